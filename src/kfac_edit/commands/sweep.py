"""``kfac-edit sweep``: grid over blocks, projections and keep_mass; results log, best point, report."""

from __future__ import annotations

import argparse

ORDER = 60


def _help(name: str) -> str:
    from dataclasses import fields

    from ..sweep import SweepConfig

    return next(f.metadata["help"] for f in fields(SweepConfig) if f.name == name)


def register(subparsers) -> None:
    from ..spec import METHODS
    from .edit import add_modules_argument
    from .eval import add_eval_arguments, add_model_arguments

    p = subparsers.add_parser(
        "sweep",
        help="grid-search blocks x projections x keep_mass; log results, pick the best edit, write a report",
        description="Edit, evaluate and restore the model for every single block and every run of up to "
        "--max-combo adjacent blocks of --blocks, for each projection set and keep_mass. Results stream to "
        "DIR/results.jsonl (a rerun resumes); DIR/best.json holds the point with the lowest strict memorization "
        "whose perplexity is within --ppl-budget x the base perplexity (apply it with `kfac-edit edit "
        "--layers-file DIR/best.json`); DIR/report.html and DIR/report.md show the trade-off.",
    )
    add_model_arguments(p)
    p.add_argument("--factors", metavar="DIR", help="K-FAC factors of the model (`kfac-edit collect`); all but svd")
    add_modules_argument(p)
    p.add_argument("--blocks", "--layers", dest="blocks", metavar="BLOCKS", help=_help("blocks") + " (--layers: the same)")
    p.add_argument(
        "--projections",
        action="append",
        metavar="KINDS",
        help="a projection set edited together, e.g. gate,up (default); repeat the option to sweep several sets, "
        "e.g. --projections gate,up --projections gate,up,down",
    )
    p.add_argument("--keep-mass", action="append", metavar="LIST",
                   help=_help("keep_masses") + " for every method (default 0.5,0.6,0.7,0.8,0.9); repeat with "
                   "METHOD=LIST for a method's own grid, e.g. --keep-mass 0.9,0.95 --keep-mass svd=0.6,0.8")
    p.add_argument("--group", action="append", metavar="BLOCKS",
                   help="a block group edited together, e.g. 0-1; repeat for several; replaces the single blocks "
                   "and runs of --blocks/--max-combo")
    p.add_argument("--max-combo", type=int, default=3, help=_help("max_combo") + " (default 3)")
    p.add_argument("--ppl-budget", type=float, default=1.2, help=_help("ppl_budget") + " (default 1.2)")
    p.add_argument("--method", action="append", metavar="METHODS",
                   help=f"edit methods, comma-separated or repeated, of {', '.join(METHODS)} (default kfac)")
    p.add_argument("--holdout-fraction", type=float, default=0.5,
                   help="share of the memorized records held out: the best point is chosen on the rest (the "
                   "selection part) and measured on these; split by a hash of each record and --seed "
                   "(default 0.5; 0: no split)")
    p.add_argument("--capability", action="append", metavar="FILE", default=[],
                   help="records (memorized-set format) only a capable model continues exactly, e.g. held-out rule "
                   "sequences; reported as STEM_accuracy, not as memorization; repeatable")
    p.add_argument("--skip-over", type=float, metavar="X", help=_help("skip_over") + "; at least --ppl-budget, "
                   "e.g. 1.5 (default: measure every point)")
    p.add_argument("--seed", type=int, default=0, help=_help("seed") + " (default 0)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where eigendecompositions are cached (default: $KFAC_EDIT_CACHE/eigen, else ~/.cache/kfac-edit/eigen)",
    )
    from .edit import add_bsn_arguments

    add_bsn_arguments(p, "records bsn learns to forget (default: the selection part of the split; refused when "
                      "they share a record with the held-out part)")
    add_eval_arguments(p)
    p.add_argument("--out", default="kfac-sweep", metavar="DIR", help="output directory (default kfac-sweep)")
    p.set_defaults(func=run)


def _keep_masses(text: str) -> list[float]:
    from ..errors import UserError

    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"cannot read --keep-mass '{text}'; write e.g. 0.6,0.7,0.8,0.9 or svd=0.6,0.8") from None
    return sorted(set(values))


