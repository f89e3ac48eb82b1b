"""Subcommands of the ``kfac-edit`` CLI, one module each (see :mod:`kfac_edit.cli`), and the options they share.

A settings dataclass's options come from its fields (:func:`add_field_options`, as kronfluence/HfArgumentParser do).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import MISSING, fields
from typing import Any, Sequence

from ..bsn import BsnConfig
from ..errors import UserError
from ..evaluate.suite import EvalConfig
from ..fileio import check_not_input, check_output, output_lock
from ..models import BIAS_MODES, DTYPE_CHOICES, load_model, resolve_device
from ..spec import METHOD_HELP, METHODS, EditSpec


def add_field_options(p, config: type, names=None, *, prefix: str = "", note_defaults: bool = True,
                      **extra: dict[str, Any]) -> None:
    """One option per field of the dataclass ``config`` named in ``names`` (in that order; default: every field).

    Flag: the field's ``flag`` metadata, else ``--[prefix-]name`` (destination ``[prefix_]name``). Type: the
    annotation's int/float/str; a bool is a switch, a list a repeatable file list. Default: the field's (none:
    required). Help: the ``help`` metadata, plus ``(default X)`` with ``note_defaults`` when X is not None.
    ``extra[name]``: ``add_argument`` keywords that win.
    """
    by_name = {f.name: f for f in fields(config)}
    for f in [by_name[name] for name in names] if names is not None else by_name.values():
        dest = f"{prefix}_{f.name}" if prefix else f.name
        options: dict[str, Any] = {"dest": dest, "help": f.metadata["help"]}
        words = set(re.findall(r"\w+", str(f.type)))  # of the annotation, e.g. {"int", "None"}
        if f.default_factory is not MISSING:  # a list of files
            options.update(nargs="+", action="extend", default=[])
        elif "bool" in words:
            options.update(action="store_true")
        else:
            kind = int if "int" in words else float if "float" in words else str
            required = f.default is MISSING
            options.update(type=kind, default=None if required else f.default, required=required)
            if note_defaults and not required and f.default is not None:
                options["help"] += f" (default {f.default})"
        options.update(extra.get(f.name, {}))
        p.add_argument(f.metadata.get("flag", "--" + dest.replace("_", "-")), **options)


def add_model_options(p, dtype_help: str = "weights dtype (default auto: the checkpoint's own dtype)") -> None:
    """``--model``, ``--dtype``, ``--device``: what :func:`load_model_from_args` loads."""
    p.add_argument("--model", required=True, help="the model: hub id or local directory")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=dtype_help)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` as ``--model/--dtype/--device`` ask."""
    return load_model(args.model, dtype=args.dtype, device=str(resolve_device(args.device)))


def add_factor_options(p, required: bool = False, modules: bool = True) -> None:
    """``--factors``, ``--cache-dir`` (eigendecompositions) and, with ``modules``, ``--modules``."""
    needed = "" if required else "; needed by every method but svd"
    p.add_argument("--factors", required=required, metavar="DIR",
                   help=f"K-FAC factors of the model (made by `kfac-edit collect`){needed}")
    p.add_argument("--cache-dir", metavar="DIR", help="where eigendecompositions are cached (default: "
                   "$KFAC_EDIT_CACHE/eigen, else ~/.cache/kfac-edit/eigen)")
    if modules:
        p.add_argument("--modules", metavar="KIND=PATH,...", help="the MLP's linear layers inside a block, e.g. "
                       "up=mlp.fc_in,down=mlp.fc_out (as given to collect); default: the paths the factors' manifest "
                       "records, else the projection table; must agree with the manifest")


def add_spec_options(p, methods: Sequence[str] = METHODS) -> None:
    """The edit (:class:`~kfac_edit.spec.EditSpec`): --layers-json | --layers-file, --method (one of ``methods``),
    --seed, --bias."""
    layers = p.add_mutually_exclusive_group(required=True)
    layers.add_argument("--layers-json", metavar="JSON",
                        help='layers JSON: block -> {projection: keep_mass}, e.g. \'{"23": {"gate": 0.6}}\'')
    layers.add_argument("--layers-file", metavar="FILE", help="file holding the layers JSON (e.g. a sweep's best.json)")
    p.add_argument("--method", choices=methods, help="; ".join(f"{m}: {METHOD_HELP[m]}" for m in methods)
                   + " (default kfac, unless a layers file written as {method, seed, layers} names another)")
    p.add_argument("--seed", type=int, help="seed of the random method's bases (default 0)")
    p.add_argument("--bias", choices=BIAS_MODES, help="biased layers: joint (default) edits [W b] together when the "
                   "factors were collected over [a; 1] (collect's default); keep leaves every bias as it is and edits "
                   "W alone")


