"""Convert OLD.pt, a torch dict {'blk<i>.<gate|up|down>': {'A': mean, 'G': mean, 'n_tokens': int}}, into
DIR/factors.safetensors + DIR/manifest.json (fp32 sums + counts), the format `collect` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..factors.reference import DEFAULT_NAME_TEMPLATE, import_reference
from ..factors.store import check_writable
from ..fileio import check_output, output_lock

HELP = "import the reference tool's factor file (.pt) as a factor directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", type=Path, metavar="OLD.pt", help="the reference tool's factor file")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for the factors")
    p.add_argument("--name-template", default=DEFAULT_NAME_TEMPLATE,
                   help=f"module name for block {{i}} and projection {{proj}} (default: {DEFAULT_NAME_TEMPLATE})")
    p.add_argument("--model", help="hub id or local dir: name modules by this architecture and check the factor "
                   "shapes (config only)")
    p.add_argument("--overwrite", action="store_true", help="replace factors already in --out")


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "dir")
    check_writable(args.out, args.overwrite)
    factors = import_reference(args.old, name_template=args.name_template, model=args.model)
    with output_lock(args.out):
        check_writable(args.out, args.overwrite)  # again under the lock: another writer may have come first
        factors.save(args.out)
    shared = len(factors) * 2 - len(factors.tensors())
    print(f"imported {len(factors)} modules ({shared} shared gate/up activation factors) from {args.old} -> {args.out}")
    return 0
