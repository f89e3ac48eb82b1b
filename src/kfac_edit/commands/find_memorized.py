"""``kfac-edit find-memorized``: build a memorized set (token-id JSONL) for a model and a corpus."""

from __future__ import annotations

import argparse

ORDER = 45


def _help(name: str) -> str:
    from dataclasses import fields

    from ..evaluate.miner import MinerConfig

    return next(f.metadata["help"] for f in fields(MinerConfig) if f.name == name)


def register(subparsers) -> None:
    from .eval import add_model_arguments

    p = subparsers.add_parser(
        "find-memorized",
        help="find the windows of a corpus that a model recites (a memorized set for `eval --memorized`)",
        description="Cut SOURCE into windows of prefix + suffix tokens; keep those whose every suffix token is the "
        "model's teacher-forced argmax; drop near-duplicates; write them as token-id JSONL (with texts and source) "
        "and OUT.meta.json with the counts and configuration.",
    )
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="SOURCE", help=_help("data"))
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="memorized-set JSONL to write")
    p.add_argument("--prefix-len", type=int, default=64, help=_help("prefix_len") + " (default 64)")
    p.add_argument("--suffix-len", type=int, default=48, help=_help("suffix_len") + " (default 48)")
    p.add_argument("--max-windows", type=int, metavar="N", help=_help("max_windows") + " (default: whole source)")
    p.add_argument("--dedup-threshold", type=float, default=0.7, help=_help("dedup_threshold") + " (default 0.7)")
    p.add_argument("--dedup-ngram", type=int, default=5, help=_help("dedup_ngram") + " (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help=_help("batch_size") + " (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.miner import MinerConfig
    from ..fileio import check_output, output_lock

    config = MinerConfig(
        data=args.data,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        max_windows=args.max_windows,
        dedup_threshold=args.dedup_threshold,
        dedup_ngram=args.dedup_ngram,
        batch_size=args.batch_size,
    )
    config.validate()
    check_output(args.out, "file", overwrite=args.overwrite)
    check_output(f"{args.out}.meta.json", "file", overwrite=args.overwrite)
    with output_lock(args.out):
        return _find(args, config)


def _find(args: argparse.Namespace, config) -> int:
    import json
    from datetime import datetime, timezone

    from ..evaluate.miner import find_memorized
    from ..fileio import atomic_path, write_json
    from ..identity import model_fingerprint
    from .eval import load_for_eval

    model, tokenizer = load_for_eval(args)
    records, stats = find_memorized(model, tokenizer, config)
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
    meta = {
        "kind": "find-memorized",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "model_fingerprint": model_fingerprint(model),
        "out": args.out,
        **stats,
    }
    write_json(f"{args.out}.meta.json", meta)
    print(
        f"scanned {stats['windows_scanned']} windows, {stats['memorized']} memorized, "
        f"{stats['kept_after_dedup']} kept after dedup -> {args.out}"
    )
    if not records:
        print("no memorized window found: the file is empty; try more data (--max-windows) or shorter --suffix-len")
    return 0
