"""Text sources and token packing.

A SOURCE string is one of:

* ``hf:DATASET[:CONFIG][@SPLIT]`` -- a Hugging Face dataset, streamed with ``datasets`` (split defaults to
  ``train``); the aliases ``dolmino`` (allenai/dolmino-mix-1124) and ``olmo-mix`` (allenai/olmo-mix-1124) also work;
* a local ``.jsonl`` file (one JSON object a line, text in the field ``text``; ``.jsonl.gz`` / ``.json.gz`` are
  gzip-compressed, as in Dolma's shards), a ``.json`` file (an array of objects, or JSON lines), a ``.csv`` file
  (column ``text``, with a header row), a ``.txt`` file (one document a non-empty line), a ``.parquet`` file
  (column ``text``), or a directory holding such files (read recursively in sorted order; hidden files skipped);
* a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``: its ``train`` split,
  else its only split).

Every source is read through ``datasets`` (``load_dataset(builder, data_files=..., streaming=True)`` for local files,
``load_from_disk`` for saved datasets): the loaders Hugging Face users know, streaming, so a large file is never read
whole. Records without the text field (``--text-field``, default ``text``) are an error naming the file (and the line,
for JSON lines) when the file has no such field at all; a record whose text is empty, null, or missing while other
records of the file have it (``datasets`` reads such a record as null) is skipped. When ``datasets`` fails on a JSON-lines or text file, the file is scanned line by line to name the
bad line (``FILE:LINE: malformed JSON``), after the documents before it were yielded.

Documents are tokenized with the model's tokenizer, joined with the EOS token between them (when the tokenizer
does not add one), and cut into windows of ``seq_len`` tokens. The final partial window is right-padded and masked
out (``attention_mask`` 0), so every real token is used exactly once.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import UserError

log = logging.getLogger(__name__)

ALIASES = {"dolmino": "hf:allenai/dolmino-mix-1124", "olmo-mix": "hf:allenai/olmo-mix-1124"}
# file suffix -> the ``datasets`` packaged builder that reads it
BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
    ".parquet": "parquet",
}
LOCAL_SUFFIXES = tuple(sorted(BUILDERS, key=len, reverse=True))  # longest first: ".jsonl.gz" before ".gz" kinds
_SUFFIX_LIST = ".jsonl, .jsonl.gz, .json, .csv, .txt or .parquet"
TOKENIZE_CHUNK = 256  # documents tokenized per tokenizer call (fast tokenizers batch them in Rust)


def _local_kind(path: Path) -> str | None:
    """The LOCAL_SUFFIXES entry a file name ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((suffix for suffix in LOCAL_SUFFIXES if name.endswith(suffix)), None)


def describe_source(source: str | os.PathLike) -> str:
    """The canonical form of a SOURCE string (aliases expanded, local paths absolute)."""
    source = str(source)
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


def iter_documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a SOURCE in a fixed order (see the module docstring for SOURCE).

    Errors (missing path, unknown file type, malformed line) are :class:`UserError` raised when iteration reaches
    them; :func:`check_source` raises the cheap ones up front.
    """
    source = str(source)
    source = ALIASES.get(source, source)
    if source.startswith("hf:"):
        yield from _iter_hf(source, text_field)
        return
    if _is_saved_dataset(Path(source).expanduser()):
        yield from _iter_saved(Path(source).expanduser(), text_field)
        return
    for file in _local_files(source):
        yield from _iter_file(file, text_field)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if not path.is_dir():
        return False
    return (path / "dataset_dict.json").is_file() or all((path / f).is_file() for f in ("state.json", "dataset_info.json"))


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and _local_kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(
                f"directory '{source}' holds no {_SUFFIX_LIST} files; point --data at text files"
            )
        return files
    if path.is_file():
        if not _local_kind(path):
            raise UserError(
                f"data file '{source}' has an unknown type; use {_SUFFIX_LIST}"
            )
        return [path]
    raise UserError(f"data source '{source}' does not exist; give a local file/directory or hf:DATASET")


def check_source(source: str | os.PathLike, text_field: str = "text") -> None:
    """Fail early (before a model is loaded) when a SOURCE is missing, unreadable or holds no document.

    Reads at most the first document; a local source is also checked for read permission on every file.
    """
    source_str = ALIASES.get(str(source), str(source))
    if not source_str.startswith("hf:") and not _is_saved_dataset(Path(source_str).expanduser()):
        for file in _local_files(source_str):
            if not os.access(file, os.R_OK):
                raise UserError(f"cannot read data file '{file}' (permission denied); fix its permissions")
    if next(iter_documents(source, text_field), None) is None:
        raise UserError(f"the data source '{source}' holds no documents; check the path or the '{text_field}' field")


def _open_text(path: Path):
    try:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
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


def _quiet_datasets() -> None:
    """``datasets`` logs a failed JSON parse at ERROR before raising; the raised error is what we report."""
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one local file, read by the ``datasets`` builder of its suffix (see :data:`BUILDERS`)."""
    import datasets

    _quiet_datasets()
    kind = _local_kind(path)
    builder = BUILDERS[kind]
    field = "text" if builder == "text" else text_field
    yielded = 0
    try:
        stream = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        for record in stream:
            if field not in record:
                what = "field" if builder == "json" else "column"
                raise UserError(f"data file '{path}' has no '{field}' {what} (it has {', '.join(record)})")
            text = record[field]
            if builder == "text":
                if not text.strip():
                    continue
                text = text.rstrip("\r\n")
            elif not text:
                continue
            yielded += 1
            yield str(text)
    except UserError as exc:
        if builder == "json":  # name the line (the scan raises at the first record without the field)
            yield from _rescan(path, kind, text_field, yielded)
        raise exc from None
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files; all are the user's data
        if builder in ("json", "text"):
            yield from _rescan(path, kind, text_field, yielded)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read data file '{path}': {first}") from None


