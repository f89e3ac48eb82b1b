"""Apply, restore and save a curvature edit of a model's MLP weights.

:func:`apply_edit` edits a model in place as an :class:`~kfac_edit.spec.EditSpec` says, from K-FAC
:class:`~kfac_edit.factors.store.Factors` through an :class:`~kfac_edit.eigen.EigenCache`, and returns an
:class:`EditReport`; the originals stay on the model (:data:`ORIGINALS_ATTR`) so :func:`restore` puts them back
bit for bit. :func:`save_edited` writes a Hugging Face model directory plus ``edit_report.json``;
:func:`edit_model_dir` is ``kfac-edit edit`` (under ``torchrun`` it first spreads the eigendecompositions).
``--method ekfac`` ranks pairs by EK-FAC eigenvalues; ``--protect`` (:class:`Protection`) also keeps the pairs
holding a share of a protected capability's curvature.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .bsn import BsnInputs, learn_masks, load_bsn_data, masked_weight
from .constants import EDIT_REPORT_FILE
from .curvature import independent_counts, pair_stats, project_weight, random_basis_edit, select_pairs, svd_truncate
from .curvature import PairStats, diagonal_in_basis, kept_mass_fraction, pair_mass_fraction, pairs_mask, select_mass
from .eigen import EigenCache, distributed_eigendecompose
from .errors import UserError
from .experts import expert_weight
from .factors.distributed import init_distributed, rank_device, shutdown
from .factors.ekfac import Ekfac
from .factors.store import Factors, ModuleFactors
from .fileio import atomic_dir, utc_timestamp, write_json
from .identity import model_fingerprint
from .models import PROJECTIONS, Projection, find_projections, load_model, load_tokenizer_as_saved, model_type
from .models import LAYOUT_KEY, model_limits, num_blocks, parse_modules_option, projection_kinds, resolve_device
from .models import use_modules
from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log
from .spec import LAYERS_EXAMPLE, NO_EDIT_AT, EditSpec, Method

log = logging.getLogger(__name__)

ORIGINALS_ATTR = "_kfac_edit_originals"  # on an edited model: {module name: original weight, as stored, on the CPU}
BIAS_SUFFIX = "#bias"  # ORIGINALS_ATTR key of a module's original bias (edited with its weight: --bias joint)


# Reports ------------------------------------------------------------------------------------------------------------


@dataclass
class ModuleEdit:
    """What one projection's edit kept.

    ``mass_fraction``: share of the method's own mass kept (``λ_G[i]·μ_A[j]`` for ``kfac`` and
    ``kfac-independent``, the EK-FAC second moments for ``ekfac``, Σσ² for ``svd``, ``None`` for ``random``).
    ``pairs_kept``/``pairs_total``: coefficients kept (for ``svd`` singular directions out of ``min(out, in)``).
    ``grad_vectors_used``/``act_vectors_used``: distinct G / A eigenvectors (singular vectors for ``svd``).
    ``weight_change``: ``‖W' − W‖ / ‖W‖`` (Frobenius; of ``[W b]`` when ``bias``).
    """

    name: str
    block: int
    kind: str
    shape: tuple[int, int]
    method: str
    keep_mass: float
    mass_fraction: float | None
    pairs_kept: int
    pairs_total: int
    pairs_fraction: float
    grad_vectors_used: int | None
    act_vectors_used: int | None
    weight_change: float
    eigen_seconds: float
    seconds: float
    protected_mass_fraction: float | None = None  # with --protect: share of the protected curvature kept
    bias: bool = False  # the bias was edited with the weight: [W b] projected, shape (out, in + 1)


@dataclass
class EditReport:
    """Everything about one edit: the spec, per-module numbers and the factors' manifest."""

    method: str
    spec: dict[str, Any]
    modules: list[ModuleEdit]
    factor_manifest: dict[str, Any]
    model: str | None
    model_fingerprint: str
    seconds: float
    eigen_cache: dict[str, Any]
    created: str = field(default_factory=utc_timestamp)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kfac_edit_version": __version__}

    def summary(self) -> str:
        lines = []
        for m in self.modules:
            mass = f"mass {m.mass_fraction:.4f}" if m.mass_fraction is not None else "mass n/a"
            lines.append(
                f"{m.name}: {m.method} keep {m.keep_mass:g}: {m.pairs_kept} of {m.pairs_total} coefficients "
                f"({100 * m.pairs_fraction:.3g}%), {mass}, weight change {m.weight_change:.3f}, {m.seconds:.2f} s"
            )
        return "\n".join(lines)


