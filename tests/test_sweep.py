"""`kfac-edit sweep` on a tiny model: the grid, complete points, resume, best.json into `edit`, the report."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_olmo2, random_number_texts
from kfac_edit.cli import main
from kfac_edit.data import token_batches
from kfac_edit.edit import EditSpec, apply_edit, restore
from kfac_edit.evaluate.memorization import greedy_generate
from kfac_edit.evaluate.suite import EvalConfig, evaluate
from kfac_edit.factors.collect import collect_factors
from kfac_edit.fileio import read_jsonl
from kfac_edit.pareto import PointConfig, read_results
from kfac_edit.sweep import SweepConfig, block_groups, point_metrics, run_sweep, sweep_points

PREFIX, SUFFIX = 8, 6


def test_grid():
    assert block_groups([0, 1, 2], 2) == [(0,), (1,), (2,), (0, 1), (1, 2)]
    assert block_groups([0, 2, 3], 3) == [(0,), (2,), (3,), (2, 3)]  # runs only over adjacent blocks
    assert block_groups(range(20, 28), 3) == (
        [(b,) for b in range(20, 28)] + [(b, b + 1) for b in range(20, 27)] + [(b, b + 1, b + 2) for b in range(20, 26)]
    )
    cfg = SweepConfig(projection_sets=[("up", "gate"), ("gate", "up", "down")], keep_masses=[0.5, 0.8], max_combo=2)
    points = sweep_points(cfg, [0, 1, 2])
    assert len(points) == 2 * 5 * 2 and len({p.id for p in points}) == 20
    assert points[0] == PointConfig("kfac", (0,), ("gate", "up"), 0.5)  # kinds in gate, up, down order
    assert points[-1] == PointConfig("kfac", (1, 2), ("gate", "up", "down"), 0.8)


@pytest.fixture
def sweep_inputs(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Factors collected from the tiny model, a memorized set of its own greedy continuations (strict 1.0 before
    any edit) and perplexity text."""
    model = make_tiny_olmo2(dtype=torch.float32)  # the weights saved in tiny_model_dir
    texts = random_number_texts(40, min_len=20, max_len=40, seed=3)
    batches = token_batches(texts, tiny_tokenizer, seq_len=32, batch_size=8)
    factors_dir = tmp_path / "factors"
    collect_factors(model, batches, labels="sampled", seed=0, progress=False).save(factors_dir)
    gen = torch.Generator().manual_seed(5)
    prefixes = torch.randint(0, 60, (16, PREFIX), generator=gen).tolist()
    suffixes = greedy_generate(model, prefixes, SUFFIX, batch_size=16, pad_id=62, desc=None)
    mem = tmp_path / "mem.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": p, "suffix_ids": s}) + "\n" for p, s in zip(prefixes, suffixes)))
    text = tmp_path / "ppl.txt"
    text.write_text("\n".join(random_number_texts(12, min_len=20, max_len=30, seed=9)) + "\n")
    return {"model": tiny_model_dir, "factors": factors_dir, "mem": mem, "text": text}


def _argv(inp, out, *extra):
    return ["sweep", "--model", str(inp["model"]), "--factors", str(inp["factors"]), "--memorized", str(inp["mem"]),
            "--perplexity-data", str(inp["text"]), "--prefix-len", str(PREFIX), "--suffix-len", str(SUFFIX),
            "--ppl-block", "16", "--batch-size", "16", "--device", "cpu", "--blocks", "0-1", "--keep-mass",
            "0.3,0.9", "--max-combo", "2", "--ppl-budget", "1.5", "--out", str(out), *extra]


