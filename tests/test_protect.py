"""`--method ekfac` and `--protect` edits against explicit sums over kept pairs (fp64), and their bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_olmo2
from test_collect import exact_model
from test_ekfac import brute_force_select, gold_batch

from kfac_edit.cli import main
from kfac_edit.curvature import eigendecompose
from kfac_edit.edit import Protection, apply_edit, restore
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.ekfac import collect_ekfac
from kfac_edit.spec import EditSpec

NAME = "model.layers.1.mlp.up_proj"
SPEC = {"1": {"up": 0.6}}


def explicit_edit(weight, grad_eig, act_eig, keep):
    """Σ over kept pairs of C[i, j] u_G[i] u_A[j]ᵀ, one pair at a time."""
    coeffs = grad_eig.vectors.T @ weight @ act_eig.vectors
    out = torch.zeros_like(weight)
    for i, j in zip(*np.nonzero(keep)):
        out += coeffs[i, j] * torch.outer(grad_eig.vectors[:, i], act_eig.vectors[:, j])
    return out


def setup():
    model = exact_model()
    batch = gold_batch(shape=(4, 9))
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    return model, batch, factors


def test_ekfac_edit_keeps_the_top_ekfac_pairs():
    model, batch, factors = setup()
    ekfac = collect_ekfac(model, factors, [batch], progress=False)
    weight = model.get_submodule(NAME).weight.detach().clone()
    report = apply_edit(model, factors, EditSpec.from_json(SPEC, method="ekfac"), ekfac=ekfac)
    grad_eig, act_eig = eigendecompose(factors.grad_cov(NAME)), eigendecompose(factors.activation_cov(NAME))
    mass = ekfac.pair_mass(NAME).numpy()
    keep = brute_force_select(mass, 0.6)
    expected = explicit_edit(weight, grad_eig, act_eig, keep)
    assert torch.allclose(model.get_submodule(NAME).weight, expected, atol=1e-10)
    record = report.modules[0]
    assert record.pairs_kept == int(keep.sum())
    assert abs(record.mass_fraction - mass[keep].sum() / mass.sum()) < 1e-12 and record.mass_fraction >= 0.6
    # ekfac selects other pairs than kfac here (the correction matters on this batch)
    restore(model)
    kfac = apply_edit(model, factors, EditSpec.from_json(SPEC, method="kfac"))
    assert kfac.modules[0].pairs_kept != record.pairs_kept or not torch.allclose(model.get_submodule(NAME).weight, expected)


def test_protect_keeps_the_union_of_both_selections():
    model, batch, factors = setup()
    protect = collect_factors(model, [gold_batch(seed=7, shape=(4, 9))], labels="gold", progress=False)
    weight = model.get_submodule(NAME).weight.detach().clone()
    report = apply_edit(model, factors, EditSpec.from_json(SPEC), protect=Protection(protect, 0.5))
    grad_eig, act_eig = eigendecompose(factors.grad_cov(NAME)), eigendecompose(factors.activation_cov(NAME))
    out_dim, in_dim = weight.shape
    fisher_p = torch.kron(protect.grad_cov(NAME), protect.activation_cov(NAME))  # vec(W) row-major
    protected = np.zeros((out_dim, in_dim))
    for i in range(out_dim):
        for j in range(in_dim):
            v = torch.kron(grad_eig.vectors[:, i], act_eig.vectors[:, j])
            protected[i, j] = float(v @ fisher_p @ v)
    own = torch.outer(grad_eig.values, act_eig.values).numpy()
    keep_own, keep_protected = brute_force_select(own, 0.6), brute_force_select(protected, 0.5)
    keep = keep_own | keep_protected
    assert keep.sum() > keep_own.sum()  # the protection adds pairs
    expected = explicit_edit(weight, grad_eig, act_eig, keep)
    assert torch.allclose(model.get_submodule(NAME).weight, expected, atol=1e-10)
    record = report.modules[0]
    assert record.pairs_kept == int(keep.sum())
    assert abs(record.protected_mass_fraction - protected[keep].sum() / protected.sum()) < 1e-9
    assert record.protected_mass_fraction >= 0.5
    # weight 0 protects nothing: the plain kfac edit
    apply_edit(model, factors, EditSpec.from_json(SPEC), protect=Protection(protect, 0.0))
    assert torch.allclose(model.get_submodule(NAME).weight, explicit_edit(weight, grad_eig, act_eig, keep_own), atol=1e-10)


def test_protect_and_ekfac_bad_input():
    model, batch, factors = setup()
    other_model = exact_model(layers=3)
    foreign = collect_factors(other_model, [batch], labels="gold", progress=False)
    with pytest.raises(UserError, match="collected on another model"):
        apply_edit(model, factors, EditSpec.from_json(SPEC), protect=Protection(foreign))
    partial = collect_factors(model, [batch], labels="gold", layers=[0], progress=False)
    with pytest.raises(UserError, match="no factors for model.layers.1.mlp.up_proj"):
        apply_edit(model, factors, EditSpec.from_json(SPEC), protect=Protection(partial))
    with pytest.raises(UserError, match="--protect-weight 1.5"):
        Protection(partial, 1.5)
    with pytest.raises(UserError, match="not svd"):
        apply_edit(model, factors, EditSpec.from_json(SPEC, method="svd"), protect=Protection(factors))
    with pytest.raises(UserError, match="collect --ekfac"):
        apply_edit(model, factors, EditSpec.from_json(SPEC, method="ekfac"))
    refit = collect_factors(model, [gold_batch(seed=3)], labels="gold", progress=False)
    ekfac_other = collect_ekfac(model, refit, [batch], progress=False)
    with pytest.raises(UserError, match="eigenbasis of other factors"):
        apply_edit(model, factors, EditSpec.from_json(SPEC, method="ekfac"), ekfac=ekfac_other)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), exact_model().parameters()))  # untouched


def test_cli_collect_ekfac_edit_ekfac_and_protect(tmp_path, tiny_model_dir, tiny_corpus_jsonl, capsys):
    factors = tmp_path / "factors"
    base = ["collect", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_jsonl), "--device", "cpu"]
    base += ["--seq-len", "16", "--batch-size", "4", "--tokens", "400", "--no-progress"]
    assert main(base + ["--out", str(factors), "--ekfac"]) == 0
    assert "EK-FAC eigenvalues of 6 modules" in capsys.readouterr().out
    manifest = json.loads((factors / "manifest.json").read_text())
    assert set(manifest["ekfac"]["modules"]) == set(manifest["modules"])
    edit = ["edit", "--model", str(tiny_model_dir), "--factors", str(factors), "--device", "cpu"]
    edit += ["--cache-dir", str(tmp_path / "cache"), "--layers-json", json.dumps(SPEC)]
    assert main(edit + ["--out", str(tmp_path / "e1"), "--method", "ekfac"]) == 0
    report = json.loads((tmp_path / "e1" / "edit_report.json").read_text())
    assert report["method"] == "ekfac" and report["modules"][0]["mass_fraction"] >= 0.6
    # protected factors of block 0 only: other modules, one line, exit 2, nothing written
    partial = tmp_path / "partial"
    assert main(base + ["--out", str(partial), "--layers", "0"]) == 0
    capsys.readouterr()
    assert main(edit + ["--out", str(tmp_path / "e2"), "--protect", str(partial)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kfac-edit: error: ") and "cover other modules" in err and not (tmp_path / "e2").exists()
    foreign = tmp_path / "foreign"  # same shapes, another model (3 blocks): refused by its config fingerprint
    collect_factors(make_tiny_olmo2(dtype=torch.float32, layers=3), [gold_batch()], labels="gold", layers=[1],
                    progress=False, out=foreign)  # fmt: skip
    assert main(edit + ["--out", str(tmp_path / "e2"), "--protect", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "collected on another model" in err and not (tmp_path / "e2").exists()
    assert main(edit + ["--out", str(tmp_path / "e3"), "--protect", str(factors), "--protect-weight", "0.5"]) == 0
    report = json.loads((tmp_path / "e3" / "edit_report.json").read_text())
    assert report["modules"][0]["protected_mass_fraction"] >= 0.5
    assert report["factor_manifest"]["protect"]["weight"] == 0.5
    # EK-FAC eigenvalues of other factors (the factors recollected on other data afterwards): exit 2
    recollect = base + ["--out", str(factors), "--overwrite", "--seed", "3"]
    ekfac_file = (factors / "ekfac.safetensors").read_bytes()
    assert main(recollect) == 0
    (factors / "ekfac.safetensors").write_bytes(ekfac_file)
    manifest2 = json.loads((factors / "manifest.json").read_text())
    assert "ekfac" not in manifest2
    assert main(edit + ["--out", str(tmp_path / "e4"), "--method", "ekfac"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "eigenbasis of other factors" in err and not (tmp_path / "e4").exists()
