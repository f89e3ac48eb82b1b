"""Memorization metrics: greedy continuation of a prefix compared with the true suffix.

Generation is greedy (argmax), batched with left padding, an attention mask, position ids that count only real
tokens, and the KV cache; it always produces exactly ``len(suffix)`` tokens (no stop at EOS). Batched output equals
one-record-at-a-time output, the no-cache loop and ``model.generate(do_sample=False)`` (tests check it in fp64). A
hand-written loop rather than ``model.generate``: it computes only the last position's logits in the prefill
(``logits_to_keep=1``), writes keys and values into buffers preallocated for the whole generation (no ``torch.cat``
growth of the cache) and, given targets, stops a batch once every row has mismatched. Per token it is barely
faster than ``model.generate``: 1.06x CPU time (165.6 ms vs 176.4 ms, identical tokens) at batch 32 on 96 records
of 32 + 24 tokens, tiny OLMo-2-shaped model, one thread (``python benchmarks/eval_throughput.py --preset tiny-cpu
--hf-records 96``, 2026-12-01, 2 shared CPU cores): nearly all the time is the model's own forward.

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
from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

from .records import MemRecord


@functools.lru_cache(maxsize=None)
def _forward_kwargs(model_cls: type) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` is accepted) for a model class."""
    params = inspect.signature(model_cls.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _buffer_cache(model: torch.nn.Module, capacity: int):
    """A KV cache whose layers write into buffers preallocated for ``capacity`` positions (no ``torch.cat`` growth),
    or None when this transformers version (or model) does not offer the pieces it needs."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or getattr(text, "sliding_window", None) or getattr(text, "layer_types", None) and any(
        t != "full_attention" for t in text.layer_types
    ):
        return None

    class BufferLayer(DynamicLayer):
        """A full-attention layer cache: keys/values written in place into ``(B, H, capacity, D)`` buffers."""

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, capacity, d))
            self._v = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
            self._len = 0
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, stop = self._len, self._len + key_states.shape[-2]
            if stop > capacity:
                raise RuntimeError(f"KV buffer of {capacity} positions overflows")
            self._k[:, :, start:stop] = key_states
            self._v[:, :, start:stop] = value_states
            self._len = stop
            self.keys, self.values = self._k[:, :, :stop], self._v[:, :, :stop]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len if self.is_initialized else 0

    try:
        return Cache(layers=[BufferLayer() for _ in range(n_layers)])
    except TypeError:
        return None


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
    cache = _buffer_cache(model, width + num_new) if cache_arg == "past_key_values" else None
    if cache is not None:
        extra["past_key_values"] = cache
    # the attention mask for every step, preallocated: step s uses its first width + s columns
    full_mask = torch.ones((batch, width + num_new), dtype=torch.long, device=device)
    full_mask[:, :width] = mask
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    generated = []
    last_pos = positions[:, -1:]
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
        last_pos = last_pos + 1
        out = model(
            input_ids=next_ids[:, None],
            attention_mask=full_mask[:, : width + step + 1],
            position_ids=last_pos,
            use_cache=True,
            **{cache_arg: cache},
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
