"""Text sources and token packing.

A SOURCE string is one of:

* ``hf:DATASET[:CONFIG][@SPLIT]``: a Hugging Face dataset, streamed (split defaults to ``train``); the aliases
  ``dolmino`` (allenai/dolmino-mix-1124) and ``olmo-mix`` (allenai/olmo-mix-1124) also work;
* a local file: ``.jsonl`` (field ``text``; ``.jsonl.gz`` / ``.json.gz`` gzip-compressed, as Dolma's shards),
  ``.json`` (an array of objects, or JSON lines), ``.csv`` (column ``text``, header row), ``.txt`` (one document a
  non-empty line) or ``.parquet`` (column ``text``); or a directory of such files (recursive, sorted, hidden skipped);
* a ``save_to_disk`` directory (a ``DatasetDict`` gives its ``train`` split, else its only split).

All are streamed through ``datasets``, never read whole. A file without the text field (``--text-field``) is an
error naming it; records with empty or missing text are skipped. When ``datasets`` fails on a JSON-lines or text
file, a line scan names the bad line (``FILE:LINE: malformed JSON``) after yielding the documents before it.

Documents are tokenized, joined with EOS between them (when the tokenizer does not add one) and cut into windows of
``seq_len`` tokens; the final partial window is right-padded and masked out (``attention_mask`` 0), so every real
token is used exactly once.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import UserError, first_line

log = logging.getLogger(__name__)

ALIASES = {"dolmino": "hf:allenai/dolmino-mix-1124", "olmo-mix": "hf:allenai/olmo-mix-1124"}
# file suffix -> the ``datasets`` packaged builder that reads it
BUILDERS = {".jsonl": "json", ".jsonl.gz": "json", ".json.gz": "json", ".json": "json", ".csv": "csv", ".txt": "text",
            ".parquet": "parquet"}  # fmt: skip
LOCAL_SUFFIXES = tuple(sorted(BUILDERS, key=len, reverse=True))  # longest first: ".jsonl.gz" before ".gz" kinds
SUFFIX_LIST = ", ".join(BUILDERS)  # for messages and --help
TOKENIZE_CHUNK = 256  # documents tokenized per tokenizer call (fast tokenizers batch them in Rust)


def _local_kind(path: Path) -> str | None:
    return next((suffix for suffix in LOCAL_SUFFIXES if path.name.lower().endswith(suffix)), None)


def _expand(source: str | os.PathLike) -> str:
    return ALIASES.get(str(source), str(source))


def describe_source(source: str | os.PathLike) -> str:
    """The canonical form of a SOURCE string (aliases expanded, local paths absolute)."""
    source = _expand(source)
    return source if source.startswith("hf:") else str(Path(source).expanduser().resolve())


def iter_documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a SOURCE (module docstring) in a fixed order; errors are :class:`UserError` raised
    when iteration reaches them (:func:`check_source` raises the cheap ones up front)."""
    source = _expand(source)
    if source.startswith("hf:"):
        yield from _iter_hf(source, text_field)
    elif _is_saved_dataset(Path(source).expanduser()):
        yield from _iter_saved(Path(source).expanduser(), text_field)
    else:
        for file in _local_files(source):
            yield from _iter_file(file, text_field)


def _is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_dict.json",), ("state.json", "dataset_info.json")
    return path.is_dir() and any(all((path / f).is_file() for f in files) for files in markers)


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and _local_kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"directory '{source}' holds no {SUFFIX_LIST} files; point --data at text files")
        return files
    if not path.is_file():
        raise UserError(f"data source '{source}' does not exist; give a local file/directory or hf:DATASET")
    if not _local_kind(path):
        raise UserError(f"data file '{source}' has an unknown type; use {SUFFIX_LIST}")
    return [path]


