"""``kfac-edit run``: evaluate the base model, apply an edit, save it, evaluate again, print before/after."""

from __future__ import annotations

import argparse

ORDER = 50


def register(subparsers) -> None:
    from .edit import add_bsn_arguments, add_modules_argument, add_spec_arguments
    from ..lm_eval_tasks import add_lm_eval_arguments
    from .eval import add_eval_arguments, add_model_arguments

    p = subparsers.add_parser(
        "run",
        help="the whole workflow: evaluate, edit, save, evaluate again, before/after table",
        description="Evaluate MODEL, apply the edit of the layers JSON with the K-FAC factors, save the edited model "
        "to DIR/edited, evaluate it again, write DIR/evals.jsonl (full records) and DIR/before_after.json (for "
        "`kfac-edit report DIR`), append a summary line (before, after, delta) to the results JSONL and print a "
        "table. nDCG compares with the base model unless --reference-model names another.",
    )
    add_model_arguments(p)
    p.add_argument("--factors", metavar="DIR", help="K-FAC factors of MODEL (from `kfac-edit collect`); all methods but svd")
    add_spec_arguments(p)
    add_bsn_arguments(p, "memorized records (JSONL) bsn learns to forget; needed by method bsn")
    add_modules_argument(p)
    p.add_argument("--out", default="kfac-edit-run", metavar="DIR", help="run directory (default ./kfac-edit-run)")
    p.add_argument("--results", metavar="FILE.jsonl", help="summary JSONL to append to (default DIR/runs.jsonl)")
    p.add_argument("--skip-baseline", action="store_true", help="do not evaluate the base model (after only)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where eigendecompositions are cached (default: $KFAC_EDIT_CACHE/eigen, else ~/.cache/kfac-edit/eigen)",
    )
    add_eval_arguments(p)
    add_lm_eval_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..edit import declare_modules
    from ..lm_eval_tasks import check_lm_eval_args, run_lm_eval_from_args
    from ..models import load_tokenizer
    from .edit import bsn_inputs_from_args, spec_from_args
    from ..workflow import check_run_inputs, format_table, run_paths, run_workflow
    from ..fileio import check_output, output_lock
    from .eval import eval_config_from_args, load_for_eval

    spec = spec_from_args(args)
    config = eval_config_from_args(args, out=None)
    paths = run_paths(args.out, args.results)
    check_output(paths.out_dir, "dir")
    check_output(paths.results, "file", flag="--results")
    check_lm_eval_args(args)
    check_run_inputs(args.model, spec, args.factors, config, paths, load_tokenizer(args.model))  # before loading
    bsn = bsn_inputs_from_args(spec, args)  # (forget, clean, config) or None; refused before loading when missing
    with output_lock(paths.out_dir):
        model, tokenizer = load_for_eval(args)
        declare_modules(model, args.modules, args.factors)
        if bsn is not None:
            from ..bsn import BsnInputs, load_bsn_data

            vocab = model.get_input_embeddings().num_embeddings
            bsn = BsnInputs(load_bsn_data(bsn[0], bsn[1], tokenizer, bsn[2], vocab_size=vocab), bsn[2])
        summary = run_workflow(model, tokenizer, args.model, spec, args.factors, config, args.out,
                               skip_baseline=args.skip_baseline, results=args.results, bsn=bsn,
                               cache_dir=args.cache_dir)
    print(format_table(summary))
    print(f"edited model: {paths.edited}; evaluations: {paths.evals}; summary appended to {paths.results}")
    if args.lm_eval_tasks:  # lm-eval on the base model and on the saved edit, results beside the evaluations
        del model  # lm-eval loads its own copies
        for path in ([] if args.skip_baseline else [args.model]) + [str(paths.edited)]:
            run_lm_eval_from_args(argparse.Namespace(**{**vars(args), "model": path, "out": str(paths.evals)}))
    return 0
