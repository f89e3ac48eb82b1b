"""Keep, per projection, the top-curvature eigen-pairs of G ⊗ A holding keep_mass of the curvature mass
(W' = U_G (C ⊙ M) U_Aᵀ) and write EDITED_DIR: save_pretrained of the model and tokenizer plus edit_report.json.
Layers JSON (the reference format): '{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}'; a missing projection or
keep_mass >= 0.9999 is not edited. Under torchrun the ranks share the eigendecompositions out by cost; rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import EDIT_REPORT_FILE
from ..edit import edit_model_dir
from . import (add_bsn_options, add_factor_options, add_model_options, add_protect_options, add_spec_options,
               bsn_inputs_from_args, spec_from_args, writing)

HELP = "edit MLP weights along K-FAC curvature and save a model directory transformers/lm-eval load"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p, dtype_help="dtype to load, edit and save the weights in (default: the checkpoint's own dtype)")
    p.add_argument("--out", required=True, metavar="EDITED_DIR", help="directory to write (new, or an earlier edit)")
    add_factor_options(p)
    add_spec_options(p)
    add_protect_options(p)
    add_bsn_options(p)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    bsn = bsn_inputs_from_args(spec, args)
    with writing((args.out, "dir")):
        report = edit_model_dir(args.model, spec, out_dir=args.out, factors_dir=args.factors, device=args.device,
                                dtype=args.dtype, cache_dir=args.cache_dir, protect_dir=args.protect,
                                protect_weight=args.protect_weight, bsn=bsn, modules=args.modules)
    print(report.summary())
    print(f"wrote {Path(args.out) / EDIT_REPORT_FILE} and the edited model in {args.out}")
    return 0
