"""Find the windows of a corpus that a model recites: build a memorized set for any model and corpus.

The SOURCE is packed into non-overlapping windows of ``prefix_len + suffix_len`` tokens
(:func:`kfac_edit.data.token_batches`; the final partial window is skipped). A window is memorized when the model's
teacher-forced argmax equals the true token at every suffix position -- the same as greedy generation from the
prefix reproducing the suffix exactly, found with one forward pass per batch of windows. Near-duplicates are then
removed greedily in corpus order: a window is dropped when the Jaccard similarity of its set of token n-grams
(over prefix + suffix) with a kept window's is above ``dedup_threshold``.

Output records use the token-id format of :mod:`.records`, with texts, lengths, the source and the window index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

from ..data import token_batches
from ..errors import UserError
from .memorization import _forward_kwargs


@dataclass
class MinerConfig:
    """Settings of :func:`find_memorized`; each field's ``help`` is its CLI help."""

    data: str = field(metadata={"help": "text SOURCE to mine (local .jsonl/.txt/.parquet/dir or hf:DATASET)"})
    prefix_len: int = field(default=64, metadata={"help": "prefix tokens of a window"})
    suffix_len: int = field(default=48, metadata={"help": "suffix tokens that must all be predicted"})
    max_windows: int | None = field(default=None, metadata={"help": "stop after this many windows"})
    dedup_threshold: float = field(
        default=0.7, metadata={"help": "drop a window whose n-gram Jaccard similarity with a kept one is above this"}
    )
    dedup_ngram: int = field(default=5, metadata={"help": "n of the token n-grams of the dedup similarity"})
    batch_size: int = field(default=32, metadata={"help": "windows per forward pass"})

    def validate(self) -> None:
        if self.prefix_len < 1 or self.suffix_len < 1:
            raise UserError("--prefix-len and --suffix-len must be at least 1")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows {self.max_windows}: use at least 1")
        if not 0.0 <= self.dedup_threshold <= 1.0:
            raise UserError(f"--dedup-threshold {self.dedup_threshold}: use a value in [0, 1] (1 keeps everything)")
        if self.dedup_ngram < 1 or self.batch_size < 1:
            raise UserError("--dedup-ngram and --batch-size must be at least 1")


def ngram_set(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    """The set of token n-grams (the whole sequence as one gram when shorter than ``n``)."""
    tokens = tuple(tokens)
    if len(tokens) <= n:
        return {tokens}
    return {tokens[i : i + n] for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup(sequences: Sequence[Sequence[int]], threshold: float, n: int = 5) -> list[int]:
    """Indices of the sequences kept: in order, drop one whose n-gram Jaccard with a kept one is > ``threshold``."""
    kept: list[int] = []
    grams: list[set] = []
    index: dict[tuple, list[int]] = {}  # n-gram -> positions in `kept` (only candidates that share a gram)
    for i, seq in enumerate(sequences):
        g = ngram_set(seq, n)
        candidates = {k for gram in g for k in index.get(gram, ())}
        if any(jaccard(g, grams[k]) > threshold for k in candidates):
            continue
        for gram in g:
            index.setdefault(gram, []).append(len(kept))
        kept.append(i)
        grams.append(g)
    return kept


@torch.inference_mode()
def find_memorized(model: torch.nn.Module, tokenizer, config: MinerConfig) -> tuple[list[dict], dict]:
    """``(records, stats)``: the memorized windows of ``config.data`` after dedup, and counts with the config."""
    config.validate()
    _, has_keep = _forward_kwargs(type(model))
    device = next(model.parameters()).device
    window = config.prefix_len + config.suffix_len
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and window > max_pos:
        raise UserError(f"windows of {window} tokens exceed the model's {max_pos} positions; lower the lengths")
    max_tokens = None if config.max_windows is None else config.max_windows * window
    found: list[tuple[int, list[int]]] = []
    scanned = 0
    extra = {"logits_to_keep": config.suffix_len + 1} if has_keep else {}
    with tqdm(total=max_tokens, desc="find-memorized", unit="tok", unit_scale=True, disable=None, leave=False) as bar:
        for batch in token_batches(config.data, tokenizer, window, config.batch_size, max_tokens=max_tokens):
            full = batch["attention_mask"].all(dim=1)  # skip the final, padded window
            ids = batch["input_ids"][full]
            if config.max_windows is not None:
                ids = ids[: config.max_windows - scanned]
            if ids.shape[0] == 0:
                continue
            ids = ids.to(device)
            logits = model(input_ids=ids, **extra).logits[:, -(config.suffix_len + 1) : -1]
            hit = (logits.argmax(-1) == ids[:, config.prefix_len :]).all(dim=1).cpu()
            for row in torch.nonzero(hit).flatten().tolist():
                found.append((scanned + row, ids[row].tolist()))
            scanned += ids.shape[0]
            bar.update(ids.numel())
            bar.set_postfix(found=len(found))
            if config.max_windows is not None and scanned >= config.max_windows:
                break
    if scanned == 0:
        raise UserError(f"'{config.data}' gives no full window of {window} tokens; give more text or shorter lengths")
    keep = dedup([tokens for _, tokens in found], config.dedup_threshold, config.dedup_ngram)
    records = []
    for i in keep:
        window_index, tokens = found[i]
        prefix, suffix = tokens[: config.prefix_len], tokens[config.prefix_len :]
        records.append(
            {
                "prefix_ids": prefix,
                "suffix_ids": suffix,
                "prefix_text": tokenizer.decode(prefix),
                "suffix_text": tokenizer.decode(suffix),
                "prefix_len": len(prefix),
                "suffix_len": len(suffix),
                "source": config.data,
                "window": window_index,
            }
        )
    stats = {
        "windows_scanned": scanned,
        "memorized": len(found),
        "kept_after_dedup": len(records),
        "config": asdict(config),
    }
    return records, stats
