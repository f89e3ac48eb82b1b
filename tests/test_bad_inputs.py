"""The bad-input battery (issue 10): every failure a user can cause ends in one clear line, and nothing good is lost.

Each case runs the CLI in-process and asserts: exit code 2, exactly one line on stderr (``kfac-edit: error: ...``,
holding the expected words), no traceback, every output that existed before byte-identical afterwards, and no
partial file (no new file beside the outputs: no temporary, no lock, no empty directory). Tiny models, factor
directories and data are shared by session-scoped fixtures; a case copies what it damages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import make_tiny_olmo2, random_number_texts
from kfac_edit.cli import main
from kfac_edit.constants import MANIFEST_FILE, TENSORS_FILE
from kfac_edit.errors import UserError
from kfac_edit.factors.store import Factors
from kfac_edit.testbed import number_tokenizer

GATE0 = "model.layers.0.mlp.gate_proj"
LAYERS = '{"0": {"gate": 0.5, "up": 0.5}}'
EVAL = ["--prefix-len", "8", "--suffix-len", "6", "--ppl-block", "16", "--ndcg-seq-len", "32", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Tiny model, corpus, memorized set, collected factors (two seeds), a BertModel directory, a reference file."""
    from kfac_edit.evaluate.memorization import greedy_generate
    from kfac_edit.factors.collect import collect_factors

    root = tmp_path_factory.mktemp("bad-inputs")
    tokenizer = number_tokenizer(60)
    model = make_tiny_olmo2(dtype=torch.float32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_number_texts(30)))
    for seed in (0, 1):
        collect_factors(str(root / "model"), str(corpus), out=root / f"factors{seed}", max_tokens=300, seq_len=32,
                        batch_size=8, device="cpu", seed=seed, progress=False)  # fmt: skip
    prompts = [[(7 * i + j) % 60 for j in range(8)] for i in range(8)]
    suffixes = greedy_generate(model, prompts, 6, batch_size=8)
    mem = root / "mem.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": p, "suffix_ids": s}) + "\n" for p, s in zip(prompts, suffixes)))
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=64))  # fmt: skip
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    wide = make_tiny_olmo2(dtype=torch.float32, vocab=80)  # 80 embedding rows, 64 tokenizer entries
    wide.save_pretrained(root / "wide")
    tokenizer.save_pretrained(root / "wide")
    return {"root": root, "model": root / "model", "corpus": corpus, "mem": mem, "factors": root / "factors0",
            "factors_other": root / "factors1", "bert": root / "bert", "wide": root / "wide"}  # fmt: skip


@dataclass
class Case:
    argv: list[str]
    expect: str  # words the one error line must hold
    outputs: list[Path] = field(default_factory=list)  # paths whose state (absent, or bytes) must not change


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}
    return "absent"


def _listing(directory: Path) -> set[str]:
    """The names in ``directory``, but the per-test cache root (conftest puts it in ``tmp_path``)."""
    return {p.name for p in directory.iterdir() if p.name != "cache"} if directory.is_dir() else set()


