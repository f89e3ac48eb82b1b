"""``kfac-edit collect``: K-FAC factors of a model's MLP projections over a text corpus (one pass, all layers)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ORDER = 10


def register(subparsers) -> None:
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
    p.add_argument("--layers", default="all", help="block indices, e.g. 23,24,25 or 20-27 or all (default: all)")
    p.add_argument(
        "--projections", default=None, help="subset of gate,up,down (default: every one the architecture has)"
    )
    p.add_argument("--tokens", type=int, default=20_000_000, help="tokens to read from the data (default: 20000000)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed window (default: 512)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward/backward (default: 16)")
    p.add_argument(
        "--labels",
        choices=["sampled", "gold"],
        default="sampled",
        help="sampled: labels drawn from the model's softmax (true Fisher, default); gold: next token (empirical)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32", "float16", "float64"],
        default="auto",
        help="model dtype (default auto: the checkpoint's own dtype); factors are always summed in fp32 or fp64",
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels (default: 0)")
    p.add_argument(
        "--modules",
        default=None,
        help="for architectures not known: KIND=PATH inside a block, e.g. up=mlp.fc_in,down=mlp.fc_out",
    )
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace factors already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = p.add_argument_group("scale and resilience")
    scale.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="TOKENS",
        help="write a checkpoint (sums so far + stream position) into DIR/checkpoint every TOKENS tokens, counted "
        "over all ranks (default: no checkpoints)",
    )
    scale.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in DIR/checkpoint (start from the beginning when there is none); the "
        "model, data and options must be those of the interrupted run (--batch-size, --tokens and the number of "
        "ranks may change)",
    )
    scale.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential", "cpu"],
        default=None,
        help="spread the model's blocks over the visible GPUs (transformers/accelerate device_map; needs "
        "accelerate); factors accumulate on each module's device. Not with several ranks",
    )
    scale.add_argument(
        "--layers-per-pass",
        type=int,
        default=None,
        metavar="K",
        help="collect K blocks per pass over the data (several passes, merged; same result) to bound factor memory "
        "(default: every block in one pass)",
    )
    scale.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory the factor sums may take on each device, e.g. 60GB (default: 90%% of the free GPU memory, "
        "80%% of the available RAM on the CPU)",
    )
    scale.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="with several ranks (torchrun / accelerate launch): how long a rank waits for the others at a "
        "checkpoint or at the end before failing (default: 1800)",
    )
    p.set_defaults(func=run)


def _check_positive(name: str, value: int) -> None:
    from ..errors import UserError

    if value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


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
    from ..data import check_source
    from ..errors import UserError
    from ..factors.checkpoint import latest_checkpoint
    from ..factors.distributed import init_distributed, shutdown
    from ..factors.memory import parse_size
    from ..factors.store import MANIFEST_FILE, TENSORS_FILE
    from ..models import parse_layers, parse_modules_option, parse_projections, resolve_device

    # Cheap checks first: nothing is loaded and nothing is written until the input makes sense.
    _check_positive("--tokens", args.tokens)
    _check_positive("--batch-size", args.batch_size)
    if args.checkpoint_every is not None:
        _check_positive("--checkpoint-every", args.checkpoint_every)
    if args.layers_per_pass is not None:
        _check_positive("--layers-per-pass", args.layers_per_pass)
    if args.dist_timeout <= 0:
        raise UserError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout:g}")
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is too short; use at least 2")
    layers = parse_layers(args.layers)
    kinds = parse_projections(args.projections) if args.projections else None
    modules = parse_modules_option(args.modules) if args.modules else None
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a directory")
    if (out / MANIFEST_FILE).exists() or (out / TENSORS_FILE).exists():
        if not args.overwrite:
            raise UserError(f"'{out}' already holds factors; pass --overwrite to replace them or pick another --out")
    pending = latest_checkpoint(out)
    if pending is not None and not (args.resume or args.overwrite):
        raise UserError(
            f"'{out}' holds a checkpoint of an unfinished collection ({pending.name}); pass --resume to continue it "
            "or --overwrite to start over"
        )
    check_source(args.data, args.text_field)

    device = resolve_device(None if args.device == "auto" else args.device)
    ctx = init_distributed(device, timeout_s=args.dist_timeout)
    try:
        return _collect(args, ctx, device, layers, kinds, modules, budget)
    finally:
        shutdown(ctx)


def _collect(args, ctx, device, layers, kinds, modules, budget) -> int:
    from ..data import describe_source, token_batches
    from ..errors import UserError
    from ..factors.checkpoint import remove_checkpoints, run_fingerprint
    from ..factors.distributed import rank_device
    from ..factors.job import CollectionConfig, run_collection
    from ..factors.memory import check_memory
    from ..models import find_projections, load_model, projection_kinds

    out: Path = args.out
    if ctx.enabled and args.device_map:
        raise UserError(
            f"--device-map {args.device_map} spreads one model over the GPUs of one process; it cannot be combined "
            f"with {ctx.world_size} ranks: launch a single process, or drop --device-map"
        )
    device = rank_device(device, ctx)
    dtype = args.dtype  # load_model resolves auto: the checkpoint's own dtype
    if args.device_map:
        try:
            import accelerate  # noqa: F401  (transformers needs it for device_map)
        except ImportError:
            raise UserError("--device-map needs the accelerate package: pip install accelerate") from None
        model, tokenizer = load_model(args.model, dtype=dtype, device_map=args.device_map)
    else:
        model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} is beyond the model's context of {context} tokens; use at most {context}")
    if kinds is None:
        kinds = projection_kinds(model, modules)
    projections = find_projections(model, layers, kinds, modules=modules)
    offloaded = [p.name for p in projections if p.module.weight.device.type == "meta"]
    if offloaded:
        raise UserError(
            f"--device-map {args.device_map} offloaded {offloaded[0]} (and {len(offloaded) - 1} more) off the GPUs; "
            "factors need every collected module on a device: use more GPUs or collect fewer --layers"
        )
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        try:
            enable()
        except ValueError as exc:
            raise UserError(f"--gradient-checkpointing: {exc}; run without it") from None

    check_memory(projections, args.layers_per_pass, budget, print_table=ctx.is_main, keeps_results=ctx.is_main)
    fingerprint = None
    if args.checkpoint_every or args.resume:
        fingerprint = run_fingerprint(
            model, projections, data=args.data, text_field=args.text_field, seq_len=args.seq_len,
            labels=args.labels, seed=args.seed, layers_per_pass=args.layers_per_pass,
        )  # fmt: skip
    if args.overwrite and ctx.is_main:
        remove_checkpoints(out)

    def batches(skip_windows: int, shard: tuple[int, int]):
        return token_batches(
            args.data, tokenizer, args.seq_len, args.batch_size, max_tokens=args.tokens, skip_windows=skip_windows,
            shard=shard, text_field=args.text_field, with_index=True, warn_if_short="--tokens",
        )  # fmt: skip

    config = CollectionConfig(
        labels=args.labels, seed=args.seed, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.tokens,
        layers_per_pass=args.layers_per_pass, checkpoint_every=args.checkpoint_every, out_dir=out,
        resume=args.resume, fingerprint=fingerprint, progress=not args.no_progress,
    )  # fmt: skip
    start = time.perf_counter()
    factors = run_collection(model, projections, batches, config, ctx)
    seconds = time.perf_counter() - start
    if factors is None:  # not rank 0: rank 0 writes
        return 0
    factors.manifest.update(
        model=args.model,
        data=describe_source(args.data),
        text_field=args.text_field,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.tokens,
        gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    factors.save(out)
    remove_checkpoints(out)
    tokens = factors.manifest["tokens"]
    blocks = sorted({p.block for p in projections})
    print(
        f"collected {len(projections)} modules ({len(blocks)} blocks x {','.join(kinds)}, {args.labels} labels) "
        f"from {tokens:,} tokens ({factors.manifest['labelled_tokens']:,} labelled) in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s"
        + (f", {ctx.world_size} ranks" if ctx.enabled else "")
        + (f", {factors.manifest['passes']} passes" if factors.manifest["passes"] > 1 else "")
        + f") -> {out}"
    )
    return 0
