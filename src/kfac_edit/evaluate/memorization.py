"""Memorization metrics: greedy continuation of a prefix compared with the true suffix.

Generation is greedy (argmax), batched with left padding, an attention mask, position ids that count only real
tokens, and the KV cache; it always produces exactly ``len(suffix)`` tokens (no stop at EOS). Batched output equals
one-record-at-a-time output, the no-cache loop and ``model.generate(do_sample=False)`` (tests check it in fp64).
The true suffix serves as a draft that teacher-forced forwards verify (:func:`greedy_generate`): a record the model
recites needs no sequential decoding. CPU time against ``model.generate`` at batch 32, identical tokens
(``python benchmarks/eval_throughput.py --preset tiny-cpu --hf-records 256 --records 256 --repeats 5 --testbed``,
2026-12-01, one thread on 2 shared cores, four runs; ``benchmarks/README.md`` has the tables): 2.6-4.2x on memorized
records, 2.95x on the trained arithmetic testbed's canaries, 0.88-1.32x on unmemorized ones and 1.09-1.17x without a
draft (hidden 64, 2 blocks, 32 + 24 tokens). At hidden 512, 4 blocks: 1.41x memorized, 0.97x without a draft.
Plain decoding is the same model forwards as ``model.generate``: a loop doing nothing but those forwards (the
benchmark's ``forward_floor``) is 1.23x at hidden 64 and 1.08x at hidden 512, so no loop reaches 1.3x there.

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
import itertools
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from rapidfuzz.distance import Levenshtein
from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

from .records import MemRecord


@functools.lru_cache(maxsize=None)
def _forward_kwargs(model_cls: type) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` is accepted) for a model class."""
    params = inspect.signature(model_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


VERIFY_FIRST = 4  # draft tokens verified in the prefill; the rest in one more forward if most rows reproduce them
DRAFT_KEEP_FRACTION = 0.9  # greedy_generate keeps drafting while at least this share of a batch recites its target
DRAFT_PROBE_EVERY = 8  # ... and otherwise tries the draft again on every 8th batch


def _step(model: torch.nn.Module, cache, ids, mask, positions, keep: int):
    """One forward: ``(argmax at the last keep positions (n, keep), the KV cache)``."""
    cache_arg, has_keep = _forward_kwargs(type(model))
    extra = {cache_arg: cache, **({"logits_to_keep": keep} if has_keep else {})}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    return out.logits[:, -keep:].argmax(-1), out["cache"] if "cache" in out else out["past_key_values"]


def _decode(model, cache, tokens, prompt_mask, accepted, last_position, n_draft: int, num_new: int) -> None:
    """Greedy-decode each row on from its first mismatch, in place: ``tokens[r, : accepted[r] + 1]`` are final; the
    cache holds the prompt, then ``n_draft`` draft positions, of which those at ``>= accepted[r]`` are hidden.

    Rows leave the batch once they are complete, whenever a quarter of those left are (one cache copy each time).
    """
    n, width = prompt_mask.shape
    device = tokens.device
    steps_left = (num_new - 1 - accepted).tolist()
    if max(steps_left) <= 0:
        return
    mask = torch.ones((n, width + n_draft + max(steps_left)), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask
    mask[:, width : width + n_draft] = torch.arange(n_draft, device=device) < accepted[:, None]
    live, column, position = list(range(n)), accepted.clone(), last_position + 1 + accepted
    for step in range(max(steps_left)):
        keep = [i for i, row in enumerate(live) if steps_left[row] > step]
        if 4 * (len(live) - len(keep)) >= len(live):
            index = torch.tensor(keep, device=device)
            cache.reorder_cache(index)
            live, column, position, mask = [live[i] for i in keep], column[index], position[index], mask[index]
        rows = torch.tensor(live, device=device)
        kv = width + n_draft + step + 1
        next_ids, cache = _step(model, cache, tokens[rows, column][:, None], mask[:, :kv], (position + step)[:, None], 1)
        column += 1
        tokens[rows, column] = next_ids[:, 0]


def _accepted(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the number of leading tokens equal to the draft."""
    return (tokens[:, : target.shape[1]] == target).cumprod(-1).sum(-1)


@torch.inference_mode()
def _greedy_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_new: int,
    pad_id: int,
    drafts: Sequence[Sequence[int]] | None = None,
    stop_at_mismatch: bool = False,
) -> torch.Tensor:
    """Greedy-generate ``num_new`` tokens for each prompt; ``(B, num_new)`` on the CPU (see :func:`greedy_generate`),
    -2 where nothing was generated (past the first mismatch with ``stop_at_mismatch``).

    The prompts are left-padded. With ``drafts``, the first draft tokens follow them in the prefill (teacher forcing)
    and, when most rows reproduce those (always with ``stop_at_mismatch``), the rest of the draft in one more
    forward: the logits give each row's greedy tokens up to and including its first mismatch with the draft (exactly:
    each position sees the prompt and accepted greedy tokens only). Rows that need more are decoded on from there
    with the KV cache, their rejected draft positions hidden by the attention mask.
    """
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    if window and width + 2 * num_new > window and not stop_at_mismatch:
        drafts = None  # hidden cache entries would count in a sliding window: plain decoding
    n_draft = num_new - 1 if drafts is not None else 0
    target = torch.full((batch, num_new), -1, dtype=torch.long)  # the draft; -1 matches no token
    ids = torch.full((batch, width + n_draft), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width + n_draft), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) : width] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
        if drafts is not None:
            draft = list(drafts[row])[:num_new]
            target[row, : len(draft)] = torch.as_tensor(draft, dtype=torch.long)
    ids[:, width:] = target[:, :n_draft].where(target[:, :n_draft] >= 0, pad_id)
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # -2: not generated; the columns past num_new take the writes of rows that are already complete
    tokens = torch.full((batch, 2 * num_new), -2, dtype=torch.long, device=device)
    first = min(VERIFY_FIRST, num_new) if drafts is not None else 1
    kv = width + first - 1
    tokens[:, :first], cache = _step(model, None, ids[:, :kv], mask[:, :kv], positions[:, :kv], first)
    cached = first - 1  # draft positions in the cache
    verified = _accepted(tokens, target) == first
    if first < num_new and (stop_at_mismatch or 2 * int(verified.sum()) >= batch):
        rest, cache = _step(model, cache, ids[:, kv:], mask, positions[:, kv:], num_new - first)
        tokens[verified, first:num_new] = rest[verified]  # the other rows' are conditioned on rejected drafts
        cached = n_draft
    if not stop_at_mismatch:
        accepted = _accepted(tokens, target).clamp(max=cached)  # an accepted draft token not in the cache is fed
        _decode(model, cache, tokens, mask[:, :width], accepted, positions[:, width - 1], cached, num_new)
    return tokens[:, :num_new].cpu()


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_new: int | Sequence[int],
    batch_size: int = 32,
    pad_id: int = 0,
    targets: Sequence[Sequence[int]] | None = None,
    desc: str | None = "generate",
    stop_at_mismatch: bool = False,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (lists of token ids), ``num_new[i]`` tokens for prompt ``i``.

    Prompts are sorted by length and batched (left padding, KV cache), results come back in input order.
    ``targets`` (the true continuations, when known) serve as a draft that teacher-forced forwards verify (see
    :func:`_greedy_batch`): a row that reproduces its target needs no decoding, the others are decoded on from their
    first mismatch; the output is the greedy continuation either way. Since verifying costs about what decoding does,
    a batch after one in which under ``DRAFT_KEEP_FRACTION`` of the rows recited their targets decodes plainly, and
    every ``DRAFT_PROBE_EVERY``-th batch tries the draft again. With ``stop_at_mismatch`` a row's output is only guaranteed up to and
    including its first mismatch with its target (enough for :func:`match_length`) and nothing is decoded.
    """
    n = len(prompts)
    lengths = [num_new] * n if isinstance(num_new, int) else list(num_new)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(n), key=lambda i: (-len(prompts[i]), -lengths[i]))
    results: list[list[int]] = [[] for _ in range(n)]
    drafting = targets is not None
    with tqdm(total=n, desc=desc, unit="prompt", disable=None if desc else True, leave=False) as bar:
        for number, start in enumerate(range(0, n, batch_size)):
            idx = order[start : start + batch_size]
            # a draft pays only when nearly every row of a batch recites it; after a batch that did not, decode
            # plainly, probing again every DRAFT_PROBE_EVERY batches
            use_draft = stop_at_mismatch or (targets is not None and (drafting or number % DRAFT_PROBE_EVERY == 0))
            tokens = _greedy_batch(
                model,
                [prompts[i] for i in idx],
                max(lengths[i] for i in idx),
                pad_id,
                [targets[i] for i in idx] if use_draft else None,
                stop_at_mismatch,
            )
            for row, i in enumerate(idx):
                results[i] = [t for t in tokens[row, : lengths[i]].tolist() if t != -2]
            if use_draft:
                recited = sum(results[i] == list(targets[i])[: lengths[i]] for i in idx)
                drafting = recited >= DRAFT_KEEP_FRACTION * len(idx)
            bar.update(len(idx))
    return results


def match_length(generated: Sequence[int], target: Sequence[int]) -> int:
    """Number of leading tokens of ``generated`` equal to ``target`` (tokens before the first mismatch)."""
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(generated, target)))


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
        targets=[r.suffix_ids for r in records],
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
