"""Memorized-set and quotes files: the three formats, truncation, and one-line errors for bad input."""

from __future__ import annotations

import json
import re

import pytest

from kfac_edit.errors import UserError
from kfac_edit.evaluate.records import MemRecord, load_records


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_token_id_records_truncate_prefix_from_the_left_and_suffix_from_the_right(tmp_path):
    path = write_lines(
        tmp_path / "mem.jsonl",
        [
            {"prefix_ids": [1, 2, 3, 4, 5], "suffix_ids": [6, 7, 8, 9], "source": "wiki", "prefix_text": "x"},
            "",
            {"prefix_ids": [10, 11, 12], "suffix_ids": [13, 14, 15]},
        ],
    )
    records = load_records(path, prefix_len=3, suffix_len=2, vocab_size=64)
    assert records == [MemRecord([3, 4, 5], [6, 7], "wiki"), MemRecord([10, 11, 12], [13, 14], None)]
    whole = load_records(path, vocab_size=64)
    assert whole[0] == MemRecord([1, 2, 3, 4, 5], [6, 7, 8, 9], "wiki")


def test_text_formats_use_the_tokenizer_prefix_with_bos_suffix_without(tmp_path, tiny_tokenizer):
    path = write_lines(
        tmp_path / "quotes.jsonl",
        [
            {"prefix": "3 10 17", "target_suffix": "4 5", "author": "ignored"},
            {"prefix_text": "1 2", "suffix_text": "7 8 9", "source": "books"},
        ],
    )
    records = load_records(path, tiny_tokenizer, prefix_len=64, suffix_len=48, vocab_size=64)
    assert records == [MemRecord([60, 3, 10, 17], [4, 5], None), MemRecord([60, 1, 2], [7, 8, 9], "books")]
    cut = load_records(path, tiny_tokenizer, prefix_len=2, suffix_len=1)
    assert cut == [MemRecord([10, 17], [4], None), MemRecord([1, 2], [7], "books")]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no records"),
        (["", "  "], "holds no records"),
        ([{"prefix_ids": [1, 2, 3], "suffix_ids": [4, 5]}, "{not json"], ":2: malformed JSON"),
        ([{"prefix_ids": [1, 2], "suffix_ids": [4, 5, 6]}], "fewer than the 3 + 2"),
        ([{"prefix_ids": [1, 2, 3], "suffix_ids": [4]}], "fewer than the 3 + 2"),
        ([{"prefix_ids": [1, 2, 3], "suffix_ids": [4, 99]}], "token id 99 in 'suffix_ids' is outside"),
        ([{"prefix_ids": [-1, 2, 3], "suffix_ids": [4, 5]}], "token id -1"),
        ([{"prefix_ids": [1, 2, "a"], "suffix_ids": [4, 5]}], "list of integer token ids"),
        ([{"text": "1 2 3"}], ":1: record has none of the known field pairs"),
        ([[1, 2]], ":1: expected a JSON object"),
        ([{"prefix": "1 2 3", "target_suffix": ""}], "tokenizes to no tokens"),
    ],
)
def test_bad_records_raise_one_line_user_errors(tmp_path, tiny_tokenizer, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_records(path, tiny_tokenizer, prefix_len=3, suffix_len=2, vocab_size=64)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
