"""Data-parallel collection and eigendecomposition on the CPU with gloo: 2 real processes.

* torchrun + the CLI (tests/dist_script.py): the factors of 2 ranks (with checkpoints and 2 passes, fp64) equal a
  single-process run; then the eigendecompositions are spread over the ranks by cost and shared;
* a rank that dies or hangs makes the other fail with a clear message, at once or after the collective timeout
  (spawned processes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import N_NUMBERS, make_tiny_olmo2, random_number_texts

from dist_workers import failing_worker

from kfac_edit.cli import main
from kfac_edit.eigen import assign_by_cost, eigen_units
from kfac_edit.factors.store import Factors
from kfac_edit.testbed import number_tokenizer

SEQ, BATCH = 16, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts() -> list[str]:
    return random_number_texts(37, seed=3)  # an odd number of windows: one rank's shard is one batch longer


def _run_processes(target, world: int, tmp: Path, *args, timeout: float = 120) -> list[int | None]:
    """Start ``target(rank, world, port, tmp, *args)`` in ``world`` spawned processes; wait for rank 0, then give the
    others a few seconds and kill what is left. Returns the exit codes (negative: killed)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, str(tmp), *args)) for rank in range(world)]
    for p in procs:
        p.start()
    procs[0].join(timeout)
    for p in procs[1:]:
        p.join(1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


# ---------------------------------------------------------------------------------------------------- tests
def test_torchrun_two_ranks_equal_one_process_then_share_eigen(tmp_path):
    """The CLI under torchrun (2 ranks, 2 passes, checkpoints; fp64) gives the factors of one process to 1e-12;
    then the eigendecompositions are spread over the ranks (gate/up together) and shared bit for bit."""
    model_dir = tmp_path / "model64"
    make_tiny_olmo2(torch.float64).save_pretrained(model_dir)
    number_tokenizer(N_NUMBERS).save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    tokenizer = number_tokenizer(N_NUMBERS)
    memorized = tmp_path / "memorized.jsonl"  # windows quoting 3 of the texts: --exclude drops some on each rank
    memorized.write_text("".join(json.dumps({"prefix_ids": tokenizer(t)["input_ids"][:6], "suffix_ids":
                                             tokenizer(t)["input_ids"][6:12]}) + "\n" for t in _texts()[:3]))
    common = ["--model", str(model_dir), "--data", str(corpus), "--seq-len", str(SEQ), "--batch-size", str(BATCH),
              "--tokens", "100000", "--device", "cpu", "--dtype", "float64", "--no-progress",
              "--exclude", str(memorized)]  # fmt: skip
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("dist_script.py")), str(run_dir), "--",
           *common, "--checkpoint-every", "100", "--layers-per-pass", "1", "--dist-timeout", "60"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 ranks, 2 passes" in proc.stdout and proc.stdout.count("collected 6 modules") == 1  # rank 0 alone
    assert not (run_dir / "factors" / "checkpoint").exists()  # removed once the factors are written
    assert main(["collect", *common, "--out", str(tmp_path / "one")]) == 0
    two, one = Factors.load(run_dir / "factors"), Factors.load(tmp_path / "one")
    assert two.manifest["world_size"] == 2 and two.manifest["passes"] == 2
    assert two.manifest["tokens"] == one.manifest["tokens"] and two.names == one.names and len(one.names) == 6
    assert two.manifest["exclude"] == one.manifest["exclude"]  # window counts summed over the ranks
    assert 0 < one.manifest["exclude"]["windows_dropped"] < one.manifest["exclude"]["windows_seen"]
    for name in one.names:
        d, s = two.modules[name], one.modules[name]
        assert (d.activation_tokens, d.grad_tokens) == (s.activation_tokens, s.grad_tokens) and s.grad_tokens > 0
        # saved as fp32: compare the fp64 sums after the same rounding
        torch.testing.assert_close(d.activation_sum, s.activation_sum, rtol=2.5e-7, atol=1e-10)
        torch.testing.assert_close(d.grad_sum, s.grad_sum, rtol=2.5e-7, atol=1e-10)

    r0, r1 = (torch.load(run_dir / f"eigen{r}.pt") for r in (0, 1))
    assert r0["computed"] and r1["computed"] and not set(r0["computed"]) & set(r1["computed"])
    assert sorted(r0["computed"] + r1["computed"]) == sorted(two.names)
    for r in (r0, r1):
        assert r["stats"][0] == len(r["computed"])  # only its own were computed; the rest came from the other rank
    for name in two.names:
        for a, b in zip(r0["eigen"][name], r1["eigen"][name]):
            assert torch.equal(a, b)
        g_val, g_vec, a_val, a_vec = r0["eigen"][name]
        torch.testing.assert_close(g_vec @ torch.diag(g_val) @ g_vec.T, two.grad_cov(name).double(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            a_vec @ torch.diag(a_val) @ a_vec.T, two.activation_cov(name).double(), rtol=1e-9, atol=1e-12
        )
    for block in (0, 1):  # gate and up share A: computed on the same rank
        gate, up = f"model.layers.{block}.mlp.gate_proj", f"model.layers.{block}.mlp.up_proj"
        assert (gate in r0["computed"]) == (up in r0["computed"])


def test_assign_by_cost_balances_n_cubed():
    class Fake:
        def __init__(self, shapes):
            self._shapes = shapes
            self.modules = {  # g and u share one activation sum: one activation key
                n: type("M", (), {"activation_key": "g" if n in ("g", "u") else n})() for n in shapes
            }

        def shape(self, name):
            return self._shapes[name]

    fake = Fake({"g": (30, 10), "u": (30, 10), "d": (10, 30), "small": (2, 2)})
    units = eigen_units(fake, ["g", "u", "d", "small"])
    costs = {tuple(m): c for m, c in units}
    assert costs[("g", "u")] == 10**3 + 2 * 30**3 and costs[("d",)] == 30**3 + 10**3 and costs[("small",)] == 16
    plan = assign_by_cost(units, 2)
    assert plan == [["g", "u"], ["d", "small"]]
    assert assign_by_cost(units, 1) == [["g", "u", "d", "small"]]
    assert assign_by_cost(units, 5)[3:] == [[], []]  # more ranks than units: some idle


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_failed_rank_fails_the_other_with_a_clear_message(tmp_path, mode):
    """A dead peer is noticed at once (connection reset); a hung one after the collective timeout (5 s here)."""
    codes = _run_processes(failing_worker, 2, tmp_path, mode, timeout=90)
    assert codes[0] == 0 and codes[1] == (3 if mode == "dies" else -9)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["message"].startswith("rank 0 of 2: checkpoint all-reduce failed (")
    assert "another rank has probably died or hung (collectives time out after 5 s)" in report["message"]
    assert "--resume" in report["message"]
    assert report["seconds"] < (3 if mode == "dies" else 20)
    if mode == "hangs":
        assert report["seconds"] >= 4.5  # it waited for the timeout, and not forever


@pytest.mark.parametrize("world", ["2"])
def test_device_map_refused_with_several_ranks(tiny_model_dir, tiny_corpus_jsonl, tmp_path, monkeypatch, capsys, world):
    from kfac_edit.factors import distributed

    monkeypatch.setattr(
        distributed, "init_distributed", lambda device, timeout_s: distributed.DistContext(0, int(world), 0, "gloo")
    )
    args = ["collect", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--device-map", "auto", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "cannot be combined with 2 ranks" in capsys.readouterr().err
