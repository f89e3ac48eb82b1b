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
    p.add_argument("--blocks", metavar="BLOCKS", help=_help("blocks"))
    p.add_argument(
        "--projections",
        action="append",
        metavar="KINDS",
        help="a projection set edited together, e.g. gate,up (default); repeat the option to sweep several sets, "
        "e.g. --projections gate,up --projections gate,up,down",
    )
    p.add_argument("--keep-mass", default="0.5,0.6,0.7,0.8,0.9", metavar="LIST",
                   help=_help("keep_masses") + " (default 0.5,0.6,0.7,0.8,0.9)")
    p.add_argument("--max-combo", type=int, default=3, help=_help("max_combo") + " (default 3)")
    p.add_argument("--ppl-budget", type=float, default=1.2, help=_help("ppl_budget") + " (default 1.2)")
    p.add_argument("--method", default="kfac", choices=METHODS, help="edit method (default kfac)")
    p.add_argument("--seed", type=int, default=0, help=_help("seed") + " (default 0)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where eigendecompositions are cached (default: $KFAC_EDIT_CACHE/eigen, else ~/.cache/kfac-edit/eigen)",
    )
    add_eval_arguments(p)
    p.add_argument("--out", default="kfac-sweep", metavar="DIR", help="output directory (default kfac-sweep)")
    p.set_defaults(func=run)


def _keep_masses(text: str) -> list[float]:
    from ..errors import UserError

    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"cannot read --keep-mass '{text}'; write e.g. 0.6,0.7,0.8,0.9") from None
    return sorted(set(values))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..edit import check_factors_dir
    from ..eigen import EigenCache, default_cache_dir
    from ..errors import UserError
    from ..factors.store import Factors
    from ..models import parse_layers, parse_projections
    from ..sweep import SweepConfig, needed_modules, run_sweep
    from .eval import eval_config_from_args, load_for_eval

    config = SweepConfig(
        blocks=parse_layers(args.blocks) if args.blocks else None,
        projection_sets=[tuple(parse_projections(s)) for s in (args.projections or ["gate,up"])],
        keep_masses=_keep_masses(args.keep_mass),
        max_combo=args.max_combo,
        ppl_budget=args.ppl_budget,
        method=args.method,
        seed=args.seed,
    )
    config.validate()
    eval_config = eval_config_from_args(args, None)
    eval_config.validate()
    if not eval_config.memorized:
        raise UserError("the sweep needs a memorized set to measure: pass --memorized FILE")
    if not eval_config.perplexity_data:
        raise UserError("the sweep needs --perplexity-data SOURCE: the best point is chosen within a perplexity budget")
    check_factors_dir(args.method, args.factors)
    model, tokenizer = load_for_eval(args)
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
    if base is not None:
        print(f"base: strict {base.strict:.4f}  perplexity {base.perplexity:.4f}")
    if outcome.chosen is not None:
        c = outcome.chosen
        print(f"best: {c.label()}  strict {c.strict:.4f}  perplexity {c.perplexity:.4f}  -> {outcome.best_path}")
    else:
        print(f"no point within {config.ppl_budget:g} x the base perplexity; raise --ppl-budget or widen the grid")
    print(f"report: {out / 'report.html'}")
    return 0
