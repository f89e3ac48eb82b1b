"""For each task file, one pass over its records (gold labels) in the factors' eigenbasis; per edited module the
share of the task's mass on the pairs the edit removes (curvature: E[(u_G[i]^T g a^T u_A[j])^2]; activation:
lambda_i * E[(u_A[j]^T a)^2]; loss: curvature * C_ij^2); the task's share is the mean over modules. Nothing is edited
or generated.
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from ..fileio import write_json
from ..predict import CURVATURE_METHODS, predict_files
from . import (add_factor_options, add_model_options, add_protect_options, add_spec_options, inputs_of, spec_from_args,
               writing)

HELP = "predict an edit's cost per task: the share of its curvature in the pairs the edit removes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_factor_options(p, required=True, modules=False)
    add_spec_options(p, methods=[m.value for m in CURVATURE_METHODS])
    p.add_argument("--data", required=True, nargs="+", metavar="TASK.jsonl",
                   help="task files: JSONL records with prefix_ids/suffix_ids (as memorized.jsonl) or a text field")
    p.add_argument("--mode", choices=["activation", "curvature", "loss"], default="activation",
                   help="the task's mass on a pair: its activation energy (default), its curvature, or its curvature "
                   "times the squared weight coefficient (loss)")
    p.add_argument("--max-records", type=int, metavar="N", help="read at most N records per task")
    add_protect_options(p)
    p.add_argument("--out", metavar="FILE", help="write the JSON here (default: print it only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.max_records is not None and args.max_records < 1:
        raise UserError(f"--max-records must be a positive integer, got {args.max_records}")
    reads = inputs_of(args, "--model", "--factors", "--layers-file", "--data", "--protect")
    with writing((args.out, "file", "--out", args.overwrite), reads=reads):
        result = predict_files(args.model, args.factors, spec, args.data, mode=args.mode, device=args.device,
                               dtype=args.dtype, max_records=args.max_records, protect_dir=args.protect,
                               protect_weight=args.protect_weight, cache_dir=args.cache_dir)
        if args.out:
            write_json(args.out, result)
    for task in result["tasks"]:
        print(f"{task['task']}: {100 * task['share']:.2f}% of its {args.mode} in removed pairs, estimated loss "
              f"increase {task['loss_estimate']:.4g} nats/token ({task['labelled_tokens']} tokens)")  # fmt: skip
    if args.out:
        print(f"wrote {args.out}")
    else:
        print(json.dumps(result, indent=2))
    return 0
