"""``kfac-edit collect``: arguments -> :class:`~kfac_edit.factors.collect.CollectConfig` -> ``collect_factors``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ORDER = 10

# CLI-only defaults (the library's are in CollectConfig)
DEFAULT_TOKENS = 20_000_000


def register(subparsers) -> None:
    from ..factors.collect import CollectConfig
    from ..models import DTYPE_CHOICES

    def option(parser, name: str, **kwargs) -> None:
        parser.add_argument(CollectConfig.flag(name), dest=name, help=CollectConfig.help(name), **kwargs)

    p = subparsers.add_parser(
        "collect",
        help="collect K-FAC factors (A, G) of MLP projections over a corpus",
        description="Collect K-FAC factors of the MLP projections of a causal LM in one pass over the data: "
        "A = sum of a a^T over layer-input rows, G = sum of g g^T over rows of the gradient of the summed token loss "
        "w.r.t. the layer output, and token counts. Writes DIR/factors.safetensors and DIR/manifest.json.",
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="hub id (e.g. allenai/OLMo-2-1124-7B) or local model directory")
    p.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="hf:DATASET[:CONFIG][@SPLIT], alias dolmino | olmo-mix, or a local .jsonl/.jsonl.gz (field 'text'), "
        ".txt, .parquet file or a directory of them",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for the factors")
    option(p, "layers", default="all")
    option(p, "kinds", default=None)
    option(p, "max_tokens", type=int, default=DEFAULT_TOKENS)
    option(p, "seq_len", type=int, default=512)
    option(p, "batch_size", type=int, default=16)
    option(p, "labels", choices=["sampled", "gold"], default="sampled")
    option(p, "dtype", choices=DTYPE_CHOICES, default="auto")
    option(p, "device", default="auto")
    option(p, "seed", type=int, default=0)
    option(p, "modules", default=None)
    option(p, "bias", choices=["joint", "keep"], default="joint")
    option(p, "text_field", default="text")
    option(p, "exclude", nargs="+", default=None, metavar="FILE")
    option(p, "gradient_checkpointing", action="store_true")
    option(p, "overwrite", action="store_true")
    option(p, "ekfac", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = p.add_argument_group("scale and resilience")
    option(scale, "checkpoint_every", type=int, default=None, metavar="TOKENS")
    option(scale, "resume", action="store_true")
    option(scale, "device_map", choices=["auto", "balanced", "balanced_low_0", "sequential", "cpu"], default=None)
    option(scale, "layers_per_pass", type=int, default=None, metavar="K")
    option(scale, "memory_budget", default=None, metavar="SIZE")
    option(scale, "dist_timeout", type=float, default=1800.0, metavar="SECONDS")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..factors.distributed import RankFailure

    try:
        return _run(args)
    except RankFailure as exc:  # another rank died or hung: one line, no traceback
        print(f"kfac-edit: error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # A process group that lost a peer cannot be torn down cleanly (its destructor may wait for the peer or
        # abort): leave at once with the error code; the launcher stops the other ranks.
        os._exit(1)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..constants import EKFAC_FILE
    from ..factors.collect import CollectConfig, collect_factors

    options = {f.name: getattr(args, f.name) for f in fields(CollectConfig) if hasattr(args, f.name)}
    config = CollectConfig(**options, progress=not args.no_progress)
    start = time.perf_counter()
    factors = collect_factors(args.model, args.data, config)
    seconds = time.perf_counter() - start
    if factors is None:  # not rank 0
        return 0
    m = factors.manifest
    tokens, ranks = m["tokens"], m["world_size"]
    print(
        f"collected {len(factors)} modules ({len(m['layers'])} blocks x {','.join(m['projections'])}, "
        f"{m['labels']} labels) from {tokens:,} tokens ({m['labelled_tokens']:,} labelled) in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s"
        + (f", {ranks} ranks" if ranks > 1 else "")
        + (f", {m['passes']} passes" if m["passes"] > 1 else "")
        + f") -> {args.out}"
    )
    if m.get("exclude"):
        x = m["exclude"]
        print(f"excluded {x['windows_dropped']:,} of {x['windows_seen']:,} windows sharing an {x['n']}-gram with "
              f"{x['records']} records of {', '.join(x['files'])}")
    if config.max_tokens is not None and tokens > config.max_tokens:  # the last batch is read whole: say so
        print(f"note: --tokens {config.max_tokens:,} was rounded up to whole batches (--batch-size {config.batch_size} "
              f"windows of --seq-len {config.seq_len}): {tokens:,} tokens were read")
    if config.ekfac:
        print(f"EK-FAC eigenvalues of {len(factors)} modules -> {Path(args.out) / EKFAC_FILE}")
    return 0