def spec_from_args(args: argparse.Namespace) -> EditSpec:
    """The :class:`~kfac_edit.spec.EditSpec` of :func:`add_spec_options`' options."""
    options = {"method": args.method, "seed": args.seed, "bias": args.bias}
    if args.layers_file is not None:
        return EditSpec.from_file(args.layers_file, **options)
    return EditSpec.from_json(args.layers_json, **options)


def add_protect_options(p) -> None:
    p.add_argument("--protect", metavar="DIR", help="factors of a capability to keep (`kfac-edit collect` on its "
                   "data): the edit also keeps the top pairs holding --protect-weight of that capability's curvature "
                   "in the edited modules' eigenbasis")
    p.add_argument("--protect-weight", type=float, default=0.9, metavar="W", help="share of the protected curvature "
                   "(u_G[i]^T G_p u_G[i] * u_A[j]^T A_p u_A[j]) whose pairs are kept besides the method's own "
                   "selection (default 0.9; 0 protects nothing)")


def add_bsn_options(p, forget_help="memorized records (JSONL) bsn learns to forget; needed by method bsn") -> None:
    """The data and hyper-parameters of method bsn (:class:`~kfac_edit.bsn.BsnConfig`): --forget, --clean-data,
    --bsn-epochs, --bsn-lr ... (defaults: the paper's reference implementation)."""
    group = p.add_argument_group("method bsn (BalancedSubnet)")
    group.add_argument("--forget", metavar="FILE", help=forget_help)
    group.add_argument("--clean-data", metavar="SOURCE", help="clean text whose loss bsn keeps (e.g. the training "
                       "mixture); local jsonl/txt/parquet or hf:NAME")
    add_field_options(group, BsnConfig, prefix="bsn")


def bsn_config_from_args(args: argparse.Namespace) -> BsnConfig:
    config = BsnConfig(**{f.name: getattr(args, f"bsn_{f.name}") for f in fields(BsnConfig)})
    config.validate()
    return config


def bsn_inputs_from_args(spec, args: argparse.Namespace):
    """``(forget FILE, clean SOURCE, BsnConfig)`` for method bsn (refused without the data), else ``None``."""
    if not spec.method.needs_data:
        return None
    if not args.forget or not args.clean_data:
        raise UserError("method bsn learns from data: pass --forget FILE (records to remove) and --clean-data "
                        "SOURCE (text to keep)")
    return args.forget, args.clean_data, bsn_config_from_args(args)


_EVAL_METAVARS = {"memorized": "FILE", "quotes": "FILE", "perplexity_data": "SOURCE", "ndcg_data": "SOURCE",
                  "reference_model": "BASE", "perturb": "T"}  # fmt: skip
_EVAL_NOT_OPTIONS = ("out", "model")  # each command sets them itself


def add_eval_options(p) -> None:
    """The evaluation options of ``eval``, ``run`` and ``sweep``: one per :class:`EvalConfig` field."""
    names = [f.name for f in fields(EvalConfig) if f.name not in _EVAL_NOT_OPTIONS]
    add_field_options(p, EvalConfig, names, **{name: {"metavar": m} for name, m in _EVAL_METAVARS.items()})


def eval_config_from_args(args: argparse.Namespace, out: str | None) -> EvalConfig:
    """The :class:`EvalConfig` of :func:`add_eval_options`' options, writing to ``out``."""
    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if f.name not in _EVAL_NOT_OPTIONS}
    return EvalConfig(**values, out=out, model=args.model)


EVAL_INPUTS = ("--memorized", "--quotes", "--perplexity-data", "--ndcg-data", "--reference-model")


def inputs_of(args: argparse.Namespace, *flags: str) -> dict[str, Any]:
    """``{flag: value}`` of the input options ``flags`` (e.g. ``--model``, ``--data``): what :func:`writing` keeps
    the outputs apart from."""
    return {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in flags}


@contextlib.contextmanager
def writing(*outputs: tuple, reads: dict[str, Any] | None = None):
    """Check each output ``(path, kind[, flag, overwrite])`` (``fileio.check_output``; none may be one of ``reads``,
    see :func:`inputs_of`), then lock the first."""
    for output in outputs:
        check_output(*output)
        check_not_input(output[0], output[2] if len(output) > 2 else "--out", reads or {})
    with output_lock(outputs[0][0]):
        yield
