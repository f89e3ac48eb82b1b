"""Position-perturbation stress test: does the memorized suffix come back from a shifted prompt?

For a record with prefix ``x_1..x_n`` and suffix ``y_1..y_L`` (so ``x_{n+i} = y_i``) and a budget ``T`` (the
paper uses 20), the perturbed prompts are

* extended: ``x_1..x_{n+i}`` for ``i = 1..min(T, L-1)``, with the true continuation ``y_{i+1}..y_L``;
* truncated: ``x_{n-i}..x_n`` (the last ``i + 1`` prefix tokens) for ``i = T..n-2``, continuation ``y_1..y_L``.

A prompt's score is the length of the exact match of its greedy continuation with the true one (tokens before the
first mismatch). Per record the max over the perturbed prompts is taken (0 when a record has none); the report
gives its mean beside the unperturbed mean match length, and the same max over each kind of prompt alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .memorization import greedy_generate, match_length
from .records import MemRecord


def perturbed_prompts(
    prefix: Sequence[int], suffix: Sequence[int], budget: int
) -> list[tuple[str, list[int], list[int]]]:
    """``(kind, prompt, true continuation)`` for every perturbed prompt of one record (see the module docstring)."""
    prefix, suffix = list(prefix), list(suffix)
    n, length = len(prefix), len(suffix)
    prompts = []
    for i in range(1, min(budget, length - 1) + 1):
        prompts.append(("extended", prefix + suffix[:i], suffix[i:]))
    for i in range(budget, n - 1):  # i = T..n-2
        prompts.append(("truncated", prefix[n - 1 - i :], suffix))
    return prompts


def perturbation_metrics(
    model: torch.nn.Module,
    records: Sequence[MemRecord],
    budget: int,
    unperturbed_match: Sequence[int],
    batch_size: int = 32,
    pad_id: int = 0,
    desc: str | None = "perturbation",
) -> dict:
    """Mean per-record max match length over the perturbed prompts, beside the unperturbed mean.

    Args:
        unperturbed_match: each record's match length from its own prefix (from the memorization pass).
    """
    owners, kinds, prompts, targets = [], [], [], []
    for r, record in enumerate(records):
        for kind, prompt, target in perturbed_prompts(record.prefix_ids, record.suffix_ids, budget):
            owners.append(r)
            kinds.append(kind)
            prompts.append(prompt)
            targets.append(target)
    best = {kind: [0] * len(records) for kind in ("extended", "truncated")}
    if prompts:
        generations = greedy_generate(
            model, prompts, [len(t) for t in targets], batch_size=batch_size, pad_id=pad_id, targets=targets, desc=desc,
            stop_at_mismatch=True,
        )
        for owner, kind, gen, target in zip(owners, kinds, generations, targets):
            best[kind][owner] = max(best[kind][owner], match_length(gen, target))
    overall = [max(e, t) for e, t in zip(best["extended"], best["truncated"])]
    n = len(records)
    return {
        "T": budget,
        "n": n,
        "prompts": len(prompts),
        "mean_max_match_len": sum(overall) / n,
        "mean_unperturbed_match_len": sum(unperturbed_match) / n,
        "mean_max_match_len_extended": sum(best["extended"]) / n,
        "mean_max_match_len_truncated": sum(best["truncated"]) / n,
        "frac_records_longer_match": sum(o > u for o, u in zip(overall, unperturbed_match)) / n,
    }
