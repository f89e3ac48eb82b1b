"""Import of the reference tool's factor files (a torch ``.pt`` dict of means).

The reference format is ``{"blk{i}.{gate|up|down}": {"A": mean (in, in), "G": mean (out, out), "n_tokens": int}}``.
Means are turned back into sums (``mean * n_tokens``) so imported factors behave like collected ones. ``gate`` and
``up`` of a block read the same input: when their ``A`` is the same tensor, or an equal one with the same token
count, it is shared (stored once). The reference's ``G`` is taken as given (the mean-loss ``G``, ours divided by
``(B·(S−1))²``: :data:`GRAD_CONVENTION`, recorded in the manifest); its label mode is unknown.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, load_failure
from ..fileio import utc_timestamp
from ..models import PROJECTIONS
from .store import Factors

DEFAULT_NAME_TEMPLATE = "model.layers.{i}.mlp.{proj}_proj"
# What the manifest of imported factors says about their G (issue 12): the reference sums g gᵀ of the gradient of the
# *mean* token loss of each batch, so its G is ours (gradient of the summed loss) divided by (B·(S−1))² for batches of
# B windows of S tokens. A constant factor on G changes no eigenvector and no mass fraction: keep_mass edits agree.
GRAD_CONVENTION = "mean-loss G: ours / (B*(S-1))^2 for batches of B windows of S tokens (keep_mass edits unchanged)"
_KEY = re.compile(r"^blk(\d+)\.(gate|up|down)$")


def read_reference(path: str | os.PathLike) -> dict[tuple[int, str], dict[str, Any]]:
    """Read and check a reference ``.pt`` file: ``{(block, kind): {"A", "G", "n_tokens"}}``."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"reference factor file '{path}' {what}; give the .pt file the reference tool wrote")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals: all mean "not a factor file"
        raise UserError(f"cannot read '{path}' as a torch factor file: {load_failure(exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"'{path}' holds no factor dict; expected {{'blk<i>.<gate|up|down>': {{'A', 'G', 'n_tokens'}}}}")
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for key, entry in raw.items():
        match = _KEY.match(str(key))
        if not match:
            raise UserError(f"'{path}': key '{key}' is not of the form blk<i>.<gate|up|down>")
        if not isinstance(entry, dict) or not {"A", "G", "n_tokens"} <= set(entry):
            raise UserError(f"'{path}': entry '{key}' needs 'A', 'G' and 'n_tokens'")
        A, G = entry["A"], entry["G"]
        for label, t in (("A", A), ("G", G)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise UserError(f"'{path}': {key}.{label} is not a square matrix")
        n = entry["n_tokens"]
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n):
            raise UserError(f"'{path}': {key}.n_tokens is {n!r}, not a whole number of tokens; fix the factor file")
        n = int(n)
        if n <= 0:
            raise UserError(f"'{path}': {key}.n_tokens is {n}; the means cannot be turned back into sums")
        out[(int(match.group(1)), match.group(2))] = {"A": A, "G": G, "n_tokens": n}
    return out


def _names_from_template(keys, template: str) -> dict[tuple[int, str], str]:
    if "{i}" not in template:
        raise UserError(f"--name-template '{template}' needs {{i}} (the block index), e.g. {DEFAULT_NAME_TEMPLATE}")
    names = {}
    for block, kind in keys:
        try:
            names[(block, kind)] = template.format(i=block, proj=kind)
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"--name-template '{template}' is not valid: only {{i}} and {{proj}} may appear ({exc})") from None
    if len(set(names.values())) != len(names):
        raise UserError(f"--name-template '{template}' gives several modules the same name; add {{proj}}")
    return names


