"""Greedy generation: batched (left padding + KV cache) equals one-at-a-time and the no-cache reference, in fp64."""

from __future__ import annotations

import random

import pytest
import torch

from kfac_edit.evaluate import memorization
from kfac_edit.evaluate.memorization import greedy_generate, match_length, memorization_metrics
from kfac_edit.evaluate.perturbation import perturbation_metrics
from kfac_edit.evaluate.records import MemRecord


def random_prompts(n, lo=2, hi=20, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(60) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy_without_cache(model, prompt, n):
    """The plainest greedy decoding: the whole sequence is run again for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_batched_generation_equals_one_at_a_time_and_no_cache(tiny_model):
    prompts = random_prompts(13)
    lengths = [random.Random(i).randint(1, 9) for i in range(13)]
    batched = greedy_generate(tiny_model, prompts, lengths, batch_size=5, pad_id=62)
    single = [greedy_generate(tiny_model, [p], n, batch_size=1, pad_id=62)[0] for p, n in zip(prompts, lengths)]
    plain = [greedy_without_cache(tiny_model, p, n) for p, n in zip(prompts, lengths)]
    assert [len(g) for g in batched] == lengths
    assert batched == single == plain
    # the pad id does not matter (it is masked out)
    assert greedy_generate(tiny_model, prompts, lengths, batch_size=13, pad_id=0) == batched


def test_early_stop_keeps_match_lengths(tiny_model):
    prompts = random_prompts(9, seed=1)
    full = greedy_generate(tiny_model, prompts, 8, batch_size=4)
    # targets that agree with the greedy output for a known number of tokens, then differ
    agree = [i % 9 for i in range(9)]
    targets = [g[:k] + [(t + 1) % 60 for t in g[k:]] for g, k in zip(full, agree)]
    stopped = greedy_generate(tiny_model, prompts, 8, batch_size=4, targets=targets, stop_at_mismatch=True)
    assert [match_length(s, t) for s, t in zip(stopped, targets)] == [min(k, 8) for k in agree]
    # up to and including the first mismatch, the early-stopped output is the greedy one
    assert [s[: k + 1] for s, k in zip(stopped, agree)] == [g[: k + 1] for g, k in zip(full, agree)]


def drafted(own, agree, seed):
    """Drafts equal to ``own`` for ``agree[i]`` leading tokens, then random (a wrong token right after)."""
    rng = random.Random(seed)
    return [g[:k] + [(g[k] + 1) % 60] + [rng.randrange(60) for _ in g[k + 1 :]] if k < len(g) else list(g)
            for g, k in zip(own, agree)]


@pytest.mark.parametrize("verify_first", [1, 4, 40])
def test_drafted_generation_equals_brute_force_greedy(tiny_model, monkeypatch, verify_first):
    """With the true suffixes as drafts (memorized, partly memorized, unmemorized rows, mixed prompt and draft
    lengths, padding), the output is the plain no-cache greedy continuation, whatever the batch grouping and the
    number of draft tokens verified with the prompt."""
    monkeypatch.setattr(memorization, "VERIFY_FIRST", verify_first)
    monkeypatch.setattr(memorization, "DRAFT_KEEP_FRACTION", 0.0)  # every batch drafts, whatever it recites
    prompts = random_prompts(14, lo=2, hi=15, seed=6)
    lengths = [random.Random(10 + i).randint(1, 9) for i in range(14)]
    plain = [greedy_without_cache(tiny_model, p, n) for p, n in zip(prompts, lengths)]
    agree = [[n, 0, n // 2, max(n - 1, 0)][i % 4] for i, n in enumerate(lengths)]  # full, none, half, all but one
    drafts = drafted(plain, agree, seed=7)
    assert sum(d == g for d, g in zip(drafts, plain)) >= 4
    for batch_size in (1, 3, 14):
        assert greedy_generate(tiny_model, prompts, lengths, batch_size=batch_size, pad_id=62, targets=drafts) == plain
    # drafts shorter or longer than the requested length, and every row memorized (no decoding at all)
    odd = [d[: len(d) // 2] if i % 2 else d + [5, 6] for i, d in enumerate(drafts)]
    assert greedy_generate(tiny_model, prompts, lengths, batch_size=5, pad_id=0, targets=odd) == plain
    assert greedy_generate(tiny_model, prompts, lengths, batch_size=4, targets=plain) == plain


def test_drafting_stops_after_a_batch_that_does_not_recite(tiny_model, monkeypatch):
    """Batches draft while nearly all rows recite their targets; after one that does not, only every
    DRAFT_PROBE_EVERY-th batch tries again. The output is the greedy continuation either way."""
    drafted_batches = []
    original = memorization._greedy_batch

    def spy(model, prompts, num_new, pad_id, drafts=None, stop_at_mismatch=False):
        drafted_batches.append(drafts is not None)
        return original(model, prompts, num_new, pad_id, drafts, stop_at_mismatch)

    monkeypatch.setattr(memorization, "_greedy_batch", spy)
    prompts = random_prompts(20, lo=3, hi=4, seed=8)
    plain = [greedy_without_cache(tiny_model, p, 5) for p in prompts]
    assert greedy_generate(tiny_model, prompts, 5, batch_size=2, targets=plain) == plain
    assert drafted_batches == [True] * 10
    drafted_batches.clear()
    wrong = drafted(plain, [0] * 20, seed=9)
    assert greedy_generate(tiny_model, prompts, 5, batch_size=2, targets=wrong) == plain
    assert drafted_batches == [True] + [False] * 7 + [True, False]


def test_memorization_metrics_on_the_models_own_continuations(tiny_model):
    prompts = random_prompts(6, lo=4, hi=10, seed=2)
    own = greedy_generate(tiny_model, prompts, 5, batch_size=6)
    records = [MemRecord(p, g if i < 3 else g[:2] + [(g[2] + 1) % 60] + g[3:], "s") for i, (p, g) in enumerate(zip(prompts, own))]
    metrics, scores = memorization_metrics(tiny_model, records, loose_threshold=0.75, batch_size=4)
    assert metrics["strict"] == 0.5  # the first three are the model's own greedy output
    assert metrics["loose"] == 1.0  # one substitution in 5 tokens: 0.8 >= 0.75
    assert metrics["avg_levenshtein_norm"] == pytest.approx(0.1)
    assert metrics["mean_match_len"] == pytest.approx((5 * 3 + 2 * 3) / 6)
    assert [s.match_len for s in scores] == [5, 5, 5, 2, 2, 2]


def test_perturbation_scores_the_best_shifted_prompt(tiny_model):
    prefix = random_prompts(1, lo=8, hi=8, seed=3)[0]
    own = greedy_generate(tiny_model, [prefix], 6)[0]
    # the suffix equals the greedy continuation except its first token: the unperturbed match is 0, while the
    # prompt extended by that first token continues the model's own greedy output for the remaining 5 tokens
    suffix = [(own[0] + 1) % 60] + greedy_without_cache(tiny_model, prefix + [(own[0] + 1) % 60], 5)
    record = MemRecord(prefix, suffix)
    out = perturbation_metrics(tiny_model, [record], budget=2, unperturbed_match=[0], batch_size=3)
    assert out["prompts"] == 2 + (8 - 2 - 2 + 1)
    assert out["mean_max_match_len_extended"] == 5
    assert out["mean_max_match_len"] == 5
    assert out["mean_unperturbed_match_len"] == 0
    assert out["frac_records_longer_match"] == 1.0


def test_generation_equals_hf_generate(tiny_model):
    """The tokens equal ``model.generate(do_sample=False)``, with and without the true continuation as a draft."""
    prompts = random_prompts(7, lo=3, hi=12, seed=5)
    ours = greedy_generate(tiny_model, prompts, 6, batch_size=7, pad_id=62)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 62, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        hf = tiny_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6,
            pad_token_id=62, eos_token_id=None,
        )
    assert ours == hf[:, width:].tolist()
    assert ours == [greedy_without_cache(tiny_model, p, 6) for p in prompts]
    drafts = drafted(ours, [6, 0, 3, 5, 1, 6, 2], seed=8)
    assert greedy_generate(tiny_model, prompts, 6, batch_size=7, pad_id=62, targets=drafts) == ours
