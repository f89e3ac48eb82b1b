"""``kfac-edit eval``: memorization, quotes, perplexity, nDCG and stress-test metrics of one model."""

from __future__ import annotations

import argparse

ORDER = 40


def _help(name: str) -> str:
    from dataclasses import fields

    from ..evaluate.suite import EvalConfig

    return next(f.metadata["help"] for f in fields(EvalConfig) if f.name == name)


_METAVARS = {"memorized": "FILE", "quotes": "FILE", "perplexity_data": "SOURCE", "ndcg_data": "SOURCE",
             "reference_model": "BASE", "perturb": "T"}  # fmt: skip
_NOT_OPTIONS = ("out", "model")  # set by each command itself


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
    """The evaluation options shared by ``eval``, ``run`` and ``sweep``: one per :class:`EvalConfig` field."""
    from dataclasses import MISSING, fields

    from ..evaluate.suite import EvalConfig

    for f in fields(EvalConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag, metavar, help_text = "--" + f.name.replace("_", "-"), _METAVARS.get(f.name), f.metadata["help"]
        if f.default_factory is not MISSING:  # a list of files
            p.add_argument(flag, nargs="+", action="extend", default=[], metavar=metavar, help=help_text)
            continue
        kind = int if "int" in f.type else float if "float" in f.type else str
        if f.default is not None:
            help_text += f" (default {f.default})"
        p.add_argument(flag, type=kind, default=f.default, metavar=metavar, help=help_text)


def eval_config_from_args(args: argparse.Namespace, out: str | None):
    """The :class:`EvalConfig` of :func:`add_eval_arguments`' options, writing to ``out``."""
    from dataclasses import fields

    from ..evaluate.suite import EvalConfig

    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if f.name not in _NOT_OPTIONS}
    return EvalConfig(**values, out=out, model=args.model)


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
    from ..fileio import check_output, output_lock
    from ..lm_eval_tasks import check_lm_eval_args

    config = eval_config_from_args(args, args.out)
    check_output(args.out, "file")
    check_lm_eval_args(args)
    with output_lock(args.out):
        return _evaluate(args, config)


def _evaluate(args: argparse.Namespace, config) -> int:
    from ..evaluate.suite import check_inputs, evaluate
    from ..lm_eval_tasks import run_lm_eval_from_args
    from ..models import check_causal_lm, load_tokenizer, model_limits

    ours = bool(config.memorized or config.quotes or config.perplexity_data or config.ndcg_data)
    if ours or not args.lm_eval_tasks:  # with only --lm-eval-tasks, our suite has nothing to do
        tokenizer = load_tokenizer(args.model)
        rows, positions = model_limits(check_causal_lm(args.model))  # token ids vs embedding rows, lengths vs context
        check_inputs(config, tokenizer, rows, positions)  # fail on bad input before loading the model
        model, tokenizer = load_for_eval(args)
        record = evaluate(model, tokenizer, config)
        print_summary(record)
        if args.out:
            print(f"appended results to {args.out}")
        del model  # lm-eval loads its own copy
    lm_record = run_lm_eval_from_args(args)
    if lm_record is not None and args.out and not ours:  # only lm-eval ran: --out still gets a line
        from ..fileio import append_jsonl
        from ..lm_eval_tasks import lm_eval_out_dir

        append_jsonl(args.out, {"model": args.model, "metrics": {"lm_eval": lm_record.get("metrics", {})},
                                "lm_eval_dir": str(lm_eval_out_dir(args.model, args.out))})  # fmt: skip
        print(f"appended results to {args.out}")
    return 0