# Apply / restore ----------------------------------------------------------------------------------------------------


def resolve_targets(model: nn.Module, spec: EditSpec) -> list[tuple[Projection, float]]:
    """The projections ``spec`` edits, with their keep_mass; :class:`UserError` for blocks or kinds the model lacks."""
    if not spec.edits_something:
        return []
    n = num_blocks(model)
    kinds = projection_kinds(model)
    block_kinds = [*spec.keep_mass, *((b, k) for b, _, k in spec.expert_keep_mass)]
    for block, kind in block_kinds:
        if not 0 <= block < n:
            raise UserError(f"block {block} does not exist: the model has blocks 0..{n - 1}; fix the layers JSON")
        if kind not in kinds:
            raise UserError(
                f"projection '{kind}' does not exist in a {model_type(model)} model (it has {', '.join(kinds)}); "
                "remove it from the layers JSON"
            )
    used = sorted({kind for _, kind in block_kinds}, key=PROJECTIONS.index)
    found = find_projections(model, layers=spec.blocks, projections=used)
    for block, expert in sorted({(b, e) for b, e, _ in spec.expert_keep_mass}):
        if not any(p.block == block and p.expert == expert for p in found):
            raise UserError(
                f"block {block} has no routed expert {expert} (the layers JSON's \"experts\" form is for "
                "mixture-of-experts blocks; experts count from 0); fix the layers JSON"
            )
    out = []
    for p in found:
        keep_mass = spec.keep_mass.get((p.block, p.kind))
        if p.expert is not None:
            keep_mass = spec.expert_keep_mass.get((p.block, p.expert, p.kind), keep_mass)
        if keep_mass is not None and keep_mass < NO_EDIT_AT:
            out.append((p, keep_mass))
    return out


def declare_modules(
    model: nn.Module, modules: str | dict[str, str] | None, factors_dir: str | os.PathLike | None
) -> None:
    """Find the projections of ``model`` where its factors were collected (:func:`~kfac_edit.models.use_modules`):
    as the factor manifest records them, or ``modules`` (``--modules up=mlp.fc_in,down=mlp.fc_out``), which must
    then agree (:class:`UserError`); neither: the projection table."""
    given = parse_modules_option(modules) if isinstance(modules, str) else (dict(modules) if modules else None)
    recorded = {}
    if factors_dir is not None and Path(factors_dir).is_dir():
        recorded = dict(Factors.load(factors_dir, names=[]).manifest.get(LAYOUT_KEY) or {})  # the manifest only
    blocks_path = recorded.pop("blocks", None)
    if given and recorded and given != recorded:
        show = lambda m: ",".join(f"{k}={m[k]}" for k in PROJECTIONS if k in m)  # noqa: E731
        raise UserError(
            f"--modules {show(given)} disagrees with the modules the factors in {factors_dir} were collected "
            f"from ({show(recorded)}); drop --modules (the factors name their modules) or collect again"
        )
    use_modules(model, given or recorded or None, blocks_path=blocks_path)


def check_factors(targets: list[tuple[Projection, float]], factors, where: str = "the factors") -> None:
    """:class:`UserError` when a target has no factors or factors of another shape (factors of another model).
    A biased target with ``(out, in + 1)`` factors (``--bias joint``) is marked ``homogeneous``: ``[W b]`` is edited."""
    if factors is None:
        raise UserError("this edit method needs K-FAC factors; pass --factors DIR (made by `kfac-edit collect`)")
    for proj, _ in targets:
        if proj.name not in factors:
            have = sorted({int(m.group(1)) for m in map(re.compile(r"\.(\d+)\.").search, factors.names) if m})
            raise UserError(
                f"no factors for {proj.name} (block {proj.block} {proj.kind}): {where} cover blocks "
                f"{have or 'none'}; collect factors for block {proj.block} or drop it from the layers JSON"
            )
        fshape = tuple(factors.shape(proj.name))
        if not proj.fits(fshape):
            raise UserError(
                f"factors for {proj.name} fit a weight of shape {fshape[0]}x{fshape[1]} (out x in) but the model's "
                f"weight is {proj.shape[0]}x{proj.shape[1]}: the factors come from another model; collect factors "
                "for this model"
            )


