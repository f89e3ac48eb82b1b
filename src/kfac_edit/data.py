"""Text sources and token packing.

A SOURCE string is one of:

* ``hf:DATASET[:CONFIG][@SPLIT]`` -- a Hugging Face dataset, streamed with ``datasets`` (split defaults to
  ``train``); the aliases ``dolmino`` (allenai/dolmino-mix-1124) and ``olmo-mix`` (allenai/olmo-mix-1124) also work;
* a local ``.jsonl`` file (one JSON object a line, text in the field ``text``), a ``.txt`` file (one document a
  non-empty line), a ``.parquet`` file (column ``text``), or a directory holding such files (read in sorted order).

Documents are tokenized with the model's tokenizer, joined with the EOS token between them (when the tokenizer
does not add one), and cut into windows of ``seq_len`` tokens. The final partial window is right-padded and masked
out (``attention_mask`` 0), so every real token is used exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import UserError

ALIASES = {"dolmino": "hf:allenai/dolmino-mix-1124", "olmo-mix": "hf:allenai/olmo-mix-1124"}
LOCAL_SUFFIXES = (".jsonl", ".txt", ".parquet")


def describe_source(source: str) -> str:
    """The canonical form of a SOURCE string (aliases expanded, local paths absolute)."""
    source = ALIASES.get(source, source)
    if source.startswith("hf:"):
        return source
    return str(Path(source).expanduser().resolve())


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    spec = source[3:]
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, config = (spec.split(":", 1) + [None])[:2] if ":" in spec else (spec, None)
    if not name:
        raise UserError(f"cannot read data source '{source}'; write hf:DATASET[:CONFIG][@SPLIT]")
    return name, config, split


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a SOURCE in a fixed order (see the module docstring for SOURCE)."""
    source = ALIASES.get(source, source)
    if source.startswith("hf:"):
        yield from _iter_hf(source, text_field)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"directory '{source}' holds no .jsonl, .txt or .parquet files; point --data at text files")
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"data file '{source}' has an unknown type; use .jsonl (field 'text'), .txt or .parquet")
        files = [path]
    else:
        raise UserError(f"data source '{source}' does not exist; give a local file/directory or hf:DATASET")
    for file in files:
        yield from _iter_file(file, text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UserError(f"{path}:{lineno}: no '{text_field}' field; each line needs {{\"{text_field}\": ...}}")
                if record[text_field]:
                    yield str(record[text_field])
    else:  # parquet
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise UserError(f"cannot read parquet file '{path}': {exc}") from None
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"parquet file '{path}' has no '{text_field}' column (it has {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield str(text)


def _iter_hf(source: str, text_field: str) -> Iterator[str]:
    import datasets

    name, config, split = _parse_hf(source)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, missing dataset, bad config: all user-facing
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot stream dataset '{name}' (config {config}, split {split}): {first}") from None
    for record in ds:
        text = record.get(text_field)
        if text:
            yield str(text)


@dataclass
class Window:
    """One packed window: ``input_ids`` and ``attention_mask`` of length ``seq_len`` (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pack_documents(documents: Iterable[str], tokenizer, seq_len: int) -> Iterator[Window]:
    """Tokenize documents, join them into one stream (EOS between documents) and cut ``seq_len`` windows."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too short; use at least 2")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    buffer: list[int] = []
    any_doc = False
    for doc in documents:
        any_doc = True
        ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            chunk, buffer = buffer[:seq_len], buffer[seq_len:]
            yield Window(torch.tensor(chunk, dtype=torch.long), torch.ones(seq_len, dtype=torch.long))
    if not any_doc:
        raise UserError("the data source holds no documents; check the path or the dataset's text field")
    if len(buffer) >= 2:  # a window needs at least one (input, label) pair
        n = len(buffer)
        ids = torch.full((seq_len,), pad, dtype=torch.long)
        ids[:n] = torch.tensor(buffer)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:n] = 1
        yield Window(ids, mask)


def token_batches(
    source: str | Iterable[str],
    tokenizer,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    skip_windows: int = 0,
    shard: tuple[int, int] = (0, 1),
    text_field: str = "text",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids": (B, T), "attention_mask": (B, T)}`` of packed windows from a SOURCE.

    Args:
        source: a SOURCE string or an iterable of document strings.
        max_tokens: stop once this many real tokens (mask 1) were yielded, counted over all shards.
        skip_windows: windows (counted over all shards) to skip first: resume a stream where a checkpoint left it.
        shard: ``(rank, world_size)``: this rank takes windows ``rank, rank + world, ...``.
    """
    rank, world = shard
    documents = iter_documents(source, text_field) if isinstance(source, (str, os.PathLike)) else iter(source)
    ids, masks = [], []
    seen_tokens = 0
    for index, window in enumerate(pack_documents(documents, tokenizer, seq_len)):
        if max_tokens is not None and seen_tokens >= max_tokens:
            break
        n_real = int(window.attention_mask.sum())
        seen_tokens += n_real
        if index < skip_windows or index % world != rank:
            continue
        ids.append(window.input_ids)
        masks.append(window.attention_mask)
        if len(ids) == batch_size:
            yield {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}
            ids, masks = [], []
    if ids:
        yield {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}
