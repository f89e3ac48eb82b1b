"""``kfac-edit eval``: memorization, quotes, perplexity, nDCG and stress-test metrics of one model."""

from __future__ import annotations

import argparse

ORDER = 40


def _help(name: str) -> str:
    from dataclasses import fields

    from ..evaluate.suite import EvalConfig

    return next(f.metadata["help"] for f in fields(EvalConfig) if f.name == name)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model: hub id or local directory")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        help="weights dtype (default auto: the checkpoint's own dtype)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation options shared by ``eval`` and ``run``."""
    p.add_argument("--reference-model", metavar="BASE", help=_help("reference_model"))
    p.add_argument("--memorized", nargs="+", action="extend", default=[], metavar="FILE", help=_help("memorized"))
    p.add_argument("--quotes", nargs="+", action="extend", default=[], metavar="FILE", help=_help("quotes"))
    p.add_argument("--perplexity-data", metavar="SOURCE", help=_help("perplexity_data"))
    p.add_argument("--ndcg-data", metavar="SOURCE", help=_help("ndcg_data"))
    p.add_argument("--prefix-len", type=int, default=64, help=_help("prefix_len") + " (default 64)")
    p.add_argument("--suffix-len", type=int, default=48, help=_help("suffix_len") + " (default 48)")
    p.add_argument("--loose", type=float, default=0.75, help=_help("loose") + " (default 0.75)")
    p.add_argument("--ndcg-k", type=int, default=10, help=_help("ndcg_k") + " (default 10)")
    p.add_argument("--ndcg-seq-len", type=int, default=1024, help=_help("ndcg_seq_len") + " (default 1024)")
    p.add_argument("--ppl-block", type=int, default=112, help=_help("ppl_block") + " (default 112)")
    p.add_argument("--max-tokens", type=int, default=200_000, help=_help("max_tokens") + " (default 200000)")
    p.add_argument("--batch-size", type=int, default=32, help=_help("batch_size") + " (default 32)")
    p.add_argument("--forward-tokens", type=int, default=16384, help=_help("forward_tokens") + " (default 16384)")
    p.add_argument("--perturb", type=int, metavar="T", help=_help("perturb"))


def eval_config_from_args(args: argparse.Namespace, out: str | None):
    from ..evaluate.suite import EvalConfig

    return EvalConfig(
        memorized=list(args.memorized),
        quotes=list(args.quotes),
        perplexity_data=args.perplexity_data,
        ndcg_data=args.ndcg_data,
        reference_model=args.reference_model,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        loose=args.loose,
        ndcg_k=args.ndcg_k,
        ndcg_seq_len=args.ndcg_seq_len,
        ppl_block=args.ppl_block,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        forward_tokens=args.forward_tokens,
        perturb=args.perturb,
        out=out,
        model=args.model,
    )


def load_for_eval(args: argparse.Namespace):
    """``(model, tokenizer)`` as ``--model/--dtype/--device`` ask."""
    from ..models import load_model, resolve_device

    device = resolve_device(args.device)
    return load_model(args.model, dtype=args.dtype, device=str(device))  # auto: the checkpoint's own dtype


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure memorization, quotes recitation, perplexity and nDCG of a model",
        description="Evaluate a model on memorized sets (--memorized), quotes (--quotes), perplexity "
        "(--perplexity-data) and nDCG@k against a reference model (--ndcg-data + --reference-model); append one "
        "JSON line with every metric and the configuration to --out, and print a summary.",
    )
    add_model_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--out", metavar="FILE.jsonl", help=_help("out") + " (default: print only)")
    from ..lm_eval_tasks import add_lm_eval_arguments

    add_lm_eval_arguments(p)
    p.set_defaults(func=run)


def print_summary(record: dict) -> None:
    from ..evaluate.suite import flat_metrics

    for name, value in flat_metrics(record["metrics"]).items():
        if ".per_source." in name:
            continue
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<48} {text}")


def run(args: argparse.Namespace) -> int:
    from ..evaluate.suite import check_inputs, evaluate
    from ..lm_eval_tasks import check_lm_eval_args, run_lm_eval_from_args
    from ..models import load_tokenizer

    config = eval_config_from_args(args, args.out)
    check_lm_eval_args(args)
    ours = bool(config.memorized or config.quotes or config.perplexity_data or config.ndcg_data)
    if ours or not args.lm_eval_tasks:  # with only --lm-eval-tasks, our suite has nothing to do
        tokenizer = load_tokenizer(args.model)
        check_inputs(config, tokenizer, len(tokenizer))  # fail on bad input before loading the model
        model, tokenizer = load_for_eval(args)
        record = evaluate(model, tokenizer, config)
        print_summary(record)
        if args.out:
            print(f"appended results to {args.out}")
        del model  # lm-eval loads its own copy
    run_lm_eval_from_args(args)
    return 0