def without_bias_coordinate(factors, targets: list[tuple[Projection, float]]):
    """``factors`` with each target's ``A`` over ``[a; 1]`` (collected with ``--bias joint``) cut to ``a`` alone,
    exactly the ``--bias keep`` factor, so ``W`` alone is edited; the targets stop being homogeneous."""
    modules = dict(factors.modules)
    sliced: dict[str, torch.Tensor] = {}
    for proj, _ in targets:
        proj.homogeneous = False
        if tuple(factors.shape(proj.name)) == proj.factor_shape:  # already over a
            continue
        mf = modules[proj.name]
        key = mf.activation_key + BIAS_SUFFIX  # not the key of the full A any more
        if key not in sliced:
            sliced[key] = mf.activation_sum[:-1, :-1].contiguous()
        modules[proj.name] = ModuleFactors(sliced[key], mf.grad_sum, mf.activation_tokens, mf.grad_tokens, key)
    return Factors(modules, factors.manifest) if sliced else factors


def edit_factors(model: nn.Module, targets: list[tuple[Projection, float]], spec: EditSpec, factors,
                 protect: Protection | None = None) -> tuple[Any, Protection | None]:  # fmt: skip
    """Check ``factors`` (and ``protect``'s) against the targets and return both as the edit uses them: cut to
    ``a`` under ``--bias keep``; under ``--bias joint`` the two must be over the same inputs, ``a`` or ``[a; 1]``."""
    if protect is not None:
        check_protection(model, targets, protect.factors, "the --protect factors")
    check_factors(targets, factors)  # after check_protection: the edit's factors decide what is homogeneous
    if spec.bias == "keep":
        factors = without_bias_coordinate(factors, targets)
        if protect is not None:
            protect = Protection(without_bias_coordinate(protect.factors, targets), protect.weight)
    for proj, _ in targets if protect is not None else []:
        if tuple(protect.factors.shape(proj.name)) != tuple(factors.shape(proj.name)):
            raise UserError(
                f"the --protect factors of {proj.name} fit {tuple(protect.factors.shape(proj.name))} but the edit's "
                f"factors fit {tuple(factors.shape(proj.name))}: one set was collected with --bias keep, the other "
                "with --bias joint; collect both with the same --bias, or edit with --bias keep"
            )
    return factors, protect


def check_factors_dir(method: Method | str, factors_dir: str | os.PathLike | None) -> None:
    """:class:`UserError` when ``method`` needs factors and ``factors_dir`` is not given or not a directory."""
    method = Method.parse(method, "edit method")
    if not method.needs_factors:
        return
    if factors_dir is None:
        raise UserError(f"method {method} needs K-FAC factors: pass --factors DIR (made by `kfac-edit collect`)")
    if not Path(factors_dir).is_dir():
        raise UserError(f"--factors {factors_dir} is not a directory; give the directory `kfac-edit collect` wrote")


def check_edit_inputs(spec: EditSpec, factors_dir: str | os.PathLike | None) -> None:
    """The checks that need no model: ``spec`` edits something and, if its method needs them, factors are given."""
    if not spec.edits_something:
        raise UserError(
            "the layers JSON edits nothing (no projection has keep_mass below 0.9999); give e.g. " + LAYERS_EXAMPLE
        )
    check_factors_dir(spec.method, factors_dir)


