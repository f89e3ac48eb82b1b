"""The predicted cost of an edit: how much of a task's curvature falls in the pairs the edit removes.

Without editing or generating: for each edited module the edit keeps a set ``M`` of pairs ``(i, j)`` of its
eigenbasis (conventions in :mod:`kfac_edit.curvature`; the selection is the edit's own, :func:`kept_pairs`).
A task's data gives each pair a mass in that same basis, from one pass over the task (the EK-FAC pass of
:mod:`kfac_edit.factors.ekfac` with the task's own next tokens as labels):

* ``activation`` (default): ``m_ij = λ_G[i]·E_task[(u_A[j]ᵀ a)²]``, the task's activation energy weighted by the
  edited module's own gradient spectrum (the backward pass is still run, but its gradients are not used);
* ``curvature``: ``m_ij = E_task[(u_G[i]ᵀ g aᵀ u_A[j])²]``, the task's per-token gradient energy;
* ``loss``: ``m_ij = E_task[(u_G[i]ᵀ g aᵀ u_A[j])²]·C_ij²`` with ``C = U_Gᵀ W U_A`` the weight's coefficients: the
  task's curvature times what the edit takes away on each pair.

Besides the share, every task gets ``loss_estimate``: ``½ Σ_modules Σ_{(i,j)∉M} E_task[(u_G[i]ᵀ g aᵀ u_A[j])²]·C_ij²``,
the second-order estimate of its mean token loss increase (nats) with the task's own diagonal curvature in this basis
(the first-order term is dropped: a trained model's mean gradient is small next to the removed weight).

The module's **removed share** is ``Σ_{(i,j)∉M} m_ij / Σ m_ij``; a task's share is the mean over the edited
modules (each module's share is in the result too). A task whose data lies entirely in kept pairs predicts 0.
:func:`predict_cost` is the entry point; ``kfac-edit predict`` prints the shares and writes them as JSON with the
configuration. ``activation`` is the default because it ranked tasks best on the arithmetic testbed (Spearman 0.76
against the loss increase over 8 tasks, the curvature share -0.29: ``benchmarks/ekfac_study.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .curvature import independent_counts, pairs_mask, select_mass, select_pairs
from .data import json_lines, pad_right
from .errors import UserError
from .spec import EditSpec, Method, _Choice

CURVATURE_METHODS = (Method.KFAC, Method.KFAC_INDEPENDENT, Method.EKFAC)  # the methods whose edit keeps pairs


class PredictMode(_Choice):
    """What a task's mass on a pair is: its per-token ``curvature`` or its ``activation`` energy (module docstring)."""

    CURVATURE = "curvature"
    ACTIVATION = "activation"
    LOSS = "loss"


def _check_method(method: Method) -> None:
    if method not in CURVATURE_METHODS:
        raise UserError(f"predict works for the curvature methods kfac, kfac-independent and ekfac, not {method}")


def kept_pairs(name: str, keep_mass: float, method: Method, grad_eig, act_eig, ekfac=None, protect=None) -> torch.Tensor:
    """The bool ``(out, in)`` mask of the pairs the edit of module ``name`` keeps (what ``apply_edit`` projects on),
    for a method of :data:`CURVATURE_METHODS` (``ekfac`` needs the EK-FAC pair sums)."""
    if method is Method.EKFAC:
        mask = select_mass(ekfac.pair_mass(name), keep_mass)
    else:
        select = select_pairs if method is Method.KFAC else independent_counts
        mask = pairs_mask(select(grad_eig.values, act_eig.values, keep_mass), act_eig.values)
    if protect is not None:
        mask = mask | protect.mask(name, grad_eig, act_eig).cpu()
    return mask.cpu()


def removed_share(mass: torch.Tensor, kept: torch.Tensor) -> float:
    """``Σ mass[~kept] / Σ mass`` (fp64; 0.0 for a zero mass)."""
    m = mass.detach().to("cpu", torch.float64).clamp_min(0.0)
    total = float(m.sum())
    return float(m[~kept.cpu()].sum()) / total if total > 0 else 0.0


@dataclass
class TaskCost:
    """One task's predicted cost: ``share`` (mean over modules), ``modules`` ``{name: share}``, ``loss_estimate``."""

    task: str
    share: float
    modules: dict[str, float]
    labelled_tokens: int
    loss_estimate: float = 0.0


def task_mass(task_ekfac, name: str, mode: PredictMode, grad_eig, coeffs: torch.Tensor | None = None) -> torch.Tensor:
    """The task's ``(out, in)`` mass on module ``name``'s pairs (see the module docstring; ``coeffs``: ``C`` for
    the ``loss`` mode)."""
    if mode is PredictMode.CURVATURE:
        return task_ekfac.pair_mass(name)
    if mode is PredictMode.LOSS:
        return task_ekfac.pair_mass(name) * coeffs.square()
    return torch.outer(grad_eig.values.to(torch.float64).cpu(), task_ekfac.activation_energy(name))


