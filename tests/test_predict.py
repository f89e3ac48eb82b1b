"""`predict`: the share of a task's curvature in the pairs an edit removes, on cases whose answer is known."""

from __future__ import annotations

import json

import pytest
import torch
from test_collect import exact_model
from test_ekfac import gold_batch

from kfac_edit.cli import main
from kfac_edit.curvature import eigendecompose, select_pairs
from kfac_edit.edit import apply_edit, restore
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.ekfac import collect_ekfac
from kfac_edit.models import find_projections
from kfac_edit.predict import predict_cost, removed_share, task_mass, PredictMode
from kfac_edit.spec import EditSpec

DOWN = "model.layers.1.mlp.down_proj"


def test_task_in_kept_directions_predicts_zero():
    model = exact_model()
    batch = gold_batch(shape=(4, 9))
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    grad_eig, act_eig = eigendecompose(factors.grad_cov(DOWN)), eigendecompose(factors.activation_cov(DOWN))
    k = 5
    kept = torch.zeros(factors.shape(DOWN), dtype=torch.bool)
    kept[:, :k] = True  # every row keeps the top-k A eigenvectors: the pairs of those directions stay
    basis = act_eig.vectors[:, :k]
    proj = find_projections(model, layers=[1], projections=["down"])[0]
    handle = proj.module.register_forward_pre_hook(lambda m, args: ((args[0] @ basis) @ basis.T,))
    try:  # the task's activations lie in span(u_A[:k]): none of its curvature is in removed pairs
        inside = collect_ekfac(model, factors, [gold_batch(seed=4, shape=(4, 9))], names=[DOWN], labels="gold",
                               progress=False)  # fmt: skip
    finally:
        handle.remove()
    outside = collect_ekfac(model, factors, [gold_batch(seed=4, shape=(4, 9))], names=[DOWN], labels="gold",
                            progress=False)  # fmt: skip
    coeffs = grad_eig.vectors.T @ proj.weight().detach() @ act_eig.vectors
    for mode in PredictMode:
        assert removed_share(task_mass(inside, DOWN, mode, grad_eig, coeffs), kept) < 1e-20, mode
        assert removed_share(task_mass(outside, DOWN, mode, grad_eig, coeffs), kept) > 0.01, mode


def test_predict_on_the_collection_data_is_the_removed_mass():
    """With the task = the factors' own data, the activation share is 1 - kept K-FAC mass and the curvature share
    under --method ekfac is 1 - kept EK-FAC mass: both known from the edit report."""
    model = exact_model()
    batch = gold_batch(shape=(4, 9))
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, [batch], progress=False)
    layers = {"0": {"gate": 0.5, "down": 0.7}, "1": {"up": 0.6}}
    for method, mode in (("kfac", "activation"), ("ekfac", "curvature")):
        spec = EditSpec.from_json(layers, method=method)
        costs = predict_cost(model, factors, spec, {"own": [batch], "other": [gold_batch(seed=8)]}, mode=mode,
                             ekfac=ekfac)  # fmt: skip
        report = apply_edit(model, factors, spec, ekfac=ekfac)
        restore(model)
        own = costs[0]
        assert own.task == "own" and own.labelled_tokens == 8 + 5 + 4 + 8  # rows: full, 3 left-padded, cut after 5, full
        for record in report.modules:
            assert abs(own.modules[record.name] - (1 - record.mass_fraction)) < 1e-9, (method, record.name)
        assert abs(own.share - sum(1 - r.mass_fraction for r in report.modules) / 3) < 1e-9
        assert 0.0 < costs[1].share < 1.0 and costs[1].share != own.share
        assert own.loss_estimate > 0
    # the loss estimate is ½ Σ_removed m_ij C_ij², by hand for one module
    spec = EditSpec.from_json({"1": {"up": 0.6}})
    cost = predict_cost(model, factors, spec, {"own": [batch]}, mode="loss")[0]
    name = "model.layers.1.mlp.up_proj"
    grad_eig, act_eig = eigendecompose(factors.grad_cov(name)), eigendecompose(factors.activation_cov(name))
    coeffs = grad_eig.vectors.T @ model.get_submodule(name).weight.detach() @ act_eig.vectors
    own_ekfac = collect_ekfac(model, factors, [batch], names=[name], labels="gold", progress=False)
    report = apply_edit(model, factors, spec)
    restore(model)
    kept_pairs = torch.zeros(factors.shape(name), dtype=torch.bool)
    counts = select_pairs(grad_eig.values, act_eig.values, 0.6)
    for i, c in enumerate(counts.tolist()):
        kept_pairs[i, :c] = True
    assert int(kept_pairs.sum()) == report.modules[0].pairs_kept
    weighted = own_ekfac.pair_mass(name) * coeffs.square()
    assert abs(cost.loss_estimate - 0.5 * float(weighted[~kept_pairs].sum())) < 1e-10 * cost.loss_estimate
    assert abs(cost.share - float(weighted[~kept_pairs].sum() / weighted.sum())) < 1e-10


def test_cli_predict_writes_json_with_config(tmp_path, tiny_model_dir, tiny_corpus_jsonl, capsys):
    factors = tmp_path / "factors"
    assert main(["collect", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_jsonl), "--device", "cpu",
                 "--seq-len", "16", "--batch-size", "4", "--tokens", "300", "--no-progress", "--out", str(factors)]) == 0
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prefix_ids": [60, i, i + 1], "suffix_ids": [i + 2, i + 3]}) + "\n"
                            for i in range(10)))  # fmt: skip
    out = tmp_path / "predict.json"
    argv = ["predict", "--model", str(tiny_model_dir), "--factors", str(factors), "--layers-json",
            '{"1": {"up": 0.5}}', "--data", str(task), str(tiny_corpus_jsonl), "--device", "cpu", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "% of its activation in removed pairs" in printed
    result = json.loads(out.read_text())
    assert result["config"]["spec"]["layers"] == {"1": {"up": 0.5}} and result["config"]["mode"] == "activation"
    assert [t["task"] for t in result["tasks"]] == [str(task), str(tiny_corpus_jsonl)]
    assert result["tasks"][0]["labelled_tokens"] == 40
    assert all(0.0 < t["share"] < 1.0 for t in result["tasks"])
    with pytest.raises(SystemExit) as exc:  # predict offers only the curvature methods
        main(argv[:-4] + ["--method", "svd"])
    assert exc.value.code == 2 and "invalid choice: 'svd'" in capsys.readouterr().err
    svd_file = tmp_path / "svd.json"  # ... and a layers file naming another is refused too
    svd_file.write_text(json.dumps({"method": "svd", "seed": 0, "layers": {"1": {"up": 0.5}}}))
    assert main(argv[:5] + ["--layers-file", str(svd_file)] + argv[7:-4]) == 2
    assert "not svd" in capsys.readouterr().err
    assert main(argv[:7] + ["--data", str(tmp_path / "missing.jsonl"), "--device", "cpu"]) == 2
    assert "is not a file" in capsys.readouterr().err
