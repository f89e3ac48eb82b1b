"""Memorized-set and quotes files: JSONL, one record a line, extra fields ignored.

Formats (detected per line, in this order):

* token ids: ``{"prefix_ids": [...], "suffix_ids": [...]}`` (the reference's Dolma sets; ``source`` is used for
  per-source metrics when present);
* text: ``{"prefix": "...", "target_suffix": "..."}`` (the reference's quotes sets) or
  ``{"prefix_text": "...", "suffix_text": "..."}``, tokenized with the model's tokenizer: the prefix with the
  special tokens the tokenizer adds (e.g. BOS), the suffix without.

Lengths: a token-id record must hold at least ``prefix_len`` prefix and ``suffix_len`` suffix tokens; the prefix
keeps its LAST ``prefix_len`` tokens and the suffix its FIRST ``suffix_len``. Text records (quotes vary in length)
are cut the same way when longer, and kept whole when shorter; ``None`` keeps every record whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import read_text

ID_FIELDS = ("prefix_ids", "suffix_ids")
TEXT_FIELDS = (("prefix", "target_suffix"), ("prefix_text", "suffix_text"))


@dataclass
class MemRecord:
    """One memorization probe: the model is prompted with ``prefix_ids`` and should recite ``suffix_ids``."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    source: str | None = None


def _check_ids(value, field: str, where: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UserError(f"{where}: '{field}' must be a list of integer token ids")
    if vocab_size is not None:
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise UserError(
                f"{where}: token id {bad[0]} in '{field}' is outside the model's vocabulary (0..{vocab_size - 1}); "
                "the file was made with another tokenizer: evaluate it on the model it was made for"
            )
    return value


def load_records(
    path: str | Path,
    tokenizer=None,
    prefix_len: int | None = None,
    suffix_len: int | None = None,
    vocab_size: int | None = None,
) -> list[MemRecord]:
    """Read a memorized-set or quotes JSONL file into :class:`MemRecord` s (see the module docstring).

    Args:
        tokenizer: needed for text records; token-id records are used as they are.
        vocab_size: token ids must lie in ``0..vocab_size-1`` (the model's embedding rows).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"records file '{path}' {what}; give a JSONL memorized set or quotes file")
    for name, n in (("--prefix-len", prefix_len), ("--suffix-len", suffix_len)):
        if n is not None and n < 1:
            raise UserError(f"{name} {n} is too short; use at least 1")
    records: list[MemRecord] = []
    lines = read_text(path, "records file", "a JSONL memorized set").splitlines()
    for lineno, line in enumerate(lines, 1):  # one JSON object a line
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with prefix_ids/suffix_ids or prefix/target_suffix")
        records.append(_parse_record(obj, where, tokenizer, prefix_len, suffix_len, vocab_size))
    if not records:
        raise UserError(f"records file '{path}' holds no records; it needs one JSON object a line")
    return records


def _parse_record(obj: dict, where: str, tokenizer, prefix_len, suffix_len, vocab_size) -> MemRecord:
    source = None if obj.get("source") is None else str(obj["source"])
    if all(f in obj for f in ID_FIELDS):
        prefix = _check_ids(obj["prefix_ids"], "prefix_ids", where, vocab_size)
        suffix = _check_ids(obj["suffix_ids"], "suffix_ids", where, vocab_size)
        need_p, need_s = prefix_len or 1, suffix_len or 1
        if len(prefix) < need_p or len(suffix) < need_s:
            raise UserError(
                f"{where}: record has {len(prefix)} prefix + {len(suffix)} suffix tokens, fewer than the "
                f"{need_p} + {need_s} asked for; lower --prefix-len/--suffix-len or drop the record"
            )
    else:
        fields = next((pair for pair in TEXT_FIELDS if all(f in obj for f in pair)), None)
        if fields is None:
            raise UserError(
                f"{where}: record has none of the known field pairs prefix_ids/suffix_ids, prefix/target_suffix, "
                "prefix_text/suffix_text"
            )
        prefix_text, suffix_text = obj[fields[0]], obj[fields[1]]
        if not isinstance(prefix_text, str) or not isinstance(suffix_text, str):
            raise UserError(f"{where}: '{fields[0]}' and '{fields[1]}' must be strings")
        if tokenizer is None:
            raise ValueError("text records need a tokenizer")
        prefix = list(tokenizer(prefix_text, add_special_tokens=True)["input_ids"])
        suffix = list(tokenizer(suffix_text, add_special_tokens=False)["input_ids"])
        if not prefix or not suffix:
            raise UserError(f"{where}: the prefix or suffix text tokenizes to no tokens; give both a non-empty text")
        if vocab_size is not None:
            _check_ids(prefix, fields[0], where, vocab_size)
            _check_ids(suffix, fields[1], where, vocab_size)
    if prefix_len is not None:
        prefix = prefix[-prefix_len:]
    if suffix_len is not None:
        suffix = suffix[:suffix_len]
    return MemRecord(prefix_ids=list(prefix), suffix_ids=list(suffix), source=source)
