"""Edit, evaluate and restore the model for every single block and every run of up to --max-combo adjacent blocks
of --blocks, for each projection set and keep_mass. Results stream to DIR/results.jsonl (a rerun resumes);
DIR/best.json holds the point with the lowest strict memorization whose perplexity is within --ppl-budget x the base
perplexity (apply it with `kfac-edit edit --layers-file DIR/best.json`); DIR/report.html and DIR/report.md show the
trade-off.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import HTML_FILE, RESULTS_FILE
from ..edit import check_factors_dir, declare_modules
from ..eigen import EigenCache
from ..errors import UserError
from ..factors.store import Factors
from ..models import parse_layers, parse_projections
from ..spec import METHODS
from ..sweep import SweepConfig, check_sweep_configs, needed_modules, run_sweep
from . import (EVAL_INPUTS, add_bsn_options, add_eval_options, add_factor_options, add_field_options,
               add_model_options, bsn_config_from_args, eval_config_from_args, inputs_of, load_model_from_args, writing)

HELP = "grid-search blocks x projections x keep_mass; log results, pick the best edit, write a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    def field_help(name: str) -> str:
        return SweepConfig.__dataclass_fields__[name].metadata["help"]

    add_model_options(p)
    p.add_argument("--out", default="kfac-sweep", metavar="DIR", help="output directory (default kfac-sweep)")
    add_factor_options(p)
    p.add_argument("--blocks", "--layers", metavar="BLOCKS", help=field_help("blocks") + " (--layers: the same)")
    p.add_argument("--projections", action="append", metavar="KINDS", help="a projection set edited together, e.g. "
                   "gate,up (default; up in a model without gate, every kind it has without gate and up); repeat "
                   "the option to sweep several sets, e.g. --projections gate,up --projections gate,up,down")
    p.add_argument("--keep-mass", action="append", metavar="LIST", help=field_help("keep_masses") + " for every "
                   "method (default 0.5,0.6,0.7,0.8,0.9); repeat with METHOD=LIST for a method's own grid, e.g. "
                   "--keep-mass 0.9,0.95 --keep-mass svd=0.6,0.8")
    p.add_argument("--group", action="append", metavar="BLOCKS", help="a block group edited together, e.g. 0-1; "
                   "repeat for several; replaces the single blocks and runs of --blocks/--max-combo")
    add_field_options(p, SweepConfig, ["max_combo", "ppl_budget"])
    p.add_argument("--method", action="append", metavar="METHODS",
                   help=f"edit methods, comma-separated or repeated, of {', '.join(METHODS)} (default kfac)")
    p.add_argument("--holdout-fraction", type=float, default=0.5, help="share of the memorized records held out: "
                   "the best point is chosen on the rest (the selection part) and measured on these; split by a hash "
                   "of each record and --seed (default 0.5; 0: no split)")
    p.add_argument("--capability", action="append", metavar="FILE", default=[], help="records (memorized-set format) "
                   "only a capable model continues exactly, e.g. held-out rule sequences; reported as STEM_accuracy, "
                   "not as memorization; repeatable")
    p.add_argument("--skip-over", type=float, metavar="X", help=field_help("skip_over") + "; at least --ppl-budget, "
                   "e.g. 1.5 (default: measure every point)")
    add_field_options(p, SweepConfig, ["seed"])
    add_eval_options(p)
    add_bsn_options(p, "records bsn learns to forget (default: the selection part of the split; refused when they "
                    "share a record with the held-out part)")


def keep_mass_grids(options: list[str] | None) -> tuple[list[float], dict[str, list[float]]]:
    """``--keep-mass`` options -> (the grid of every method, per-method grids): ``["0.9,0.95", "svd=0.6"]`` ->
    ``([0.9, 0.95], {"svd": [0.6]})``."""
    common, per_method = [0.5, 0.6, 0.7, 0.8, 0.9], {}
    for text in options or []:
        method, sep, values = text.rpartition("=")
        try:
            grid = sorted({float(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise UserError(f"cannot read --keep-mass '{values}'; write e.g. 0.6,0.7,0.8,0.9 or svd=0.6,0.8") from None
        if sep:
            per_method[method.strip()] = grid
        else:
            common = grid
    return common, per_method


def run(args: argparse.Namespace) -> int:
    keep_masses, per_method = keep_mass_grids(args.keep_mass)
    methods = [m.strip() for text in args.method or ["kfac"] for m in text.split(",") if m.strip()]
    config = SweepConfig(
        blocks=parse_layers(args.blocks) if args.blocks else None,
        projection_sets=[tuple(parse_projections(s)) for s in args.projections] if args.projections else None,
        keep_masses=keep_masses, method_keep_masses=per_method, methods=list(dict.fromkeys(methods)),
        groups=[tuple(parse_layers(g)) for g in args.group] if args.group else None,
        max_combo=args.max_combo, ppl_budget=args.ppl_budget, holdout_fraction=args.holdout_fraction,
        capability=list(args.capability), skip_over=args.skip_over, seed=args.seed, clean_data=args.clean_data,
        forget=args.forget, bsn=bsn_config_from_args(args),
    )  # fmt: skip
    eval_config = eval_config_from_args(args, None)
    check_sweep_configs(config, eval_config)
    for method in config.methods:
        check_factors_dir(method, args.factors)
    reads = inputs_of(args, "--model", "--factors", "--capability", "--forget", "--clean-data", *EVAL_INPUTS)
    with writing((args.out, "dir"), reads=reads):
        model, tokenizer = load_model_from_args(args)
        declare_modules(model, args.modules, args.factors)
        factors = None
        if args.factors:
            held = list(Factors.load(args.factors, names=[]).manifest.get("modules", {}))  # manifest only
            wanted = [n for n in needed_modules(model, config, held) if n in held]  # missing ones: error below
            factors = Factors.load(args.factors, names=wanted)
            factors.manifest.setdefault("directory", str(args.factors))
        cache = EigenCache.default(args.cache_dir)
        outcome = run_sweep(model, tokenizer, factors, config, eval_config, args.out, cache=cache)
    print(f"{len(outcome.records) - 1} points in {Path(args.out) / RESULTS_FILE} ({outcome.evaluated} evaluated now)")
    if split := outcome.split:
        print(f"split: {split['selection']} selection / {split['heldout']} held-out records (--holdout-fraction "
              f"{split['holdout_fraction']:g}, --seed {split['seed']}); the best point is chosen on the selection part")
    if (base := next((r for r in outcome.records if r.kind == "base"), None)) is not None:
        print(f"base: {_memorization(base)}  perplexity {base.perplexity:.4f}")
    if (c := outcome.chosen) is not None:
        print(f"best: {c.label()}  {_memorization(c)}  perplexity {c.perplexity:.4f}  -> {outcome.best_path}")
    else:
        print(f"no point within {config.ppl_budget:g} x the base perplexity; raise --ppl-budget or widen the grid")
    print(f"report: {Path(args.out) / HTML_FILE}")
    return 0


def _memorization(record) -> str:
    m = record.metrics
    if "selection_strict" in m:
        return f"strict {m['strict']:.4f} (selection {m['selection_strict']:.4f}, held-out {m['heldout_strict']:.4f})"
    return f"strict {m['strict']:.4f}"
