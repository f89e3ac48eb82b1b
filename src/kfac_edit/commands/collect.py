"""``kfac-edit collect``: K-FAC factors of a model's MLP projections over a text corpus (one pass, all layers)."""

from __future__ import annotations

import argparse
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
        help="model dtype (default: bfloat16 on cuda, float32 on cpu); factors are always summed in fp32 or fp64",
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
    p.set_defaults(func=run)


def _check_positive(name: str, value: int) -> None:
    from ..errors import UserError

    if value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def run(args: argparse.Namespace) -> int:
    from ..data import check_source, describe_source, token_batches
    from ..errors import UserError
    from ..factors.collect import collect_factors
    from ..factors.store import MANIFEST_FILE, TENSORS_FILE
    from ..models import (
        find_projections,
        load_model,
        parse_layers,
        parse_modules_option,
        parse_projections,
        projection_kinds,
        resolve_device,
    )

    # Cheap checks first: nothing is loaded and nothing is written until the input makes sense.
    _check_positive("--tokens", args.tokens)
    _check_positive("--batch-size", args.batch_size)
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
    check_source(args.data, args.text_field)

    device = resolve_device(None if args.device == "auto" else args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} is beyond the model's context of {context} tokens; use at most {context}")
    if kinds is None:
        kinds = projection_kinds(model, modules)
    projections = find_projections(model, layers, kinds, modules=modules)
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        try:
            enable()
        except ValueError as exc:
            raise UserError(f"--gradient-checkpointing: {exc}; run without it") from None

    batches = token_batches(
        args.data, tokenizer, args.seq_len, args.batch_size, max_tokens=args.tokens, text_field=args.text_field,
        with_index=True,
    )
    start = time.perf_counter()
    factors = collect_factors(
        model,
        batches,
        projections=projections,
        labels=args.labels,
        seed=args.seed,
        max_tokens=args.tokens,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
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
    tokens = factors.manifest["tokens"]
    blocks = sorted({p.block for p in projections})
    print(
        f"collected {len(projections)} modules ({len(blocks)} blocks x {','.join(kinds)}, {args.labels} labels) "
        f"from {tokens:,} tokens ({factors.manifest['labelled_tokens']:,} labelled) in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {out}"
    )
    return 0
