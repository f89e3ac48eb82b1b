"""``kfac-edit demo``: the whole method on the embedded testbed, on a laptop CPU, in minutes.

Every step is the public API a user runs on a real model:

1. :func:`kfac_edit.testbed.build_testbed`: train a tiny OLMo-2 that learns a rule (arithmetic sequences) and
   memorizes canaries (random sequences repeated in its training stream), or load it from the cache.
2. :func:`kfac_edit.factors.collect_factors` over ``corpus.jsonl`` (the training mixture), sampled labels (true
   Fisher), for the MLP projections the edit touches.
3. :func:`kfac_edit.edit.apply_edit` at each keep_mass of a grid, for the ``kfac`` edit and for the data-free
   ``svd`` baseline; each point is edited, evaluated and restored.
4. :func:`kfac_edit.evaluate.evaluate` of each point: the canaries (``memorized.jsonl``), the held-out rule sequences
   (``rule_heldout.jsonl``) and the rule text (``clean.jsonl``, perplexity).

Metrics of every point (fractions in [0, 1]; the console shows percentages):

* ``canary_strict``: share of canaries whose greedy continuation after the prefix is the whole suffix, exactly
  (strict memorization); ``canary_loose``: share within the loose Levenshtein threshold (0.75).
* ``rule_accuracy``: share of held-out rule sequences (never trained on) continued exactly: the same strict
  criterion on sequences that can only be computed, not recalled (:func:`kfac_edit.testbed.rule_accuracy`).
* ``rule_loss``: mean next-token loss on held-out rule text, one document per window; ``rule_loss_increase`` is the
  change from the base model (the cost of the edit); ``perplexity`` = exp(rule_loss).

The comparison: the headline K-FAC edit against the *matched* SVD point, the one whose rule-loss increase is the
smallest that is at least as large as the K-FAC edit's: at equal or greater damage to the rule, how many canaries
does SVD leave? The headline K-FAC point is the one ``kfac-edit sweep`` would choose
(:func:`kfac_edit.pareto.choose_best`): the lowest canary strict memorization whose rule perplexity is within
``ppl_budget`` x the base model's (ties: the lower perplexity); ``keep_mass`` fixes it instead.

Output directory (written whole, atomically)::

    results.json        configuration, testbed info, every point, the headline comparison, checks, timings
    results.jsonl       the points in the sweep schema (:mod:`kfac_edit.pareto`), so `kfac-edit report DIR` works
    before_after.json   base vs the headline K-FAC edit (:mod:`kfac_edit.report`)
    best.json           the headline edit as a layers JSON: `kfac-edit edit --layers-file DIR/best.json`
    sweep.json          the perplexity budget of the headline choice (read by the report)
    table.txt           the console table
    plots/demo_keep_mass.png   canary strict memorization and rule accuracy vs keep_mass, K-FAC and SVD
    plots/demo_tradeoff.png    canary strict memorization vs rule-loss increase, K-FAC and SVD
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
from .sweep import BEST_FILE, SWEEP_FILE  # best.json: layers JSON of the headline; sweep.json: its ppl_budget
from .testbed import TestbedConfig, build_testbed

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
TABLE_FILE = "table.txt"
MEMORIZED_SET = "memorized"  # evaluate() names a set after its file's stem
RULE_SET = "rule_heldout"


@dataclass(frozen=True)
class DemoConfig:
    """The testbed, the edit and the grids of the demo."""

    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    blocks: tuple[int, ...] = (0, 1)  # edited blocks
    projections: tuple[str, ...] = ("gate", "up", "down")  # edited MLP projections of each block
    # keep_mass grids: K-FAC's interesting range is close to 1 (the curvature mass is concentrated), SVD's lower
    kfac_grid: tuple[float, ...] = (
        0.998, 0.995, 0.9925, 0.99, 0.9875, 0.985, 0.9825, 0.98, 0.9775, 0.975, 0.9725, 0.97, 0.965, 0.96, 0.95, 0.94,
        0.92, 0.9, 0.85, 0.8,
    )
    svd_grid: tuple[float, ...] = tuple(round(0.95 - 0.0125 * i, 4) for i in range(37))  # 0.95, 0.9375, ..., 0.5
    ppl_budget: float = 1.05  # headline: lowest canary memorization with rule perplexity <= budget x base
    keep_mass: float | None = None  # fix the headline K-FAC keep_mass instead (added to the grid)
    factor_tokens: int = 200_000  # corpus tokens for factor collection (the corpus holds steps * batch * 26)
    labels: str = "sampled"  # true Fisher; "gold" for the empirical Fisher
    seed: int = 0  # seed of the sampled labels
    batch_size: int = 128  # windows per collection batch; prompts per generation batch

    def __post_init__(self) -> None:
        if self.keep_mass is not None and self.keep_mass not in self.kfac_grid:
            object.__setattr__(self, "kfac_grid", tuple(sorted({*self.kfac_grid, self.keep_mass}, reverse=True)))
        if not self.ppl_budget > 1.0:
            raise UserError(f"demo ppl_budget {self.ppl_budget} must be above 1, e.g. 1.05")
        for value in (*self.kfac_grid, *self.svd_grid):
            if not 0.0 <= value < 1.0:
                raise UserError(f"demo keep_mass {value} is outside [0, 1)")
        bad = [b for b in self.blocks if not 0 <= b < self.testbed.n_layers]
        if bad:
            raise UserError(f"demo block {bad[0]} does not exist: the testbed has blocks 0..{self.testbed.n_layers - 1}")

    @classmethod
    def quick(cls) -> "DemoConfig":
        """The small configuration of ``--quick`` and the integration test: trains in well under a minute."""
        return cls(testbed=TestbedConfig.quick(), factor_tokens=100_000)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["testbed_hash"] = self.testbed.config_hash()
        return d


# ----------------------------------------------------------------------------------------------------------------
# Measuring one point


def eval_config(paths, testbed: TestbedConfig, batch_size: int):
    """What every point is evaluated on: canaries, held-out rule sequences, rule text (one document a window)."""
    from .evaluate import EvalConfig

    return EvalConfig(
        memorized=[str(paths.memorized), str(paths.rule_heldout)],
        perplexity_data=str(paths.clean),
        prefix_len=None,  # records are used whole: prefix = bos + prefix_len numbers, suffix = the rest
        suffix_len=None,
        ppl_block=testbed.seq_len + 2,  # [bos, x_1..x_L, eos]: the training window
        batch_size=batch_size,
    )


def point_metrics(record: dict) -> dict[str, float]:
    """The demo's metrics (module docstring) from an :func:`kfac_edit.evaluate.evaluate` record."""
    metrics = record["metrics"]
    canary, rule, ppl = metrics["memorized"][MEMORIZED_SET], metrics["memorized"][RULE_SET], metrics["perplexity"]
    return {
        "canary_strict": canary["strict"],
        "canary_loose": canary["loose"],
        "canary_match_len": canary["mean_match_len"],
        "rule_accuracy": rule["strict"],
        "rule_loss": ppl["mean_loss"],
        "perplexity": ppl["perplexity"],
    }