def keep_mass_grids(options: list[str] | None) -> tuple[list[float], dict[str, list[float]]]:
    """``--keep-mass`` options -> (the grid of every method, per-method grids): ``["0.9,0.95", "svd=0.6"]`` ->
    ``([0.9, 0.95], {"svd": [0.6]})``."""
    common, per_method = [0.5, 0.6, 0.7, 0.8, 0.9], {}
    for text in options or []:
        method, sep, values = text.rpartition("=")
        if sep:
            per_method[method.strip()] = _keep_masses(values)
        else:
            common = _keep_masses(text)
    return common, per_method


def methods_of(options: list[str] | None) -> list[str]:
    """``--method`` options (comma-separated or repeated) in order, without repeats; default ``["kfac"]``."""
    methods = [m.strip() for text in options or ["kfac"] for m in text.split(",") if m.strip()]
    return list(dict.fromkeys(methods))


def run(args: argparse.Namespace) -> int:
    from ..edit import check_factors_dir
    from ..errors import UserError
    from ..fileio import check_output, output_lock
    from ..models import parse_layers, parse_projections
    from ..sweep import SweepConfig
    from .edit import bsn_config_from_args
    from .eval import eval_config_from_args

    keep_masses, per_method = keep_mass_grids(args.keep_mass)
    config = SweepConfig(
        blocks=parse_layers(args.blocks) if args.blocks else None,
        projection_sets=[tuple(parse_projections(s)) for s in (args.projections or ["gate,up"])],
        keep_masses=keep_masses,
        method_keep_masses=per_method,
        groups=[tuple(parse_layers(g)) for g in args.group] if args.group else None,
        max_combo=args.max_combo,
        ppl_budget=args.ppl_budget,
        methods=methods_of(args.method),
        holdout_fraction=args.holdout_fraction,
        capability=list(args.capability),
        skip_over=args.skip_over,
        seed=args.seed,
        clean_data=args.clean_data,
        forget=args.forget,
        bsn=bsn_config_from_args(args),
    )
    config.validate()
    eval_config = eval_config_from_args(args, None)
    eval_config.validate()
    if not eval_config.memorized:
        raise UserError("the sweep needs a memorized set to measure: pass --memorized FILE")
    if not eval_config.perplexity_data:
        raise UserError("the sweep needs --perplexity-data SOURCE: the best point is chosen within a perplexity budget")
    for method in config.methods:
        check_factors_dir(method, args.factors)
    check_output(args.out, "dir")
    with output_lock(args.out):
        return _sweep(args, config, eval_config)


def _sweep(args: argparse.Namespace, config, eval_config) -> int:
    from pathlib import Path

    from ..edit import declare_modules
    from ..eigen import EigenCache, default_cache_dir
    from ..factors.store import Factors
    from ..sweep import needed_modules, run_sweep
    from .eval import load_for_eval

    model, tokenizer = load_for_eval(args)
    declare_modules(model, args.modules, args.factors)
    factors = None
    if args.factors:
        held = list(Factors.load(args.factors, names=[]).manifest.get("modules", {}))  # manifest only
        wanted = [n for n in needed_modules(model, config, held) if n in held]  # missing ones: error below
        factors = Factors.load(args.factors, names=wanted)
        factors.manifest.setdefault("directory", str(args.factors))
    cache = EigenCache(args.cache_dir if args.cache_dir is not None else default_cache_dir())
    outcome = run_sweep(model, tokenizer, factors, config, eval_config, args.out, cache=cache)
    out = Path(args.out)
    base = next((r for r in outcome.records if r.kind == "base"), None)
    print(f"{len(outcome.records) - 1} points in {out / 'results.jsonl'} ({outcome.evaluated} evaluated now)")
    if outcome.split:
        print(f"split: {outcome.split['selection']} selection / {outcome.split['heldout']} held-out records "
              f"(--holdout-fraction {outcome.split['holdout_fraction']:g}, --seed {outcome.split['seed']}); "
              "the best point is chosen on the selection part")
    if base is not None:
        print(f"base: {_memorization(base)}  perplexity {base.perplexity:.4f}")
    if outcome.chosen is not None:
        c = outcome.chosen
        print(f"best: {c.label()}  {_memorization(c)}  perplexity {c.perplexity:.4f}  -> {outcome.best_path}")
    else:
        print(f"no point within {config.ppl_budget:g} x the base perplexity; raise --ppl-budget or widen the grid")
    print(f"report: {out / 'report.html'}")
    return 0


def _memorization(record) -> str:
    m = record.metrics
    if "selection_strict" in m:
        return f"strict {m['strict']:.4f} (selection {m['selection_strict']:.4f}, held-out {m['heldout_strict']:.4f})"
    return f"strict {m['strict']:.4f}"
