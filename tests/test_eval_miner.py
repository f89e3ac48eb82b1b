"""find-memorized: near-duplicate removal by hand, and a tiny model trained to recite two sequences -- the miner
finds windows of those and none of random text, and `eval` then scores them as strictly memorized."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import N_NUMBERS, make_tiny_olmo2, random_number_texts
from kfac_edit.cli import main
from kfac_edit.evaluate.miner import MinerConfig, dedup, find_memorized, jaccard, ngram_set
from kfac_edit.fileio import read_jsonl
from kfac_edit.testbed import number_tokenizer

BOS, EOS = N_NUMBERS, N_NUMBERS + 1


def test_ngram_jaccard_and_dedup_by_hand():
    a = [1, 2, 3, 4, 5, 6]
    assert ngram_set(a, 3) == {(1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6)}
    assert ngram_set([1, 2], 3) == {(1, 2)}
    shifted = [2, 3, 4, 5, 6, 7]  # shares 3 of 5 distinct 3-grams: Jaccard 3/5
    assert jaccard(ngram_set(a, 3), ngram_set(shifted, 3)) == pytest.approx(3 / 5)
    other = [9, 8, 7, 6, 5, 4]
    assert dedup([a, shifted, other, a], threshold=0.5, n=3) == [0, 2]
    assert dedup([a, shifted, other, a], threshold=0.6, n=3) == [0, 1, 2]  # 0.6 is not above 0.6
    assert dedup([a, a], threshold=1.0, n=3) == [0, 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny OLMo-2 trained for 100 steps to recite two random 40-token sequences; saved with its tokenizer."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(0)
    sequences = [[rng.randrange(N_NUMBERS) for _ in range(40)] for _ in range(2)]
    model = make_tiny_olmo2(dtype=torch.float32, seed=0)
    data = torch.tensor([[BOS] + s + [EOS] for s in sequences])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(100):
        loss = model(input_ids=data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.set_num_threads(n)
    root = tmp_path_factory.mktemp("miner")
    model.save_pretrained(root / "model")
    number_tokenizer(N_NUMBERS).save_pretrained(root / "model")
    corpus = root / "corpus.jsonl"
    docs = random_number_texts(12, min_len=20, max_len=40, seed=5)
    docs.insert(3, " ".join(map(str, sequences[0])))
    docs.insert(9, " ".join(map(str, sequences[1])))
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return model, sequences, root


def contains(seq, window):
    return any(seq[i : i + len(window)] == window for i in range(len(seq) - len(window) + 1))


def test_miner_finds_the_trained_sequences_and_no_random_text(trained):
    model, sequences, root = trained
    config = MinerConfig(data=str(root / "corpus.jsonl"), prefix_len=8, suffix_len=8, batch_size=7)
    records, stats = find_memorized(model, number_tokenizer(N_NUMBERS), config)
    streams = [[BOS] + s + [EOS] for s in sequences]
    assert stats["windows_scanned"] > 20
    assert records, "nothing found"
    hits = [0, 0]
    for r in records:
        assert r["prefix_len"] == 8 == len(r["prefix_ids"]) and len(r["suffix_ids"]) == 8
        # the recited suffix lies inside a trained sequence (its prefix may start in the document before)
        owner = [contains(s, r["suffix_ids"]) for s in streams]
        assert any(owner), f"suffix {r['suffix_ids']} is not from a trained sequence"
        hits[owner.index(True)] += 1
        assert r["suffix_text"] == " ".join(map(str, r["suffix_ids"]))
        assert r["source"] == str(root / "corpus.jsonl")
    # each 42-token trained document holds at least one full 16-token window of the packed stream
    assert hits[0] >= 1 and hits[1] >= 1
    assert stats["memorized"] == len(records) <= 6


def test_find_memorized_then_eval_on_the_cli(trained, tmp_path, capsys):
    _, _, root = trained
    out = tmp_path / "mem.jsonl"
    code = main(
        ["find-memorized", "--model", str(root / "model"), "--data", str(root / "corpus.jsonl"), "--out", str(out),
         "--prefix-len", "8", "--suffix-len", "8", "--max-windows", "40"]
    )
    assert code == 0
    found = read_jsonl(out)
    meta = json.loads((tmp_path / "mem.jsonl.meta.json").read_text())
    assert meta["kept_after_dedup"] == len(found) >= 2 and meta["config"]["prefix_len"] == 8
    results = tmp_path / "results.jsonl"
    code = main(
        ["eval", "--model", str(root / "model"), "--memorized", str(out), "--prefix-len", "8", "--suffix-len", "8",
         "--out", str(results)]
    )
    assert code == 0
    (line,) = read_jsonl(results)
    # teacher-forced argmax right at every suffix position <=> greedy generation recites the suffix
    assert line["metrics"]["memorized"]["mem"]["strict"] == 1.0
    assert line["metrics"]["memorized"]["mem"]["mean_match_len"] == 8.0
    assert "memorized.mem.strict" in capsys.readouterr().out
