"""Memorization metrics: greedy continuation of a prefix compared with the true suffix.

Generation is greedy (argmax), batched with left padding, an attention mask, position ids that count only real
tokens, and the KV cache; it always produces exactly ``len(suffix)`` tokens (no stop at EOS). Batched output equals
one-record-at-a-time output (tests check it in fp64). A hand-written loop rather than ``model.generate``: it gives
the same tokens and was 10x faster on the tiny CPU model (no logits processors, no stopping criteria), and it
computes only the last position's logits in the prefill (``logits_to_keep=1``).

Per record, with ``g`` the generated and ``y`` the true suffix (``L = len(y)`` tokens):

* ``strict``: ``g == y``;
* ``d``: token-level Levenshtein distance between ``g`` and ``y`` (rapidfuzz), ``lev_norm = d / L``;
* ``loose``: ``1 - d / L >= threshold`` (default 0.75);
* ``match_len``: tokens generated before the first mismatch (``L`` when strict).

A set's metrics are means over records: ``strict`` and ``loose`` (fractions), ``avg_levenshtein_norm``,
``mean_match_len``; grouped by ``source`` too when records carry one.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from rapidfuzz.distance import Levenshtein
from tqdm.auto import tqdm

from .records import MemRecord


@functools.lru_cache(maxsize=None)
def _forward_kwargs(model_cls: type) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` is accepted) for a model class."""
    params = inspect.signature(model_cls.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _greedy_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_new: int,
    pad_id: int,
    targets: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Greedy-generate ``num_new`` tokens for each left-padded prompt; ``(B, <= num_new)`` on the CPU.

    With ``targets``, stops once every row has mismatched its target (later tokens cannot change a match length).
    """
    cache_arg, has_keep = _forward_kwargs(type(model))
    device = _model_device(model)
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    alive = None
    if targets is not None:
        target = torch.full((batch, num_new), -1, dtype=torch.long)
        for row, t in enumerate(targets):
            target[row, : len(t)] = torch.as_tensor(list(t)[:num_new], dtype=torch.long)
        target = target.to(device)
        alive = torch.ones(batch, dtype=torch.bool, device=device)
    extra = {"logits_to_keep": 1} if has_keep else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    generated = []
    last_pos = positions[:, -1:]
    ones = torch.ones((batch, 1), dtype=torch.long, device=device)
    for step in range(num_new):
        next_ids = out.logits[:, -1].argmax(-1)
        generated.append(next_ids)
        if alive is not None:
            alive &= next_ids == target[:, step]
            if not bool(alive.any()):
                break
        if step == num_new - 1:
            break
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        mask = torch.cat([mask, ones], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=next_ids[:, None], attention_mask=mask, position_ids=last_pos, use_cache=True, **{cache_arg: cache}
        )
    return torch.stack(generated, dim=1).cpu()


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_new: int | Sequence[int],
    batch_size: int = 32,
    pad_id: int = 0,
    targets: Sequence[Sequence[int]] | None = None,
    desc: str | None = "generate",
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (lists of token ids), ``num_new[i]`` tokens for prompt ``i``.

    Prompts are sorted by length and batched (left padding, KV cache), results come back in input order. With
    ``targets`` (the true continuations), a batch stops early once every row has mismatched; a row's output is then
    only guaranteed up to and including its first mismatch (enough for :func:`match_length`).
    """
    n = len(prompts)
    lengths = [num_new] * n if isinstance(num_new, int) else list(num_new)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(n), key=lambda i: (-len(prompts[i]), -lengths[i]))
    results: list[list[int]] = [[] for _ in range(n)]
    with tqdm(total=n, desc=desc, unit="prompt", disable=None if desc else True, leave=False) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            tokens = _greedy_batch(
                model,
                [prompts[i] for i in idx],
                max(lengths[i] for i in idx),
                pad_id,
                None if targets is None else [targets[i] for i in idx],
            )
            for row, i in enumerate(idx):
                results[i] = tokens[row, : lengths[i]].tolist()
            bar.update(len(idx))
    return results


def match_length(generated: Sequence[int], target: Sequence[int]) -> int:
    """Number of leading tokens of ``generated`` equal to ``target`` (tokens before the first mismatch)."""
    n = 0
    for g, t in zip(generated, target):
        if g != t:
            break
        n += 1
    return n


@dataclass
class RecordScore:
    """Scores of one record; see the module docstring."""

    strict: bool
    lev_norm: float
    match_len: int
    suffix_len: int
    generated: list[int] | None = field(default=None, repr=False, compare=False)  # the greedy continuation


def score_record(generated: Sequence[int], target: Sequence[int]) -> RecordScore:
    distance = Levenshtein.distance(list(generated), list(target))
    return RecordScore(
        strict=list(generated) == list(target),
        lev_norm=distance / len(target),
        match_len=match_length(generated, target),
        suffix_len=len(target),
        generated=list(generated),
    )


def summarize(scores: Sequence[RecordScore], loose_threshold: float) -> dict:
    """Means over records: ``n``, ``strict``, ``loose``, ``avg_levenshtein_norm``, ``mean_match_len``."""
    n = len(scores)
    if n == 0:
        return {"n": 0}
    return {
        "n": n,
        "strict": sum(s.strict for s in scores) / n,
        "loose": sum((1.0 - s.lev_norm) >= loose_threshold for s in scores) / n,
        "avg_levenshtein_norm": sum(s.lev_norm for s in scores) / n,
        "mean_match_len": sum(s.match_len for s in scores) / n,
        "mean_suffix_len": sum(s.suffix_len for s in scores) / n,
    }


def summarize_by_source(records: Sequence[MemRecord], scores: Sequence[RecordScore], loose_threshold: float) -> dict:
    """:func:`summarize` over all records, plus ``per_source`` when any record has a ``source``."""
    out = summarize(scores, loose_threshold)
    groups: dict[str, list[RecordScore]] = {}
    for rec, score in zip(records, scores):
        if rec.source is not None:
            groups.setdefault(rec.source, []).append(score)
    if groups:
        out["per_source"] = {src: summarize(group, loose_threshold) for src, group in sorted(groups.items())}
    return out


def score_records(
    model: torch.nn.Module,
    records: Sequence[MemRecord],
    batch_size: int = 32,
    pad_id: int = 0,
    desc: str | None = "memorization",
) -> list[RecordScore]:
    """Greedy-generate ``len(suffix)`` tokens after each prefix and score them against the suffix."""
    generations = greedy_generate(
        model,
        [r.prefix_ids for r in records],
        [len(r.suffix_ids) for r in records],
        batch_size=batch_size,
        pad_id=pad_id,
        desc=desc,
    )
    return [score_record(g, r.suffix_ids) for g, r in zip(generations, records)]


def memorization_metrics(
    model: torch.nn.Module,
    records: Sequence[MemRecord],
    loose_threshold: float = 0.75,
    batch_size: int = 32,
    pad_id: int = 0,
    desc: str | None = "memorization",
) -> tuple[dict, list[RecordScore]]:
    """The set's metrics (see the module docstring) and the per-record scores."""
    scores = score_records(model, records, batch_size=batch_size, pad_id=pad_id, desc=desc)
    return summarize_by_source(records, scores, loose_threshold), scores