def _rescan(path: Path, kind: str, text_field: str, skip: int) -> Iterator[str]:
    """After ``datasets`` failed on a JSON or text file: scan it line by line, yield the documents the stream had
    not yielded yet and raise the :class:`UserError` that names the bad line (returns if the scan finds none)."""
    if kind == ".json" and not _looks_like_json_lines(path):
        try:
            with _open_text(path) as fh:
                json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 text; convert the file to UTF-8") from None
        return
    for index, text in enumerate(_scan_lines(path, kind, text_field)):
        if index >= skip:
            yield text


def _looks_like_json_lines(path: Path) -> bool:
    with _open_text(path) as fh:
        try:
            head = fh.read(4096).lstrip()
        except UnicodeDecodeError:
            return True
    return not head.startswith("[")


def _scan_lines(path: Path, kind: str, text_field: str) -> Iterator[str]:
    """The documents of a JSON-lines or text file, read line by line with exact ``FILE:LINE`` errors."""
    if kind == ".txt":
        for _, line in _numbered_lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
        return
    for lineno, line in _numbered_lines(path):
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


def _iter_saved(path: Path, text_field: str) -> Iterator[str]:
    """The documents of a ``save_to_disk`` directory (a DatasetDict gives its ``train`` split, else its only one)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged or foreign directory
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read saved dataset '{path}': {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"saved dataset '{path}' has splits {', '.join(ds)} and none is 'train'; save one split")
    if text_field not in ds.column_names:
        raise UserError(f"saved dataset '{path}' has no '{text_field}' column (it has {', '.join(ds.column_names)})")
    for record in ds.select_columns([text_field]):
        if record[text_field]:
            yield str(record[text_field])


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


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Window:
    """One packed window: ``input_ids`` and ``attention_mask`` of length ``seq_len`` (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pad_right(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of any lengths as one right-padded batch: ``(input_ids, attention_mask)``, both
    ``(len(rows), longest)`` int64, padding id 0 with mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
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
    buffer: list[int] = []
    start = 0  # buffer[start:] is not yet cut into windows (avoids quadratic list slicing on long documents)
    any_doc = produced = False
    for docs in _chunks(documents, TOKENIZE_CHUNK):
        any_doc = True
        # verbose=False: documents longer than the tokenizer's model_max_length are fine here (we cut windows).
        for ids in tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            buffer.extend(ids)
            while len(buffer) - start >= seq_len:
                chunk = buffer[start : start + seq_len]
                start += seq_len
                produced = True
                yield Window(torch.tensor(chunk, dtype=torch.long), torch.ones(seq_len, dtype=torch.long))
            if start:
                del buffer[:start]
                start = 0
    if not any_doc:
        raise UserError("the data source holds no documents; check the path or the dataset's text field")
    if len(buffer) >= 2:  # a window needs at least one (input, label) pair
        n = len(buffer)
        ids = torch.full((seq_len,), pad, dtype=torch.long)
        ids[:n] = torch.tensor(buffer)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:n] = 1
        produced = True
        yield Window(ids, mask)
    if not produced:
        raise UserError("the data source holds fewer than 2 tokens of text; give it more text")


def token_batches(
    source: str | Iterable[str],
    tokenizer,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    skip_windows: int = 0,
    shard: tuple[int, int] = (0, 1),
    text_field: str = "text",
    with_index: bool = False,
    warn_if_short: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids": (B, T), "attention_mask": (B, T)}`` of packed windows from a SOURCE.

    Args:
        source: a SOURCE string or an iterable of document strings.
        max_tokens: stop once this many real tokens (mask 1) were yielded, counted over all shards.
        skip_windows: windows (counted over all shards) to skip first: resume a stream where a checkpoint left it.
        shard: ``(rank, world_size)``: this rank takes windows ``rank, rank + world, ...``.
        with_index: also yield ``"window_index"`` (B,): each window's position in the whole stream (over all
            shards). The factor collector seeds its sampled labels with it, so labels do not depend on batch size,
            sharding or resuming. Leave it off when the batch goes to ``model(**batch)``.
        warn_if_short: the option that set ``max_tokens`` (e.g. ``"--tokens"``): log a warning (rank 0 only) when
            the data runs out before ``max_tokens`` real tokens. Leave it ``None`` where ``max_tokens`` is a cap.
    """
    rank, world = shard
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard} is not (rank, world_size) with 0 <= rank < world_size")
    documents = iter_documents(source, text_field) if isinstance(source, (str, os.PathLike)) else iter(source)
    ids, masks, indices = [], [], []
    seen_tokens = 0
    reached = False
    for index, window in enumerate(pack_documents(documents, tokenizer, seq_len)):
        if max_tokens is not None and seen_tokens >= max_tokens:
            reached = True
            break
        n_real = int(window.attention_mask.sum())
        seen_tokens += n_real
        if index < skip_windows or index % world != rank:
            continue
        ids.append(window.input_ids)
        masks.append(window.attention_mask)
        indices.append(index)
        if len(ids) == batch_size:
            yield _batch(ids, masks, indices, with_index)
            ids, masks, indices = [], [], []
    if ids:
        yield _batch(ids, masks, indices, with_index)
    if warn_if_short and max_tokens is not None and not reached and seen_tokens < max_tokens and rank == 0:
        log.warning(
            "the data ran out after %s tokens, before the %s of %s; the result uses the %s there were",
            f"{seen_tokens:,}",
            f"{max_tokens:,}",
            warn_if_short,
            f"{seen_tokens:,}",
        )


def _batch(ids: list, masks: list, indices: list[int], with_index: bool) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}
    if with_index:
        batch["window_index"] = torch.tensor(indices, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# The factor-data recipe: leave the memorized set out of the factor data

EXCLUDE_NGRAM = 8  # n of the n-gram overlap test of exclude_overlapping


def record_ngrams(records: Iterable[Iterable[int]], n: int = EXCLUDE_NGRAM) -> tuple[set[int], set[int]]:
    """``(hashes, lengths)``: hashes of every ``n``-gram of token ids of each record, and the gram lengths used.

    A record shorter than ``n`` adds itself whole (and its length to ``lengths``, which always holds ``n``).
    Pass each record's token ids without special tokens such as ``<bos>`` (they match every window start).
    """
    grams: set[int] = set()
    lengths = {n}
    for record in records:
        ids = tuple(int(t) for t in record)
        if not ids:
            continue
        if len(ids) < n:
            grams.add(hash(ids))
            lengths.add(len(ids))
        for i in range(len(ids) - n + 1):
            grams.add(hash(ids[i : i + n]))
    return grams, lengths


def window_overlaps(
    ids: Iterable[int], grams: set[int], lengths: Iterable[int], mask: Iterable[int] | None = None
) -> bool:
    """Whether any run of ``length`` consecutive real tokens of a window (``mask`` 1; all when None) hashes into
    ``grams``, for each of ``lengths`` (from :func:`record_ngrams`)."""
    ids = [int(t) for t in ids]
    if mask is not None:
        ids = [t for t, m in zip(ids, mask) if int(m)]
    for length in lengths:
        for i in range(len(ids) - length + 1):
            if hash(tuple(ids[i : i + length])) in grams:
                return True
    return False


def exclude_overlapping(
    batches: Iterable[dict[str, torch.Tensor]], records: Iterable[Iterable[int]], n: int = EXCLUDE_NGRAM
) -> Iterator[dict[str, torch.Tensor]]:
    """Drop from a :func:`token_batches` stream every window that shares an ``n``-gram with any record.

    Contract: ``batches`` are dicts of ``(B, T)`` tensors ``input_ids`` and ``attention_mask`` (and optionally
    ``window_index``, which is kept per surviving window, so sampled labels stay seeded by stream position);
    ``records`` are token-id sequences (what the model sees of each memorized record, e.g. ``prefix_ids[1:] +
    suffix_ids``). A window is dropped when any ``n`` consecutive real tokens of it (default ``n`` = 8, the
    threshold: a single shared 8-gram suffices) equal ``n`` consecutive tokens of a record; shorter records drop
    windows that contain them whole. Hashed n-grams in a set: O(tokens) per window, memory O(record tokens).
    Batches that lose all windows are skipped; others keep their order and shrink. Windows are tested as
    they are, so an occurrence split across two windows drops only the windows holding ``n`` of its tokens.
    """
    if n < 1:
        raise UserError(f"n-gram length {n} must be at least 1")
    grams, lengths = record_ngrams(records, n)
    for batch in batches:
        keep = [
            i
            for i in range(batch["input_ids"].shape[0])
            if not window_overlaps(batch["input_ids"][i].tolist(), grams, lengths, batch["attention_mask"][i].tolist())
        ]
        if not keep:
            continue
        if len(keep) == batch["input_ids"].shape[0]:
            yield batch
        else:
            index = torch.tensor(keep, dtype=torch.long)
            yield {key: value[index] for key, value in batch.items()}
