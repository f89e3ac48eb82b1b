"""Collect K-FAC factors of the MLP projections of a causal LM in one pass over the data: A = sum of a a^T over
layer-input rows, G = sum of g g^T over rows of the gradient of the summed token loss w.r.t. the layer output, and
token counts. Writes DIR/factors.safetensors and DIR/manifest.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from ..constants import EKFAC_FILE
from ..data import SUFFIX_LIST
from ..factors.collect import CollectConfig, collect_factors
from ..factors.distributed import RankFailure
from ..fileio import check_not_input
from ..models import BIAS_MODES, DTYPE_CHOICES
from ..spec import LABEL_MODES
from . import add_field_options, inputs_of

HELP = "collect K-FAC factors (A, G) of MLP projections over a corpus"
DEFAULT_TOKENS = 20_000_000  # --tokens (in Python, CollectConfig reads every batch)
OPTIONS = ("layers", "kinds", "max_tokens", "seq_len", "batch_size", "labels", "dtype", "device", "seed", "modules",
           "bias", "text_field", "exclude", "gradient_checkpointing", "overwrite", "ekfac")  # --help order
SCALE_OPTIONS = ("checkpoint_every", "resume", "device_map", "layers_per_pass", "memory_budget", "dist_timeout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per :class:`~kfac_edit.factors.collect.CollectConfig` field but ``out`` and ``progress``."""
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="hub id (e.g. allenai/OLMo-2-1124-7B) or local model directory")
    p.add_argument("--data", required=True, metavar="SOURCE", help="hf:DATASET[:CONFIG][@SPLIT], alias dolmino | "
                   f"olmo-mix, or a local file ({SUFFIX_LIST}; field 'text'), a directory of them or a "
                   "datasets save_to_disk directory")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for the factors")
    add_field_options(p, CollectConfig, OPTIONS, note_defaults=False, max_tokens={"default": DEFAULT_TOKENS},
                      labels={"choices": LABEL_MODES}, dtype={"choices": DTYPE_CHOICES},
                      bias={"choices": BIAS_MODES}, exclude={"nargs": "+", "metavar": "FILE"})
    add_field_options(p.add_argument_group("scale and resilience"), CollectConfig, SCALE_OPTIONS, note_defaults=False,
                      checkpoint_every={"metavar": "TOKENS"}, layers_per_pass={"metavar": "K"},
                      device_map={"choices": ["auto", "balanced", "balanced_low_0", "sequential", "cpu"]},
                      memory_budget={"metavar": "SIZE"}, dist_timeout={"metavar": "SECONDS"})


def run(args: argparse.Namespace) -> int:
    options = {f.name: getattr(args, f.name) for f in fields(CollectConfig) if hasattr(args, f.name)}
    config = CollectConfig(**options, progress=not args.no_progress)
    check_not_input(args.out, "--out", inputs_of(args, "--model", "--data", "--exclude"))
    start = time.perf_counter()
    try:
        factors = collect_factors(args.model, args.data, config)
    except RankFailure as exc:  # another rank died or hung: one line, no traceback
        print(f"kfac-edit: error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # a process group that lost a peer cannot be torn down cleanly: leave, the launcher stops the rest
    seconds = time.perf_counter() - start
    if factors is None:  # not rank 0
        return 0
    m = factors.manifest
    tokens, ranks = m["tokens"], m["world_size"]
    scale = (f", {ranks} ranks" if ranks > 1 else "") + (f", {m['passes']} passes" if m["passes"] > 1 else "")
    print(f"collected {len(factors)} modules ({len(m['layers'])} blocks x {','.join(m['projections'])}, "
          f"{m['labels']} labels) from {tokens:,} tokens ({m['labelled_tokens']:,} labelled) in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):,.0f} tokens/s{scale}) -> {args.out}")
    if x := m.get("exclude"):
        print(f"excluded {x['windows_dropped']:,} of {x['windows_seen']:,} windows sharing an {x['n']}-gram with "
              f"{x['records']} records of {', '.join(x['files'])}")
    if config.max_tokens is not None and tokens > config.max_tokens:  # the last batch is read whole: say so
        print(f"note: --tokens {config.max_tokens:,} was rounded up to whole batches (--batch-size {config.batch_size} "
              f"windows of --seq-len {config.seq_len}): {tokens:,} tokens were read")
    if config.ekfac:
        print(f"EK-FAC eigenvalues of {len(factors)} modules -> {Path(args.out) / EKFAC_FILE}")
    return 0
