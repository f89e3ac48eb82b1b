"""Evaluate a model on memorized sets (--memorized), quotes (--quotes), perplexity (--perplexity-data) and nDCG@k
against a reference model (--ndcg-data + --reference-model); append one JSON line with every metric and the
configuration to --out, and print a summary.
"""

from __future__ import annotations

import argparse

from .. import lm_eval_tasks
from ..evaluate.suite import check_inputs, evaluate, flat_metrics
from ..fileio import append_jsonl
from ..models import check_causal_lm, load_tokenizer, model_limits
from . import (EVAL_INPUTS, add_eval_options, add_model_options, eval_config_from_args, inputs_of,
               load_model_from_args, writing)

HELP = "measure memorization, quotes recitation, perplexity and nDCG of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_eval_options(p)
    p.add_argument("--out", metavar="FILE.jsonl", help="results JSONL to append one line to (default: print only)")
    lm_eval_tasks.add_lm_eval_arguments(p)


def run(args: argparse.Namespace) -> int:
    config = eval_config_from_args(args, args.out)
    ours = bool(config.memorized or config.quotes or config.perplexity_data or config.ndcg_data)
    with writing((args.out, "jsonl"), reads=inputs_of(args, "--model", *EVAL_INPUTS)):
        lm_eval_tasks.check_lm_eval_args(args)
        if ours or not args.lm_eval_tasks:  # with only --lm-eval-tasks, our suite has nothing to do
            rows, positions = model_limits(check_causal_lm(args.model))  # embedding rows, context length
            check_inputs(config, load_tokenizer(args.model), rows, positions)  # bad input fails before loading
            model, tokenizer = load_model_from_args(args)
            for name, value in flat_metrics(evaluate(model, tokenizer, config)["metrics"]).items():
                if ".per_source." not in name:
                    print(f"{name:<48} {value:.4f}" if isinstance(value, float) else f"{name:<48} {value}")
            if args.out:
                print(f"appended results to {args.out}")
            del model  # lm-eval loads its own copy
        lm_record = lm_eval_tasks.run_lm_eval_from_args(args)
        if lm_record is not None and args.out and not ours:  # only lm-eval ran: --out still gets a line
            append_jsonl(args.out, {"model": args.model, "metrics": {"lm_eval": lm_record.get("metrics", {})},
                                    "lm_eval_dir": str(lm_eval_tasks.lm_eval_out_dir(args.model, args.out))})
            print(f"appended results to {args.out}")
    return 0
