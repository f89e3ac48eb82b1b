"""BalancedSubnet (``--method bsn``): the mask, the learning on the testbed, the data checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kfac_edit.bsn import BsnConfig, BsnData, BsnInputs, check_disjoint, learn_masks, load_bsn_data, mask_of
from kfac_edit.edit import apply_edit, restore
from kfac_edit.errors import UserError
from kfac_edit.fileio import read_jsonl
from kfac_edit.models import find_projections
from kfac_edit.spec import EditSpec, Method


def test_mask_drops_the_smallest_scores_and_passes_gradients_straight_through():
    scores = torch.tensor([[0.3, -0.1, 2.0], [-0.05, 1.0, -0.7]], requires_grad=True)
    mask = mask_of(scores, keep=0.5)  # int(0.5 * 6) = 3 dropped: |s| = 0.05, 0.1, 0.3
    assert mask.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    (mask * torch.arange(6.0).view(2, 3)).sum().backward()
    # straight through the top-k, then through |s|: sign(s) * upstream
    assert scores.grad.tolist() == [[0.0, -1.0, 2.0], [-3.0, 4.0, -5.0]]
    assert mask_of(scores, keep=0.99999).sum() == 6  # too small a share to drop one entry drops none


def test_method_bsn_needs_no_factors_but_data(tiny_model):
    assert Method.parse("bsn") is Method.BSN and not Method.BSN.needs_factors and Method.BSN.needs_data
    with pytest.raises(UserError, match="--forget FILE"):
        apply_edit(tiny_model, None, EditSpec({(0, "up"): 0.9}, "bsn"))


def test_forget_set_overlapping_heldout_is_refused():
    a = {"prefix_ids": [1, 2], "suffix_ids": [3]}
    b = {"prefix_ids": [1, 2], "suffix_ids": [4]}
    check_disjoint([a], [b])
    with pytest.raises(UserError, match="shares 1 record"):
        check_disjoint([a, b], [b])
    with pytest.raises(UserError, match="forget records"):
        BsnData([], [[1, 2]])


def test_bsn_lowers_forget_memorization_on_the_testbed():
    """On the quick arithmetic testbed, masking 5% of every MLP weight learned on half the canaries removes most
    of them, keeps the rule, and the edit restores bit for bit (testbed build + learning: well under 2 minutes)."""
    from kfac_edit.models import load_model
    from kfac_edit.sweep import split_records
    from kfac_edit.testbed import TestbedConfig, build_testbed, exact_continuations

    paths = build_testbed(TestbedConfig.quick(), progress=False)
    model, tok = load_model(str(paths.model_dir), device="cpu")
    selection, heldout = split_records(read_jsonl(paths.memorized), 0.5, seed=0)
    forget_texts = {f"{r['prefix_text']} {r['suffix_text']}" for r in selection}
    clean = [r["text"] for r in read_jsonl(paths.corpus) if r["text"] not in forget_texts]
    config = BsnConfig(epochs=30, max_clean_tokens=20_000)
    data = load_bsn_data(selection, clean, tok, config)
    assert len(data.forget) == len(selection) == 15 and all(len(s) == 25 for s in data.forget)

    def strict(records):
        return float(np.mean(exact_continuations(model, records)))

    rules = read_jsonl(paths.rule_heldout)
    assert strict(selection) == 1.0
    rule_before = strict(rules)
    before = {p.name: p.module.weight.detach().clone() for p in find_projections(model)}
    spec = EditSpec({(b, k): 0.95 for b in (0, 1) for k in ("gate", "up", "down")}, "bsn")
    report = apply_edit(model, None, spec, bsn=BsnInputs(data, config))
    assert strict(selection) <= 0.2  # measured: 1.0 -> 0.067
    assert strict(rules) >= rule_before - 0.1  # measured: 1.0 -> 0.945
    for m in report.modules:
        w = model.get_submodule(m.name).weight.detach()
        zeroed = (w == 0) & (before[m.name] != 0)
        assert int(zeroed.sum()) == int(0.05 * w.numel())  # exactly the ratio of entries dropped
        assert torch.equal(w[~zeroed], before[m.name][~zeroed])  # the rest untouched
        assert m.pairs_kept == w.numel() - int(0.05 * w.numel()) and m.method == "bsn"
    restore(model)
    assert all(torch.equal(p.module.weight, before[p.name]) for p in find_projections(model))


def test_learn_masks_is_deterministic_and_leaves_the_model_alone(tiny_model):
    data = BsnData(forget=[[1, 2, 3, 4, 5]] * 3, clean=[[5, 4, 3, 2, 1, 0]] * 5)
    targets = [(p, 0.8) for p in find_projections(tiny_model, layers=[0], projections=["up"])]
    before = targets[0][0].module.weight.detach().clone()
    config = BsnConfig(epochs=2, batch_size=4, seed=3)
    first = learn_masks(tiny_model, targets, data, config, progress=False)
    second = learn_masks(tiny_model, targets, data, config, progress=False)
    name = targets[0][0].name
    assert torch.equal(first[name], second[name])
    assert torch.equal(targets[0][0].module.weight, before)
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert int((~first[name]).sum()) == int(0.2 * before.numel() + 1e-9)


from test_sweep import _argv, sweep_inputs  # noqa: E402,F401  (the tiny model, factors and records of test_sweep)


def test_sweep_and_edit_cli_run_bsn_and_refuse_bad_data(sweep_inputs, tmp_path, capsys):
    from kfac_edit.cli import main

    inp, out = sweep_inputs, tmp_path / "bsn"
    argv = _argv(inp, out, "--method", "kfac,bsn", "--keep-mass", "bsn=0.8", "--group", "0-1",
                 "--clean-data", str(inp["text"]), "--bsn-epochs", "2", "--bsn-batch-size", "8",
                 "--bsn-clean-seq-len", "64")  # the tiny model's context
    assert main(argv) == 0
    capsys.readouterr()
    lines = read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in lines] == ["base", "kfac|b0-1|gate,up|k0.3", "kfac|b0-1|gate,up|k0.9",
                                        "bsn|b0-1|gate,up|k0.8"]
    edit = lines[-1]["edit"]["modules"]
    assert len(edit) == 4 and all(m["pairs_fraction"] == pytest.approx(0.8, abs=5e-3) for m in edit)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["identity"]["bsn"]["epochs"] == 2 and sweep["identity"]["bsn"]["loss_weight"] == 0.05
    # the held-out records as the forget set: refused, one line, exit 2, nothing written
    heldout = out / "split" / "heldout.jsonl"
    for extra, message in (([*argv[argv.index("--method"):], "--forget", str(heldout)], "shares"),
                           (["--method", "bsn", "--keep-mass", "bsn=0.8"], "--clean-data SOURCE")):
        bad = _argv(inp, tmp_path / "bad", *extra)
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    assert main(["edit", "--model", str(inp["model"]), "--layers-json", '{"0": {"up": 0.9}}', "--method", "bsn",
                 "--out", str(tmp_path / "edited"), "--device", "cpu"]) == 2
    assert "--forget FILE" in capsys.readouterr().err and not (tmp_path / "edited").exists()
    assert main(["edit", "--model", str(inp["model"]), "--layers-json", '{"0": {"up": 0.9}}', "--method", "bsn",
                 "--forget", str(inp["mem"]), "--clean-data", str(inp["text"]), "--bsn-epochs", "1",
                 "--bsn-clean-seq-len", "64", "--out", str(tmp_path / "edited"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "edited" / "edit_report.json").read_text())
    assert report["method"] == "bsn" and report["modules"][0]["pairs_fraction"] == pytest.approx(0.9, abs=5e-3)
    run_dir = tmp_path / "run"
    assert main(["run", "--model", str(inp["model"]), "--layers-json", '{"0": {"up": 0.9}}', "--method", "bsn",
                 "--out", str(run_dir), "--device", "cpu", "--memorized", str(inp["mem"]), "--prefix-len", "8",
                 "--suffix-len", "6", "--batch-size", "16"]) == 2
    assert "--forget FILE" in capsys.readouterr().err and not run_dir.exists()
    assert main(["run", "--model", str(inp["model"]), "--layers-json", '{"0": {"up": 0.9}}', "--method", "bsn",
                 "--forget", str(inp["mem"]), "--clean-data", str(inp["text"]), "--bsn-epochs", "1",
                 "--bsn-clean-seq-len", "64", "--out", str(run_dir), "--device", "cpu", "--memorized", str(inp["mem"]),
                 "--prefix-len", "8", "--suffix-len", "6", "--batch-size", "16"]) == 0
    edited = json.loads((run_dir / "edited" / "edit_report.json").read_text())
    assert edited["method"] == "bsn" and edited["modules"][0]["name"] == "model.layers.0.mlp.up_proj"