def test_sweep_cli_complete_resume_best_round_trip(sweep_inputs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    inp, out = sweep_inputs, tmp_path / "sweep"
    assert main(_argv(inp, out)) == 0
    assert "best:" in capsys.readouterr().out
    lines = read_jsonl(out / "results.jsonl")
    assert len(lines) == 1 + 3 * 2  # base + {0}, {1}, {0,1} x keep 0.3, 0.9
    ids = [r["id"] for r in lines]
    assert ids[0] == "base" and len(set(ids)) == len(ids)
    for line in lines:  # complete records
        assert set(line) >= {"schema", "id", "kind", "config", "layers", "metrics", "seconds", "timestamp"}
        assert set(line["metrics"]) >= {"strict", "loose", "avg_levenshtein_norm", "perplexity"}
    base = lines[0]["metrics"]
    assert base["strict"] == 1.0 and base["loose"] == 1.0  # the set is the model's own continuations
    assert any(r["metrics"]["strict"] < 1.0 for r in lines[1:])  # edits change what the model recites

    # a point's numbers equal a fresh edit + evaluation of the same point (the in-place edit/restore is exact)
    rec = next(r for r in read_results(out) if r.id == "kfac|b0-1|gate,up|k0.3")
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model

    model, tok = load_model(str(inp["model"]), dtype="float32", device="cpu")
    cfg = EvalConfig(memorized=[str(inp["mem"])], perplexity_data=str(inp["text"]), prefix_len=PREFIX,
                     suffix_len=SUFFIX, ppl_block=16, batch_size=16)
    apply_edit(model, Factors.load(inp["factors"]), EditSpec.from_json(rec.config.layers()))
    fresh = point_metrics(evaluate(model, tok, cfg))
    assert fresh["strict"] == rec.metrics["strict"]
    assert fresh["perplexity"] == pytest.approx(rec.metrics["perplexity"], rel=1e-6)

    # best.json: the lowest strict on the selection part within 1.5 x base perplexity; it round-trips into `edit`
    points = [r for r in read_results(out) if r.kind == "point"]
    within = [r for r in points if r.perplexity <= 1.5 * base["perplexity"]]
    best = json.loads((out / "best.json").read_text())
    chosen = min(within, key=lambda r: (r.metrics["selection_strict"], r.perplexity))
    assert best == chosen.config.layers()
    edited = tmp_path / "edited"
    assert main(["edit", "--model", str(inp["model"]), "--factors", str(inp["factors"]), "--layers-file",
                 str(out / "best.json"), "--out", str(edited), "--device", "cpu"]) == 0
    restore(model)
    apply_edit(model, Factors.load(inp["factors"]), EditSpec.from_json(best))
    saved = AutoModelForCausalLM.from_pretrained(edited).state_dict()
    for key, value in model.state_dict().items():
        assert torch.allclose(saved[key], value, atol=1e-6), key

    # the report: every plot, the chosen point's spectra
    spectra = json.loads((out / "spectra.json").read_text())["modules"]
    assert set(spectra) == {f"model.layers.{b}.mlp.{k}_proj" for b in map(int, best) for k in ("gate", "up")}
    assert {p.name for p in (out / "plots").iterdir()} == {"tradeoff.png", "keep_mass.png", "spectra.png"}
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3

    # resume: nothing to do; then a torn line and two lost points are repaired and recomputed, nothing else
    before = (out / "results.jsonl").read_text()
    assert main(_argv(inp, out)) == 0
    assert (out / "results.jsonl").read_text() == before
    kept = before.splitlines(keepends=True)[:-2]
    (out / "results.jsonl").write_text("".join(kept) + '{"id": "kfac|b0')
    restore(model)  # the API, as the CLI calls it (without rewriting the report, to keep the test fast)
    cfg.model = str(inp["model"])
    grid = SweepConfig(blocks=[0, 1], keep_masses=[0.3, 0.9], max_combo=2, ppl_budget=1.5)
    outcome = run_sweep(model, tok, Factors.load(inp["factors"]), grid, cfg, out, write_report=False)
    after = read_jsonl(out / "results.jsonl")
    assert outcome.evaluated == 2 and len(after) == 7 and [r["id"] for r in after] == ids
    assert after[:5] == [json.loads(x) for x in kept]  # finished points were not rerun
    assert [r["metrics"]["strict"] for r in after[5:]] == [r["metrics"]["strict"] for r in lines[5:]]

    # widening the grid resumes too; other evaluation settings are refused
    grid = SweepConfig(blocks=[0, 1], keep_masses=[0.3, 0.6], max_combo=1, ppl_budget=1.5)
    assert run_sweep(model, tok, Factors.load(inp["factors"]), grid, cfg, out, write_report=False).evaluated == 2
    assert len(read_jsonl(out / "results.jsonl")) == 9
    capsys.readouterr()
    assert main(_argv(inp, out) + ["--loose", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings (--loose differ)" in err and "Traceback" not in err


def test_run_sweep_restores_the_model_and_rejects_bad_input(sweep_inputs, tmp_path, capsys):
    from kfac_edit.errors import UserError
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model

    inp = sweep_inputs
    model, tok = load_model(str(inp["model"]), dtype="float32", device="cpu")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EvalConfig(memorized=[str(inp["mem"])], perplexity_data=str(inp["text"]), prefix_len=PREFIX,
                     suffix_len=SUFFIX, ppl_block=16, batch_size=16)
    factors = Factors.load(inp["factors"])
    outcome = run_sweep(model, tok, factors, SweepConfig(blocks=[1], keep_masses=[0.2], ppl_budget=100.0), cfg,
                        tmp_path / "s", write_report=False)
    assert outcome.evaluated == 1 and outcome.chosen is not None and outcome.chosen.config.blocks == (1,)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert not (tmp_path / "s" / "report.html").exists()

    with pytest.raises(UserError, match="block 5 does not exist"):
        run_sweep(model, tok, factors, SweepConfig(blocks=[5]), cfg, tmp_path / "t")
    with pytest.raises(UserError, match="outside"):
        run_sweep(model, tok, factors, SweepConfig(keep_masses=[1.0]), cfg, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert main(_argv(inp, tmp_path / "u")[:5] + ["--perplexity-data", str(inp["text"]), "--out", str(tmp_path / "u")]) == 2
    assert "needs a memorized set" in capsys.readouterr().err


def test_split_records_is_deterministic_disjoint_and_content_based():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kfac_edit.errors import UserError
    from kfac_edit.sweep import split_records

    records = [{"prefix_ids": [i, i + 1], "suffix_ids": [i * 7 % 13]} for i in range(40)]
    selection, heldout = split_records(records, 0.5, seed=0)
    assert len(selection) == len(heldout) == 20
    assert sorted(map(json.dumps, selection + heldout)) == sorted(map(json.dumps, records))  # disjoint, complete
    assert split_records(records, 0.5, seed=0) == (selection, heldout)  # deterministic
    # by content, not position: shuffled (or reversed) records give the same parts, each in the order given
    again = split_records(records[::-1], 0.5, seed=0)
    assert again == (selection[::-1], heldout[::-1])
    assert split_records(records, 0.5, seed=1) != (selection, heldout)  # the seed draws another split
    assert len(split_records(records, 0.25)[1]) == 10
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="outside"):
            split_records(records, bad)
    SweepConfig(holdout_fraction=0.0).validate()  # documented: 0 means no split
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(UserError, match="holdout-fraction"):
            SweepConfig(holdout_fraction=bad).validate()
    with pytest.raises(UserError, match="held-out part empty"):
        split_records(records[:3], 0.1)
    with pytest.raises(UserError, match="selection part empty"):
        split_records(records[:3], 0.9)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(0, 10**6), min_size=2, max_size=30, unique=True), st.floats(0.05, 0.95),
           st.integers(0, 5), st.randoms(use_true_random=False))
    def prop(values, fraction, seed, rng):
        n_heldout = round(fraction * len(values))
        if n_heldout in (0, len(values)):
            return
        sel, held = split_records(values, fraction, seed)
        assert len(held) == n_heldout and set(sel) | set(held) == set(values) and not set(sel) & set(held)
        shuffled = list(values)
        rng.shuffle(shuffled)
        assert set(split_records(shuffled, fraction, seed)[1]) == set(held)

    prop()


def test_match_by_cost_picks_on_selection_within_each_budget():
    from kfac_edit.pareto import (BASE_CONFIG, SweepRecord, accuracy_drop, choose_best, match_by_cost,
                                  perplexity_increase)

    def rec(method, keep, selection, heldout, ppl, acc):
        return SweepRecord(PointConfig(method, (0,), ("gate", "up"), keep),
                           {"strict": (selection + heldout) / 2, "selection_strict": selection,
                            "heldout_strict": heldout, "perplexity": ppl, "rule_accuracy": acc})

    base = SweepRecord(BASE_CONFIG, {"strict": 1.0, "perplexity": 10.0, "rule_accuracy": 0.99}, kind="base")
    points = [rec("kfac", 0.9, 0.5, 0.0, 10.4, 0.99), rec("kfac", 0.8, 0.1, 0.6, 10.9, 0.97),
              rec("kfac", 0.7, 0.0, 0.2, 12.5, 0.80), rec("svd", 0.9, 0.9, 0.9, 10.2, 0.99),
              rec("svd", 0.6, 0.4, 0.4, 11.8, 0.90)]
    by_ppl = match_by_cost(points, perplexity_increase(base), (0.05, 0.10, 0.20, 0.30))
    keep = {m: {b: (r.config.keep_mass if r else None) for b, r in t.items()} for m, t in by_ppl.items()}
    # selection strict decides (the held-out 0.0 of kfac 0.9 plays no part); +10% admits 10.9, +30% admits 12.5
    assert keep == {"kfac": {0.05: 0.9, 0.10: 0.8, 0.20: 0.8, 0.30: 0.7},
                    "svd": {0.05: 0.9, 0.10: 0.9, 0.20: 0.6, 0.30: 0.6}}
    by_acc = match_by_cost(points, accuracy_drop(base, "rule_accuracy"), (0.01, 0.05, 0.2))
    assert {b: r.config.keep_mass for b, r in by_acc["kfac"].items()} == {0.01: 0.9, 0.05: 0.8, 0.2: 0.7}
    assert by_acc["svd"][0.05].config.keep_mass == 0.9 and by_acc["svd"][0.2].config.keep_mass == 0.6
    assert match_by_cost(points, perplexity_increase(base), (0.01,)) == {"kfac": {0.01: None}, "svd": {0.01: None}}
    assert choose_best(points, 10.0, 1.1).config.keep_mass == 0.8  # the sweep's choice: selection strict


def test_sweep_several_methods_split_capability_and_factor_identity(sweep_inputs, tmp_path, capsys):
    inp, out = sweep_inputs, tmp_path / "multi"
    rule = tmp_path / "rule.jsonl"  # a capability set: half the memorized records, reported as rule_accuracy
    rule.write_text("".join(inp["mem"].read_text().splitlines(keepends=True)[:8]))
    argv = _argv(inp, out, "--method", "kfac,svd", "--keep-mass", "svd=0.5", "--group", "0-1",
                 "--capability", str(rule), "--holdout-fraction", "0.25", "--seed", "3")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "split: 12 selection / 4 held-out records" in printed
    lines = read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in lines] == ["base", "kfac|b0-1|gate,up|k0.3", "kfac|b0-1|gate,up|k0.9",
                                        "svd|b0-1|gate,up|k0.5"]
    for r in lines:
        m = r["metrics"]
        assert {f"{part}_{key}" for part in ("selection", "heldout")
                for key in ("strict", "loose", "avg_levenshtein_norm")} <= set(m)
        # pooled = both parts, weighted by size; the capability set stays out of the pool
        assert m["strict"] == pytest.approx((12 * m["selection_strict"] + 4 * m["heldout_strict"]) / 16)
        assert "rule_accuracy" in m
    assert lines[0]["metrics"]["rule_accuracy"] == 1.0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["split"]["selection"] == 12 and sweep["split"]["heldout"] == 4 and sweep["split"]["seed"] == 3
    assert sweep["identity"]["methods"] == ["kfac", "svd"]
    held = read_jsonl(out / "split" / "heldout.jsonl")
    sel = read_jsonl(out / "split" / "selection.jsonl")
    assert len(held) == 4 and not {json.dumps(r) for r in held} & {json.dumps(r) for r in sel}
    assert sorted(map(json.dumps, held + sel)) == sorted(map(json.dumps, read_jsonl(inp["mem"])))

    # resume: the same command does nothing; other factors (same names, other content) or methods are refused
    assert main(argv) == 0
    assert "(0 evaluated now)" in capsys.readouterr().out
    from kfac_edit.factors.store import Factors

    other = Factors.load(inp["factors"])
    for mf in other.modules.values():
        mf.grad_sum = mf.grad_sum * 2
    other.save(tmp_path / "other")
    argv_other = list(argv)
    argv_other[argv_other.index("--factors") + 1] = str(tmp_path / "other")
    assert main(argv_other) == 2
    assert "--factors content" in capsys.readouterr().err
    assert main(_argv(inp, out, "--method", "kfac", "--group", "0-1", "--capability", str(rule),
                      "--holdout-fraction", "0.25", "--seed", "3")) == 2
    assert "--method" in capsys.readouterr().err
    inp["mem"].write_text("".join(inp["mem"].read_text().splitlines(keepends=True)[:12]))
    assert main(argv) == 2  # the same file with other records: refused, not resumed
    assert "(memorized_digest differ)" in capsys.readouterr().err
    # bad input: one line, exit 2, nothing written
    for extra, message in ((["--holdout-fraction", "1.5"], "outside (0, 1)"),
                           (["--holdout-fraction", "0.01"], "held-out part empty"),
                           (["--method", "kfac", "--keep-mass", "svd=0.5"], "does not run"),
                           (["--method", "nope"], "unknown edit method")):
        assert main(_argv(inp, tmp_path / "bad", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "bad").exists()


def test_skip_over_measures_memorization_only_within_the_limit(sweep_inputs, tmp_path):
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model
    from kfac_edit.report import write_report

    inp = sweep_inputs
    model, tok = load_model(str(inp["model"]), dtype="float32", device="cpu")
    cfg = EvalConfig(memorized=[str(inp["mem"])], perplexity_data=str(inp["text"]), prefix_len=PREFIX,
                     suffix_len=SUFFIX, ppl_block=16, batch_size=16)
    factors = Factors.load(inp["factors"])
    grid = dict(blocks=[0, 1], keep_masses=[0.1, 0.3, 0.9], max_combo=1, ppl_budget=1.0)
    full = run_sweep(model, tok, factors, SweepConfig(**grid), cfg, tmp_path / "full", write_report=False).records
    base, points = full[0], full[1:]
    ratios = sorted(r.perplexity / base.perplexity for r in points)
    limit = (ratios[2] + ratios[3]) / 2  # the 3 cheapest points are measured, the other 3 are not
    assert ratios[2] < ratios[3]
    cheap = run_sweep(model, tok, factors, SweepConfig(**grid, skip_over=limit), cfg, tmp_path / "cheap",
                      write_report=False)
    by_id = {r.id: r for r in cheap.records}
    skipped = [r for r in points if r.perplexity > limit * base.perplexity]
    assert len(skipped) == 3
    for r in points:
        got = by_id[r.id]
        assert got.perplexity == pytest.approx(r.perplexity, rel=1e-9)
        if r in skipped:
            assert got.metrics["memorization_skipped"] == 1.0 and "strict" not in got.metrics
        else:
            assert got.metrics["strict"] == r.metrics["strict"]
            assert got.metrics["heldout_strict"] == r.metrics["heldout_strict"]
    assert cheap.chosen is None or cheap.chosen.id not in {r.id for r in skipped}
    write_report(tmp_path / "cheap")  # a report over points without memorization still renders
    assert (tmp_path / "cheap" / "report.html").exists()
    from kfac_edit.errors import UserError

    with pytest.raises(UserError, match="skip-over"):
        SweepConfig(**grid, skip_over=0.5).validate()


def test_sweep_runs_ekfac_points_and_they_equal_a_direct_edit(sweep_inputs, tmp_path, capsys):
    """`sweep --method ekfac` reads the EK-FAC eigenvalues beside the factors; its point equals apply_edit's."""
    from kfac_edit.eigen import EigenCache
    from kfac_edit.factors.ekfac import Ekfac, collect_ekfac
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model

    inp = sweep_inputs
    model, tokenizer = load_model(str(inp["model"]), dtype="float32", device="cpu")
    factors = Factors.load(inp["factors"])
    texts = random_number_texts(40, min_len=20, max_len=40, seed=3)
    batches = token_batches(texts, tokenizer, seq_len=32, batch_size=8, with_index=True)
    collect_ekfac(model, factors, batches, cache=EigenCache(None), progress=False).save(inp["factors"])
    out = tmp_path / "ekfac"
    assert main(_argv(inp, out, "--method", "ekfac", "--group", "0-1", "--keep-mass", "0.5",
                      "--holdout-fraction", "0")) == 0
    capsys.readouterr()
    point = read_jsonl(out / "results.jsonl")[1]
    assert point["id"] == "ekfac|b0-1|gate,up|k0.5"
    spec = EditSpec({(b, k): 0.5 for b in (0, 1) for k in ("gate", "up")}, "ekfac")
    report = apply_edit(model, factors, spec, ekfac=Ekfac.load(inp["factors"]))
    metrics = evaluate(model, tokenizer, EvalConfig(memorized=[str(inp["mem"])], prefix_len=PREFIX,
                                                    suffix_len=SUFFIX, batch_size=16))["metrics"]
    restore(model)
    assert point["metrics"]["strict"] == pytest.approx(point_metrics({"metrics": metrics})["strict"])
    swept = {m["name"]: m["mass_fraction"] for m in point["edit"]["modules"]}
    assert swept == pytest.approx({m.name: m.mass_fraction for m in report.modules}, rel=1e-9)
    assert all(0.5 <= f < 1 for f in swept.values())  # EK-FAC mass kept, not the K-FAC product's
    # without ekfac.safetensors beside the factors: one line, exit 2, nothing written
    (inp["factors"] / "ekfac.safetensors").unlink()
    assert main(_argv(inp, tmp_path / "none", "--method", "ekfac", "--group", "0-1", "--holdout-fraction", "0")) == 2
    err = capsys.readouterr().err
    assert "collect --ekfac" in err and "Traceback" not in err and not (tmp_path / "none").exists()