def predict_cost(model: nn.Module, factors, spec: EditSpec, tasks: dict[str, Iterable[dict[str, torch.Tensor]]],
                 mode: PredictMode | str = PredictMode.ACTIVATION, cache=None, ekfac=None, protect=None,
                 progress: bool = False) -> list[TaskCost]:  # fmt: skip
    """Per task (``{name: batches}``), the share of its mass in the pairs ``spec``'s edit removes.

    ``factors`` give the eigenbasis and the edit's selection (with ``ekfac`` for ``--method ekfac`` and a
    :class:`~kfac_edit.edit.Protection` for ``protect``); the task passes use gold labels (the task's tokens). The
    model is not changed.
    """
    from .edit import edit_factors, resolve_targets
    from .eigen import EigenCache
    from .factors.ekfac import collect_ekfac

    mode = PredictMode.parse(mode, "predict mode")
    _check_method(spec.method)
    targets = resolve_targets(model, spec)
    if not targets:
        raise UserError("the layers JSON edits nothing (no projection has keep_mass below 0.9999)")
    factors, protect = edit_factors(model, targets, spec, factors, protect)  # as the edit uses them
    names = [p.name for p, _ in targets]
    if spec.method is Method.EKFAC:
        if ekfac is None:
            raise UserError("--method ekfac needs EK-FAC eigenvalues: run `kfac-edit collect --ekfac` for the factors")
        ekfac.check_basis(factors, names)
    cache = cache if cache is not None else EigenCache(None)
    bases, coeffs, kept = {}, {}, {}
    for proj, keep_mass in targets:
        grad_eig, act_eig = bases[proj.name] = cache.get(factors, proj.name)
        coeffs[proj.name] = grad_eig.vectors.T @ proj.affine_weight().detach().to("cpu", torch.float64) @ act_eig.vectors
        kept[proj.name] = kept_pairs(proj.name, keep_mass, spec.method, grad_eig, act_eig, ekfac=ekfac, protect=protect)
    results = []
    for task, batches in tasks.items():
        measured = collect_ekfac(model, factors, batches, names=names, labels="gold", cache=cache, progress=progress)
        shares = {n: removed_share(task_mass(measured, n, mode, bases[n][0], coeffs[n]), kept[n]) for n in names}
        removed = [float(task_mass(measured, n, PredictMode.LOSS, None, coeffs[n])[~kept[n]].sum()) for n in names]
        tokens = measured.modules[names[0]].tokens
        results.append(TaskCost(task, sum(shares.values()) / len(shares), shares, tokens, 0.5 * sum(removed)))
    return results


# ---------------------------------------------------------------------------------------------------- task data
def task_batches(path: str | os.PathLike, tokenizer, batch_size: int = 32, max_records: int | None = None,
                 max_len: int | None = None, text_field: str = "text") -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """A task file's records as right-padded batches, one record per row.

    A JSONL record is either memorized-set style (``prefix_ids`` and ``suffix_ids``: their concatenation) or text
    (``text_field``, tokenized); rows longer than ``max_len`` are cut.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} is not a file; give JSONL task files (text or prefix_ids/suffix_ids records)")
    rows: list[list[int]] = []
    for number, record in json_lines(path):
        if "prefix_ids" in record and "suffix_ids" in record:
            ids = [int(t) for t in record["prefix_ids"]] + [int(t) for t in record["suffix_ids"]]
        elif isinstance(record.get(text_field), str):
            ids = list(tokenizer(record[text_field])["input_ids"])
        else:
            raise UserError(f"{path}:{number}: a record needs prefix_ids and suffix_ids, or a '{text_field}' string")
        rows.append(ids[:max_len] if max_len else ids)
        if max_records is not None and len(rows) >= max_records:
            break
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise UserError(f"{path} holds no record of at least 2 tokens")
    batches = (pad_right(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size))
    return [{"input_ids": ids, "attention_mask": mask} for ids, mask in batches]


def predict_files(model: str, factors_dir: str | os.PathLike, spec: EditSpec, data: Sequence[str],
                  mode: str = "activation", device: str | None = "auto", dtype: str = "auto",
                  max_records: int | None = None, protect_dir: str | os.PathLike | None = None,
                  protect_weight: float | None = None,
                  cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """What ``kfac-edit predict`` does: the shares of each task file, with the configuration (a JSON-ready dict)."""
    from .edit import DEFAULT_PROTECT_WEIGHT, Protection, check_edit_inputs, load_edit_factors, load_protect_factors
    from .edit import declare_modules, resolve_targets
    from .eigen import EigenCache
    from .factors.ekfac import Ekfac
    from .models import load_model

    mode = PredictMode.parse(mode, "predict mode")
    _check_method(spec.method)
    check_edit_inputs(spec, factors_dir)
    if not data:
        raise UserError("give at least one task file with --data")
    for path in data:
        if not Path(path).is_file():
            raise UserError(f"--data {path} is not a file; give JSONL task files")
    weight = DEFAULT_PROTECT_WEIGHT if protect_weight is None else protect_weight
    if protect_dir is not None:
        Protection(None, weight)
    net, tokenizer = load_model(model, dtype=dtype, device=device)
    declare_modules(net, None, factors_dir)  # the modules the factors were collected from (collect --modules)
    factors = load_edit_factors(net, spec, factors_dir)
    names = [p.name for p, _ in resolve_targets(net, spec)]
    ekfac = Ekfac.load(factors_dir, names=names) if spec.method is Method.EKFAC else None
    protect = Protection(load_protect_factors(net, spec, protect_dir), weight) if protect_dir is not None else None
    context = getattr(net.config, "max_position_embeddings", None)
    tasks = {str(p): task_batches(p, tokenizer, max_records=max_records, max_len=context) for p in data}
    cache = EigenCache.default(cache_dir)
    costs = predict_cost(net, factors, spec, tasks, mode=mode, cache=cache, ekfac=ekfac, protect=protect)
    return {
        "config": {
            "model": model, "factors": str(factors_dir), "spec": spec.to_dict(), "mode": mode.value,
            "labels": "gold", "max_records": max_records,
            "protect": {"directory": str(protect_dir), "weight": weight} if protect_dir is not None else None,
        },  # fmt: skip
        "tasks": [asdict(c) for c in costs],
    }
