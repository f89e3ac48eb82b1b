"""Evaluate MODEL, apply the edit of the layers JSON with the K-FAC factors, save the edited model to DIR/edited,
evaluate it again, write DIR/evals.jsonl (full records) and DIR/before_after.json (for `kfac-edit report DIR`),
append a summary line (before, after, delta) to the results JSONL and print a table. nDCG compares with the base
model unless --reference-model names another.
"""

from __future__ import annotations

import argparse

from .. import lm_eval_tasks
from ..workflow import RunPaths, format_table, run_workflow
from . import (EVAL_INPUTS, add_bsn_options, add_eval_options, add_factor_options, add_model_options,
               add_spec_options, bsn_inputs_from_args, eval_config_from_args, inputs_of, spec_from_args, writing)

HELP = "the whole workflow: evaluate, edit, save, evaluate again, before/after table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--out", default="kfac-edit-run", metavar="DIR", help="run directory (default ./kfac-edit-run)")
    p.add_argument("--results", metavar="FILE.jsonl", help="summary JSONL to append to (default DIR/runs.jsonl)")
    p.add_argument("--skip-baseline", action="store_true", help="do not evaluate the base model (after only)")
    add_factor_options(p)
    add_spec_options(p)
    add_eval_options(p)
    lm_eval_tasks.add_lm_eval_arguments(p)
    add_bsn_options(p)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    config = eval_config_from_args(args, out=None)
    paths = RunPaths(args.out, args.results)
    reads = inputs_of(args, "--model", "--factors", "--layers-file", "--forget", "--clean-data", *EVAL_INPUTS)
    with writing((paths.out_dir, "dir"), (paths.results, "jsonl", "--results"), reads=reads):
        lm_eval_tasks.check_lm_eval_args(args)
        summary = run_workflow(args.model, spec, args.factors, config, args.out, results=args.results,
                               skip_baseline=args.skip_baseline, dtype=args.dtype, device=args.device,
                               modules=args.modules, bsn=bsn_inputs_from_args(spec, args), cache_dir=args.cache_dir)
    print(format_table(summary))
    print(f"edited model: {paths.edited}; evaluations: {paths.evals}; summary appended to {paths.results}")
    if args.lm_eval_tasks:  # lm-eval on the base model and on the saved edit, results beside the evaluations
        for path in ([] if args.skip_baseline else [args.model]) + [str(paths.edited)]:
            lm_eval_tasks.run_lm_eval_from_args(argparse.Namespace(**{**vars(args), "model": path,
                                                                      "out": str(paths.evals)}))
    return 0