def check_source(source: str | os.PathLike, text_field: str = "text") -> None:
    """Fail early (before a model is loaded) when a SOURCE is missing, unreadable (read permission of every local
    file) or holds no document (reads at most the first one)."""
    expanded = _expand(source)
    if not expanded.startswith("hf:") and not _is_saved_dataset(Path(expanded).expanduser()):
        for file in _local_files(expanded):
            if not os.access(file, os.R_OK):
                raise UserError(f"cannot read data file '{file}' (permission denied); fix its permissions")
    if next(iter_documents(source, text_field), None) is None:
        raise UserError(f"the data source '{source}' holds no documents; check the path or the '{text_field}' field")


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        return opener(path, "rt", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read data file '{path}': {exc.strerror or exc}") from None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file, with decoding and I/O errors turned into :class:`UserError`."""
    with _open_text(path) as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                yield lineno, line
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno + 1}: not valid UTF-8 text; convert the file to UTF-8") from None
        except (OSError, EOFError) as exc:  # truncated gzip, I/O errors
            raise UserError(f"{path}:{lineno + 1}: cannot read further ({exc}); the file may be truncated") from None


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file (``.gz`` too); a line that is not JSON
    is a :class:`UserError` ``FILE:LINE: malformed JSON``."""
    for lineno, line in _numbered_lines(Path(path)):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
        yield lineno, value


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    # datasets logs a failed JSON parse at ERROR before raising; the raised error is what we report
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    if path.stat().st_size == 0:  # datasets fails on an empty file with a bare StopIteration: no documents
        return
    kind = _local_kind(path)
    builder = BUILDERS[kind]
    field = "text" if builder == "text" else text_field
    yielded = 0
    try:
        for record in datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True):
            if field not in record:
                what = "field" if builder == "json" else "column"
                raise UserError(f"data file '{path}' has no '{field}' {what} (it has {', '.join(record)})")
            text = record[field]
            if builder == "text":
                text = text.rstrip("\r\n") if text.strip() else None
            if text:
                yielded += 1
                yield str(text)
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files; all are the user's data
        if builder in ("json", "text"):  # name the bad line (a missing field: the first record without it)
            yield from _rescan(path, kind, text_field, yielded)
        if isinstance(exc, UserError):
            raise exc from None
        raise UserError(f"cannot read data file '{path}': {first_line(exc)}") from None


def _rescan(path: Path, kind: str, text_field: str, skip: int) -> Iterator[str]:
    """After ``datasets`` failed on a JSON or text file: yield the documents after the first ``skip`` and raise the
    :class:`UserError` naming the bad line (return if a line scan finds none)."""
    if kind == ".json":  # an array of objects, or JSON lines
        try:
            with _open_text(path) as fh:
                text = fh.read()
        except UnicodeDecodeError:
            text = ""  # the line scan names the line
        if text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
            return
    yield from itertools.islice(_scan_lines(path, kind, text_field), skip, None)


def _scan_lines(path: Path, kind: str, text_field: str) -> Iterator[str]:
    """The documents of a JSON-lines or text file, read line by line with exact ``FILE:LINE`` errors."""
    if kind == ".txt":
        yield from (line.rstrip("\r\n") for _, line in _numbered_lines(path) if line.strip())
        return
    for lineno, record in json_lines(path):
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{path}:{lineno}: no '{text_field}' field; each line needs {{\"{text_field}\": ...}}")
        if record[text_field]:
            yield str(record[text_field])


def _iter_saved(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged or foreign directory
        raise UserError(f"cannot read saved dataset '{path}': {first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise UserError(f"saved dataset '{path}' has splits {', '.join(ds)} and none is 'train'; save one split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise UserError(f"saved dataset '{path}' has no '{text_field}' column (it has {', '.join(ds.column_names)})")
    for record in ds.select_columns([text_field]):
        if record[text_field]:
            yield str(record[text_field])


def _iter_hf(source: str, text_field: str) -> Iterator[str]:
    import datasets

    spec, at, split = source[3:].rpartition("@")  # hf:DATASET[:CONFIG][@SPLIT]
    name, _, config = (spec if at else split).partition(":")
    if not name:
        raise UserError(f"cannot read data source '{source}'; write hf:DATASET[:CONFIG][@SPLIT]")
    config, split = config or None, split if at else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, missing dataset, bad config: all user-facing
        raise UserError(f"cannot stream dataset '{name}' (config {config}, split {split}): {first_line(exc)}") from None
    for record in ds:
        if record.get(text_field):
            yield str(record[text_field])


@dataclass
class Window:
    """One packed window: ``input_ids`` and ``attention_mask`` of length ``seq_len`` (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pad_right(rows: Sequence[Sequence[int]], width: int | None = None, pad_id: int = 0):
    """Token-id rows of any lengths as one right-padded batch: ``(input_ids, attention_mask)``, both
    ``(len(rows), width)`` int64 (``width`` defaults to the longest row), padding ``pad_id`` with mask 0."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pack_documents(documents: Iterable[str], tokenizer, seq_len: int) -> Iterator[Window]:
    """Tokenize documents, join them into one stream (EOS between documents) and cut ``seq_len`` windows."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too short; use at least 2")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    documents = iter(documents)
    buffer: list[int] = []  # tokens not yet cut into windows
    any_doc = produced = False
    while docs := list(itertools.islice(documents, TOKENIZE_CHUNK)):
        any_doc = True
        # verbose=False: documents longer than the tokenizer's model_max_length are fine here (we cut windows).
        for ids in tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]:
            buffer.extend(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                buffer.append(eos)
            cut = len(buffer) - len(buffer) % seq_len
            for start in range(0, cut, seq_len):
                produced = True
                window = torch.tensor(buffer[start : start + seq_len], dtype=torch.long)
                yield Window(window, torch.ones(seq_len, dtype=torch.long))
            del buffer[:cut]
    if not any_doc:
        raise UserError("the data source holds no documents; check the path or the dataset's text field")
    if len(buffer) >= 2:  # a window needs at least one (input, label) pair
        ids, mask = pad_right([buffer], seq_len, pad)
        produced = True
        yield Window(ids[0], mask[0])
    if not produced:
        raise UserError("the data source holds fewer than 2 tokens of text; give it more text")


def token_batches(source: str | Iterable[str], tokenizer, seq_len: int, batch_size: int,
                  max_tokens: int | None = None, skip_windows: int = 0, shard: tuple[int, int] = (0, 1),
                  text_field: str = "text", with_index: bool = False,
                  warn_if_short: str | None = None) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """Batches ``{"input_ids": (B, T), "attention_mask": (B, T)}`` of packed windows from a SOURCE.

    Args:
        source: a SOURCE string or an iterable of document strings.
        max_tokens: stop once this many real tokens (mask 1) were yielded; it, ``skip_windows`` (resume where a
            checkpoint left off) and ``"window_index"`` count over all shards.
        shard: ``(rank, world_size)``: this rank takes windows ``rank, rank + world, ...``.
        with_index: also yield ``"window_index"`` (B,), each window's position in the stream; the factor collector
            seeds sampled labels with it (independent of batch size, sharding, resuming). Not for ``model(**batch)``.
        warn_if_short: the option that set ``max_tokens`` (e.g. ``"--tokens"``): warn (rank 0) when the data runs
            out before it. ``None`` where ``max_tokens`` is a cap.
    """
    rank, world = shard
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard} is not (rank, world_size) with 0 <= rank < world_size")
    documents = iter_documents(source, text_field) if isinstance(source, (str, os.PathLike)) else source
    rows: list[tuple[int, Window]] = []
    seen_tokens = 0
    for index, window in enumerate(pack_documents(documents, tokenizer, seq_len)):
        if max_tokens is not None and seen_tokens >= max_tokens:
            break
        seen_tokens += int(window.attention_mask.sum())
        if index >= skip_windows and index % world == rank:
            rows.append((index, window))
            if len(rows) == batch_size:
                yield _batch(rows, with_index)
                rows = []
    if rows:
        yield _batch(rows, with_index)
    if warn_if_short and max_tokens is not None and seen_tokens < max_tokens and rank == 0:
        log.warning(f"the data ran out after {seen_tokens:,} tokens, before the {max_tokens:,} of {warn_if_short}; "
                    f"the result uses the {seen_tokens:,} there were")  # fmt: skip