def choose_headline(config: "DemoConfig", base: dict, kfac_points: list[dict]) -> dict:
    """The headline K-FAC point: ``config.keep_mass`` if set, else the sweep's choice within ``config.ppl_budget``
    (:func:`kfac_edit.pareto.choose_best`), else (no point within the budget) the mildest edit of the grid."""
    from .pareto import PointConfig, SweepRecord, choose_best

    if config.keep_mass is not None:
        return next(p for p in kfac_points if p["keep_mass"] == config.keep_mass)
    records = [
        SweepRecord(PointConfig("kfac", tuple(config.blocks), tuple(config.projections), p["keep_mass"]),
                    {"strict": p["canary_strict"], "loose": p["canary_loose"], "perplexity": p["perplexity"]})
        for p in kfac_points
    ]
    best = choose_best(records, base["perplexity"], config.ppl_budget)
    if best is None:
        return max(kfac_points, key=lambda p: p["keep_mass"])
    return next(p for p in kfac_points if p["keep_mass"] == best.config.keep_mass)


def matched_svd(kfac_point: dict, svd_points: list[dict]) -> dict | None:
    """The SVD point whose rule-loss increase is the smallest one at least as large as ``kfac_point``'s.

    ``None`` when no SVD point of the grid costs as much rule loss (widen the grid to lower keep_mass).
    """
    costlier = [p for p in svd_points if p["rule_loss_increase"] >= kfac_point["rule_loss_increase"]]
    return min(costlier, key=lambda p: p["rule_loss_increase"]) if costlier else None


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def check_out_dir(out_dir: str | Path) -> Path:
    """The demo replaces its output directory whole: refuse one that holds something else."""
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; choose a new path")
        if any(out.iterdir()) and not (out / RESULTS_JSON).exists():
            raise UserError(
                f"--out {out} exists and is not a demo directory (no {RESULTS_JSON}); choose a new path or remove it"
            )
    return out


