"""``kfac-edit demo``: train (or load) the embedded testbed, collect, edit, evaluate K-FAC against SVD, report."""

from __future__ import annotations

import argparse

ORDER = 5


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole method on the embedded testbed (tiny OLMo-2, CPU, minutes): K-FAC edit vs SVD baseline",
        description="Train (or load from the cache: $KFAC_EDIT_CACHE, default ~/.cache/kfac-edit) a tiny OLMo-2 that "
        "learns a rule (arithmetic sequences) and memorizes canaries; collect K-FAC factors on its training mixture; "
        "sweep keep_mass for K-FAC and the SVD baseline, choosing on half the canaries and reporting on the other "
        "half, with rule accuracy and perplexity as the costs; print a table and write DIR/results.json, "
        "DIR/summary.json and report.html. --testbed text: the same on the Python documentation (see README).",
    )
    p.add_argument("--out", default="kfac-edit-demo", metavar="DIR",
                   help="report directory, replaced whole on each run (default ./kfac-edit-demo)")
    p.add_argument("--testbed", choices=["arithmetic", "text"], default="arithmetic",
                   help="arithmetic (default): the rule-and-canaries world; text: a tiny OLMo-2 trained on the Python "
                   "standard library's documentation with canaries, factors collected on that prose without them, "
                   "perplexity on held-out modules' text, fact recall as the capability (see README)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller testbed (arithmetic: 30 canaries, 600 training steps, about 45 s on 2 CPU cores; "
                   "text: 10 canaries, 500 steps, about a minute)")
    p.add_argument("--holdout-fraction", type=float, default=0.5,
                   help="share of the canaries held out from the choice and reported on (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels and the held-out split (default 0)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache root for the trained testbed (default $KFAC_EDIT_CACHE "
                   "or ~/.cache/kfac-edit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, check_out_dir, run_demo
    from ..fileio import check_output, output_lock

    check_out_dir(args.out)
    check_output(args.cache_dir, "dir", "--cache-dir")
    options = dict(holdout_fraction=args.holdout_fraction, seed=args.seed)
    if args.testbed == "text":
        config = DemoConfig.text(quick=args.quick, **options)
    else:
        config = DemoConfig.quick(**options) if args.quick else DemoConfig(**options)
    with output_lock(args.out):
        results = run_demo(config, args.out, cache_dir=args.cache_dir)
    print(results["table"])
    print(f"report: {args.out}/report.html; results: {args.out}/results.json, {args.out}/summary.json")
    return 0
