"""`kfac-edit collect` and `kfac-edit import-factors` end to end (in-process), bad input included."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_olmo2

from kfac_edit.cli import main
from kfac_edit.data import token_batches
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import CollectConfig, collect_factors
from kfac_edit.factors.store import MANIFEST_FILE, TENSORS_FILE, Factors
from kfac_edit.models import load_model


def collect_args(model_dir, data, out, *extra):
    return [
        "collect", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--seq-len", "16", "--batch-size", "4", "--tokens", "300", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_collect_end_to_end(tiny_model_dir, tiny_corpus_jsonl, tmp_path, capsys):
    out = tmp_path / "factors"
    assert main(collect_args(tiny_model_dir, tiny_corpus_jsonl, out, "--layers", "1", "--labels", "gold")) == 0
    summary = capsys.readouterr().out
    assert "collected 3 modules (1 blocks x gate,up,down, gold labels)" in summary and "tokens/s" in summary
    factors = Factors.load(out)
    assert factors.names == [f"model.layers.1.mlp.{k}_proj" for k in ("gate", "up", "down")]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["model"] == str(tiny_model_dir) and manifest["data"] == str(tiny_corpus_jsonl.resolve())
    assert manifest["labels"] == "gold" and manifest["seq_len"] == 16 and manifest["dtype"] == "float32"
    assert 300 <= manifest["tokens"] < 300 + 4 * 16 and manifest["layers"] == [1]
    # the CLI is a thin layer: same numbers as the Python API on the same model and data
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")

    def api_batches():
        return token_batches(str(tiny_corpus_jsonl), tok, 16, 4, max_tokens=300, with_index=True)

    api = collect_factors(model, api_batches(), layers=[1], labels="gold", max_tokens=300, progress=False)
    # the same call with the source string (packed by the library) and an output directory, as the README shows
    config = CollectConfig(layers="1", labels="gold", seq_len=16, batch_size=4, max_tokens=300, progress=False)
    packed = collect_factors(model, str(tiny_corpus_jsonl), config, tokenizer=tok, out=tmp_path / "api")
    assert Factors.load(tmp_path / "api").names == packed.names == api.names
    assert packed.manifest["data"] == manifest["data"] and packed.manifest["max_tokens"] == 300
    for name in api.names:
        assert torch.allclose(factors.modules[name].grad_sum, api.modules[name].grad_sum, rtol=1e-5, atol=1e-7)
        assert torch.equal(packed.modules[name].grad_sum, api.modules[name].grad_sum)
        assert factors.tokens(name) == api.tokens(name) == packed.tokens(name) == manifest["labelled_tokens"]
    with pytest.raises(UserError, match="needs a tokenizer"):
        collect_factors(model, str(tiny_corpus_jsonl), config)
    with pytest.raises(UserError, match="give a list, not an iterator"):
        collect_factors(model, iter(api_batches()), config, layers_per_pass=1, layers=None)
    # a second run refuses to overwrite, unless asked
    assert main(collect_args(tiny_model_dir, tiny_corpus_jsonl, out, "--layers", "0")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(collect_args(tiny_model_dir, tiny_corpus_jsonl, out, "--layers", "0", "--overwrite")) == 0
    assert Factors.load(out).names[0] == "model.layers.0.mlp.gate_proj"


@pytest.fixture
def nan_model_dir(tmp_path, tiny_tokenizer):
    model = make_tiny_olmo2(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_collect_bad_input(tiny_model_dir, tiny_corpus_jsonl, nan_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18"}\n{"text": oops}\n')
    cases = [
        (["--layers", "7"], tiny_corpus_jsonl, "layer 7 does not exist"),
        (["--projections", "gate,fc"], tiny_corpus_jsonl, "unknown projection 'fc'"),
        (["--seq-len", "65"], tiny_corpus_jsonl, "beyond the model's context of 64"),
        (["--batch-size", "0"], tiny_corpus_jsonl, "--batch-size must be a positive"),
        (["--modules", "up=mlp.fc_in"], tiny_corpus_jsonl, "block 0 has no module 'mlp.fc_in'"),
        ([], tmp_path / "missing.jsonl", "does not exist"),
        ([], empty, "holds no documents"),
        ([], broken, r"broken\.jsonl:2: malformed JSON"),
    ]
    out = tmp_path / "out"
    for extra, data, message in cases:
        assert main(collect_args(tiny_model_dir, data, out, *extra)) == 2, message
        err = capsys.readouterr().err
        # one error line, no traceback (transformers' own weight-loading bar may precede it)
        assert "Traceback" not in err and err.count("kfac-edit: error:") == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("kfac-edit: error:") and re.search(message, last), (message, err)
        assert not (out / TENSORS_FILE).exists() and not (out / MANIFEST_FILE).exists()
    assert main(collect_args(nan_model_dir, tiny_corpus_jsonl, out, "--labels", "gold")) == 2
    err = capsys.readouterr().err
    assert "contains NaN/Inf" in err and "model.layers.0.mlp" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(collect_args(tmp_path / "no-model", tiny_corpus_jsonl, out)) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_import_factors_cli(tiny_model_dir, tmp_path, capsys):
    A = torch.eye(16) * 2
    ref = {}
    for i in (0, 1):
        ref[f"blk{i}.gate"] = {"A": A, "G": torch.eye(24), "n_tokens": 500}
        ref[f"blk{i}.up"] = {"A": A, "G": torch.eye(24) * 3, "n_tokens": 500}
        ref[f"blk{i}.down"] = {"A": torch.eye(24), "G": torch.eye(16), "n_tokens": 500}
    torch.save(ref, tmp_path / "old.pt")
    out = tmp_path / "imported"
    assert main(["import-factors", str(tmp_path / "old.pt"), "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    assert "imported 6 modules (2 shared gate/up activation factors)" in capsys.readouterr().out
    factors = Factors.load(out)
    assert torch.equal(factors.activation_cov("model.layers.1.mlp.up_proj"), A)
    assert torch.equal(factors.grad_cov("model.layers.1.mlp.up_proj"), torch.eye(24) * 3)
    assert factors.manifest["imported_from"] == str((tmp_path / "old.pt").resolve())
    assert factors.manifest["grad_convention"].startswith("mean-loss G: ours / (B*(S-1))^2")
    templated = tmp_path / "templated"
    assert main(["import-factors", str(tmp_path / "old.pt"), "--out", str(templated), "--name-template", "h.{i}.{proj}"]) == 0
    assert Factors.load(templated).names[:2] == ["h.0.gate", "h.0.up"]
    ref["blk0.down"]["G"] = torch.eye(3)
    torch.save(ref, tmp_path / "wrong.pt")
    bad_out = tmp_path / "bad"
    assert main(["import-factors", str(tmp_path / "wrong.pt"), "--out", str(bad_out), "--model", str(tiny_model_dir)]) == 2
    assert "right --model" in capsys.readouterr().err and not bad_out.exists()
