"""``kfac-edit demo``: train (or load) the embedded testbed, collect, edit, evaluate K-FAC against SVD, report."""

from __future__ import annotations

import argparse

ORDER = 5


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole method on the embedded testbed (tiny OLMo-2, CPU, minutes): K-FAC edit vs SVD baseline",
        description="Train a tiny OLMo-2 that learns a rule (arithmetic sequences) and memorizes canaries (random "
        "sequences repeated in its training stream), or load it from the cache ($KFAC_EDIT_CACHE, default "
        "~/.cache/kfac-edit); collect K-FAC factors on its training mixture; edit its MLPs at a grid of keep_mass "
        "values with K-FAC and with the SVD baseline; evaluate canary memorization, rule accuracy and rule loss "
        "for each; print a table and write DIR/results.json, plots and report.html.",
    )
    p.add_argument("--out", default="kfac-edit-demo", metavar="DIR",
                   help="report directory, replaced whole on each run (default ./kfac-edit-demo)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller testbed (30 canaries, 600 training steps): trains in about 20 s")
    p.add_argument("--cache-dir", metavar="DIR", help="cache root for the trained testbed (default $KFAC_EDIT_CACHE "
                   "or ~/.cache/kfac-edit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, check_out_dir, run_demo

    check_out_dir(args.out)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    results = run_demo(config, args.out, cache_dir=args.cache_dir)
    print(results["table"])
    print(f"report: {args.out}/report.html; results: {args.out}/results.json; plots: {args.out}/plots/")
    return 0
