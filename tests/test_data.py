"""Text sources (jsonl/json/csv/txt/parquet/gz/dir/save_to_disk, all through datasets), packing into windows,
batching, sharding and bad input."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch

from kfac_edit.data import (
    check_source,
    describe_source,
    iter_documents,
    pack_documents,
    token_batches,
)
from kfac_edit.errors import UserError
from kfac_edit.testbed import number_tokenizer

DOCS = ["1 2 3", "4 5", "6 7 8 9 10", "11"]
BOS, EOS, PAD = 60, 61, 62


@pytest.fixture(scope="module")
def tok():
    return number_tokenizer(60)


def write_sources(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:2])) + "\n\n")
    (root / "b.txt").write_text(DOCS[2] + "\n\n")
    with gzip.open(root / "c.json.gz", "wt") as fh:
        fh.write(json.dumps({"text": DOCS[3]}) + "\n")
    (root / ".hidden.jsonl").write_text('{"text": "99"}\n')
    (root / "notes.md").write_text("not data")
    return root


def test_local_sources_and_directory_order(tmp_path):
    root = write_sources(tmp_path / "corpus")
    assert list(iter_documents(root / "a.jsonl")) == DOCS[:2]  # a Path works as well as a str
    assert list(iter_documents(str(root / "b.txt"))) == [DOCS[2]]
    assert list(iter_documents(root / "c.json.gz")) == [DOCS[3]]
    assert list(iter_documents(root)) == DOCS  # sorted, recursive, hidden and unknown files skipped
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["5 6", None, "7"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(iter_documents(tmp_path / "d.parquet")) == ["5 6", "7"]
    assert describe_source("dolmino") == "hf:allenai/dolmino-mix-1124"
    assert describe_source(root / "a.jsonl") == str((root / "a.jsonl").resolve())


def test_bad_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2"}\n{"text": "3" \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        list(iter_documents(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "1"}\n')
    with pytest.raises(UserError, match=r"nofield\.jsonl:1: no 'text' field"):
        list(iter_documents(nofield))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"1 2\n\xff\xfe 3\n")
    with pytest.raises(UserError, match=r"latin\.txt:\d+: not valid UTF-8"):
        list(iter_documents(latin))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": ""}\n')
    with pytest.raises(UserError, match="holds no documents"):
        check_source(empty)
    with pytest.raises(UserError, match="does not exist"):
        check_source(tmp_path / "missing.jsonl")
    (tmp_path / "x.md").write_text("text\n1")  # (.csv was the unknown type here until csv became a format)
    with pytest.raises(UserError, match="unknown type"):
        check_source(tmp_path / "x.md")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl"):
        check_source(tmp_path / "emptydir")
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.txt"
        locked.write_text("1 2\n")
        locked.chmod(0)
        with pytest.raises(UserError, match="permission denied"):
            check_source(locked)
    check_source(bad)  # the first document is fine; the bad line is found when reading reaches it


def test_every_format_through_datasets(tmp_path):
    import datasets

    (tmp_path / "array.json").write_text(json.dumps([{"text": "1 2"}, {"text": None}, {"text": "3"}]))
    assert list(iter_documents(tmp_path / "array.json")) == ["1 2", "3"]  # null text skipped
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    assert list(iter_documents(tmp_path / "d.jsonl.gz", text_field="body")) == DOCS
    (tmp_path / "t.csv").write_text('id,text\n1,"4, 5"\n2,\n3,6\n')
    assert list(iter_documents(tmp_path / "t.csv")) == ["4, 5", "6"]  # quoting kept, empty cell skipped
    with pytest.raises(UserError, match=r"t\.csv' has no 'body' column \(it has id, text\)"):
        list(iter_documents(tmp_path / "t.csv", text_field="body"))
    (tmp_path / "crlf.txt").write_bytes(b"7 8\r\n\r\n9\r\n")
    assert list(iter_documents(tmp_path / "crlf.txt")) == ["7 8", "9"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS[:3], "n": [1, 2, 3]}).save_to_disk(str(saved))
    assert list(iter_documents(saved)) == DOCS[:3]
    check_source(saved)
    splits = tmp_path / "splits"
    train, test = datasets.Dataset.from_dict({"content": DOCS[:2]}), datasets.Dataset.from_dict({"content": ["0"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(splits))
    assert list(iter_documents(splits, text_field="content")) == DOCS[:2]  # a DatasetDict gives its train split
    with pytest.raises(UserError, match="saved dataset .* has no 'text' column \\(it has content\\)"):
        list(iter_documents(splits))
    with pytest.raises(UserError, match=r"array\.json' has no 'body' field"):
        list(iter_documents(tmp_path / "array.json", text_field="body"))
    (tmp_path / "broken.json").write_text('[{"text": "1"},\n {"text": ]')
    with pytest.raises(UserError, match=r"broken\.json:2: malformed JSON"):
        list(iter_documents(tmp_path / "broken.json"))


def test_pack_documents_uses_every_token_once(tok):
    windows = list(pack_documents(DOCS, tok, seq_len=4))
    stream = [BOS, 1, 2, 3, EOS, BOS, 4, 5, EOS, BOS, 6, 7, 8, 9, 10, EOS, BOS, 11, EOS]
    assert [w.input_ids.tolist() for w in windows[:4]] == [stream[i : i + 4] for i in range(0, 16, 4)]
    last = windows[-1]
    assert last.input_ids.tolist() == [BOS, 11, EOS, PAD] and last.attention_mask.tolist() == [1, 1, 1, 0]
    assert sum(int(w.attention_mask.sum()) for w in windows) == len(stream)
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        list(pack_documents(["x"], _one_token_tokenizer(), 4))  # a source of one token in all
    with pytest.raises(UserError, match="too short"):
        list(pack_documents(DOCS, tok, seq_len=1))


def _one_token_tokenizer():
    class One:
        eos_token_id = 7
        pad_token_id = 0

        def __call__(self, docs, **kwargs):
            return {"input_ids": [[7] for _ in docs]}

    return One()


def test_token_batches_limits_shards_and_resume(tok):
    docs = [" ".join(str(i % 60) for i in range(k, k + 11)) for k in range(20)]
    full = list(token_batches(docs, tok, seq_len=8, batch_size=3, with_index=True))
    all_ids = torch.cat([b["input_ids"] for b in full])
    assert torch.equal(torch.cat([b["window_index"] for b in full]), torch.arange(len(all_ids)))
    assert "window_index" not in next(iter(token_batches(docs, tok, seq_len=8, batch_size=3)))
    # shards partition the windows; skip_windows resumes where a checkpoint left off
    shards = [list(token_batches(docs, tok, 8, 2, shard=(r, 3), with_index=True)) for r in range(3)]
    got = sorted(int(i) for s in shards for b in s for i in b["window_index"])
    assert got == list(range(len(all_ids)))
    resumed = torch.cat([b["input_ids"] for b in token_batches(docs, tok, 8, 3, skip_windows=5)])
    assert torch.equal(resumed, all_ids[5:])
    limited = list(token_batches(docs, tok, 8, 3, max_tokens=20))
    assert sum(int(b["attention_mask"].sum()) for b in limited) == 24  # stops at the first window past 20
    with pytest.raises(UserError, match="batch-size"):
        next(token_batches(docs, tok, 8, 0))


def test_warning_when_the_data_runs_out_before_the_tokens_asked_for(tok, caplog):
    docs = [" ".join(str(i % 60) for i in range(k, k + 11)) for k in range(4)]  # 4 x 13 = 52 tokens
    with caplog.at_level("WARNING", logger="kfac_edit.data"):
        batches = token_batches(docs, tok, 8, 2, max_tokens=100, warn_if_short="--tokens")
        assert sum(int(b["attention_mask"].sum()) for b in batches) == 52
        assert [r.getMessage() for r in caplog.records] == [
            "the data ran out after 52 tokens, before the 100 of --tokens; the result uses the 52 there were"
        ]
        caplog.clear()
        list(token_batches(docs, tok, 8, 2, max_tokens=20, warn_if_short="--tokens"))  # enough data: quiet
        list(token_batches(docs, tok, 8, 2, max_tokens=100))  # max_tokens only a cap: quiet
        list(token_batches(docs, tok, 8, 2, max_tokens=100, shard=(1, 2), warn_if_short="--tokens"))  # rank 0 warns
        assert caplog.records == []
