"""Read DIR/results.jsonl (and, when present, DIR/spectra.json and DIR/before_after.json) and write DIR/report.html
(self-contained, opens offline), DIR/report.md and DIR/plots/*.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..constants import PLOTS_DIR
from ..errors import UserError
from ..report import write_report

HELP = "write report.html and report.md (with PNG plots) for a sweep or run directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="directory written by `kfac-edit sweep --out DIR` (or run/demo)")
    p.add_argument("--ppl-budget", type=float, help="choose the best point within this multiple of the base "
                   "perplexity (default: the sweep's, else 1.2)")


def run(args: argparse.Namespace) -> int:
    if args.ppl_budget is not None and not 0 < args.ppl_budget < math.inf:
        raise UserError(f"--ppl-budget must be a positive number, got {args.ppl_budget}; e.g. --ppl-budget 1.2")
    plots = Path(args.dir) / PLOTS_DIR
    if plots.exists() and not plots.is_dir():
        raise UserError(f"{plots} is a file, but the report writes its plots there; move or remove it")
    paths = write_report(args.dir, ppl_budget=args.ppl_budget)
    print(f"wrote {paths.html}")
    print(f"wrote {paths.markdown}" + (f" ({len(paths.plots)} plots in {plots})" if paths.plots else ""))
    return 0