def check_refused(case: Case, capsys) -> str:
    """Run ``case``; assert exit 2, one stderr line with the expected words, no traceback, outputs untouched."""
    before = {p: _snapshot(p) for p in case.outputs}
    beside = {p.parent: _listing(p.parent) for p in case.outputs}
    capsys.readouterr()
    code = main([str(a) for a in case.argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("kfac-edit: error: "), err
    assert "Traceback" not in err and case.expect in lines[0], lines[0]
    for p, snap in before.items():
        assert _snapshot(p) == snap, f"{p} changed"
    for parent, names in beside.items():
        assert _listing(parent) == names, f"new files beside the outputs: {_listing(parent) - names}"
    return lines[0]


def copy_factors(env, dest: Path) -> Path:
    shutil.copytree(env["factors"], dest)
    return dest


def rewrite(directory: Path, change: Callable[[Factors], None]) -> Path:
    """Load factors, change their sums in memory, save them again (valid checksums: the content is what is bad)."""
    f = _load_unchecked(directory)
    change(f)
    f.save(directory)
    return directory


def _load_unchecked(directory: Path) -> Factors:
    from safetensors.torch import load_file

    from kfac_edit.factors.store import ModuleFactors

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = load_file(str(directory / TENSORS_FILE))
    modules = {}
    for name, e in manifest["modules"].items():
        act = tensors[f"{e['activation_key']}.activation_sum"]
        modules[name] = ModuleFactors(act, tensors[f"{name}.grad_sum"], e["activation_tokens"], e["grad_tokens"],
                                      e["activation_key"])  # fmt: skip
    return Factors(modules, manifest)


def _indefinite(n: int) -> torch.Tensor:
    """Positive diagonal and trace, yet far from PSD: eigenvalues 1 + (n-1)·3 and 1 - 3 (n-1 times)."""
    return torch.eye(n) + 3.0 * (torch.ones(n, n) - torch.eye(n))


def _edit_module(name: str, how: str):
    def change(f: Factors) -> None:
        mf = f.modules[name]
        if how == "zero":
            mf.activation_sum.zero_()
            mf.grad_sum.zero_()
        elif how == "negated_g":
            mf.grad_sum.neg_()
        elif how == "nan":
            mf.grad_sum[0, 0] = float("nan")
        elif how == "asymmetric":
            mf.activation_sum[0, 1] += 10 * float(mf.activation_sum.abs().max())
        elif how == "indefinite":
            mf.grad_sum.copy_(_indefinite(mf.grad_sum.shape[0]))
        elif how == "no_tokens":
            mf.grad_tokens = 0

    return change


def _damage_file(directory: Path, how: str) -> None:
    tensors, manifest = directory / TENSORS_FILE, directory / MANIFEST_FILE
    data = tensors.read_bytes()
    if how == "truncated":
        tensors.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        tensors.write_bytes(b"")
    elif how == "random_bytes":
        tensors.write_bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes())  # fmt: skip
    elif how == "broken_header":
        tensors.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "manifest_list":
        manifest.write_text(json.dumps([1, 2, 3]))
    elif how == "manifest_not_json":
        manifest.write_bytes(b"\xff\xfe{")
    elif how == "missing_tensor":
        m = json.loads(manifest.read_text())
        m["modules"][GATE0]["activation_key"] = "model.nowhere"
        manifest.write_text(json.dumps(m))
    elif how == "flipped_byte":  # a byte inside GATE0's G (the header is intact): only the checksum sees it
        header_len = int.from_bytes(data[:8], "little")
        start, end = json.loads(data[8 : 8 + header_len])[f"{GATE0}.grad_sum"]["data_offsets"]
        flipped = bytearray(data)
        flipped[8 + header_len + (start + end) // 2] ^= 0x01  # a low mantissa bit: still finite, still plausible
        tensors.write_bytes(bytes(flipped))
    else:  # pragma: no cover
        raise ValueError(how)


CONTENT = {"zero": "not positive semi-definite", "negated_g": "not positive semi-definite", "nan": "not finite",
           "asymmetric": "not symmetric", "no_tokens": "from no tokens"}  # fmt: skip
DAMAGE = ["truncated", "empty", "random_bytes", "broken_header", "manifest_list", "manifest_not_json",
          "missing_tensor", "flipped_byte"]  # fmt: skip


def _factor_command(env, tmp: Path, command: str, factors: Path) -> Case:
    if command == "edit":
        out = tmp / "edited"
        return Case(["edit", "--model", env["model"], "--factors", factors, "--layers-json", LAYERS, "--out", out,
                     "--device", "cpu"], "", [out, factors])  # fmt: skip
    if command == "run":
        out = tmp / "run"
        return Case(["run", "--model", env["model"], "--factors", factors, "--layers-json", LAYERS, "--out", out,
                     "--memorized", env["mem"], "--perplexity-data", env["corpus"], *EVAL], "", [out, factors])
    out = tmp / "sweep"
    return Case(["sweep", "--model", env["model"], "--factors", factors, "--blocks", "0", "--max-combo", "1",
                 "--keep-mass", "0.5", "--holdout-fraction", "0", "--memorized", env["mem"], "--perplexity-data",
                 env["corpus"], *EVAL, "--out", out], "", [out, factors])  # fmt: skip


# ------------------------------------------------------------------------------------- silent damage: bad factors
@pytest.mark.parametrize("how", sorted(CONTENT))
@pytest.mark.parametrize("command", ["edit", "run", "sweep"])
def test_implausible_factors_are_refused(env, tmp_path, capsys, command, how):
    """All-zero or negated factors used to exit 0 and save an all-zero model; now: refused on load, nothing written."""
    factors = rewrite(copy_factors(env, tmp_path / "factors"), _edit_module(GATE0, how))
    case = _factor_command(env, tmp_path, command, factors)
    case.expect = f"factors in {factors} for {GATE0} are {CONTENT[how]}"
    line = check_refused(case, capsys)
    assert line.endswith("recollect them")


@pytest.mark.parametrize("command", ["edit", "sweep"])
def test_indefinite_factor_with_positive_diagonal_is_refused_before_any_evaluation(env, tmp_path, capsys, command):
    factors = rewrite(copy_factors(env, tmp_path / "factors"), _edit_module(GATE0, "indefinite"))
    case = _factor_command(env, tmp_path, command, factors)
    case.expect = "not positive semi-definite"
    check_refused(case, capsys)


DAMAGE_CASES = [("edit", how) for how in DAMAGE] + [  # run and sweep share edit's loader: a few kinds each
    (command, how) for command in ("run", "sweep") for how in ("truncated", "flipped_byte", "manifest_list")]


@pytest.mark.parametrize("command, how", DAMAGE_CASES)
def test_damaged_factor_files_are_one_line(env, tmp_path, capsys, command, how):
    factors = copy_factors(env, tmp_path / "factors")
    _damage_file(factors, how)
    case = _factor_command(env, tmp_path, command, factors)
    case.expect = f"factors in {factors} are damaged ("
    line = check_refused(case, capsys)
    assert line.endswith("recollect them")
    if how == "flipped_byte":
        assert "checksum" in line


def test_factors_without_checksums_still_load(env, tmp_path):
    """Directories written before checksums existed load (unchecked); a saved one holds a checksum per tensor."""
    factors = copy_factors(env, tmp_path / "factors")
    manifest = json.loads((factors / MANIFEST_FILE).read_text())
    assert len(manifest["checksums"]) == 6 + 4  # 6 grad sums, 4 activation sums (gate/up share one per block)
    del manifest["checksums"]
    (factors / MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded = Factors.load(factors)
    assert len(loaded) == 6 and loaded.tokens(GATE0) > 0


def test_import_factors_checks_what_load_checks(env, tmp_path, capsys):
    def reference(**change):
        A = torch.eye(16) * 2
        entry = {"A": A, "G": torch.eye(24), "n_tokens": 100}
        out = {"blk0.gate": dict(entry), "blk0.up": dict(entry), "blk0.down": {"A": torch.eye(24), "G": torch.eye(16),
                                                                              "n_tokens": 100}}  # fmt: skip
        out["blk0.gate"].update(change)
        return out

    asym = torch.eye(16)
    asym[0, 5] = 3.0
    cases = [({"A": asym}, "not symmetric"), ({"n_tokens": 2.5}, "not a whole number"),
             ({"n_tokens": "abc"}, "not a whole number"), ({"G": -torch.eye(24)}, "not positive semi-definite")]
    out = tmp_path / "imported"
    for change, expect in cases:
        torch.save(reference(**change), tmp_path / "old.pt")
        check_refused(Case(["import-factors", tmp_path / "old.pt", "--out", out], expect, [out]), capsys)
    torch.save({"blk5.gate": reference()["blk0.gate"]}, tmp_path / "far.pt")
    line = check_refused(Case(["import-factors", tmp_path / "far.pt", "--out", out, "--model", env["model"]],
                              "block 5", [out]), capsys)  # fmt: skip
    assert "--layers" not in line and "right --model" in line


# --------------------------------------------------------------------------------- silent damage: sweep, miner, lock
def test_sweep_does_not_resume_from_other_factors(env, tmp_path, capsys):
    case = _factor_command(env, tmp_path, "sweep", env["factors"])
    assert main([str(a) for a in case.argv]) == 0
    other = [str(env["factors_other"]) if str(a) == str(env["factors"]) else str(a) for a in case.argv]
    out = tmp_path / "sweep"
    check_refused(Case(other, "--factors content differ", [out]), capsys)


def test_failed_sweep_leaves_nothing_that_blocks_its_retry(env, tmp_path, capsys):
    case = _factor_command(env, tmp_path, "sweep", env["factors"])
    bad = [*case.argv, "--ppl-block", "100000"]  # argparse: the last one wins
    check_refused(Case(bad, "--ppl-block 100000 exceeds the model's context of 64", case.outputs), capsys)
    out = tmp_path / "sweep"
    out.mkdir()  # a sweep that died after writing its settings, before its first result (an older kfac-edit)
    (out / "sweep.json").write_text(json.dumps({"identity": {"model": "another"}}))
    assert main([str(a) for a in case.argv]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # base + one point


def test_find_memorized_keeps_an_existing_output(env, tmp_path, capsys):
    out = tmp_path / "found.jsonl"
    out.write_text('{"prefix_ids": [1], "suffix_ids": [2]}\n' * 3)
    argv = ["find-memorized", "--model", env["model"], "--data", env["corpus"], "--out", out, "--prefix-len", "4",
            "--suffix-len", "2", "--device", "cpu"]  # fmt: skip
    check_refused(Case(argv, "pass --overwrite", [out]), capsys)
    assert main([str(a) for a in argv] + ["--overwrite"]) == 0 and out.read_text() != '{"prefix_ids": [1]}\n' * 3


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_writer_is_refused_with_the_holders_pid(env, tmp_path, capsys, live_pid):
    out = tmp_path / "factors"
    lock = tmp_path / ".factors.kfac-edit.lock"
    lock.write_text(json.dumps({"pid": live_pid, "host": os.uname().nodename}))
    argv = ["collect", "--model", env["model"], "--data", env["corpus"], "--out", out, "--tokens", "100", "--seq-len",
            "32", "--batch-size", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    case = Case(argv, f"being written by another kfac-edit (pid {live_pid})", [out])
    before = lock.read_bytes()
    line = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert line == 2 and len(err) == 1 and case.expect in err[0] and not out.exists() and lock.read_bytes() == before
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))  # its writer is gone: stale
    assert main([str(a) for a in argv]) == 0 and (out / MANIFEST_FILE).exists() and not lock.exists()
    printed = capsys.readouterr().out  # --tokens 100 with 4 windows of 32 per batch: a whole batch is read
    assert "--tokens 100 was rounded up to whole batches (--batch-size 4 windows of --seq-len 32)" in printed


def test_output_lock_nests_in_one_process_and_refuses_another(tmp_path, live_pid):
    from kfac_edit.fileio import output_lock

    target = tmp_path / "out"
    with output_lock(target):
        with output_lock(target):
            pass
        assert (tmp_path / ".out.kfac-edit.lock").exists()  # the outer hold still holds
    assert not (tmp_path / ".out.kfac-edit.lock").exists()
    (tmp_path / ".out.kfac-edit.lock").write_text(json.dumps({"pid": live_pid, "host": os.uname().nodename}))
    with pytest.raises(UserError, match=f"pid {live_pid}"):
        with output_lock(target):
            pass


# ---------------------------------------------------------------------------------------------- output locations
def _output_cases(env, tmp: Path) -> dict[str, Case]:
    a_file = tmp / "a-file"
    a_file.write_text("keep me\n")
    a_dir = tmp / "a-dir"
    a_dir.mkdir()
    (a_dir / "x.txt").write_text("keep\n")
    collect = ["collect", "--model", env["model"], "--data", env["corpus"], "--tokens", "100", "--seq-len", "32",
               "--device", "cpu", "--no-progress"]  # fmt: skip
    run = ["run", "--model", env["model"], "--factors", env["factors"], "--layers-json", LAYERS, "--memorized",
           env["mem"], *EVAL]  # fmt: skip
    return {
        "collect --out under a file": Case([*collect, "--out", a_file / "f"], "which is a file", [a_file]),
        "collect --out is a file": Case([*collect, "--out", a_file], "is a file", [a_file]),
        "demo --out under a file": Case(["demo", "--quick", "--out", a_file / "d"], "which is a file", [a_file]),
        "eval --out is a directory": Case(["eval", "--model", env["model"], "--memorized", env["mem"], *EVAL, "--out",
                                           a_dir], "is a directory", [a_dir]),  # fmt: skip
        "run --results is a directory": Case([*run, "--out", tmp / "run", "--results", a_dir], "--results", [a_dir]),
        "run --out is a file": Case([*run, "--out", a_file], "is a file", [a_file]),
        "find-memorized --out is a directory": Case(["find-memorized", "--model", env["model"], "--data",
                                                     env["corpus"], "--out", a_dir], "is a directory", [a_dir]),
        "sweep --out under a file": Case(["sweep", "--model", env["model"], "--factors", env["factors"], "--memorized",
                                          env["mem"], "--perplexity-data", env["corpus"], "--out", a_file / "s"],
                                         "which is a file", [a_file]),  # fmt: skip
        "edit --out under a file": Case(["edit", "--model", env["model"], "--factors", env["factors"], "--layers-json",
                                         LAYERS, "--out", a_file / "e"], "which is a file", [a_file]),
        "import-factors --out under a file": Case(["import-factors", a_file, "--out", a_file / "i"], "which is a file",
                                                  [a_file]),
    }


OUTPUT_CASES = ["collect --out under a file", "collect --out is a file", "demo --out under a file",
                "eval --out is a directory", "run --results is a directory", "run --out is a file",
                "find-memorized --out is a directory", "sweep --out under a file", "edit --out under a file",
                "import-factors --out under a file"]  # fmt: skip


@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_output_locations_are_checked_before_any_work(env, tmp_path, capsys, name):
    check_refused(_output_cases(env, tmp_path)[name], capsys)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only); yields its mount point, unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (disk-full cases)")
    point = tmp_path / "small"
    point.mkdir()
    mounted = []

    def mount(options: str = "size=1m") -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for p in mounted:
        subprocess.run(["umount", str(p)], check=False)


def test_read_only_output_is_refused_up_front(env, tmp_path, capsys, small_tmpfs):
    point = small_tmpfs("size=1m,ro")
    argv = ["collect", "--model", env["model"], "--data", env["corpus"], "--out", point / "f", "--tokens", "100",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    check_refused(Case(argv, "read-only", [point / "f"]), capsys)


def test_full_disk_is_refused_up_front_and_during_a_save(env, tmp_path, capsys, small_tmpfs):
    point = small_tmpfs()
    old = copy_factors(env, point / "factors")
    filler = point / "filler"
    with open(filler, "wb") as fh:  # fill the disk but for ~8 KiB: less than the factors need (~18 KiB)
        free = shutil.disk_usage(point).free
        fh.write(b"\0" * max(0, free - 8192))
    argv = ["collect", "--model", env["model"], "--data", env["corpus"], "--out", old, "--tokens", "100",
            "--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--no-progress", "--overwrite"]  # fmt: skip
    line = check_refused(Case(argv, "no space left", [old]), capsys)
    assert str(old) in line
    fresh = point / "fresh"  # a new --out on that disk: no empty directory stays behind
    check_refused(Case([*argv[:6], fresh, *argv[7:]], "no space left", [fresh, old]), capsys)
    try:  # now fill it up
        with open(filler, "ab", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError:
        pass
    assert shutil.disk_usage(point).free == 0
    new = point / "new"
    check_refused(Case([*argv[:6], new, *argv[7:]], "no space left", [new, old]), capsys)


def test_full_disk_during_an_edit_save_keeps_the_earlier_edit(env, tmp_path, capsys, small_tmpfs):
    point = small_tmpfs("size=2m")
    out = point / "edited"
    argv = ["edit", "--model", env["model"], "--factors", env["factors"], "--layers-json", LAYERS, "--out", out,
            "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    try:  # fill the disk but for a few KiB: less than a model needs
        with open(point / "filler", "wb", buffering=0) as fh:
            fh.write(b"\0" * max(0, shutil.disk_usage(point).free - 16384))
    except OSError:
        pass
    check_refused(Case(argv, "no space left", [out]), capsys)


def test_append_that_fails_leaves_no_torn_line(tmp_path, small_tmpfs):
    from kfac_edit.fileio import append_jsonl, read_jsonl

    point = small_tmpfs("size=64k")
    target = point / "results.jsonl"
    append_jsonl(target, {"a": 1})
    before = target.read_bytes()
    with pytest.raises(UserError, match="no space left"):
        append_jsonl(target, {"big": "x" * (1 << 17)})
    assert target.read_bytes() == before and read_jsonl(target) == [{"a": 1}]


# ------------------------------------------------------------------------------------------- inputs of every kind
def _input_cases(env, tmp: Path) -> dict[str, Case]:
    binary = tmp / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    big_id = tmp / "big-id.jsonl"
    big_id.write_text(json.dumps({"prefix_ids": [1, 2, 3, 4, 5, 6, 7, 100], "suffix_ids": [1, 2, 3, 4, 5, 6]}) + "\n")
    out = tmp / "out"
    evaluate = ["eval", "--model", env["model"], "--memorized", env["mem"], *EVAL, "--out", out / "r.jsonl"]
    collect = ["collect", "--model", env["model"], "--data", env["corpus"], "--out", out, "--tokens", "100",
               "--seq-len", "32", "--device", "cpu", "--no-progress"]  # fmt: skip
    edit = ["edit", "--model", env["model"], "--factors", env["factors"], "--out", out, "--device", "cpu"]
    bert = env["bert"]
    broken = tmp / "broken-sweep"
    broken.mkdir()
    (broken / "results.jsonl").write_text('{"kind": "base"}\n{"kind": \n{"kind": "point"}\n')
    reference = tmp / "old.pt"
    torch.save({"blk0.gate": {"A": torch.eye(16), "G": torch.eye(24), "n_tokens": 10}}, reference)
    return {
        "eval binary --memorized": Case(["eval", "--model", env["model"], "--memorized", binary, *EVAL], "not UTF-8"),
        "run binary --memorized": Case(["run", "--model", env["model"], "--factors", env["factors"], "--layers-json",
                                        LAYERS, "--memorized", binary, *EVAL, "--out", out], "not UTF-8", [out]),
        "edit binary --layers-file": Case([*edit, "--layers-file", binary], "not UTF-8", [out]),
        "eval BertModel --model": Case(["eval", "--model", bert, "--memorized", env["mem"], *EVAL],
                                       "is not a causal language model (BertModel)"),
        "eval BertModel --reference-model": Case([*evaluate[:3], "--ndcg-data", env["corpus"], "--reference-model",
                                                  bert, *EVAL], "--reference-model", [out]),  # fmt: skip
        "find-memorized BertModel": Case(["find-memorized", "--model", bert, "--data", env["corpus"], "--out",
                                          out / "m.jsonl", "--device", "cpu"], "not a causal language model", [out]),
        "collect BertModel": Case(["collect", "--model", bert, *collect[3:]], "not a causal language model", [out]),
        "edit BertModel": Case(["edit", "--model", bert, "--factors", env["factors"], "--out", out, "--layers-json",
                                LAYERS], "not a causal language model", [out]),  # fmt: skip
        "import-factors BertModel": Case(["import-factors", reference, "--out", out, "--model", bert],
                                         "not a causal language model", [out]),
        "eval --ppl-block past the context": Case([*evaluate[:5], "--perplexity-data", env["corpus"], *EVAL,
                                                   "--ppl-block", "100000"], "--ppl-block 100000 exceeds", [out]),
        "eval --ndcg-seq-len past the context": Case([*evaluate[:3], "--ndcg-data", env["corpus"], "--reference-model",
                                                      env["model"], *EVAL, "--ndcg-seq-len", "65"],
                                                     "--ndcg-seq-len 65 exceeds the model's context of 64", [out]),
        "eval token id past the embedding rows": Case(["eval", "--model", env["wide"], "--memorized", big_id, *EVAL],
                                                      "token id 100", [out]),  # fmt: skip
        "collect --layers backwards": Case([*collect, "--layers", "1-0"], "names no block", [out]),
        "collect --modules not a linear layer": Case([*collect, "--modules", "up=mlp"], "not a linear layer", [out]),
        "collect --modules not KIND=PATH": Case([*collect, "--modules", "mlp"], "is not KIND=PATH", [out]),
        # handled before issue 10: they stay handled
        "edit missing --factors": Case([*edit[:3], "--factors", tmp / "nothing", *edit[5:], "--layers-json", LAYERS],
                                       "is not a directory", [out]),  # fmt: skip
        "edit layers JSON keep_mass > 1": Case([*edit, "--layers-json", '{"0": {"gate": 1.5}}'], "[0, 1]", [out]),
        "edit block the model lacks": Case([*edit, "--layers-json", '{"9": {"gate": 0.5}}'], "block 9", [out]),
        "collect missing --data": Case([*collect[:4], tmp / "nothing.jsonl", *collect[5:]], "nothing.jsonl", [out]),
        "eval missing --memorized": Case([*evaluate[:4], tmp / "nothing.jsonl", *evaluate[5:]], "does not exist", [out]),
        "eval missing --model": Case(["eval", "--model", tmp / "no-model", "--memorized", env["mem"], *EVAL],
                                     "no-model"),
        "report missing dir": Case(["report", tmp / "no-sweep"], "no-sweep"),
        "report DIR is a file": Case(["report", binary], "is a file", [binary]),
        "report malformed results line": Case(["report", broken], "line 2", [broken]),
    }


INPUT_CASES = ["eval binary --memorized", "run binary --memorized", "edit binary --layers-file",
               "eval BertModel --model", "eval BertModel --reference-model", "find-memorized BertModel",
               "collect BertModel", "edit BertModel", "import-factors BertModel", "eval --ppl-block past the context",
               "eval --ndcg-seq-len past the context", "eval token id past the embedding rows",
               "collect --layers backwards", "collect --modules not a linear layer", "collect --modules not KIND=PATH",
               "edit missing --factors", "edit layers JSON keep_mass > 1", "edit block the model lacks",
               "collect missing --data", "eval missing --memorized", "eval missing --model", "report missing dir",
               "report DIR is a file", "report malformed results line"]  # fmt: skip


@pytest.mark.parametrize("name", INPUT_CASES)
def test_bad_inputs_are_one_line(env, tmp_path, capsys, name):
    check_refused(_input_cases(env, tmp_path)[name], capsys)


def test_token_ids_are_checked_against_embedding_rows_not_the_tokenizer(env, tmp_path, capsys):
    """The wide model has 80 embedding rows and a 64-entry tokenizer: id 70 is a valid input, 100 is not."""
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prefix_ids": [1, 2, 3, 4, 5, 6, 7, 70], "suffix_ids": [1, 2, 3, 4, 5, 6]}) + "\n")
    assert main(["eval", "--model", str(env["wide"]), "--memorized", str(ok), *EVAL]) == 0
    assert "outside" not in capsys.readouterr().err


def test_run_with_bad_factors_leaves_no_stale_baseline(env, tmp_path, capsys):
    """The base evaluation of a run whose factors cannot edit is neither run nor written (before: evals.jsonl kept
    a baseline of a run that never finished)."""
    factors = rewrite(copy_factors(env, tmp_path / "factors"), _edit_module("model.layers.0.mlp.up_proj",
                                                                            "indefinite"))  # fmt: skip
    case = _factor_command(env, tmp_path, "run", factors)
    case.expect = "not positive semi-definite"
    check_refused(case, capsys)
    assert not (tmp_path / "run").exists()


def test_resume_with_other_layers_names_the_modules(env, tmp_path, capsys):
    from kfac_edit.factors.checkpoint import fingerprint_differences

    saved = {"weights_digest": "a", "modules": ["x", "y"], "seed": 0}
    now = {"weights_digest": "b", "modules": ["x"], "seed": 0}
    (diff,) = fingerprint_differences(saved, now)
    assert diff.startswith("collected modules (--layers") and "weights" not in diff


# ------------------------------------------------------------------------- outputs that are inputs, values, devices
def _copied(env, tmp: Path, key: str) -> Path:
    """A private copy of ``env[key]`` (file or directory): a case that would damage an input damages only this."""
    dest = tmp / f"copy-{env[key].name}"
    (shutil.copytree if env[key].is_dir() else shutil.copy)(env[key], dest)
    return dest


def _audit_cases(env, tmp: Path) -> dict[str, Callable[[], Case]]:
    """Each case made when called: only the one a test runs copies what it damages."""
    out = tmp / "out"
    empty, not_pt, a_dir = tmp / "empty.jsonl", tmp / "text.pt", tmp / "a-dir"
    empty.write_text("")
    not_pt.write_text('{"blk0.gate": 1}')
    a_dir.mkdir()
    collect = ["collect", "--data", env["corpus"], "--tokens", "100", "--seq-len", "32", "--device", "cpu"]
    edit = ["edit", "--model", env["model"], "--factors", env["factors"], "--out", out, "--device", "cpu"]
    evaluate = ["eval", "--model", env["model"], *EVAL]
    run = ["run", "--model", env["model"], "--factors", env["factors"], "--layers-json", LAYERS, *EVAL]
    sweep = ["sweep", "--model", env["model"], "--factors", env["factors"], "--perplexity-data", env["corpus"], *EVAL,
             "--blocks", "0", "--max-combo", "1", "--keep-mass", "0.5", "--holdout-fraction", "0"]  # fmt: skip
    predict = ["predict", "--model", env["model"], "--factors", env["factors"], "--layers-json", LAYERS, "--device",
               "cpu"]  # fmt: skip
    cases: dict[str, Callable[[], Case]] = {
        # an output that is also an input: before, appended to, replaced or filled with the command's files
        "eval --out is the --memorized file": lambda: Case(
            [*evaluate, "--memorized", (mem := _copied(env, tmp, "mem")), "--out", mem], "also the --memorized input",
            [mem]),
        "run --results is the --memorized file": lambda: Case(
            [*run, "--memorized", (mem := _copied(env, tmp, "mem")), "--out", out, "--results", mem],
            "--results", [mem, out]),
        "run --out is the --model directory": lambda: Case(
            [*run, "--memorized", env["mem"], "--model", (model := _copied(env, tmp, "model")), "--out", model],
            "also the --model input", [model]),
        "sweep --out is the --factors directory": lambda: Case(
            [*sweep, "--memorized", env["mem"], "--factors", (factors := _copied(env, tmp, "factors")), "--out",
             factors], "also the --factors input", [factors]),
        "find-memorized --out is the --data file, with --overwrite": lambda: Case(
            ["find-memorized", "--model", env["model"], "--data", (corpus := _copied(env, tmp, "corpus")), "--out",
             corpus, "--overwrite", "--device", "cpu"], "also the --data input", [corpus]),
        "predict --out is the --data file": lambda: Case(
            [*predict, "--data", (mem := _copied(env, tmp, "mem")), "--out", mem, "--overwrite"], "also the --data input",
            [mem]),
        "collect --out is the --model directory": lambda: Case(
            [*collect, "--model", (model := _copied(env, tmp, "model")), "--out", model], "also the --model input",
            [model]),
        "eval --out is a factor manifest (appended to: not JSONL)": lambda: Case(
            [*evaluate, "--memorized", env["mem"], "--out", (manifest := _copied(env, tmp, "factors") / MANIFEST_FILE)],
            "exists and is not JSONL", [manifest]),
        "run --results is a binary file": lambda: Case(
            [*run, "--memorized", env["mem"], "--out", out, "--results", _write(tmp / "r.bin", "\x00\x01")],
            "--results", [tmp / "r.bin", out]),
        # checked before the work, not after it (before: a traceback once the prediction was done)
        "predict --out is a directory": lambda: Case([*predict, "--data", env["mem"], "--out", a_dir],
                                                     "is a directory", [a_dir]),
        "predict --out exists, no --overwrite": lambda: Case(  # before: replaced silently
            [*predict, "--data", env["mem"], "--out", _write(tmp / "p.json", "{}")], "pass --overwrite",
            [tmp / "p.json"]),
        "sweep --capability missing": lambda: Case([*sweep, "--memorized", env["mem"], "--out", out, "--capability",
                                                    tmp / "nothing.jsonl"], "does not exist", [out]),
        # values
        "collect --dist-timeout nan": lambda: Case([*collect, "--model", env["model"], "--out", out, "--dist-timeout",
                                                    "nan"], "--dist-timeout must be a positive number", [out]),
        "collect --memory-budget 1e400GB": lambda: Case([*collect, "--model", env["model"], "--out", out,
                                                         "--memory-budget", "1e400GB"], "cannot read the size", [out]),
        "eval --ndcg-k past the vocabulary": lambda: Case(
            [*evaluate, "--ndcg-data", env["corpus"], "--reference-model", env["model"], "--ndcg-k", "100000"],
            "--ndcg-k 100000 exceeds the model's vocabulary of 64 tokens"),
        "eval --lm-eval-limit inf": lambda: Case([*evaluate, "--lm-eval-tasks", "x", "--lm-eval-limit", "inf"],
                                                 "--lm-eval-limit inf must be a positive number"),
        "report --ppl-budget inf": lambda: Case(["report", a_dir, "--ppl-budget", "inf"], "--ppl-budget must be a "
                                                "positive number", [a_dir]),
        "edit layers file with a non-integer seed": lambda: Case(
            [*edit, "--layers-file", _write(tmp / "l.json", '{"method": "random", "seed": "x", "layers": '
                                                             '{"0": {"gate": 0.5}}}')],
            "seed must be an integer", [out]),
        "edit layers JSON with a block twice": lambda: Case(
            [*edit, "--layers-json", '{"0": {"gate": 0.5}, "0": {"up": 0.5}}'], "gives '0' twice", [out]),
        "edit layers JSON with a block twice, spelt apart": lambda: Case(
            [*edit, "--layers-json", '{"0": {"gate": 0.5}, "00": {"up": 0.5}}'], "gives block 0 twice", [out]),
        "collect --modules with a kind twice": lambda: Case(  # before: up_proj collected as gate_proj, silently
            [*collect, "--model", env["model"], "--out", out, "--modules", "up=mlp.up_proj,up=mlp.gate_proj"],
            "names kind 'up' twice", [out]),
        "collect --modules with a path twice": lambda: Case(
            [*collect, "--model", env["model"], "--out", out, "--modules", "gate=mlp.up_proj,up=mlp.up_proj"],
            "names path 'mlp.up_proj' twice", [out]),
        "sweep --capability is the --memorized file": lambda: Case(
            [*sweep, "--memorized", env["mem"], "--capability", env["mem"], "--out", out], "also a --memorized set",
            [out]),
        # devices, caches, files of the wrong kind
        "collect --device bogus": lambda: Case([*collect, "--model", env["model"], "--out", out, "--device", "bogus"],
                                               "unknown --device 'bogus'", [out]),
        "edit --device meta": lambda: Case([*edit, "--layers-json", LAYERS, "--device", "meta"],
                                           "unknown --device 'meta'", [out]),
        "edit --cache-dir is a file": lambda: Case([*edit, "--layers-json", LAYERS, "--cache-dir", env["corpus"]],
                                                   "--cache-dir", [out]),
        "eval --model is a factor directory": lambda: Case([*evaluate, "--memorized", env["mem"], "--model",
                                                            env["factors"]], "is a factor directory", []),
        "eval --memorized is a directory": lambda: Case([*evaluate, "--memorized", a_dir], "is a directory", [a_dir]),
        "import-factors OLD.pt is a factor directory": lambda: Case(["import-factors", env["factors"], "--out", out],
                                                                    "is a directory", [out]),
        "demo --cache-dir is a file": lambda: Case(["demo", "--quick", "--out", out, "--cache-dir", env["corpus"]],
                                                   "--cache-dir", [out]),
        "edit model with truncated weights": lambda: Case(
            [*edit[:2], _truncated_weights(_copied(env, tmp, "model")), *edit[3:], "--layers-json", LAYERS],
            "a weights file is damaged", [out]),
        "collect empty --data file": lambda: Case([*collect[:1], "--data", empty, *collect[3:], "--model",
                                                   env["model"], "--out", out], f"'{empty}' holds no documents", [out]),
        "eval empty --perplexity-data file": lambda: Case([*evaluate, "--perplexity-data", empty],
                                                          f"'{empty}' holds no documents"),
        "eval --perplexity-data .pt that is no torch file": lambda: Case(
            [*evaluate, "--perplexity-data", not_pt], "it is not a file torch.save wrote"),
        "import-factors a text file": lambda: Case(["import-factors", not_pt, "--out", out],
                                                   "it is not a file torch.save wrote", [out]),
        "report empty results.jsonl": lambda: Case(["report", _write(a_dir / "results.jsonl", "").parent],
                                                   "holds no results", [a_dir]),
        "report plots is a file": lambda: Case(["report", _write(a_dir / "plots", "not a directory").parent],
                                               "plots is a file", [a_dir]),
    }
    return cases


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated_weights(model_dir: Path) -> Path:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return model_dir


AUDIT_CASES = ["eval --out is the --memorized file", "run --results is the --memorized file",
               "run --out is the --model directory", "sweep --out is the --factors directory",
               "find-memorized --out is the --data file, with --overwrite", "predict --out is the --data file",
               "collect --out is the --model directory", "eval --out is a factor manifest (appended to: not JSONL)",
               "run --results is a binary file", "predict --out is a directory", "predict --out exists, no --overwrite",
               "sweep --capability missing",
               "collect --dist-timeout nan", "collect --memory-budget 1e400GB", "eval --ndcg-k past the vocabulary",
               "eval --lm-eval-limit inf", "report --ppl-budget inf", "edit layers file with a non-integer seed",
               "edit layers JSON with a block twice", "edit layers JSON with a block twice, spelt apart",
               "collect --modules with a kind twice", "collect --modules with a path twice",
               "sweep --capability is the --memorized file",
               "collect --device bogus", "edit --device meta", "edit --cache-dir is a file",
               "eval --model is a factor directory", "eval --memorized is a directory",
               "import-factors OLD.pt is a factor directory", "demo --cache-dir is a file",
               "edit model with truncated weights", "collect empty --data file",
               "eval empty --perplexity-data file", "eval --perplexity-data .pt that is no torch file",
               "import-factors a text file", "report empty results.jsonl", "report plots is a file"]  # fmt: skip


@pytest.mark.parametrize("name", AUDIT_CASES)
def test_bad_inputs_after_the_cli_refactor_are_one_line(env, tmp_path, capsys, name):
    """Found by the bad-input audit of the generated CLI: each was a traceback, exit 0 with damage (an input
    appended to or filled with outputs), a partial output, or a paragraph."""
    check_refused(_audit_cases(env, tmp_path)[name](), capsys)


@pytest.mark.parametrize("argv, expect", [
    (["collect", "--model", "m", "--data", "d", "--out", "o", "--tokens", "abc"], "argument --tokens: invalid int"),
    (["sweep", "--model", "m", "--memorized"], "argument --memorized: expected at least one argument"),
    (["edit", "--model", "m", "--out", "o", "--layers-json", "{}", "--layers-file", "f"], "not allowed with"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])  # fmt: skip
def test_usage_mistakes_are_one_line_too(capsys, argv, expect):
    """argparse's own errors: one line naming the command's --help, not the whole usage text (28 lines for sweep)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert expect in lines[0] and lines[0].endswith(" --help") and lines[0].startswith("kfac-edit: error: ")


def test_lm_eval_without_the_hub_is_one_line(env, tmp_path, capsys, monkeypatch):
    """A task whose dataset is on an unreachable hub: datasets' ConnectionError was a traceback."""
    from types import SimpleNamespace

    from kfac_edit import lm_eval_tasks

    def offline(**_):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    fake = SimpleNamespace(simple_evaluate=offline, tasks=SimpleNamespace(TaskManager=None))
    monkeypatch.setattr(lm_eval_tasks, "_import_lm_eval", lambda: fake)
    monkeypatch.setattr(lm_eval_tasks, "_task_manager", lambda *a: None)
    out = tmp_path / "r.jsonl"
    argv = ["eval", "--model", env["model"], "--lm-eval-tasks", "hellaswag", "--device", "cpu", "--out", out]
    line = check_refused(Case(argv, "lm-eval cannot fetch the data of hellaswag", [out]), capsys)
    assert "Rowan/hellaswag" in line


def test_a_point_given_twice_is_swept_once():
    """--group 0-1 twice, or gate,up and up,gate: the same point; it used to be evaluated and logged twice."""
    from kfac_edit.sweep import SweepConfig, sweep_points

    config = SweepConfig(groups=[(0, 1), (1, 0)], projection_sets=[("gate", "up"), ("up", "gate")],
                         keep_masses=[0.5, 0.7])  # fmt: skip
    points = sweep_points(config, [0, 1])
    assert [p.id for p in points] == ["kfac|b0-1|gate,up|k0.5", "kfac|b0-1|gate,up|k0.7"]


# ------------------------------------------------------------------------------------------------- property tests
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def small_factor_file(tmp_path_factory):
    """Factors made as a collection makes them (sums of outer products of random rows), saved once."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(20, 5, generator=gen), torch.randn(20, 3, generator=gen)
    factors = Factors.from_means({"m.gate": (x.T @ x / 20, g.T @ g / 20, 20), "m.down": (g.T @ g / 20, x.T @ x / 20, 20)})
    factors.check_sane()
    directory = factors.save(tmp_path_factory.mktemp("small") / "factors")
    return directory, (directory / TENSORS_FILE).read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_every_flipped_byte_of_a_factor_file_is_one_line(small_factor_file, tmp_path, position, mask):
    """Any single changed byte of factors.safetensors (header, names, offsets, data) fails the load with a
    one-line :class:`UserError` (damaged, other run, or implausible), never another exception; or, when the byte is
    one no load reads (the header's copy of the manifest), the factors load bit-identical to the saved ones."""
    directory, data = small_factor_file
    case = tmp_path / "factors"  # the same path for every example: a fresh copy each time
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(directory, case)
    flipped = bytearray(data)
    flipped[int(position * len(data))] ^= mask
    (case / TENSORS_FILE).write_bytes(bytes(flipped))
    try:
        loaded = Factors.load(case)
    except UserError as exc:
        assert "\n" not in str(exc) and ("recollect" in str(exc) or "collect the factors again" in str(exc))
        return
    original = Factors.load(directory)
    header_len = int.from_bytes(data[:8], "little")
    assert 8 <= int(position * len(data)) < 8 + header_len  # only a header byte can go unnoticed
    for name in original.names:
        assert torch.equal(loaded.modules[name].activation_sum, original.modules[name].activation_sum)
        assert torch.equal(loaded.modules[name].grad_sum, original.modules[name].grad_sum)
        assert loaded.tokens(name) == original.tokens(name)
