"""Cut SOURCE into windows of prefix + suffix tokens; keep those whose every suffix token is the model's
teacher-forced argmax; drop near-duplicates; write them as token-id JSONL (with texts and source) and OUT.meta.json
with the counts and configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..data import check_source
from ..evaluate.miner import MinerConfig, find_memorized
from ..fileio import atomic_path, utc_timestamp, write_json
from ..identity import model_fingerprint
from . import add_field_options, add_model_options, inputs_of, load_model_from_args, writing

HELP = "find the windows of a corpus that a model recites (a memorized set for `eval --memorized`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="memorized-set JSONL to write")
    add_field_options(p, MinerConfig, data={"metavar": "SOURCE"},
                      max_windows={"metavar": "N", "help": "stop after this many windows (default: whole source)"})
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    config = MinerConfig(**{f.name: getattr(args, f.name) for f in fields(MinerConfig)})
    config.validate()
    check_source(config.data)  # before the model loads: a source without documents fails here, named
    meta_path = f"{args.out}.meta.json"
    with writing((args.out, "file", "--out", args.overwrite), (meta_path, "file", "--out", args.overwrite),
                 reads=inputs_of(args, "--model", "--data")):
        model, tokenizer = load_model_from_args(args)
        records, stats = find_memorized(model, tokenizer, config)
        with atomic_path(args.out) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        write_json(meta_path, {"kind": "find-memorized", "timestamp": utc_timestamp(), "model": args.model,
                               "model_fingerprint": model_fingerprint(model), "out": args.out, **stats})
    print(f"scanned {stats['windows_scanned']} windows, {stats['memorized']} memorized, "
          f"{stats['kept_after_dedup']} kept after dedup -> {args.out}")
    if not records:
        print("no memorized window found: the file is empty; try more data (--max-windows) or shorter --suffix-len")
    return 0