def load_edit_factors(model: nn.Module, spec: EditSpec, factors_dir: str | os.PathLike | None):
    """The factors ``spec`` needs from ``factors_dir`` (only its targets' modules), checked; ``None`` for ``svd``."""
    if not spec.needs_factors:
        return None
    targets = resolve_targets(model, spec)
    factors = Factors.load(factors_dir, names=[p.name for p, _ in targets])
    check_factors(targets, factors, where=f"the factors in {factors_dir}")
    return factors


def load_protect_factors(model: nn.Module, spec: EditSpec, protect_dir: str | os.PathLike):
    """The protected capability's factors of ``spec``'s targets from ``protect_dir``, checked against ``model``."""
    targets = resolve_targets(model, spec)
    where = f"the --protect factors in {protect_dir}"
    manifest_names = set(Factors.load(protect_dir, names=[]).manifest.get("modules", {}))
    missing = [p.name for p, _ in targets if p.name not in manifest_names]
    if missing:
        raise UserError(
            f"{where} hold no factors for {missing[0]}: they cover other modules; collect the protected capability's "
            "factors for the edited layers"
        )
    protect = Factors.load(protect_dir, names=[p.name for p, _ in targets])
    check_protection(model, targets, protect, where)
    return protect


def restore(model: nn.Module) -> list[str]:
    """Put back the original weights of every module :func:`apply_edit` changed (exactly); returns their names."""
    originals = model.__dict__.pop(ORIGINALS_ATTR, {})
    with torch.no_grad():
        for name, weight in originals.items():
            target = _original_of(model, name)
            target.copy_(weight.to(target.device))
    return [name for name in originals if not name.endswith(BIAS_SUFFIX)]


def _original_of(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor an :data:`ORIGINALS_ATTR` key names: a module's weight as stored, its bias (``name#bias``: edited
    jointly with the weight), or the ``(out, in)`` view of an expert projection's matrix."""
    if name.endswith(BIAS_SUFFIX):
        return model.get_submodule(name.removesuffix(BIAS_SUFFIX)).bias
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        return expert_weight(model, name)


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


DEFAULT_PROTECT_WEIGHT = 0.9  # --protect-weight: share of the protected curvature whose pairs are kept


@dataclass
class Protection:
    """A capability to keep: its K-FAC ``factors`` (collected on its data) and the ``weight`` of its selection.

    The edit keeps the union of the method's selection and the top pairs (selected like ``kfac``'s) by the
    protected mass ``(u_G[i]ᵀ G_p u_G[i])·(u_A[j]ᵀ A_p u_A[j])`` (:func:`~kfac_edit.curvature.projected_mass`)
    holding ``weight`` of its total, both in the edited module's eigenbasis. ``weight`` 0 protects nothing.
    """

    factors: Any
    weight: float = DEFAULT_PROTECT_WEIGHT

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise UserError(f"--protect-weight {self.weight} is outside [0, 1]; give the share of the protected "
                            "curvature to keep, e.g. 0.9")  # fmt: skip

    def mask(self, name: str, grad_eig, act_eig) -> torch.Tensor:
        """The protected selection of module ``name``, a bool ``(out, in)`` mask."""
        mass = self.masses(name, grad_eig, act_eig)
        return pairs_mask(select_pairs(mass[0], mass[1], self.weight), mass[1], device=grad_eig.vectors.device)

    def masses(self, name: str, grad_eig, act_eig) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_G[i]ᵀ G_p u_G[i])_i`` and ``(u_A[j]ᵀ A_p u_A[j])_j``: the protected mass is their outer product."""
        return (diagonal_in_basis(self.factors.grad_cov(name), grad_eig),
                diagonal_in_basis(self.factors.activation_cov(name), act_eig))  # fmt: skip


def check_protection(model: nn.Module, targets: list[tuple[Projection, float]], protect, where: str) -> None:
    """:class:`UserError` when the protected factors come from another model or lack a target module."""
    recorded = (getattr(protect, "manifest", None) or {}).get("model_fingerprint")
    if recorded and recorded != model_fingerprint(model):
        raise UserError(
            f"{where} were collected on another model (config fingerprint {recorded}, this model "
            f"{model_fingerprint(model)}); collect the protected capability's factors with this model"
        )
    check_factors(targets, protect, where=where)


def _weight_change(weight: torch.Tensor, new_weight: torch.Tensor) -> float:
    """``‖W' − W‖ / ‖W‖`` (Frobenius, in fp32 or fp64); 0 for a zero ``W``."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    norm = float(weight.to(wide).norm())
    return float((new_weight.to(wide) - weight.to(wide)).norm()) / norm if norm > 0 else 0.0


