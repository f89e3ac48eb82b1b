"""``kfac-edit demo``: the helpers on hand-made points, and the whole pipeline end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from kfac_edit.cli import main
from kfac_edit.demo import DemoConfig, check_out_dir, choose_headline, format_table, matched_svd
from kfac_edit.errors import UserError
from kfac_edit.pareto import BASE_CONFIG, PointConfig, SweepRecord
from kfac_edit.testbed import TestbedConfig


def _record(method: str, keep: float, selection: float, ppl: float, heldout: float | None = None) -> SweepRecord:
    metrics = {"strict": selection, "loose": selection, "selection_strict": selection,
               "heldout_strict": selection if heldout is None else heldout, "perplexity": ppl}
    if method == "base":
        return SweepRecord(BASE_CONFIG, metrics, kind="base")
    return SweepRecord(PointConfig(method, (0, 1), ("gate", "up", "down"), keep), metrics)


BASE = _record("base", 1.0, 1.0, 2.0)


def test_matched_svd_is_the_svd_choice_within_the_same_perplexity_budget():
    config = DemoConfig(testbed=TestbedConfig.quick(), ppl_budget=1.05)  # perplexity <= 2.1
    svd = [_record("svd", 0.9, 1.0, 2.02), _record("svd", 0.8, 0.7, 2.08), _record("svd", 0.7, 0.1, 2.3)]
    kfac = _record("kfac", 0.97, 0.0, 2.05)
    assert matched_svd(config, [BASE, kfac, *svd], kfac).config.keep_mass == 0.8
    # a headline over the budget widens the match to its own perplexity
    costly = _record("kfac", 0.9, 0.0, 2.4)
    assert matched_svd(config, [BASE, costly, *svd], costly).config.keep_mass == 0.7
    assert matched_svd(config, [BASE, kfac, _record("svd", 0.5, 0.0, 3.0)], kfac) is None


def test_headline_is_the_sweep_choice_on_the_selection_part_within_the_budget():
    config = DemoConfig(testbed=TestbedConfig.quick(), ppl_budget=1.05)
    kfac = [_record("kfac", 0.99, 0.8, 2.01), _record("kfac", 0.97, 0.0, 2.08, heldout=0.0),
            _record("kfac", 0.96, 0.0, 2.06, heldout=0.3), _record("kfac", 0.9, 0.0, 2.5)]
    # lowest selection strict within budget; among the 0% points the lower perplexity (held-out plays no part)
    assert choose_headline(config, [BASE, *kfac]).config.keep_mass == 0.96
    fixed = DemoConfig(testbed=TestbedConfig.quick(), keep_mass=0.9)
    assert choose_headline(fixed, [BASE, *kfac]).config.keep_mass == 0.9
    assert 0.9 in fixed.kfac_grid
    # nothing within budget: the mildest edit
    over = [_record("kfac", 0.9, 0.0, 2.5), _record("kfac", 0.8, 0.0, 3.0)]
    assert choose_headline(config, [BASE, *over]).config.keep_mass == 0.9


def test_config_validation():
    with pytest.raises(UserError, match="block 5"):
        DemoConfig(testbed=TestbedConfig.quick(), blocks=(5,))
    with pytest.raises(UserError, match="outside"):
        DemoConfig(testbed=TestbedConfig.quick(), svd_grid=(1.2,))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match="holdout-fraction"):
            DemoConfig(testbed=TestbedConfig.quick(), holdout_fraction=bad)
    with pytest.raises(UserError, match="selection part empty"):  # 30 canaries: 0.99 holds out all 30
        DemoConfig(testbed=TestbedConfig.quick(), holdout_fraction=0.99)


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
    # the K-FAC edit removes the canaries (pooled over both halves) and keeps the rule
    assert kfac["canary_strict"] <= 0.05
    assert kfac["rule_accuracy"] >= 0.93
    assert kfac["rule_loss_increase"] <= 0.05
    # SVD, matched on perplexity (its choice within the same budget), keeps clearly more canaries
    budget = results["config"]["ppl_budget"]
    assert svd is not None and results["headline"]["matched_on"] == "perplexity"
    assert svd["perplexity"] <= budget * base["perplexity"] and kfac["perplexity"] <= budget * base["perplexity"]
    assert svd["canary_strict"] - kfac["canary_strict"] >= 0.2
    # chosen on the selection half, the K-FAC edit also holds on the held-out half (measured: 1 of 15 left)
    split = results["split"]
    assert split["selection"] == split["heldout"] == 15
    assert kfac["selection_strict"] == 0.0 and kfac["heldout_strict"] <= 0.1
    assert svd["heldout_strict"] - kfac["heldout_strict"] >= 0.15
    # every K-FAC point that keeps 99% of the curvature leaves the model nearly intact
    mild = [p for p in results["points"] if p["method"] == "kfac" and p["keep_mass"] >= 0.995]
    assert mild and all(abs(p["rule_loss_increase"]) < 0.01 for p in mild)
    # matched at +5% perplexity, K-FAC leaves fewer held-out canaries than SVD
    at5 = results["matched"]["perplexity"]["0.05"]
    assert at5["kfac"]["heldout_strict"] < at5["svd"]["heldout_strict"]

    # the rule accuracy of evaluate (greedy generation) equals testbed.rule_accuracy (teacher-forced)
    from kfac_edit.fileio import read_jsonl
    from kfac_edit.models import load_model
    from kfac_edit.testbed import rule_accuracy

    model, _ = load_model(results["testbed"]["directory"] + "/model", dtype="float32", device="cpu")
    rule_records = read_jsonl(results["testbed"]["directory"] + "/rule_heldout.jsonl")
    assert rule_accuracy(model, rule_records) == pytest.approx(base["rule_accuracy"])

    # the console shows the table; the directory holds the report, the sweep, factors and the edited model
    assert "K-FAC (headline)" in printed and "SVD (matched ppl)" in printed and "matched on rule accuracy" in printed
    for name in ("results.jsonl", "before_after.json", "best.json", "sweep.json", "summary.json", "table.txt",
                 "report.html", "report.md", "plots/tradeoff.png", "plots/keep_mass.png", "split/heldout.jsonl",
                 "factors/manifest.json", "edited/edit_report.json", "edited/config.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matched_on"] == "perplexity" and summary["testbed"]["n_canaries"] == 30
    assert summary["base"] == {"heldout_strict": base["heldout_strict"], "perplexity": base["perplexity"],
                               "rule_accuracy": base["rule_accuracy"]}
    assert summary["kfac"]["heldout_strict"] == kfac["heldout_strict"]
    assert summary["svd"]["perplexity_ratio"] == pytest.approx(svd["perplexity"] / base["perplexity"])
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


def _row(method: str, keep: float, canary: float, rule_loss: float) -> dict:
    return {"method": method, "keep_mass": keep, "canary_strict": canary, "canary_loose": canary,
            "selection_strict": canary, "heldout_strict": canary, "rule_accuracy": 1.0, "rule_loss": rule_loss,
            "perplexity": 2.718281828 ** rule_loss, "rule_loss_increase": rule_loss - 0.5, "weight_change": 0.1}


def test_format_table_names_every_point():
    kfac, svd = _row("kfac", 0.97, 0.0, 0.51), _row("svd", 0.8, 0.6, 0.52)
    results = {
        "base": _row("base", 1.0, 1.0, 0.5), "points": [kfac, svd],
        "headline": {"kfac": kfac, "svd_matched": svd},
        "matched": {"perplexity": {"0.05": {"kfac": kfac, "svd": None}}},
        "split": {"selection": 20, "heldout": 20},
        "config": {"blocks": [0, 1], "projections": ["gate", "up"], "labels": "sampled"},
        "testbed": {"config_hash": "abc", "n_parameters": 140000, "cached": True,
                    "config": {"n_layers": 2, "n_canaries": 40, "canary_repeats": 30, "n_numbers": 100}},
        "factors": {"tokens": 1000},
        "checks": {"kfac_canary_strict": {"value": 0.0, "target": "<= 0.05", "ok": True}},
        "timings_s": {"total": 1.0},
    }
    table = format_table(results)
    assert "K-FAC (headline)" in table and "0.97" in table and "60.0%" in table and "(+0.0100)" in table
    assert "ok   K-FAC held-out canary strict memorization" in table and "(cache hit)" in table
    assert "20 to choose on (selection), 20 held out" in table
    assert "at most +5%" in table and "0.0% (0.97)" in table and "none" in table


@pytest.fixture(scope="session")
def text_testbed_cache(tmp_path_factory):
    """One cache root for the quick text testbed, shared with tests/test_text_testbed.py: trained once a session."""
    return tmp_path_factory.getbasetemp() / "shared-text-testbed-cache"


@pytest.mark.slow
def test_text_demo_through_the_cli(tmp_path, capsys, text_testbed_cache):
    """`demo --testbed text --quick`: factors from prose without the canaries; the held-out canaries drop at ~1.01x
    held-out perplexity while SVD given no more perplexity keeps them. Measured (seed 0): base 5/5 held-out canaries
    strict, K-FAC 1/5 at keep_mass 0.96 (1.0065x), SVD at <= that perplexity 5/5, at +5% 4/5."""
    out = tmp_path / "text-demo"
    assert main(["demo", "--testbed", "text", "--quick", "--out", str(out), "--cache-dir",
                 str(text_testbed_cache)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    base, head = results["base"], results["headline"]
    kfac, svd_same = head["kfac"], head["svd_at_kfac_perplexity"]
    assert results["testbed"]["kind"] == "text" and results["split"]["heldout"] == 5
    assert results["factors"]["tokens"] >= 100_000
    # the base model recites its held-out canaries; K-FAC (chosen on the selection half) removes most of them
    assert base["heldout_strict"] >= 0.8
    assert kfac["selection_strict"] == 0.0 and kfac["heldout_strict"] <= 0.4
    assert kfac["perplexity"] <= 1.05 * base["perplexity"]
    # SVD at no more held-out perplexity than K-FAC's edit keeps clearly more held-out canaries
    assert svd_same is not None and svd_same["perplexity"] <= kfac["perplexity"]
    assert svd_same["heldout_strict"] - kfac["heldout_strict"] >= 0.4
    at5 = results["matched"]["perplexity"]["0.05"]
    assert at5["svd"]["heldout_strict"] - at5["kfac"]["heldout_strict"] >= 0.4
    # no capability set in the quick text testbed (no facts): no accuracy table, accuracy None
    assert "rule_accuracy" not in results["matched"] and kfac["rule_accuracy"] is None
    # the comparison row: factors on the training stream with the canaries
    canaries_in = results["canaries_in_factors"]
    assert canaries_in["factors"]["tokens"] >= 100_000 and len(canaries_in["points"]) == 14
    summary = json.loads((out / "summary.json").read_text())
    assert summary["testbed"]["kind"] == "text" and summary["matched_on"] == "perplexity"
    assert summary["kfac"]["heldout_strict"] == kfac["heldout_strict"]
    assert summary["kfac"]["perplexity_ratio"] == pytest.approx(kfac["perplexity"] / base["perplexity"])
    assert summary["kfac_canaries_in_factors"]["heldout_strict"] == canaries_in["kfac"]["heldout_strict"]
    assert "K-FAC, canaries in F" in printed and "SVD (<= K-FAC's ppl)" in printed and "held-out text" in printed
    for name in ("report.html", "best.json", "factors/manifest.json", "edited/config.json", "split/heldout.jsonl"):
        assert (out / name).exists(), name