def run_demo(
    config: DemoConfig | None = None,
    out_dir: str | Path = "kfac-edit-demo",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train (or load) -> collect -> edit -> evaluate, K-FAC and SVD; write ``out_dir``; return ``results.json``."""
    from .data import token_batches
    from .edit import EditSpec, EigenCache, apply_edit, restore, save_edited
    from .evaluate import evaluate
    from .factors import collect_factors
    from .models import load_model

    config = config or DemoConfig()
    out = check_out_dir(out_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the testbed
    t0 = time.perf_counter()
    paths = build_testbed(config.testbed, cache_dir=cache_dir, progress=progress)
    timings["testbed"] = time.perf_counter() - t0
    info = paths.load_info()
    model, tokenizer = load_model(str(paths.model_dir), dtype="float32", device="cpu")

    # 2. K-FAC factors of the edited projections, over the training mixture
    t0 = time.perf_counter()
    batches = token_batches(
        str(paths.corpus), tokenizer, seq_len=config.testbed.seq_len + 2, batch_size=config.batch_size,
        max_tokens=config.factor_tokens, with_index=True,
    )
    factors = collect_factors(
        model, batches, layers=list(config.blocks), kinds=list(config.projections), labels=config.labels,
        seed=config.seed, max_tokens=config.factor_tokens, progress=progress,
    )
    timings["collect"] = time.perf_counter() - t0

    # 3-4. edit, evaluate, restore: base, the K-FAC grid, the SVD grid
    t0 = time.perf_counter()
    evaluation = eval_config(paths, config.testbed, config.batch_size)

    def measure() -> dict[str, float]:
        return point_metrics(evaluate(model, tokenizer, evaluation))

    base = {"method": "base", "keep_mass": 1.0, **measure()}
    base["rule_loss_increase"] = 0.0
    cache = EigenCache(None)
    points: list[dict] = []
    grid = [("kfac", k) for k in config.kfac_grid] + [("svd", k) for k in config.svd_grid]
    from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    for method, keep in tqdm(grid, desc="edit + evaluate", unit="point", disable=None if progress else True):
        spec = EditSpec({(b, kind): keep for b in config.blocks for kind in config.projections}, method, config.seed)
        t1 = time.perf_counter()
        try:
            report = apply_edit(model, factors if method != "svd" else None, spec, cache=cache)
            metrics = measure()
        finally:
            restore(model)
        points.append({
            "method": method,
            "keep_mass": keep,
            **metrics,
            "rule_loss_increase": metrics["rule_loss"] - base["rule_loss"],
            "coefficients_kept": _mean([m.pairs_fraction for m in report.modules]),
            "weight_change": _mean([m.weight_change for m in report.modules]),
            "seconds": round(time.perf_counter() - t1, 3),
        })
    timings["edit_and_evaluate"] = time.perf_counter() - t0

    kfac_points = [p for p in points if p["method"] == "kfac"]
    svd_points = [p for p in points if p["method"] == "svd"]
    headline = choose_headline(config, base, kfac_points)
    matched = matched_svd(headline, svd_points)
    checks = _checks(base, headline, matched)

    # 5. write everything into a fresh directory, renamed into place at the end
    headline_spec = EditSpec(
        {(b, kind): headline["keep_mass"] for b in config.blocks for kind in config.projections}, "kfac", config.seed
    )
    results = {
        "kind": "demo",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "testbed": {"directory": str(paths.root), "cached": paths.cached, **info},
        "factors": {k: v for k, v in factors.manifest.items() if k not in ("modules",)},
        "edit": {"blocks": list(config.blocks), "projections": list(config.projections),
                 "layers": headline_spec.layers()},
        "base": base,
        "points": points,
        "headline": {"kfac": headline, "svd_matched": matched},
        "checks": checks,
        "timings_s": {},
    }
    table = format_table(results)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        factors.save(tmp / "factors")
        report = apply_edit(model, factors, headline_spec, cache=cache)
        try:
            save_edited(model, tokenizer, tmp / "edited", report)
        finally:
            restore(model)
        write_json(tmp / BEST_FILE, headline_spec.layers())
        _write_sweep_records(tmp, config, base, points, headline)
        (tmp / "plots").mkdir(exist_ok=True)
        _plot_keep_mass(tmp / "plots" / "demo_keep_mass.png", base, kfac_points, svd_points, headline, matched)
        _plot_tradeoff(tmp / "plots" / "demo_tradeoff.png", base, kfac_points, svd_points, headline, matched)
        _write_results(tmp, results, timings, started)
    # the report pages name their directory, so they are written once it has its final name
    from .report import write_report

    write_report(out, ppl_budget=config.ppl_budget)
    table = _write_results(out, results, timings, started)
    results["table"] = table
    return results


def _write_results(directory: Path, results: dict, timings: dict[str, float], started: float) -> str:
    """Write ``results.json`` and ``table.txt`` with the timings so far; return the table."""
    timings["total"] = time.perf_counter() - started
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    table = format_table(results)
    with atomic_path(directory / TABLE_FILE) as tmp:
        tmp.write_text(table + "\n")
    write_json(directory / RESULTS_JSON, results)
    return table


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _checks(base: dict, headline: dict, matched: dict | None) -> dict[str, dict]:
    """The issue's targets, each with the measured value and whether it holds."""

    def check(value: float | None, ok: bool, target: str) -> dict:
        return {"value": value, "target": target, "ok": bool(ok)}

    out = {
        "base_canary_strict": check(base["canary_strict"], base["canary_strict"] >= 0.95, ">= 0.95"),
        "base_rule_accuracy": check(base["rule_accuracy"], base["rule_accuracy"] >= 0.99, ">= 0.99"),
        "kfac_canary_strict": check(headline["canary_strict"], headline["canary_strict"] <= 0.05, "<= 0.05"),
        "kfac_rule_accuracy": check(headline["rule_accuracy"], headline["rule_accuracy"] >= 0.95, ">= 0.95"),
    }
    if matched is None:
        out["svd_keeps_more_canaries"] = check(None, False, "an SVD point with a rule-loss increase >= K-FAC's")
    else:
        margin = matched["canary_strict"] - headline["canary_strict"]
        out["svd_keeps_more_canaries"] = check(margin, margin >= 0.25, ">= 0.25")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Output


def _row(label: str, p: dict, base: dict) -> str:
    keep = "-" if p["method"] == "base" else f"{p['keep_mass']:g}"
    delta = "" if p["method"] == "base" else f" ({p['rule_loss_increase']:+.4f})"
    change = p.get("weight_change")
    change_s = "-" if change is None else f"{100 * change:.1f}%"
    return (
        f"{label:<22}{keep:>6}{100 * p['canary_strict']:>9.1f}%{100 * p['canary_loose']:>9.1f}%"
        f"{100 * p['rule_accuracy']:>9.1f}%   {p['rule_loss']:.4f}{delta:<12}{p['perplexity']:>8.3f}{change_s:>9}"
    )


def format_table(results: dict) -> str:
    """The console table: headline comparison, then every point of both grids, then the checks."""
    base, points = results["base"], results["points"]
    head, matched = results["headline"]["kfac"], results["headline"]["svd_matched"]
    cfg, tb = results["config"], results["testbed"]
    blocks = ",".join(str(b) for b in cfg["blocks"])
    header = (
        f"{'':<22}{'keep':>6}{'canary':>10}{'canary':>10}{'rule':>10}   {'rule loss':<19}{'rule':>8}{'weight':>9}\n"
        f"{'model':<22}{'mass':>6}{'strict':>10}{'loose':>10}{'acc':>10}   {'(change)':<19}{'ppl':>8}{'change':>9}"
    )
    rule = "-" * len(header.splitlines()[0])
    params = tb.get("n_parameters", 0) / 1e6
    t = tb["config"]
    lines = [
        f"kfac-edit demo: Olmo2 testbed {tb['config_hash']} ({params:.2f}M parameters, {t['n_layers']} blocks; "
        f"{t['n_canaries']} canaries x {t['canary_repeats']} repeats among arithmetic sequences mod {t['n_numbers']})",
        f"edit: MLP {','.join(cfg['projections'])} of blocks {blocks}; factors from {results['factors'].get('tokens', '?')} "
        f"corpus tokens, {cfg['labels']} labels",
        "",
        header,
        rule,
        _row("base model", base, base),
        _row("K-FAC (headline)", head, base),
        _row("SVD (matched cost)", matched, base) if matched else "SVD (matched cost)    none in the grid costs as much",
        rule,
    ]
    for p in points:
        lines.append(_row(f"  {'K-FAC' if p['method'] == 'kfac' else 'SVD'}", p, base))
    lines.append(rule)
    names = {
        "base_canary_strict": "base canary strict memorization",
        "base_rule_accuracy": "base rule accuracy",
        "kfac_canary_strict": "K-FAC canary strict memorization",
        "kfac_rule_accuracy": "K-FAC rule accuracy",
        "svd_keeps_more_canaries": "SVD at matched cost keeps more canaries (margin)",
    }
    for key, c in results["checks"].items():
        value = "n/a" if c["value"] is None else f"{100 * c['value']:.1f}%"
        lines.append(f"{'ok  ' if c['ok'] else 'MISS'} {names[key]:<50} {value:>7}  target {c['target']}")
    if results.get("timings_s"):
        tm = results["timings_s"]
        cached = " (cache hit)" if tb.get("cached") else ""
        lines.append(
            "time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in tm.items()) + cached
        )
    return "\n".join(lines)


def _write_sweep_records(directory: Path, config: DemoConfig, base: dict, points: list[dict], headline: dict) -> None:
    """``results.jsonl`` in the sweep schema (strict = canary strict, perplexity = rule-text perplexity) and
    ``before_after.json``, so that :func:`kfac_edit.report.write_report` and `kfac-edit report DIR` read the demo."""
    from .fileio import append_jsonl
    from .pareto import BASE_CONFIG, RESULTS_FILE, PointConfig, SweepRecord

    def metrics(p: dict) -> dict[str, float]:
        return {
            "strict": p["canary_strict"], "loose": p["canary_loose"], "perplexity": p["perplexity"],
            "rule_accuracy": p["rule_accuracy"], "rule_loss": p["rule_loss"],
            "rule_loss_increase": p["rule_loss_increase"],
        }

    append_jsonl(directory / RESULTS_FILE, SweepRecord(BASE_CONFIG, metrics(base), kind="base").to_dict())
    for p in points:
        point = PointConfig(p["method"], tuple(config.blocks), tuple(config.projections), float(p["keep_mass"]))
        append_jsonl(directory / RESULTS_FILE, SweepRecord(point, metrics(p), seconds=p["seconds"]).to_dict())
    blocks = ",".join(str(b) for b in config.blocks)
    write_json(directory / SWEEP_FILE, {"kind": "demo", "ppl_budget": config.ppl_budget})  # read by the report
    write_json(directory / "before_after.json", {
        "before": {"label": "base", "metrics": metrics(base)},
        "after": {"label": f"kfac b{blocks} {','.join(config.projections)} k={headline['keep_mass']:g}",
                  "metrics": metrics(headline)},
    })


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plot_keep_mass(path: Path, base, kfac_points, svd_points, headline, matched) -> None:
    """Two panels: canary strict memorization and rule accuracy vs keep_mass, one line per method."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "canary_strict", "canary strict memorization"),
                           (axes[1], "rule_accuracy", "rule accuracy (held-out sequences)")):
        for pts, label, color in ((kfac_points, "K-FAC (curvature mass kept)", "tab:blue"),
                                  (svd_points, "SVD (weight energy kept)", "tab:orange")):
            pts = sorted(pts, key=lambda p: p["keep_mass"])
            ax.plot([p["keep_mass"] for p in pts], [p[key] for p in pts], marker="o", ms=4, color=color, label=label)
        ax.axhline(base[key], color="black", ls="--", lw=1, label="base model")
        ax.scatter([headline["keep_mass"]], [headline[key]], marker="*", s=200, color="tab:blue", edgecolor="black",
                   zorder=5, label="K-FAC headline")
        if matched:
            ax.scatter([matched["keep_mass"]], [matched[key]], marker="*", s=200, color="tab:orange",
                       edgecolor="black", zorder=5, label="SVD at matched rule-loss cost")
        ax.set_xlabel("keep_mass")
        ax.set_title(title)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="center left")
    _save(fig, path)


def _plot_tradeoff(path: Path, base, kfac_points, svd_points, headline, matched) -> None:
    """Canary strict memorization vs rule-loss increase: at equal cost, which edit removes more canaries?"""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for pts, label, color in ((kfac_points, "K-FAC", "tab:blue"), (svd_points, "SVD", "tab:orange")):
        pts = sorted(pts, key=lambda p: p["rule_loss_increase"])
        xs = [p["rule_loss_increase"] for p in pts]
        ax.plot(xs, [p["canary_strict"] for p in pts], marker="o", ms=4, color=color, label=label)
        for p, x in zip(pts, xs):
            if 0.02 < p["canary_strict"] < 0.98:  # label the transition only
                ax.annotate(f"{p['keep_mass']:g}", (x, p["canary_strict"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color=color)
    ax.scatter([headline["rule_loss_increase"]], [headline["canary_strict"]], marker="*", s=200,
               color="tab:blue", edgecolor="black", zorder=5, label=f"K-FAC headline (keep {headline['keep_mass']:g})")
    if matched:
        ax.scatter([matched["rule_loss_increase"]], [matched["canary_strict"]], marker="*", s=200,
                   color="tab:orange", edgecolor="black", zorder=5,
                   label=f"SVD at matched cost (keep {matched['keep_mass']:g})")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("rule-loss increase over the base model (nats/token; symlog scale)")
    ax.set_ylabel("canary strict memorization")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Memorization removed vs capability cost (labels: keep_mass)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