def _edit_one(
    proj: Projection, keep_mass: float, spec: EditSpec, factors, cache: EigenCache, originals: dict[str, torch.Tensor],
    ekfac=None, protect: Protection | None = None,
) -> ModuleEdit:  # fmt: skip
    """Edit one projection in place (its original goes into ``originals`` first) and describe the edit."""
    t0 = time.perf_counter()
    if spec.method is Method.SVD:
        proj.homogeneous = False  # the data-free baseline truncates W alone
    weight = proj.affine_weight().detach()  # [W b] for a homogeneous projection
    device = weight.device
    grad_eig, act_eig = cache.get(factors, proj.name, device) if spec.needs_factors else (None, None)
    eigen_seconds = time.perf_counter() - t0 if spec.needs_factors else 0.0
    out_dim, in_dim = proj.factor_shape
    protected = own_mass = None
    if spec.method in (Method.KFAC, Method.KFAC_INDEPENDENT, Method.EKFAC):
        if spec.method is Method.EKFAC:
            own_mass = ekfac.pair_mass(proj.name)
            mask = select_mass(own_mass, keep_mass).to(device)
        else:  # per-row counts: no dense mask
            select = select_pairs if spec.method is Method.KFAC else independent_counts
            mask = select(grad_eig.values, act_eig.values, keep_mass)
        if protect is not None:
            if mask.dim() == 1:
                mask = pairs_mask(mask, act_eig.values, device=device)
            mask |= protect.mask(proj.name, grad_eig, act_eig)
            protected = pair_mass_fraction(*protect.masses(proj.name, grad_eig, act_eig), mask.cpu())
        halves = cache.half_products(factors, proj.name, weight) if mask.dim() == 1 else None  # kept across a sweep
        new_weight = project_weight(weight, grad_eig, act_eig, mask, halves=halves)
        kept = pair_stats(grad_eig.values, act_eig.values, mask)
        if own_mass is not None:
            kept.mass_fraction = kept_mass_fraction(own_mass, mask)
    elif spec.method is Method.SVD:
        new_weight, rank, energy = svd_truncate(weight, keep_mass)
        kept = PairStats(rank, min(out_dim, in_dim), energy, rank, rank)
    else:  # random: as many coefficients as the kfac edit keeps
        n_keep = int(select_pairs(grad_eig.values, act_eig.values, keep_mass).sum())
        new_weight = random_basis_edit(weight, n_keep, seed=_module_seed(spec.seed, proj.name))
        kept = PairStats(n_keep, out_dim * in_dim, None, None, None)
    change = _weight_change(weight, new_weight)
    originals[proj.name] = proj.module.weight.detach().to("cpu", copy=True)
    if proj.homogeneous:
        originals[proj.name + BIAS_SUFFIX] = proj.module.bias.detach().to("cpu", copy=True)
    proj.set_affine_weight(new_weight)
    record = ModuleEdit(
        name=proj.name, block=proj.block, kind=proj.kind, shape=(out_dim, in_dim), method=spec.method.value,
        keep_mass=keep_mass, **asdict(kept), pairs_fraction=kept.pairs_fraction, weight_change=change,
        eigen_seconds=round(eigen_seconds, 4), seconds=round(time.perf_counter() - t0, 4),
        protected_mass_fraction=protected, bias=proj.homogeneous,
    )
    log.debug("%s", record)
    return record


