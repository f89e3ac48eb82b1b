"""``kfac-edit import-factors``: convert the reference tool's factor file (.pt of means) to a factor directory."""

from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 15


def register(subparsers) -> None:
    from ..factors.reference import DEFAULT_NAME_TEMPLATE

    p = subparsers.add_parser(
        "import-factors",
        help="import the reference tool's factor file (.pt) as a factor directory",
        description="Convert OLD.pt, a torch dict {'blk<i>.<gate|up|down>': {'A': mean, 'G': mean, 'n_tokens': int}}, "
        "into DIR/factors.safetensors + DIR/manifest.json (fp32 sums + counts), the format `collect` writes.",
    )
    p.add_argument("old", type=Path, metavar="OLD.pt", help="the reference tool's factor file")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for the factors")
    p.add_argument(
        "--name-template",
        default=DEFAULT_NAME_TEMPLATE,
        help=f"module name for block {{i}} and projection {{proj}} (default: {DEFAULT_NAME_TEMPLATE})",
    )
    p.add_argument(
        "--model",
        default=None,
        help="hub id or local dir: name modules by this architecture and check the factor shapes (config only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace factors already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..factors.reference import import_reference
    from ..factors.store import check_writable
    from ..fileio import check_output, output_lock

    out: Path = args.out
    check_output(out, "dir")
    check_writable(out, args.overwrite)
    factors = import_reference(args.old, name_template=args.name_template, model=args.model)
    with output_lock(out):
        check_writable(out, args.overwrite)
        factors.save(out)
    shared = len(factors) * 2 - len(factors.tensors())
    print(
        f"imported {len(factors)} modules ({shared} shared gate/up activation factors) from {args.old} -> {out}"
    )
    return 0
