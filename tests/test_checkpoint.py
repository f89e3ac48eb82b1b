"""Checkpoints and resume: a SIGKILLed `kfac-edit collect` resumes to the factors of an uninterrupted run; damaged or
mismatched checkpoints are refused with the reason."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import interrupt_collection, make_tiny_olmo2, random_number_texts

from kfac_edit.cli import main
from kfac_edit.factors.checkpoint import (
    STATE_FILE,
    CheckpointState,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kfac_edit.factors.store import MANIFEST_FILE, TENSORS_FILE, Factors


def write_corpus(path, n_docs: int, seed: int) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_number_texts(n_docs, seed=seed)))


def collect_args(model_dir, data, out, *extra) -> list[str]:
    return [
        "collect", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", "16",
        "--batch-size", "2", "--tokens", "100000", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def assert_same_factors(got: Factors, want: Factors, exact: bool) -> None:
    assert got.names == want.names and len(want.names) == 6
    for name in want.names:
        g, w = got.modules[name], want.modules[name]
        assert (g.activation_tokens, g.grad_tokens) == (w.activation_tokens, w.grad_tokens) and w.grad_tokens > 0
        for a, b in ((g.activation_sum, w.activation_sum), (g.grad_sum, w.grad_sum)):
            if exact:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 150, seed=5)
    out = tmp_path / "killed"
    args = collect_args(tiny_model_dir, corpus, out, "--checkpoint-every", "64", "--layers-per-pass", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kfac_edit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, "collect ended before its first checkpoint: " + proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / TENSORS_FILE).exists() and not (out / MANIFEST_FILE).exists()
    state = json.loads((latest_checkpoint(out) / STATE_FILE).read_text())
    assert state["pass_index"] == 0 and state["windows"] > 0 and state["passes"][0][0].startswith("model.layers.0")

    # without --resume the unfinished run is not silently replaced
    assert main(args) == 2
    assert main([*args, "--resume"]) == 0
    assert not checkpoint_root(out).exists()
    assert main(collect_args(tiny_model_dir, corpus, tmp_path / "whole")) == 0
    resumed, whole = Factors.load(out), Factors.load(tmp_path / "whole")
    assert_same_factors(resumed, whole, exact=True)  # same batches in the same order: bit for bit
    assert resumed.manifest["tokens"] == whole.manifest["tokens"] > 2000
    assert resumed.manifest["labelled_tokens"] == whole.manifest["labelled_tokens"]
    assert [r["windows"] for r in resumed.manifest["resumed"]] == [state["windows"]]
    assert resumed.manifest["passes"] == 2 and resumed.manifest["checkpoint_every"] == 64


@pytest.fixture
def interrupted(tiny_model_dir, tmp_path, monkeypatch):
    """A collection stopped (Ctrl-C) after 5 batches with checkpoints every 2: its checkpoint holds 4 batches."""
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 40, seed=1)
    out = tmp_path / "out"
    args = collect_args(tiny_model_dir, corpus, out, "--checkpoint-every", "64")
    interrupt_collection(monkeypatch, args)
    assert latest_checkpoint(out).name == "ckpt-000002"
    return args, out, corpus


def test_mismatched_checkpoint_refused_with_reason(interrupted, tiny_model_dir, tmp_path, capsys, caplog):
    args, out, corpus = interrupted
    other_model = tmp_path / "other-model"
    make_tiny_olmo2(torch.float32, seed=1).save_pretrained(other_model)
    for name in os.listdir(tiny_model_dir):
        if "token" in name:
            shutil.copy(tiny_model_dir / name, other_model / name)
    other_data = tmp_path / "other.jsonl"
    write_corpus(other_data, 40, seed=2)
    capsys.readouterr()
    cases = [
        (args, "holds a checkpoint of an unfinished collection (ckpt-000002); pass --resume"),
        ([*args, "--resume", "--seed", "1"], "--seed: 0 in the checkpoint, 1 now"),
        ([*args, "--resume", "--seq-len", "8"], "--seq-len: 16 in the checkpoint, 8 now"),
        ([*args, "--resume", "--labels", "gold"], "--labels: 'sampled' in the checkpoint, 'gold' now"),
        ([*args, "--resume", "--layers-per-pass", "1"], "--layers-per-pass: None in the checkpoint, 1 now"),
        ([*args, "--resume", "--layers", "1"], "collected modules"),
        ([*args, "--resume", "--data", str(other_data)], "--data: "),
        ([*args, "--resume", "--model", str(other_model)], "belongs to another run (model weights differ)"),
    ]
    for argv, reason in cases:
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kfac-edit:")]
        assert len(errors) == 1 and errors[0].startswith("kfac-edit: error: ") and reason in errors[0], errors
    # same content under another name is another --data too, but same options resume (batch size may change)
    caplog.set_level(logging.INFO, logger="kfac_edit")
    assert main([*args, "--resume", "--batch-size", "3"]) == 0
    assert "resuming from checkpoint 2" in caplog.text  # logged (INFO)
    resumed = Factors.load(out)
    assert main(collect_args(tiny_model_dir, corpus, tmp_path / "whole")) == 0
    assert_same_factors(resumed, Factors.load(tmp_path / "whole"), exact=False)


def test_damaged_checkpoint_refused_with_reason(interrupted, capsys):
    args, out, _ = interrupted
    ckpt = latest_checkpoint(out)
    backup = ckpt.with_name("backup")
    shutil.copytree(ckpt, backup)
    tensors = ckpt / TENSORS_FILE

    def restore():
        shutil.rmtree(ckpt)
        shutil.copytree(backup, ckpt)

    def refused(reason: str) -> None:
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {ckpt} is damaged: " in err and reason in err and "--overwrite" in err, err

    size = tensors.stat().st_size
    with open(tensors, "r+b") as fh:
        fh.truncate(size // 2)
    refused(f"{TENSORS_FILE} has {size // 2} bytes, {size} were written")
    restore()
    with open(tensors, "r+b") as fh:  # same size, broken header
        fh.write(b"\xff" * 16)
    refused(f"{TENSORS_FILE} cannot be read")
    restore()
    (ckpt / STATE_FILE).write_text('{"pass_index": 0, ')
    refused(f"{STATE_FILE} is unreadable")
    restore()
    (ckpt / STATE_FILE).unlink()
    refused(f"{STATE_FILE} is missing")
    restore()
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["run_id"] = "0" * 32
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    refused("come from different writes")
    restore()
    # a temporary directory left by a write that was killed is not a checkpoint
    shutil.rmtree(backup)
    (checkpoint_root(out) / ".ckpt-000003.abc.tmp").mkdir()
    assert latest_checkpoint(out) == ckpt
    assert main([*args, "--resume"]) == 0 and Factors.load(out).manifest["resumed"][0]["windows"] == 8


def test_checkpoint_keeps_fp64_sums_exact_and_replaces_older(tmp_path):
    gen = torch.Generator().manual_seed(0)
    def spd(n):  # a sum of outer products: symmetric PSD, as a collection makes
        m = torch.randn(n, n, dtype=torch.float64, generator=gen)
        return m @ m.T + torch.eye(n, dtype=torch.float64)

    act = spd(5)
    factors = Factors.from_means({"m.gate": (act, spd(3), 7), "m.up": (act, spd(3), 7)})
    fingerprint = {"seed": 0, "labels": "sampled"}
    for sequence in (1, 2):
        state = CheckpointState(
            pass_index=0, passes=[["m.gate", "m.up"]], windows=10 * sequence, tokens=160 * sequence,
            labelled_tokens=150 * sequence, fingerprint=fingerprint, sequence=sequence,
        )  # fmt: skip
        path = save_checkpoint(tmp_path, factors, state)
    assert [p.name for p in checkpoint_root(tmp_path).iterdir()] == ["ckpt-000002"] and path.name == "ckpt-000002"
    loaded, state = load_checkpoint(tmp_path, fingerprint)
    assert state.windows == 20 and state.tokens == 320 and state.run_id == loaded.manifest["run_id"]
    for name in ("m.gate", "m.up"):
        assert loaded.modules[name].grad_sum.dtype == torch.float64
        assert torch.equal(loaded.modules[name].grad_sum, factors.modules[name].grad_sum)
        assert torch.equal(loaded.modules[name].activation_sum, factors.modules[name].activation_sum)
    assert loaded.modules["m.gate"].activation_sum is loaded.modules["m.up"].activation_sum  # still shared
    with pytest.raises(Exception, match=r"--seed: 0 in the checkpoint, 1 now"):
        load_checkpoint(tmp_path, {"seed": 1, "labels": "sampled"})
    assert load_checkpoint(tmp_path / "nothing-here", fingerprint) is None