def _bsn_edits(targets, bsn, originals: dict[str, torch.Tensor], model: nn.Module) -> list[ModuleEdit]:
    """The ``bsn`` method: learn the masks of every target jointly (:func:`~kfac_edit.bsn.learn_masks`), apply them."""
    if bsn is None:
        raise UserError("method bsn learns from data: give --forget FILE (records to remove) and --clean-data SOURCE")
    t0 = time.perf_counter()
    masks = learn_masks(model, targets, bsn.data, bsn.config)
    seconds = (time.perf_counter() - t0) / max(1, len(targets))
    records = []
    for proj, keep in targets:
        weight = proj.weight().detach()
        new_weight = masked_weight(proj, masks[proj.name])
        change = _weight_change(weight, new_weight)
        kept = PairStats(int(masks[proj.name].sum()), weight.numel(), None, None, None)
        originals[proj.name] = proj.module.weight.detach().to("cpu", copy=True)
        proj.set_weight(new_weight)
        records.append(ModuleEdit(
            name=proj.name, block=proj.block, kind=proj.kind, shape=proj.shape, method=Method.BSN.value,
            keep_mass=keep, **asdict(kept), pairs_fraction=kept.pairs_fraction, weight_change=change,
            eigen_seconds=0.0, seconds=round(seconds, 4),
        ))
    return records


def apply_edit(
    model: nn.Module, factors, spec: EditSpec, cache: EigenCache | None = None, *, ekfac=None,
    protect: Protection | None = None, bsn=None,
) -> EditReport:  # fmt: skip
    """Edit ``model`` in place as ``spec`` says and return an :class:`EditReport`.

    ``factors``: ``None`` is fine for ``svd``. ``ekfac``: the :class:`~kfac_edit.factors.ekfac.Ekfac` eigenvalues
    of ``factors`` (method ``ekfac``). ``protect``: a :class:`Protection`. ``bsn``: a
    :class:`~kfac_edit.bsn.BsnInputs` for method ``bsn``, which learns one mask per target jointly (``keep_mass`` =
    share of entries kept). ``cache`` reuses eigendecompositions across calls (a fresh in-memory one by default).

    Every check runs before any weight changes. A model edited earlier is first restored: edits never compound,
    so a sweep just calls this again.
    """
    start = time.perf_counter()
    restore(model)
    targets = resolve_targets(model, spec)
    if protect is not None and spec.method not in (Method.KFAC, Method.KFAC_INDEPENDENT, Method.EKFAC):
        raise UserError(f"--protect works with the kfac, kfac-independent and ekfac methods, not {spec.method}")
    if spec.needs_factors:
        factors, protect = edit_factors(model, targets, spec, factors, protect)
        recorded = (getattr(factors, "manifest", None) or {}).get("model_fingerprint")
        if recorded and targets and recorded != model_fingerprint(model):
            log.warning("the factors were collected on a model with another config (fingerprint %s, this model %s); "
                        "shapes match, so editing goes on", recorded, model_fingerprint(model))  # fmt: skip
    if spec.method is Method.EKFAC:
        if ekfac is None:
            raise UserError("--method ekfac needs EK-FAC eigenvalues: run `kfac-edit collect --ekfac` for the factors")
        ekfac.check_basis(factors, [p.name for p, _ in targets])
    cache = cache if cache is not None else EigenCache(None)
    originals: dict[str, torch.Tensor] = {}
    model.__dict__[ORIGINALS_ATTR] = originals  # a plain attribute: not a buffer, so never saved with the model
    try:
        if spec.method is Method.BSN:
            modules = _bsn_edits(targets, bsn, originals, model)
        else:
            bar = tqdm(targets, desc=f"edit ({spec.method})", unit="module", disable=None)
            modules = [_edit_one(p, keep, spec, factors, cache, originals, ekfac, protect) for p, keep in bar]
    except BaseException:  # a failure part-way (NaN factors, out of memory, Ctrl-C) leaves the model as it was
        restore(model)
        raise
    cfg = getattr(model, "config", None)
    return EditReport(
        method=spec.method.value,
        spec=spec.to_dict(),
        modules=modules,
        factor_manifest=dict(getattr(factors, "manifest", None) or {}),
        model=getattr(cfg, "_name_or_path", None) or None,
        model_fingerprint=model_fingerprint(model),
        seconds=round(time.perf_counter() - start, 4),
        eigen_cache={"directory": str(cache.directory) if cache.directory else None, **asdict(cache.stats)},
    )


