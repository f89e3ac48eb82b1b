"""`kfac-edit eval` end to end on a saved tiny model: the results line, nDCG and its cache, and bad input (exit 2,
one line, nothing appended)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_olmo2, random_number_texts
from kfac_edit.cli import main
from kfac_edit.evaluate import ndcg
from kfac_edit.fileio import read_jsonl
from kfac_edit.testbed import number_tokenizer


@pytest.fixture
def inputs(tmp_path):
    mem = tmp_path / "mem.jsonl"
    mem.write_text(
        "".join(
            json.dumps({"prefix_ids": list(range(i, i + 10)), "suffix_ids": list(range(30 + i, 36 + i)), "source": s})
            + "\n"
            for i, s in zip(range(6), "aabbab")
        )
    )
    quotes = tmp_path / "quotes.jsonl"
    quotes.write_text(json.dumps({"prefix": "1 2 3", "target_suffix": "4 5 6"}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(random_number_texts(20, seed=7)) + "\n")
    return {"mem": mem, "quotes": quotes, "text": text}


def test_eval_appends_one_line_with_every_metric(tiny_model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = ["eval", "--model", str(tiny_model_dir), "--memorized", str(inputs["mem"]), "--quotes", str(inputs["quotes"]),
            "--perplexity-data", str(inputs["text"]), "--ndcg-data", str(inputs["text"]), "--reference-model",
            str(tiny_model_dir), "--prefix-len", "8", "--suffix-len", "5", "--ndcg-seq-len", "32", "--ppl-block", "16",
            "--perturb", "2", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    (line,) = read_jsonl(out)
    assert line["model"] == str(tiny_model_dir) and len(line["model_fingerprint"]) == 16
    assert line["config"]["prefix_len"] == 8 and line["config"]["perturb"] == 2 and line["timestamp"]
    m = line["metrics"]
    mem = m["memorized"]["mem"]
    assert mem["n"] == 6 and mem["mean_suffix_len"] == 5 and set(mem["per_source"]) == {"a", "b"}
    assert mem["per_source"]["a"]["n"] == 3
    assert mem["perturb"]["T"] == 2 and mem["perturb"]["prompts"] == 6 * (2 + (8 - 2 - 2 + 1))
    assert m["quotes"]["quotes"]["n"] == 1 and m["quotes"]["quotes"]["mean_suffix_len"] == 3
    assert m["perplexity"]["perplexity"] > 1 and m["perplexity"]["block_size"] == 16
    # the model against itself: the same top-k at every real position
    n_tokens = sum(len(t.split()) + 2 for t in inputs["text"].read_text().splitlines())  # + BOS + EOS
    assert m["ndcg"]["ndcg@10"] == 1.0 and m["ndcg"]["positions"] == n_tokens
    assert len(list((tmp_path / "cache" / "ndcg").glob("*.safetensors"))) == 1
    assert "ndcg.ndcg@10" in capsys.readouterr().out
    assert main(args) == 0
    assert len(read_jsonl(out)) == 2


def test_reference_topk_is_cached_and_keyed(tiny_model, tiny_tokenizer, inputs):
    reference = make_tiny_olmo2(seed=1)
    text = str(inputs["text"])
    first = ndcg.reference_topk(reference, tiny_tokenizer, text, k=4, seq_len=16, max_tokens=100, rows=3)
    assert first.shape == (112, 4) and first.dtype == torch.int32  # 7 full windows of 16: the budget is reached

    def must_not_load():
        raise AssertionError("the reference was loaded despite a cached top-k")

    identity = ndcg.model_identity(reference)
    again = ndcg.reference_topk(must_not_load, tiny_tokenizer, text, 4, 16, 100, rows=5, reference_identity=identity)
    assert torch.equal(first, again)
    other_k = ndcg.reference_topk(reference, tiny_tokenizer, text, k=3, seq_len=16, max_tokens=100)
    assert torch.equal(other_k, first[:, :3])
    out = ndcg.ndcg_at_k(tiny_model, tiny_tokenizer, text, first, seq_len=16, max_tokens=100, rows=2)
    assert out["positions"] == first.shape[0] and 0.0 <= out["ndcg@4"] < 1.0
    # brute force over the same positions
    top = ndcg.topk_over_source(tiny_model, tiny_tokenizer, text, 4, 16, 100, rows=7)
    assert out["ndcg@4"] == pytest.approx(float(ndcg.ndcg_scores(top, first).mean()), abs=1e-12)
    # an edit changes the weight digest, hence the cache key
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert ndcg.model_identity(reference)["weights"] != identity["weights"]


@pytest.fixture
def other_tokenizer_model(tmp_path):
    path = tmp_path / "other"
    make_tiny_olmo2(dtype=torch.float32).save_pretrained(path)
    number_tokenizer(50).save_pretrained(path)
    return path


BAD = {
    "malformed line": ("mem", '{"prefix_ids": [1, 2, 3, 4, 5, 6, 7, 8], "suffix_ids": [1, 2, 3, 4, 5]}\n{oops\n', ":2: malformed JSON"),
    "too short": ("mem", '{"prefix_ids": [1, 2, 3], "suffix_ids": [1, 2, 3, 4, 5]}\n', "fewer than the 8 + 5"),
    "outside vocab": ("mem", '{"prefix_ids": [1, 2, 3, 4, 5, 6, 7, 800], "suffix_ids": [1, 2, 3, 4, 5]}\n', "outside"),
    "empty file": ("mem", "", "holds no records"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_exit_2_and_append_nothing(case, tiny_model_dir, inputs, tmp_path, capsys):
    _, content, message = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "results.jsonl"
    code = main(["eval", "--model", str(tiny_model_dir), "--memorized", str(inputs["mem"]), str(bad),
                 "--prefix-len", "8", "--suffix-len", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("kfac-edit: error: ") and message in err and "\n" not in err  # the model is not loaded


def test_bad_options_exit_2_and_append_nothing(tiny_model_dir, other_tokenizer_model, inputs, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    base = ["eval", "--model", str(tiny_model_dir), "--out", str(out)]
    cases = [
        (["--ndcg-data", str(inputs["text"]), "--reference-model", str(other_tokenizer_model)], "another tokenizer"),
        (["--ndcg-data", str(inputs["text"])], "needs --reference-model"),
        (["--perplexity-data", str(tmp_path / "missing.txt")], "does not exist"),
        ([], "nothing to evaluate"),
        (["--memorized", str(inputs["mem"]), "--loose", "1.5"], "--loose 1.5"),
        (["--memorized", str(inputs["mem"]), "--prefix-len", "50", "--suffix-len", "20"], "fewer than"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert not out.exists()
