"""Metrics against hand-computed values: Levenshtein, loose threshold, match length, nDCG, both perplexities,
and the perturbation prompts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_edit.evaluate.memorization import RecordScore, score_record, summarize, summarize_by_source
from kfac_edit.evaluate.ndcg import ndcg_scores
from kfac_edit.evaluate.perplexity import perplexity_metrics
from kfac_edit.evaluate.perturbation import perturbed_prompts
from kfac_edit.evaluate.records import MemRecord


def test_score_record_uses_token_levenshtein_not_hamming():
    # a shift by one: Hamming distance 4, Levenshtein 2 (delete 1, insert 5)
    s = score_record([2, 3, 4, 5], [1, 2, 3, 4])
    assert s == RecordScore(strict=False, lev_norm=0.5, match_len=0, suffix_len=4)
    assert score_record([1, 2, 3, 4], [1, 2, 3, 4]) == RecordScore(True, 0.0, 4, 4)
    assert score_record([1, 2, 9, 4], [1, 2, 3, 4]) == RecordScore(False, 0.25, 2, 4)


def test_loose_threshold_is_inclusive_and_means_are_hand_computed():
    scores = [
        score_record([1, 2, 3, 4], [1, 2, 3, 4]),  # d=0: strict, loose
        score_record([1, 2, 3, 9], [1, 2, 3, 4]),  # d=1: 1 - 1/4 = 0.75 >= 0.75: loose
        score_record([1, 8, 3, 9], [1, 2, 3, 4]),  # d=2: 0.5: not loose
        score_record([7, 7, 7, 7], [1, 2, 3, 4]),  # d=4
    ]
    out = summarize(scores, loose_threshold=0.75)
    assert out["n"] == 4
    assert out["strict"] == 0.25
    assert out["loose"] == 0.5
    assert out["avg_levenshtein_norm"] == pytest.approx((0 + 0.25 + 0.5 + 1.0) / 4)
    assert out["mean_match_len"] == pytest.approx((4 + 3 + 1 + 0) / 4)
    assert summarize(scores, loose_threshold=0.76)["loose"] == 0.25


def test_per_source_groups():
    records = [MemRecord([0], [1], "a"), MemRecord([0], [1], "b"), MemRecord([0], [1], "a")]
    scores = [RecordScore(True, 0.0, 1, 1), RecordScore(False, 1.0, 0, 1), RecordScore(False, 1.0, 0, 1)]
    out = summarize_by_source(records, scores, 0.75)
    assert out["strict"] == pytest.approx(1 / 3)
    assert out["per_source"]["a"]["strict"] == 0.5 and out["per_source"]["a"]["n"] == 2
    assert out["per_source"]["b"]["strict"] == 0.0
    assert "per_source" not in summarize_by_source([MemRecord([0], [1])], scores[:1], 0.75)


def test_ndcg_known_rankings():
    ref = torch.tensor([[5, 6, 7]] * 4)
    model = torch.tensor([[5, 6, 7], [7, 6, 5], [8, 9, 5], [1, 2, 3]])
    got = ndcg_scores(model, ref)
    log2_3 = math.log2(3)
    idcg = 3 / 1 + 2 / log2_3 + 1 / 2
    expected = [1.0, (1 / 1 + 2 / log2_3 + 3 / 2) / idcg, (3 / 2) / idcg, 0.0]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-15)


class ShiftLM(nn.Module):
    """A fake LM: logit ``c`` on token ``(input + 1) % V``, 0 elsewhere; the loss of each label is known in closed form."""

    def __init__(self, vocab: int = 8, c: float = 2.0):
        super().__init__()
        self.vocab, self.c = vocab, c
        self.embed = nn.Embedding(vocab, 1)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float64)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], self.c)
        return type("Out", (), {"logits": logits})()


def test_both_perplexity_conventions_from_a_pre_tokenized_tensor(tmp_path):
    vocab, c = 8, 2.0
    z = math.exp(c) + vocab - 1
    hit, miss = -math.log(math.exp(c) / z), -math.log(1 / z)  # loss when the label is / is not input + 1
    blocks = torch.tensor([[0, 1, 2, 3], [5, 6, 0, 0], [1, 1, 1, 2]])  # 3 hits; 1 hit 2 misses; 1 hit 2 misses
    path = tmp_path / "tokens.pt"
    torch.save(blocks, path)
    out = perplexity_metrics(ShiftLM(vocab, c), None, str(path), block_size=4, batch_size=2, max_tokens=None)
    batch1 = (3 * hit + hit + 2 * miss) / 6  # blocks 0 and 1
    batch2 = (hit + 2 * miss) / 3  # block 2
    assert out["tokens"] == 9 and out["batches"] == 2 and out["blocks"] == 3 and out["block_size"] == 4
    assert out["perplexity"] == pytest.approx(math.exp((5 * hit + 4 * miss) / 9), rel=1e-12)
    assert out["perplexity_batch_mean"] == pytest.approx((math.exp(batch1) + math.exp(batch2)) / 2, rel=1e-12)

    flat = tmp_path / "flat.pt"
    torch.save(torch.tensor([0, 1, 2, 3, 4, 7]), flat)  # blocks [0 1 2 3] [4 7 pad pad]: 3 hits + 1 miss
    out = perplexity_metrics(ShiftLM(vocab, c), None, str(flat), block_size=4, batch_size=8, max_tokens=None)
    assert out["tokens"] == 4
    assert out["perplexity"] == pytest.approx(math.exp((3 * hit + miss) / 4), rel=1e-12)
    assert out["perplexity_batch_mean"] == pytest.approx(out["perplexity"], rel=1e-12)


def test_perplexity_on_text_matches_a_brute_force_loop(tiny_model, tiny_tokenizer, tmp_path):
    from conftest import random_number_texts

    path = tmp_path / "ppl.txt"
    path.write_text("\n".join(random_number_texts(12, seed=3)) + "\n")
    out = perplexity_metrics(tiny_model, tiny_tokenizer, str(path), block_size=16, batch_size=3, max_tokens=None)
    # brute force: the packed stream cut into blocks of 16, each scored alone, token by token
    stream = []
    for line in path.read_text().splitlines():
        stream += tiny_tokenizer(line)["input_ids"] + [tiny_tokenizer.eos_token_id]
    blocks = [stream[i : i + 16] for i in range(0, len(stream), 16)]
    losses, per_batch = [], []
    with torch.no_grad():
        for b, block in enumerate(blocks):
            if len(block) < 2:
                continue
            logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([block])).logits[0], -1)
            block_losses = [-float(logp[t, block[t + 1]]) for t in range(len(block) - 1)]
            losses += block_losses
            if b % 3 == 0:
                per_batch.append([])
            per_batch[-1] += block_losses
    assert out["tokens"] == len(losses)
    assert out["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-10)
    batch_mean = sum(math.exp(sum(x) / len(x)) for x in per_batch) / len(per_batch)
    assert out["perplexity_batch_mean"] == pytest.approx(batch_mean, rel=1e-10)
    assert out["perplexity"] != pytest.approx(out["perplexity_batch_mean"], rel=1e-6)


def test_perturbed_prompts_follow_the_definition():
    prefix, suffix = [1, 2, 3, 4, 5, 6], [7, 8, 9]  # n = 6, L = 3
    prompts = perturbed_prompts(prefix, suffix, budget=2)
    # extended: i = 1..min(T, L-1) = 1..2; truncated: x_{n-i}..x_n for i = T..n-2 = 2..4 (i + 1 tokens)
    assert prompts == [
        ("extended", [1, 2, 3, 4, 5, 6, 7], [8, 9]),
        ("extended", [1, 2, 3, 4, 5, 6, 7, 8], [9]),
        ("truncated", [4, 5, 6], [7, 8, 9]),
        ("truncated", [3, 4, 5, 6], [7, 8, 9]),
        ("truncated", [2, 3, 4, 5, 6], [7, 8, 9]),
    ]
    assert perturbed_prompts([1, 2, 3], [4], budget=5) == []