def _batch(rows: list[tuple[int, Window]], with_index: bool) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": torch.stack([w.input_ids for _, w in rows]),
        "attention_mask": torch.stack([w.attention_mask for _, w in rows]),
    }
    if with_index:
        batch["window_index"] = torch.tensor([i for i, _ in rows], dtype=torch.long)
    return batch


EXCLUDE_NGRAM = 8  # n of exclude_overlapping's n-gram overlap test (the factor data leaves the memorized set out)


def record_ngrams(records: Iterable[Iterable[int]], n: int = EXCLUDE_NGRAM) -> tuple[set[int], set[int]]:
    """``(hashes, lengths)``: hashes of every ``n``-gram of each record's token ids (pass them without ``<bos>``,
    which matches every window start); a record shorter than ``n`` adds itself whole and its length to ``lengths``."""
    grams: set[int] = set()
    lengths = {n}
    for ids in (tuple(int(t) for t in record) for record in records):
        if 0 < len(ids) < n:
            grams.add(hash(ids))
            lengths.add(len(ids))
        grams.update(hash(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return grams, lengths


def window_overlaps(ids: Iterable[int], grams: set[int], lengths: Iterable[int], mask: Iterable[int] | None = None):
    """Whether any run of ``length`` consecutive real tokens of a window (``mask`` 1; all when None) hashes into
    ``grams``, for each of ``lengths`` (from :func:`record_ngrams`)."""
    ids = [int(t) for t in ids] if mask is None else [int(t) for t, m in zip(ids, mask) if int(m)]
    return any(hash(tuple(ids[i : i + k])) in grams for k in lengths for i in range(len(ids) - k + 1))


def exclude_overlapping(batches: Iterable[dict[str, torch.Tensor]], records: Iterable[Iterable[int]],
                        n: int = EXCLUDE_NGRAM) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """Drop from a :func:`token_batches` stream (``(B, T)`` tensors; ``window_index`` kept per surviving window)
    every window whose ``n`` consecutive real tokens equal ``n`` consecutive tokens of a record (token ids as the
    model sees them, e.g. ``prefix_ids[1:] + suffix_ids``) or contain a shorter record whole. An occurrence split
    across two windows drops only the windows holding ``n`` of its tokens. Hashed n-grams: O(tokens) per window,
    memory O(record tokens). Batches that lose every window are skipped; others shrink in order."""
    if n < 1:
        raise UserError(f"n-gram length {n} must be at least 1")
    grams, lengths = record_ngrams(records, n)
    for batch in batches:
        rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
        keep = [i for i, (ids, mask) in enumerate(rows) if not window_overlaps(ids, grams, lengths, mask)]
        if len(keep) == len(batch["input_ids"]):
            yield batch
        elif keep:
            yield {key: value[keep] for key, value in batch.items()}
