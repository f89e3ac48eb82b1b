"""``kfac-edit demo``: the helpers on hand-made points, and the whole pipeline end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from kfac_edit.cli import main
from kfac_edit.demo import DemoConfig, check_out_dir, choose_headline, format_table, matched_svd
from kfac_edit.errors import UserError
from kfac_edit.testbed import TestbedConfig


def _point(method: str, keep: float, canary: float, rule_loss: float, rule_acc: float = 1.0) -> dict:
    return {
        "method": method, "keep_mass": keep, "canary_strict": canary, "canary_loose": canary,
        "canary_match_len": 0.0, "rule_accuracy": rule_acc, "rule_loss": rule_loss,
        "perplexity": 2.718281828 ** rule_loss, "rule_loss_increase": rule_loss - 0.5, "weight_change": 0.1,
    }


BASE = _point("base", 1.0, 1.0, 0.5)


def test_matched_svd_is_the_cheapest_point_at_least_as_costly():
    kfac = _point("kfac", 0.95, 0.0, 0.52)
    svd = [_point("svd", 0.9, 1.0, 0.51), _point("svd", 0.8, 0.7, 0.53), _point("svd", 0.7, 0.1, 0.60)]
    assert matched_svd(kfac, svd)["keep_mass"] == 0.8
    assert matched_svd(_point("kfac", 0.5, 0.0, 0.9), svd) is None


def test_headline_is_the_sweep_choice_within_the_budget():
    config = DemoConfig(testbed=TestbedConfig.quick(), ppl_budget=1.05)  # rule loss increase <= log(1.05) = 0.0488
    kfac = [_point("kfac", 0.99, 0.8, 0.505), _point("kfac", 0.97, 0.0, 0.54), _point("kfac", 0.96, 0.0, 0.53),
            _point("kfac", 0.9, 0.0, 0.6)]
    # lowest strict within budget; among the 0% points the lower perplexity; 0.9 is over budget
    assert choose_headline(config, BASE, kfac)["keep_mass"] == 0.96
    fixed = DemoConfig(testbed=TestbedConfig.quick(), keep_mass=0.9)
    assert choose_headline(fixed, BASE, kfac)["keep_mass"] == 0.9
    assert 0.9 in fixed.kfac_grid
    # nothing within budget: the mildest edit
    assert choose_headline(config, BASE, [_point("kfac", 0.9, 0.0, 0.6), _point("kfac", 0.8, 0.0, 0.7)])[
        "keep_mass"] == 0.9


def test_config_validation():
    with pytest.raises(UserError, match="block 5"):
        DemoConfig(testbed=TestbedConfig.quick(), blocks=(5,))
    with pytest.raises(UserError, match="outside"):
        DemoConfig(testbed=TestbedConfig.quick(), svd_grid=(1.2,))


def test_out_dir_that_is_not_a_demo_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="not a demo directory"):
        check_out_dir(tmp_path)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").read_text() == "x"
    check_out_dir(tmp_path / "new")  # a new path is fine


@pytest.mark.slow
def test_demo_end_to_end_through_the_cli(tmp_path, capsys, monkeypatch):
    """The quick demo: base memorizes, K-FAC removes the canaries and keeps the rule, SVD at matched cost does not."""
    monkeypatch.setenv("KFAC_EDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    base, kfac, svd = results["base"], results["headline"]["kfac"], results["headline"]["svd_matched"]
    print(results["table"] if "table" in results else printed)

    # the base model memorized the canaries and learned the rule
    assert base["canary_strict"] >= 0.95 and base["rule_accuracy"] >= 0.97
    # the K-FAC edit removes the canaries and keeps the rule
    assert kfac["canary_strict"] <= 0.05
    assert kfac["rule_accuracy"] >= 0.93
    assert kfac["rule_loss_increase"] <= 0.05
    # SVD, at a rule-loss cost at least as large, keeps clearly more canaries
    assert svd is not None and svd["rule_loss_increase"] >= kfac["rule_loss_increase"]
    assert svd["canary_strict"] - kfac["canary_strict"] >= 0.2
    # every K-FAC point that keeps 99% of the curvature leaves the model nearly intact
    mild = [p for p in results["points"] if p["method"] == "kfac" and p["keep_mass"] >= 0.995]
    assert mild and all(abs(p["rule_loss_increase"]) < 0.01 for p in mild)

    # the rule accuracy of evaluate (greedy generation) equals testbed.rule_accuracy (teacher-forced)
    from kfac_edit.fileio import read_jsonl
    from kfac_edit.models import load_model
    from kfac_edit.testbed import rule_accuracy

    model, _ = load_model(results["testbed"]["directory"] + "/model", dtype="float32", device="cpu")
    rule_records = read_jsonl(results["testbed"]["directory"] + "/rule_heldout.jsonl")
    assert rule_accuracy(model, rule_records) == pytest.approx(base["rule_accuracy"])

    # the console shows the table; the directory holds the report, plots, factors and the edited model
    assert "K-FAC (headline)" in printed and "SVD (matched cost)" in printed
    for name in ("results.jsonl", "before_after.json", "best.json", "sweep.json", "table.txt", "report.html", "report.md",
                 "plots/demo_keep_mass.png", "plots/demo_tradeoff.png", "factors/manifest.json",
                 "edited/edit_report.json", "edited/config.json"):
        assert (out / name).exists(), name
    edited, _ = load_model(str(out / "edited"), dtype="float32", device="cpu")
    assert rule_accuracy(edited, rule_records) == pytest.approx(kfac["rule_accuracy"])
    from kfac_edit.pareto import read_results

    records = read_results(out)
    assert len(records) == 1 + len(results["points"])
    from kfac_edit.edit import EditSpec

    spec = EditSpec.from_file(out / "best.json")  # what `kfac-edit edit --layers-file` reads
    assert set(spec.keep_mass.values()) == {kfac["keep_mass"]} and spec.blocks == [0, 1]
    assert results["testbed"]["cached"] is False

    # second run: the testbed comes from the cache
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["testbed"]["cached"] is True
    assert again["base"] == base


def test_format_table_names_every_point():
    results = {
        "base": BASE, "points": [_point("kfac", 0.97, 0.0, 0.51), _point("svd", 0.8, 0.6, 0.52)],
        "headline": {"kfac": _point("kfac", 0.97, 0.0, 0.51), "svd_matched": _point("svd", 0.8, 0.6, 0.52)},
        "config": {"blocks": [0, 1], "projections": ["gate", "up"], "labels": "sampled"},
        "testbed": {"config_hash": "abc", "n_parameters": 140000, "cached": True,
                    "config": {"n_layers": 2, "n_canaries": 40, "canary_repeats": 30, "n_numbers": 100}},
        "factors": {"tokens": 1000},
        "checks": {"kfac_canary_strict": {"value": 0.0, "target": "<= 0.05", "ok": True}},
        "timings_s": {"total": 1.0},
    }
    table = format_table(results)
    assert "K-FAC (headline)" in table and "0.97" in table and "60.0%" in table and "(+0.0100)" in table
    assert "ok   K-FAC canary strict memorization" in table and "(cache hit)" in table