def _names_from_model(entries: dict[tuple[int, str], dict[str, Any]], model) -> dict[tuple[int, str], str]:
    """The model's module names of the entries, whose shapes are checked against the model's weights."""
    from ..models import find_projections, num_blocks

    blocks = sorted({b for b, _ in entries})
    n = num_blocks(model)
    if blocks[-1] >= n:
        raise UserError(f"the factor file has block {blocks[-1]}, but the --model has blocks 0..{n - 1}; is this the "
                        "right --model?")
    kinds = [k for k in PROJECTIONS if any(kind == k for _, kind in entries)]
    by_key = {(p.block, p.kind): p for p in find_projections(model, blocks, kinds)}
    for key, entry in entries.items():
        (n_out, n_in), A, G = by_key[key].shape, entry["A"], entry["G"]
        if by_key[key].has_bias and A.shape == (n_in + 1, n_in + 1) and G.shape == (n_out, n_out):
            raise UserError(
                f"blk{key[0]}.{key[1]}: A {tuple(A.shape)} is over [a; 1] of the biased {by_key[key].name}; the "
                f"reference format holds A over the input a alone ({n_in}x{n_in}): give that A, or collect the "
                "factors with `kfac-edit collect` (--bias joint)"
            )
        if A.shape != (n_in, n_in) or G.shape != (n_out, n_out):
            raise UserError(
                f"blk{key[0]}.{key[1]}: A {tuple(A.shape)} / G {tuple(G.shape)} do not fit {by_key[key].name} of shape "
                f"(out, in) = {(n_out, n_in)}; is this the right --model?"
            )
    return {key: by_key[key].name for key in entries}


def meta_model(name_or_path: str):
    """The architecture of a model (config only, weights on the meta device: nothing is loaded or allocated)."""
    from transformers import AutoModelForCausalLM

    from ..models import check_causal_lm

    config = check_causal_lm(name_or_path)  # the config, or a one-line UserError
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def import_reference(
    path: str | os.PathLike, name_template: str = DEFAULT_NAME_TEMPLATE, model: Any | str | None = None
) -> Factors:
    """Turn a reference ``.pt`` file into :class:`Factors` (fp32 sums + counts).

    Modules are named by ``name_template`` (``{i}`` = block, ``{proj}`` = gate|up|down), or, when ``model`` (a
    model, hub id or local dir) is given, by that architecture's projections, whose shapes are then checked.
    """
    entries = read_reference(path)
    model_name = None
    if model is not None:
        if isinstance(model, (str, os.PathLike)):
            model_name = str(model)
            model = meta_model(model_name)
        names = _names_from_model(entries, model)
    else:
        names = _names_from_template(entries, name_template)

    means: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for block, kind in sorted(entries, key=lambda k: (k[0], PROJECTIONS.index(k[1]))):
        entry = entries[(block, kind)]
        A = entry["A"].to(torch.float32, copy=True)  # own tensor: only gate/up of one block may share
        if kind == "up" and (block, "gate") in entries:
            gate = entries[(block, "gate")]
            same = gate["A"] is entry["A"] or (gate["A"].shape == entry["A"].shape and torch.equal(gate["A"], entry["A"]))
            if same and gate["n_tokens"] == entry["n_tokens"]:
                A = means[names[(block, "gate")]][0]  # one tensor object: from_means shares the sum
        means[names[(block, kind)]] = (A, entry["G"].to(torch.float32, copy=True), entry["n_tokens"])

    from .. import __version__

    manifest: dict[str, Any] = {
        "imported_from": str(Path(path).resolve()),
        "source_format": "reference .pt (means + n_tokens)",
        "name_template": None if model is not None else name_template,
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None),
        "labels": None,
        "grad_convention": GRAD_CONVENTION,
        "tokens": max(e["n_tokens"] for e in entries.values()),
        "layers": sorted({b for b, _ in entries}),
        "projections": [k for k in PROJECTIONS if any(kind == k for _, kind in entries)],
        "kfac_edit_version": __version__,
        "created": utc_timestamp(),
    }
    if model is not None:
        from ..identity import model_fingerprint

        manifest["model_fingerprint"] = model_fingerprint(model)
    factors = Factors.from_means(means, manifest)
    factors.check_sane(str(path))  # what a load would refuse is refused here, before a directory is written
    return factors
