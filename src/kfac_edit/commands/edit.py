"""``kfac-edit edit``: apply a curvature edit to a model and write a standard Hugging Face model directory."""

from __future__ import annotations

import argparse

ORDER = 30


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The edit's options, shared by ``edit`` and ``run``: --layers-json | --layers-file, --method, --seed."""
    from ..spec import METHODS

    layers = p.add_mutually_exclusive_group(required=True)
    layers.add_argument(
        "--layers-json", metavar="JSON", help='layers JSON: block -> {projection: keep_mass}, e.g. \'{"23": {"gate": 0.6}}\''
    )
    layers.add_argument("--layers-file", metavar="FILE", help="file holding the layers JSON (e.g. a sweep's best.json)")
    p.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="kfac: top pairs of G ⊗ A (the default, unless a layers file written as {method, seed, layers} "
        "names another); kfac-independent: top eigenvectors of G and of A separately; "
        "svd: top singular directions of W holding keep_mass of Σσ² (data-free baseline); random: as many "
        "coefficients as kfac, random positions in a random orthogonal basis (control); ekfac: as kfac, pairs "
        "ranked by their EK-FAC second moments (needs `collect --ekfac`); bsn: BalancedSubnet, a "
        "learned mask keeping keep_mass of the entries (needs --forget and --clean-data)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the random method's bases (default 0)")
    p.add_argument(
        "--bias",
        default=None,
        choices=("joint", "keep"),
        help="biased layers: joint (default) edits [W b] together when the factors were collected over [a; 1] "
        "(collect's default); keep leaves every bias as it is and edits W alone",
    )


def add_modules_argument(p: argparse.ArgumentParser) -> None:
    """``--modules``, as ``collect`` takes it (``edit``, ``run`` and ``sweep``)."""
    p.add_argument(
        "--modules",
        default=None,
        metavar="KIND=PATH,...",
        help="the MLP's linear layers inside a block, e.g. up=mlp.fc_in,down=mlp.fc_out (as given to collect); "
        "default: the paths the factors' manifest records, else the projection table; must agree with the manifest",
    )


def add_bsn_arguments(p: argparse.ArgumentParser, forget_help: str) -> None:
    """The data and hyper-parameters of method bsn (:class:`~kfac_edit.bsn.BsnConfig`): --forget, --clean-data,
    --bsn-epochs, --bsn-lr ... (defaults: the paper's reference implementation)."""
    from dataclasses import fields

    from ..bsn import BsnConfig

    g = p.add_argument_group("method bsn (BalancedSubnet)")
    g.add_argument("--forget", metavar="FILE", help=forget_help)
    g.add_argument("--clean-data", metavar="SOURCE", help="clean text whose loss bsn keeps (e.g. the training "
                   "mixture); local jsonl/txt/parquet or hf:NAME")
    for f in fields(BsnConfig):
        kind = int if f.name in ("epochs", "batch_size", "clean_seq_len", "max_clean_tokens", "seed") else float
        default = f.default
        g.add_argument(f"--bsn-{f.name.replace('_', '-')}", dest=f"bsn_{f.name}", type=kind, default=default,
                       help=f"{f.metadata['help']} (default {default})")


def bsn_config_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from ..bsn import BsnConfig

    config = BsnConfig(**{f.name: getattr(args, f"bsn_{f.name}") for f in fields(BsnConfig)})
    config.validate()
    return config


def bsn_inputs_from_args(spec, args: argparse.Namespace):
    """``(forget FILE, clean SOURCE, BsnConfig)`` when ``spec``'s method is bsn (a one-line error without the data),
    else ``None``."""
    if not spec.method.needs_data:
        return None
    from ..errors import UserError

    if not args.forget or not args.clean_data:
        raise UserError("method bsn learns from data: pass --forget FILE (records to remove) and --clean-data "
                        "SOURCE (text to keep)")
    return args.forget, args.clean_data, bsn_config_from_args(args)


def spec_from_args(args: argparse.Namespace):
    """The :class:`~kfac_edit.spec.EditSpec` that ``add_spec_arguments``' options describe."""
    from ..spec import EditSpec

    if args.layers_file is not None:
        return EditSpec.from_file(args.layers_file, method=args.method, seed=args.seed, bias=args.bias)
    return EditSpec.from_json(args.layers_json, method=args.method, seed=args.seed, bias=args.bias)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit MLP weights along K-FAC curvature and save a model directory transformers/lm-eval load",
        description="Keep, per projection, the top-curvature eigen-pairs of G ⊗ A holding keep_mass of the "
        "curvature mass (W' = U_G (C ⊙ M) U_Aᵀ) and write EDITED_DIR: save_pretrained of the model and tokenizer "
        "plus edit_report.json. Layers JSON (the reference format): "
        '\'{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}\'; a missing projection or keep_mass >= 0.9999 '
        "is not edited. Under torchrun the ranks share the eigendecompositions out by cost; rank 0 writes.",
    )
    p.add_argument("--model", required=True, help="model to edit: hub id or local directory")
    p.add_argument(
        "--factors",
        metavar="DIR",
        help="K-FAC factors of this model (made by `kfac-edit collect`); needed by every method but svd",
    )
    p.add_argument("--out", required=True, metavar="EDITED_DIR", help="directory to write (new, or an earlier edit)")
    add_spec_arguments(p)
    add_bsn_arguments(p, "memorized records (JSONL) bsn learns to forget; needed by method bsn")
    add_modules_argument(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        help="dtype to load, edit and save the weights in (default: the checkpoint's own dtype)",
    )
    p.add_argument(
        "--protect",
        metavar="DIR",
        help="factors of a capability to keep (`kfac-edit collect` on its data): the edit also keeps the top pairs "
        "holding --protect-weight of that capability's curvature in the edited modules' eigenbasis",
    )
    p.add_argument(
        "--protect-weight",
        type=float,
        default=0.9,
        metavar="W",
        help="share of the protected curvature (u_G[i]^T G_p u_G[i] * u_A[j]^T A_p u_A[j]) whose pairs are kept "
        "besides the method's own selection (default 0.9; 0 protects nothing)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where eigendecompositions are cached (default: $KFAC_EDIT_CACHE/eigen, else ~/.cache/kfac-edit/eigen)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..constants import EDIT_REPORT_FILE
    from ..edit import edit_model_dir
    from ..fileio import check_output, output_lock

    spec = spec_from_args(args)
    bsn = bsn_inputs_from_args(spec, args)
    check_output(args.out, "dir")
    with output_lock(args.out):
        report = edit_model_dir(
            args.model,
            spec,
            out_dir=args.out,
            factors_dir=args.factors,
            device=args.device,
            dtype=args.dtype,
            cache_dir=args.cache_dir,
            protect_dir=args.protect,
            protect_weight=args.protect_weight,
            bsn=bsn,
            modules=args.modules,
        )
    print(report.summary())
    print(f"wrote {Path(args.out) / EDIT_REPORT_FILE} and the edited model in {args.out}")
    return 0