# Save ---------------------------------------------------------------------------------------------------------------


def check_output_dir(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """:class:`UserError` unless ``out_dir`` is new, empty, or an earlier edited directory (which is replaced)."""
    out = Path(out_dir).expanduser()
    if source is not None and Path(source).expanduser().exists():
        if out.resolve() == Path(source).expanduser().resolve():
            raise UserError(f"--out {out} is the model's own directory; write the edited model somewhere else")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; choose a new path")
        if any(out.iterdir()) and not (out / EDIT_REPORT_FILE).exists():
            raise UserError(
                f"--out {out} exists and is not an edited model directory (no {EDIT_REPORT_FILE}); choose a new path "
                "or remove it"
            )
    return out


def save_edited(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: EditReport) -> Path:
    """Write ``out_dir`` atomically (complete or not at all; an earlier edited directory is replaced whole):
    ``save_pretrained`` of the model (and tokenizer) plus ``edit_report.json``."""
    out = check_output_dir(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / EDIT_REPORT_FILE, report.to_dict())
    return out


def edit_model_dir(
    model: str,
    spec: EditSpec,
    out_dir: str | os.PathLike,
    factors_dir: str | os.PathLike | None = None,
    device: str | None = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    protect_dir: str | os.PathLike | None = None,
    protect_weight: float = DEFAULT_PROTECT_WEIGHT,
    bsn: tuple | None = None,
    modules: str | dict[str, str] | None = None,
) -> EditReport:
    """What ``kfac-edit edit`` does: load, check everything, edit, save ``out_dir`` (nothing is written on error).

    ``cache_dir`` defaults to :func:`~kfac_edit.eigen.default_cache_dir`; ``modules`` as :func:`declare_modules`.
    Under ``torchrun`` the ranks first share out the eigendecompositions, every rank edits, the main rank writes.
    ``bsn``: ``(forget records file, clean-text SOURCE, BsnConfig)`` for method ``bsn``.
    """
    check_edit_inputs(spec, factors_dir)
    check_output_dir(out_dir, source=model)
    if protect_dir is not None:
        Protection(None, protect_weight)  # the weight's check, before loading anything
        if not Path(protect_dir).is_dir():
            raise UserError(f"--protect {protect_dir} is not a directory; give factors `kfac-edit collect` wrote")
    if spec.method is Method.EKFAC and not Ekfac.exists(factors_dir):
        Ekfac.load(factors_dir)  # the one-line error saying how to make them
    ctx = init_distributed(resolve_device(device))
    try:
        net, _ = load_model(model, dtype=dtype, device=str(rank_device(resolve_device(device), ctx)))
        declare_modules(net, modules, factors_dir)
        factors = load_edit_factors(net, spec, factors_dir)
        cache = EigenCache.default(cache_dir)
        names = [p.name for p, _ in resolve_targets(net, spec)]
        if ctx.enabled and factors is not None:
            distributed_eigendecompose(factors, names, cache, ctx, device=next(net.parameters()).device)
        ekfac = Ekfac.load(factors_dir, names=names) if spec.method is Method.EKFAC else None
        protect = None
        if protect_dir is not None:
            protect = Protection(load_protect_factors(net, spec, protect_dir), protect_weight)
        tokenizer = load_tokenizer_as_saved(model)
        inputs = None
        if bsn is not None:
            forget, clean, bsn_config = bsn
            vocab, context = net.get_input_embeddings().num_embeddings, model_limits(net.config)[1]
            data = load_bsn_data(forget, clean, tokenizer, bsn_config, vocab_size=vocab, context=context)
            inputs = BsnInputs(data, bsn_config)
        report = apply_edit(net, factors, spec, cache=cache, ekfac=ekfac, protect=protect, bsn=inputs)
        if protect_dir is not None:
            report.factor_manifest["protect"] = {"directory": str(protect_dir), "weight": protect_weight}
        report.factor_manifest.setdefault("directory", str(factors_dir) if factors_dir is not None else None)
        if ctx.is_main:
            save_edited(net, tokenizer, out_dir, report)
    finally:
        shutdown(ctx)
    return report
