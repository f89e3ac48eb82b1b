"""`kfac-edit collect --exclude FILE...`: factors from the data without the windows that overlap given records."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import interrupt_collection

from kfac_edit.cli import main
from kfac_edit.factors.store import MANIFEST_FILE, Factors

SEQ = 16  # window = <bos> + 14 numbers + <eos>: one document a window


def _write(path, docs):
    path.write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs))
    return path


@pytest.fixture
def corpus(tmp_path):
    """40 documents of 14 numbers; a 12-number record is inside documents 3, 17 and 31 (at different offsets),
    document 9 shares only 7 consecutive tokens with it (below the 8-gram threshold)."""
    rng = random.Random(1)
    docs = [[rng.randrange(60) for _ in range(14)] for _ in range(40)]
    record = [rng.randrange(60) for _ in range(12)]
    for i, at in ((3, 0), (17, 2), (31, 1)):
        docs[i][at : at + 12] = record
    docs[9][4:11] = record[2:9]
    return docs, record


def _args(model_dir, data, out, *extra):
    return ["collect", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ),
            "--batch-size", "4", "--labels", "gold", "--layers", "0", "--device", "cpu", "--no-progress", *extra]


def test_exclude_drops_the_overlapping_windows_and_records_it(tiny_model_dir, corpus, tmp_path, capsys):
    docs, record = corpus
    data = _write(tmp_path / "corpus.jsonl", docs)
    # the record in the eval command's token-id format (bos first, as memorized.jsonl has it) and in text format
    bos = 60
    ids_file = tmp_path / "memorized.jsonl"
    ids_file.write_text(json.dumps({"prefix_ids": [bos] + record[:4], "suffix_ids": record[4:]}) + "\n")
    text_file = tmp_path / "quotes.jsonl"
    text_file.write_text(json.dumps({"prefix": " ".join(map(str, record[:6])),
                                     "target_suffix": " ".join(map(str, record[6:]))}) + "\n")

    out = tmp_path / "excluded"
    assert main(_args(tiny_model_dir, data, out, "--exclude", str(ids_file), str(text_file))) == 0
    printed = capsys.readouterr().out
    assert "excluded 3 of 40 windows sharing an 8-gram with 2 records" in printed
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    x = manifest["exclude"]
    assert x["files"] == [str(ids_file), str(text_file)] and x["n"] == 8 and x["records"] == 2
    assert x["windows_seen"] == 40 and x["windows_dropped"] == 3 and len(x["digest"]) == 16
    assert manifest["tokens"] == 37 * SEQ

    # the same factors as a collection on the corpus without those three documents (gold labels: exact)
    clean = _write(tmp_path / "clean.jsonl", [d for i, d in enumerate(docs) if i not in (3, 17, 31)])
    ref = tmp_path / "reference"
    assert main(_args(tiny_model_dir, clean, ref)) == 0
    a, b = Factors.load(out), Factors.load(ref)
    assert a.names == b.names
    for name in a.names:
        for key in ("activation_sum", "grad_sum"):
            torch.testing.assert_close(getattr(a.modules[name], key), getattr(b.modules[name], key))
    assert "exclude" not in json.loads((ref / MANIFEST_FILE).read_text())

    # --tokens counts the tokens kept, after the exclusion
    capped = tmp_path / "capped"
    assert main(_args(tiny_model_dir, data, capped, "--exclude", str(ids_file), "--tokens", str(10 * SEQ))) == 0
    # batches of 4 windows: 3 (document 3 dropped) + 4 + 4 reach 10 windows; whole batches are kept
    assert json.loads((capped / MANIFEST_FILE).read_text())["tokens"] == 11 * SEQ


def test_exclude_bad_input_is_one_line(tiny_model_dir, corpus, tmp_path, capsys):
    data = _write(tmp_path / "corpus.jsonl", corpus[0])
    out = tmp_path / "f"
    assert main(_args(tiny_model_dir, data, out, "--exclude", str(tmp_path / "missing.jsonl"))) == 2
    err = capsys.readouterr().err
    assert "--exclude file" in err and "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix_ids": [1, 2], "suffix_ids": [999]}\n')  # outside the 64-token vocabulary
    assert main(_args(tiny_model_dir, data, out, "--exclude", str(bad))) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert not out.exists()



def test_exclude_interrupted_and_resumed_equals_one_pass(tiny_model_dir, corpus, tmp_path, capsys, monkeypatch):
    """--exclude with checkpoints: stopped after 5 batches, --resume gives the one-pass factors (gold labels: the
    same sums); resuming with other --exclude records is refused in one line."""
    docs, record = corpus
    data = _write(tmp_path / "corpus.jsonl", docs)
    ids_file = tmp_path / "memorized.jsonl"
    ids_file.write_text(json.dumps({"prefix_ids": record[:4], "suffix_ids": record[4:]}) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prefix_ids": docs[5][:4], "suffix_ids": docs[5][4:12]}) + "\n")
    one = tmp_path / "one"
    assert main(_args(tiny_model_dir, data, one, "--exclude", str(ids_file))) == 0

    args = _args(tiny_model_dir, data, tmp_path / "ckpt", "--exclude", str(ids_file), "--checkpoint-every", "64")
    interrupt_collection(monkeypatch, args)
    capsys.readouterr()
    refused = args[: args.index("--exclude") + 1] + [str(other)] + args[args.index("--exclude") + 2 :]
    assert main([*refused, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exclude" in err[0], err
    assert main([*args, "--resume"]) == 0
    a, b = Factors.load(one), Factors.load(tmp_path / "ckpt")
    for name in a.names:
        torch.testing.assert_close(a.modules[name].activation_sum, b.modules[name].activation_sum)
        torch.testing.assert_close(a.modules[name].grad_sum, b.modules[name].grad_sum)
    assert b.manifest["tokens"] == 37 * SEQ
