"""``kfac-edit demo``: the whole method on the embedded testbed, on a laptop CPU, in minutes.

Every step is the public API a user runs on a real model:

1. :func:`kfac_edit.testbed.build_testbed`: train a tiny OLMo-2 that learns a rule (arithmetic sequences) and
   memorizes canaries (random sequences repeated in its training stream), or load it from the cache.
2. :func:`kfac_edit.factors.collect_factors` over ``corpus.jsonl`` (the training mixture), sampled labels (true
   Fisher), for the MLP projections the edit touches.
3. :func:`kfac_edit.sweep.run_sweep` with two methods, ``kfac`` and the data-free ``svd`` baseline, each over its
   own keep_mass grid, on one block group (gate, up and down of blocks 0 and 1 together). The canaries
   (``memorized.jsonl``) are split into a selection half and a held-out half (:func:`kfac_edit.sweep.split_records`);
   the held-out rule sequences (``rule_heldout.jsonl``) are a capability set (``rule_heldout_accuracy``: the same
   exact-continuation test on sequences that can only be computed, not recalled); perplexity is on held-out rule
   text (``clean.jsonl``, one document a window).
4. :func:`kfac_edit.report.write_report` on the sweep's directory.

The testbed is a parameter (``DemoConfig.testbed``; ``DemoConfig.text()`` for the English-text one,
:mod:`kfac_edit.text_testbed`). On the text testbed step 2 collects on ``factor_corpus.jsonl`` (the training prose
without the canaries: the factor-data recipe), perplexity is on held-out modules' text, the capability set is
``facts.jsonl`` (``facts_accuracy``, shown as ``rule_accuracy``; absent with ``n_facts=0``: ``None``, no accuracy
table) and ``rule_loss`` is the held-out text's loss; a second collection on ``corpus.jsonl`` (canaries in) and its
K-FAC sweep (into ``canaries_in/``) give the ``canaries_in_factors`` row. Both testbeds report
``svd_at_kfac_perplexity``: SVD's choice among points no more costly than the K-FAC headline.

The demo's rows (``results.json`` ``points``) come from the sweep records: ``selection_strict``/``heldout_strict``
(canary strict memorization on each half), ``canary_strict``/``canary_loose`` (both halves pooled),
``rule_accuracy``, ``rule_loss`` (mean next-token loss on rule text) and its change ``rule_loss_increase``,
``perplexity`` = exp(rule_loss).

The comparison: the headline K-FAC point is the one the sweep chooses, on the *selection* canaries (lowest strict
memorization with rule perplexity within ``ppl_budget`` x base; ``keep_mass`` fixes it instead); SVD is matched on
perplexity (its own choice on the selection canaries within the same budget, or within the headline's perplexity when
that is higher); both are reported on the *held-out* canaries. The cost tables match every method at +5/+10/+20/+30%
perplexity and at rule accuracy at most 1/5/10/20 points below the base (:func:`kfac_edit.pareto.match_by_cost`).

Output directory (written whole, atomically)::

    results.json        configuration, testbed info, every point, the headline comparison, cost tables, checks
    summary.json        the headline in machine-readable form (testbed, base, kfac, svd, matched_on)
    table.txt           the console table
    results.jsonl, sweep.json, best.json, spectra.json, split/   the sweep's directory (:mod:`kfac_edit.sweep`);
                        best.json is the headline K-FAC edit (`kfac-edit edit --layers-file DIR/best.json`)
    before_after.json   base vs the headline K-FAC edit (:mod:`kfac_edit.report`)
    records.jsonl, provenance.json   each canary continued by the base and the headline edit; where it all came from
    report.html, report.md, plots/*.png   the standard report (:func:`kfac_edit.report.write_report`)
    factors/            the K-FAC factors (`kfac-edit collect` format)
    edited/             the headline K-FAC edit as a Hugging Face model directory (+ edit_report.json)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_dir, atomic_path, write_json
from .pareto import (ACCURACY_DROPS, PPL_INCREASES, SweepRecord, accuracy_drop, base_record, choose_best,
                     choose_within, match_by_cost, perplexity_increase)
from .constants import BEST_FILE, DEMO_RESULTS_FILE, SUMMARY_FILE, TABLE_FILE
from .testbed import TestbedConfig, build_testbed, one_thread
from .text_testbed import TextTestbedConfig, build_text_testbed

log = logging.getLogger(__name__)

RULE_ACCURACY = "rule_heldout_accuracy"  # the sweep's name for the capability set rule_heldout.jsonl


@dataclass(frozen=True)
class DemoConfig:
    """The testbed, the edit and the grids of the demo."""

    testbed: TestbedConfig | TextTestbedConfig = field(default_factory=TestbedConfig)
    blocks: tuple[int, ...] = (0, 1)  # edited blocks
    projections: tuple[str, ...] = ("gate", "up", "down")  # edited MLP projections of each block
    # keep_mass grids: K-FAC's interesting range is close to 1 (the curvature mass is concentrated), SVD's lower
    kfac_grid: tuple[float, ...] = (
        0.998, 0.995, 0.9925, 0.99, 0.9875, 0.985, 0.9825, 0.98, 0.9775, 0.975, 0.9725, 0.97, 0.965, 0.96, 0.95, 0.94,
        0.92, 0.9, 0.85, 0.8,
    )
    svd_grid: tuple[float, ...] = tuple(round(0.95 - 0.0125 * i, 4) for i in range(37))  # 0.95, 0.9375, ..., 0.5
    ppl_budget: float = 1.05  # headline: lowest selection canary memorization with rule perplexity <= budget x base
    keep_mass: float | None = None  # fix the headline K-FAC keep_mass instead (added to the grid)
    holdout_fraction: float = 0.5  # share of the canaries held out from the choice (split seeded by seed)
    factor_tokens: int = 200_000  # corpus tokens for factor collection (the corpus holds steps * batch * 26)
    labels: str = "sampled"  # true Fisher; "gold" for the empirical Fisher
    seed: int = 0  # seed of the sampled labels and of the held-out split
    batch_size: int = 128  # windows per collection batch; prompts per generation batch
    ppl_tokens: int | None = None  # perplexity tokens per point (None: the whole perplexity set)

    def __post_init__(self) -> None:
        if self.keep_mass is not None and self.keep_mass not in self.kfac_grid:
            object.__setattr__(self, "kfac_grid", tuple(sorted({*self.kfac_grid, self.keep_mass}, reverse=True)))
        from .sweep import split_records

        if not self.ppl_budget > 1.0:
            raise UserError(f"demo ppl_budget {self.ppl_budget} must be above 1, e.g. 1.05")
        self.sweep_config().validate()
        split_records(range(self.testbed.n_canaries), self.holdout_fraction)  # UserError if a part would be empty
        bad = [b for b in self.blocks if not 0 <= b < self.testbed.n_layers]
        if bad:
            raise UserError(f"demo block {bad[0]} does not exist: the testbed has blocks 0..{self.testbed.n_layers - 1}")

    def sweep_config(self, capability: tuple[str, ...] = ()):
        """The demo's sweep: K-FAC and SVD, each over its grid, on one block group, with held-out canaries."""
        from .sweep import SweepConfig

        return SweepConfig(
            projection_sets=[tuple(self.projections)], groups=[tuple(self.blocks)], methods=["kfac", "svd"],
            keep_masses=list(self.kfac_grid), method_keep_masses={"svd": list(self.svd_grid)},
            ppl_budget=self.ppl_budget, holdout_fraction=self.holdout_fraction, capability=list(capability),
            seed=self.seed,
        )

    @classmethod
    def quick(cls) -> "DemoConfig":
        """The small configuration of ``--quick`` and the integration test: trains in well under a minute."""
        return cls(testbed=TestbedConfig.quick(), factor_tokens=100_000)

    @classmethod
    def text(cls, quick: bool = False, **overrides) -> "DemoConfig":
        """The demo on the English-text testbed (:mod:`kfac_edit.text_testbed`): the grids, budget and factor tokens
        of ``benchmarks/text_testbed_study.py`` (K-FAC down to 0.6, SVD 0.98..0.41; the issue's +20% budget)."""
        testbed = TextTestbedConfig.quick() if quick else TextTestbedConfig()
        fields = dict(
            testbed=testbed, ppl_budget=1.20, factor_tokens=100_000 if quick else 150_000, batch_size=64,
            ppl_tokens=None if quick else 13_200,
            kfac_grid=(0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6),
            svd_grid=tuple(round(0.98 - 0.03 * i, 3) for i in range(20)),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def kind(self) -> str:
        """``"text"`` or ``"arithmetic"``: which testbed."""
        return "text" if isinstance(self.testbed, TextTestbedConfig) else "arithmetic"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["testbed_hash"] = self.testbed.config_hash()
        return d


# ----------------------------------------------------------------------------------------------------------------
# The comparison


def demo_row(record: SweepRecord, base: SweepRecord, capability: str | None = RULE_ACCURACY) -> dict[str, Any]:
    """One row of the demo (module docstring) from a sweep record; ``capability`` names the accuracy metric shown
    as ``rule_accuracy`` (``None``: no capability set, the value is ``None``)."""
    m = record.metrics
    modules = record.edit.get("modules", [])
    return {
        "method": "base" if record.kind == "base" else record.config.method,
        "keep_mass": record.config.keep_mass,
        "canary_strict": m["strict"],
        "canary_loose": m["loose"],
        "selection_strict": m["selection_strict"],
        "heldout_strict": m["heldout_strict"],
        "rule_accuracy": m[capability] if capability else None,
        "rule_loss": m["perplexity.mean_loss"],
        "rule_loss_increase": m["perplexity.mean_loss"] - base.metrics["perplexity.mean_loss"],
        "perplexity": m["perplexity"],
        "weight_change": sum(x["weight_change"] for x in modules) / len(modules) if modules else None,
        **({"seconds": record.seconds} if record.kind == "point" else {}),
    }


def choose_headline(config: DemoConfig, records: list[SweepRecord]) -> SweepRecord:
    """The headline K-FAC point: ``config.keep_mass`` if set, else the sweep's choice within ``config.ppl_budget``
    (:func:`kfac_edit.pareto.choose_best`, on the selection canaries), else the mildest edit of the grid."""
    kfac = [r for r in records if r.kind == "point" and r.config.method == "kfac"]
    if config.keep_mass is not None:
        return next(r for r in kfac if r.config.keep_mass == config.keep_mass)
    best = choose_best(kfac, base_record(records).perplexity, config.ppl_budget)
    return best if best is not None else max(kfac, key=lambda r: r.config.keep_mass)


def matched_svd(config: DemoConfig, records: list[SweepRecord], headline: SweepRecord) -> SweepRecord | None:
    """SVD matched on perplexity: its choice on the selection canaries among points whose perplexity is within the
    budget, or within the headline's perplexity when that is higher. ``None`` when no SVD point is that cheap."""
    limit = max(config.ppl_budget * base_record(records).perplexity, headline.perplexity)
    return choose_within([r for r in records if r.config.method == "svd"], lambda r: r.perplexity, limit)


def cost_tables(records: list[SweepRecord], rows: dict[str, dict],
                capability: str | None = RULE_ACCURACY) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cost (``perplexity``: +5..+30%; ``rule_accuracy``: the ``capability`` metric at most 1..20 points lower,
    when there is one), per budget, per method: the row of the point chosen on the selection canaries within that
    budget, or ``None``."""
    base = base_record(records)
    points = [r for r in records if r.kind == "point"]
    out = {}
    costs = [("perplexity", perplexity_increase(base), PPL_INCREASES)]
    if capability:
        costs.append(("rule_accuracy", accuracy_drop(base, capability), ACCURACY_DROPS))
    for name, cost, budgets in costs:
        table = match_by_cost(points, cost, budgets)
        out[name] = {f"{b:g}": {m: rows[t[b].id] if t[b] else None for m, t in table.items()} for b in budgets}
    return out


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def check_out_dir(out_dir: str | Path) -> Path:
    """The demo replaces its output directory whole: refuse one that holds something else."""
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; choose a new path")
        if any(out.iterdir()) and not (out / DEMO_RESULTS_FILE).exists():
            raise UserError(
                f"--out {out} exists and is not a demo directory (no {DEMO_RESULTS_FILE}); choose a new path or remove it"
            )
    return out


def run_demo(
    config: DemoConfig | None = None,
    out_dir: str | Path = "kfac-edit-demo",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train (or load) -> collect -> sweep K-FAC and SVD -> report; write ``out_dir``; return ``results.json``.

    Runs on one torch thread (:func:`~kfac_edit.testbed.one_thread`): the testbeds' models are tiny."""
    with one_thread():
        return _run_demo(config, out_dir, cache_dir, progress)


def _run_demo(config: DemoConfig | None, out_dir: str | Path, cache_dir: str | Path | None, progress: bool) -> dict:
    from .data import token_batches
    from .edit import apply_edit, restore, save_edited
    from .eigen import EigenCache
    from .spec import EditSpec
    from .evaluate import EvalConfig
    from .factors import collect_factors
    from .models import load_model
    from .report import write_report
    from .sweep import run_sweep

    config = config or DemoConfig()
    out = check_out_dir(out_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the testbed
    t0 = time.perf_counter()
    text = config.kind == "text"
    build = build_text_testbed if text else build_testbed
    paths = build(config.testbed, cache_dir=cache_dir, progress=progress)
    timings["testbed"] = time.perf_counter() - t0
    info = paths.load_info()
    model, tokenizer = load_model(str(paths.model_dir), dtype="float32", device="cpu")

    # 2. K-FAC factors of the edited projections: over the training mixture (arithmetic), over the training prose
    #    without the canaries (text: the recipe; the training stream with them is the comparison row)
    def collect(source: Path):
        t0 = time.perf_counter()
        batches = token_batches(
            str(source), tokenizer, seq_len=config.testbed.seq_len + 2, batch_size=config.batch_size,
            max_tokens=config.factor_tokens, with_index=True,
        )
        collected = collect_factors(
            model, batches, layers=list(config.blocks), kinds=list(config.projections), labels=config.labels,
            seed=config.seed, max_tokens=config.factor_tokens, progress=progress,
        )
        timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
        return collected

    factors = collect(paths.factor_corpus if text else paths.corpus)

    # 3. the sweep (base, K-FAC grid, SVD grid) into a fresh directory, renamed into place at the end
    capability_file = paths.rule_heldout if paths.rule_heldout.exists() else None
    capability = f"{capability_file.stem}_accuracy" if capability_file else None
    sweep = config.sweep_config(capability=(str(capability_file),) if capability_file else ())
    evaluation = EvalConfig(
        memorized=[str(paths.memorized)], perplexity_data=str(paths.clean),
        prefix_len=None, suffix_len=None,  # records are used whole: prefix = bos + prefix_len tokens, suffix = rest
        ppl_block=config.testbed.seq_len + 2,  # [bos, x_1..x_L, eos]: the training window
        batch_size=config.batch_size, **({"max_tokens": config.ppl_tokens} if config.ppl_tokens else {}),
    )
    cache = EigenCache(None)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        factors.manifest.setdefault("data", str(paths.corpus))  # provenance: what the factors were collected on
        outcome = run_sweep(model, tokenizer, factors, sweep, evaluation, tmp, cache=cache, write_report=False,
                            outputs_for=lambda records: choose_headline(config, records))  # report: the headline
        timings["sweep"] = time.perf_counter() - t0
        records = outcome.records
        base = base_record(records)
        headline = choose_headline(config, records)
        matched = matched_svd(config, records, headline)
        at_cost = choose_within([r for r in records if r.config.method == "svd"], lambda r: r.perplexity,
                                headline.perplexity)  # SVD given no more perplexity than the headline took
        rows = {r.id: demo_row(r, base, capability) for r in records}
        canaries_in = None
        if text:  # what the canaries in the factor data do: the same K-FAC sweep on factors from corpus.jsonl
            with_canaries = collect(paths.corpus)
            t0 = time.perf_counter()
            kfac_only = dataclasses.replace(sweep, methods=["kfac"], method_keep_masses={})
            other = run_sweep(model, tokenizer, with_canaries, kfac_only, evaluation, tmp / "canaries_in",
                              cache=EigenCache(None), write_report=False)
            timings["sweep_canaries_in"] = time.perf_counter() - t0
            chosen = choose_headline(config, other.records)
            canaries_in = {"factors": {k: v for k, v in with_canaries.manifest.items() if k != "modules"},
                           "kfac": demo_row(chosen, base_record(other.records), capability),
                           "points": [demo_row(r, base_record(other.records), capability)
                                      for r in other.records if r.kind == "point"]}
        results = {
            "kind": "demo",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "testbed": {"directory": str(paths.root), "cached": paths.cached, **info},
            "factors": {k: v for k, v in factors.manifest.items() if k not in ("modules",)},
            "split": outcome.split,
            "edit": {"blocks": list(config.blocks), "projections": list(config.projections),
                     "layers": headline.config.layers()},
            "base": rows["base"],
            "points": [rows[r.id] for r in records if r.kind == "point"],
            "headline": {"kfac": rows[headline.id], "svd_matched": rows[matched.id] if matched else None,
                         "svd_at_kfac_perplexity": rows[at_cost.id] if at_cost else None,
                         "matched_on": "perplexity"},
            "matched": cost_tables(records, rows, capability),
            "checks": _checks(config, rows["base"], rows[headline.id], rows[matched.id] if matched else None),
            **({"canaries_in_factors": canaries_in} if canaries_in else {}),
            "timings_s": {},
        }
        factors.save(tmp / "factors")
        spec = EditSpec.from_json(headline.config.layers())
        report = apply_edit(model, factors, spec, cache=cache)
        try:
            save_edited(model, tokenizer, tmp / "edited", report)
        finally:
            restore(model)
        write_json(tmp / BEST_FILE, headline.config.layers())  # the headline, also when another method won
        write_json(tmp / "before_after.json", {
            "before": {"label": "base", "metrics": base.metrics},
            "after": {"label": headline.label(), "metrics": headline.metrics},
        })
        write_json(tmp / SUMMARY_FILE, summary(config, results, headline, matched, capability))
        _write_results(tmp, results, timings, started)
    # the report pages name their directory, so they are written once it has its final name
    write_report(out, ppl_budget=config.ppl_budget)
    results["table"] = _write_results(out, results, timings, started)
    return results


def summary(config: DemoConfig, results: dict, headline: SweepRecord, matched: SweepRecord | None,
            capability: str | None = RULE_ACCURACY) -> dict:
    """``summary.json``: the headline comparison in machine-readable form (issue 11.5). ``rule_accuracy`` is the
    capability set's accuracy (text testbed: fact recall; ``None`` without facts)."""
    base = results["base"]

    def side(record: SweepRecord | None) -> dict | None:
        if record is None:
            return None
        m = record.metrics
        return {"layers": record.config.layers(), "heldout_strict": m["heldout_strict"],
                "selection_strict": m["selection_strict"], "perplexity_ratio": m["perplexity"] / base["perplexity"],
                "rule_accuracy": m[capability] if capability else None}

    out = {
        "testbed": {"kind": config.kind, **dataclasses.asdict(config.testbed)},
        "base": {"heldout_strict": base["heldout_strict"], "perplexity": base["perplexity"],
                 "rule_accuracy": base["rule_accuracy"]},
        "kfac": side(headline),
        "svd": side(matched),
        "matched_on": "perplexity",
    }
    at_cost = results["headline"].get("svd_at_kfac_perplexity")
    if at_cost is not None:
        out["svd_at_kfac_perplexity"] = {
            "keep_mass": at_cost["keep_mass"], "heldout_strict": at_cost["heldout_strict"],
            "selection_strict": at_cost["selection_strict"], "perplexity_ratio": at_cost["perplexity"] / base["perplexity"]}
    if "canaries_in_factors" in results:
        row = results["canaries_in_factors"]["kfac"]
        out["kfac_canaries_in_factors"] = {
            "keep_mass": row["keep_mass"], "heldout_strict": row["heldout_strict"],
            "selection_strict": row["selection_strict"], "perplexity_ratio": row["perplexity"] / base["perplexity"]}
    return out


def _write_results(directory: Path, results: dict, timings: dict[str, float], started: float) -> str:
    """Write ``results.json`` and ``table.txt`` with the timings so far; return the table."""
    timings["total"] = time.perf_counter() - started
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    table = format_table(results)
    with atomic_path(directory / TABLE_FILE) as tmp:
        tmp.write_text(table + "\n")
    write_json(directory / DEMO_RESULTS_FILE, results)
    return table


def _checks(config: DemoConfig, base: dict, headline: dict, matched: dict | None) -> dict[str, dict]:
    """The issue's targets, each with the measured value and whether it holds (canaries: the held-out half)."""

    def check(value: float | None, ok: bool, target: str) -> dict:
        return {"value": value, "target": target, "ok": bool(ok)}

    if config.kind == "text":  # issue 11: <= 10% held-out at <= 1.20x; SVD at that cost >= 3x as many and >= 30%
        ratio = headline["perplexity"] / base["perplexity"]
        out = {
            "base_canary_strict": check(base["canary_strict"], base["canary_strict"] >= 0.95, ">= 0.95"),
            "kfac_canary_strict": check(headline["heldout_strict"], headline["heldout_strict"] <= 0.10, "<= 0.10"),
            "kfac_perplexity_ratio": check(ratio, ratio <= 1.20, "<= 1.20x"),
        }
        if matched is None:
            out["svd_keeps_more_canaries"] = check(None, False, "an SVD point within the perplexity budget")
        else:
            svd = matched["heldout_strict"]
            ok = svd >= 0.30 and svd >= 3 * headline["heldout_strict"]
            out["svd_keeps_more_canaries"] = check(svd, ok, ">= 0.30 and >= 3x K-FAC")
        return out

    out = {
        "base_canary_strict": check(base["canary_strict"], base["canary_strict"] >= 0.95, ">= 0.95"),
        "base_rule_accuracy": check(base["rule_accuracy"], base["rule_accuracy"] >= 0.99, ">= 0.99"),
        "kfac_canary_strict": check(headline["heldout_strict"], headline["heldout_strict"] <= 0.05, "<= 0.05"),
        "kfac_rule_accuracy": check(headline["rule_accuracy"], headline["rule_accuracy"] >= 0.95, ">= 0.95"),
    }
    if matched is None:
        out["svd_keeps_more_canaries"] = check(None, False, "an SVD point within the perplexity budget")
    else:
        margin = matched["heldout_strict"] - headline["heldout_strict"]
        out["svd_keeps_more_canaries"] = check(margin, margin >= 0.25, ">= 0.25")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Output


def _row(label: str, p: dict) -> str:
    keep = "-" if p["method"] == "base" else f"{p['keep_mass']:g}"
    delta = "" if p["method"] == "base" else f" ({p['rule_loss_increase']:+.4f})"
    change = p.get("weight_change")
    change_s = "-" if change is None else f"{100 * change:.1f}%"
    accuracy = "-" if p["rule_accuracy"] is None else f"{100 * p['rule_accuracy']:.1f}%"
    return (
        f"{label:<22}{keep:>6}{100 * p['selection_strict']:>9.1f}%{100 * p['heldout_strict']:>9.1f}%"
        f"{100 * p['canary_loose']:>9.1f}%{accuracy:>10}   {p['rule_loss']:.4f}{delta:<12}"
        f"{p['perplexity']:>8.3f}{change_s:>9}"
    )


def _cost_lines(results: dict) -> list[str]:
    """The matched-cost tables: per budget, each method's point chosen on the selection canaries."""
    lines = []
    text = results.get("testbed", {}).get("kind") == "text"
    for name, title, fmt in (("perplexity", f"{'held-out text' if text else 'rule'} perplexity increase",
                              "at most +{:.0f}%"),
                             ("rule_accuracy", f"{'fact' if text else 'rule'} accuracy drop", "at most {:.0f} points")):
        table = results.get("matched", {}).get(name, {})
        if not table:
            continue
        methods = sorted({m for by in table.values() for m in by})
        lines.append(f"matched on {name.replace('_', ' ')}: each method's point chosen on the selection canaries "
                     f"within the budget; held-out canary strict (keep_mass)")
        lines.append(f"  {title + ' from base':<32}" + "".join(f"{m.upper():>18}" for m in methods))
        for budget, by in table.items():
            cells = []
            for m in methods:
                p = by.get(m)
                cell = "none" if p is None else f"{100 * p['heldout_strict']:.1f}% ({p['keep_mass']:g})"
                cells.append(f"{cell:>18}")
            lines.append(f"  {fmt.format(100 * float(budget)):<32}" + "".join(cells))
    return lines


def format_table(results: dict) -> str:
    """The console table: headline comparison, matched-cost tables, every point, then the checks."""
    base, points = results["base"], results["points"]
    head, matched = results["headline"]["kfac"], results["headline"]["svd_matched"]
    cfg, tb = results["config"], results["testbed"]
    blocks = ",".join(str(b) for b in cfg["blocks"])
    text = tb.get("kind") == "text"
    capability, cost = ("facts", "text") if text else ("rule", "rule")
    header = (
        f"{'':<22}{'keep':>6}{'select':>10}{'held-out':>10}{'canary':>10}{capability:>10}   {cost + ' loss':<19}"
        f"{cost:>8}{'weight':>9}\n"
        f"{'model':<22}{'mass':>6}{'strict':>10}{'strict':>10}{'loose':>10}{'acc':>10}   {'(change)':<19}{'ppl':>8}"
        f"{'change':>9}"
    )
    rule = "-" * len(header.splitlines()[0])
    params = tb.get("n_parameters", 0) / 1e6
    t = tb["config"]
    split = results.get("split") or {}
    world = (f"{t['canary_len']}-word canaries x {t['canary_repeats']} repeats in Python documentation prose "
             f"(vocabulary {t['vocab_size']})" if text else
             f"canaries x {t['canary_repeats']} repeats among arithmetic sequences mod {t['n_numbers']}")
    lines = [
        f"kfac-edit demo: Olmo2 {'text ' if text else ''}testbed {tb['config_hash']} ({params:.2f}M parameters, "
        f"{t['n_layers']} blocks; {t['n_canaries']} {world})",
        f"edit: MLP {','.join(cfg['projections'])} of blocks {blocks}; factors from {results['factors'].get('tokens', '?')} "
        + ("tokens of factor_corpus.jsonl (the training prose without the canaries)" if text else "corpus tokens")
        + f", {cfg['labels']} labels",
        f"canaries: {split.get('selection', '?')} to choose on (selection), {split.get('heldout', '?')} held out to "
        f"report on; SVD matched on {'held-out text' if text else 'rule'} perplexity",
        "",
        header,
        rule,
        _row("base model", base),
        _row("K-FAC (headline)", head),
        _row("SVD (matched ppl)", matched) if matched else "SVD (matched ppl)     none in the grid is that cheap",
    ]
    at_cost = results["headline"].get("svd_at_kfac_perplexity")
    if at_cost is not None:
        lines.append(_row("SVD (<= K-FAC's ppl)", at_cost))
    if results.get("canaries_in_factors"):
        lines.append(_row("K-FAC, canaries in F", results["canaries_in_factors"]["kfac"]))
    lines += [rule]
    for p in points:
        lines.append(_row(f"  {'K-FAC' if p['method'] == 'kfac' else 'SVD'}", p))
    lines.append(rule)
    lines += _cost_lines(results)
    lines.append(rule)
    names = {
        "base_canary_strict": "base canary strict memorization",
        "base_rule_accuracy": "base rule accuracy",
        "kfac_canary_strict": "K-FAC held-out canary strict memorization",
        "kfac_rule_accuracy": "K-FAC rule accuracy",
        "svd_keeps_more_canaries": "SVD at matched ppl keeps more held-out canaries",
        "kfac_perplexity_ratio": "K-FAC held-out perplexity ratio",
    }
    for key, c in results["checks"].items():
        value = ("n/a" if c["value"] is None else f"{c['value']:.3f}x" if key.endswith("ratio")
                 else f"{100 * c['value']:.1f}%")
        lines.append(f"{'ok  ' if c['ok'] else 'MISS'} {names[key]:<50} {value:>7}  target {c['target']}")
    if results.get("timings_s"):
        tm = results["timings_s"]
        cached = " (cache hit)" if tb.get("cached") else ""
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in tm.items()) + cached)
    return "\n".join(lines)
