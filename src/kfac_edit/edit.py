"""Apply, restore and save a curvature edit of a model's MLP weights.

An :class:`EditSpec` says which projections of which blocks to edit and how much curvature mass to keep
(``keep_mass``, the ρ of :mod:`kfac_edit.curvature`, whose docstring states every convention). :func:`apply_edit`
edits a model in place, from K-FAC :class:`~kfac_edit.factors.store.Factors`, and remembers the original weights so
:func:`restore` puts them back bit for bit. :func:`save_edited` writes a standard Hugging Face model directory
(loadable by ``AutoModelForCausalLM.from_pretrained`` and lm-eval) plus ``edit_report.json``.

Methods (``EditSpec.method``):

* ``kfac``: keep the smallest set of top-mass eigen-pairs of ``G ⊗ A`` holding ``keep_mass`` of the mass;
* ``kfac-independent``: keep the top eigenvectors of ``G`` and of ``A`` each holding ``keep_mass`` of its trace;
* ``svd``: data-free baseline, keep the top singular directions of ``W`` holding ``keep_mass`` of Σσ²;
* ``random``: control, keep as many coefficients as ``kfac`` would, at random positions in a random orthogonal
  basis pair.

Eigendecompositions are cached (:class:`EigenCache`) in memory and on disk, keyed by the factors' content hash,
so a sweep over ``keep_mass`` pays each ``eigh`` once.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time
import weakref
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .curvature import (
    Eigen,
    eigendecompose,
    independent_mask,
    pair_stats,
    project_weight,
    random_basis_edit,
    select_pairs,
    svd_truncate,
)
from .errors import UserError
from .fileio import atomic_dir, atomic_path, cache_root, write_json
from .models import PROJECTIONS, Projection, find_projections, model_fingerprint, model_type, num_blocks
from .models import projection_kinds

log = logging.getLogger(__name__)

METHODS = ("kfac", "kfac-independent", "svd", "random")
NO_EDIT_AT = 0.9999  # keep_mass at or above this: the projection is left as it is (reference convention)
REPORT_FILE = "edit_report.json"
_EXAMPLE = '{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}'


# ---------------------------------------------------------------------------------------------------------------
# What to edit
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EditSpec:
    """Which projections to edit and the keep_mass of each.

    ``keep_mass`` maps ``(block, kind)`` to a value in ``[0, 1]``; only projections listed there are edited
    (entries at or above 0.9999 are dropped when parsing, as in the reference). ``method`` is one of
    :data:`METHODS`; ``seed`` feeds the random bases of the ``random`` control.
    """

    keep_mass: dict[tuple[int, str], float] = field(default_factory=dict)
    method: str = "kfac"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown edit method '{self.method}'; use one of {', '.join(METHODS)}")
        for (block, kind), value in self.keep_mass.items():
            if kind not in PROJECTIONS:
                raise UserError(f"unknown projection '{kind}' for block {block}; use gate, up or down")
            if not isinstance(block, int) or block < 0:
                raise UserError(f"block '{block}' is not a block index; use keys like \"23\"")
            if not 0.0 <= value <= 1.0:
                raise UserError(
                    f"keep_mass {value} for block {block} {kind} is outside [0, 1]; give the fraction of curvature "
                    "mass to keep, e.g. 0.6"
                )

    @property
    def needs_factors(self) -> bool:
        return self.method != "svd"

    @property
    def blocks(self) -> list[int]:
        return sorted({block for block, _ in self.keep_mass})

    @classmethod
    def from_json(cls, source: str | dict, method: str | None = None, seed: int | None = None) -> "EditSpec":
        """Parse the reference layers JSON, ``{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}``.

        Keys are block indices, values map projection kinds to keep_mass. A missing projection or a keep_mass
        ``>= 0.9999`` is not edited. The dict written by :meth:`to_dict` (``{"method", "seed", "layers"}``) is
        accepted too; ``method`` and ``seed`` given here win over its own (defaults: ``kfac`` and 0).
        """
        if isinstance(source, str):
            try:
                data = json.loads(source)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"the layers JSON is malformed at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                    f"write e.g. {_EXAMPLE}"
                ) from None
        else:
            data = source
        if not isinstance(data, dict):
            raise UserError(f"the layers JSON must be an object of blocks, e.g. {_EXAMPLE}")
        if "layers" in data and isinstance(data["layers"], dict):
            method = method if method is not None else data.get("method")
            seed = seed if seed is not None else data.get("seed")
            data = data["layers"]
        keep: dict[tuple[int, str], float] = {}
        for key, kinds in data.items():
            try:
                block = int(key)
            except (TypeError, ValueError):
                raise UserError(f"layers JSON key '{key}' is not a block index; write e.g. {_EXAMPLE}") from None
            if block < 0:
                raise UserError(f"layers JSON key '{key}' is negative; blocks count from 0")
            if not isinstance(kinds, dict):
                raise UserError(
                    f"layers JSON block {key} must map projections to keep_mass, e.g. {{\"gate\": 0.6}}; "
                    f"got {json.dumps(kinds)}"
                )
            for kind, value in kinds.items():
                if kind not in PROJECTIONS:
                    raise UserError(
                        f"unknown projection '{kind}' in block {key} of the layers JSON; use gate, up or down"
                    )
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(
                        f"keep_mass for block {key} {kind} must be a number in [0, 1], got {json.dumps(value)}"
                    )
                value = float(value)
                if not 0.0 <= value <= 1.0:
                    raise UserError(
                        f"keep_mass {value} for block {key} {kind} is outside [0, 1]; give the fraction of curvature "
                        "mass to keep, e.g. 0.6"
                    )
                if value < NO_EDIT_AT:
                    keep[(block, kind)] = value
        return cls(keep, method=method or "kfac", seed=int(seed or 0))

    @classmethod
    def from_file(cls, path: str | os.PathLike, method: str | None = None, seed: int | None = None) -> "EditSpec":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the layers file '{path}': {exc.strerror}") from None
        try:
            return cls.from_json(text, method=method, seed=seed)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def layers(self) -> dict[str, dict[str, float]]:
        """The reference layers mapping (block index as a string -> {kind: keep_mass})."""
        out: dict[str, dict[str, float]] = {}
        for (block, kind) in sorted(self.keep_mass, key=lambda bk: (bk[0], PROJECTIONS.index(bk[1]))):
            out.setdefault(str(block), {})[kind] = self.keep_mass[(block, kind)]
        return out

    def to_json(self) -> str:
        """The reference layers JSON (method and seed are not part of it: see :meth:`to_dict`)."""
        return json.dumps(self.layers())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "layers": self.layers()}


# ---------------------------------------------------------------------------------------------------------------
# Eigendecomposition cache
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$KFAC_EDIT_CACHE/eigen`` when that variable is set, else ``~/.cache/kfac-edit/eigen``."""
    return cache_root("eigen")


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0


class EigenCache:
    """Eigendecompositions of ``G`` and ``A`` per module, in memory (LRU, ``memory_bytes``) and on disk.

    Disk entries are ``DIR/<content hash>.safetensors`` (fp64 ``grad_values``, ``grad_vectors``, ``act_values``,
    ``act_vectors``), keyed by :meth:`Factors.content_hash`: factors that change get new entries, never stale
    ones. ``directory=None`` keeps the cache in memory only. Within one cache, modules that share one activation
    sum (``gate`` and ``up`` of a block) share one eigendecomposition of ``A``.
    """

    def __init__(self, directory: str | os.PathLike | None = None, memory_bytes: int = 4 << 30):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.memory_bytes = int(memory_bytes)
        self.stats = CacheStats()
        self._memory: OrderedDict[str, tuple[Eigen, Eigen]] = OrderedDict()
        self._shared_act: dict[int, tuple[torch.Tensor, int, Eigen]] = {}

    @classmethod
    def default(cls) -> "EigenCache":
        return cls(default_cache_dir())

    def get(self, factors, name: str, device: torch.device | str = "cpu") -> tuple[Eigen, Eigen]:
        """``(grad_eig, act_eig)`` of module ``name``, on ``device`` (computed there on a miss)."""
        key = factors.content_hash(name)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            grad, act = self._memory[key]
            return grad.to(device), act.to(device)
        loaded = self._load(key, device)
        if loaded is not None:
            self.stats.disk_hits += 1
            self._remember(key, loaded)
            return loaded
        grad = eigendecompose(factors.grad_cov(name).to(device), f"{name} grad_cov")
        act = self._activation_eigen(factors, name, device)
        self.stats.computed += 1
        self._save(key, name, grad, act)
        self._remember(key, (grad, act))
        return grad, act

    def put(self, factors, name: str, grad: Eigen, act: Eigen) -> None:
        """Hold an eigendecomposition made elsewhere (e.g. by another rank: :mod:`kfac_edit.eigen_dist`) in memory."""
        self._remember(factors.content_hash(name), (grad, act))

    def clear_memory(self) -> None:
        """Drop the in-memory entries (the disk entries stay)."""
        self._memory.clear()
        self._shared_act.clear()

    def _activation_eigen(self, factors, name: str, device) -> Eigen:
        module = getattr(factors, "modules", {}).get(name)
        act_sum = getattr(module, "activation_sum", None)
        if act_sum is not None:
            held = self._shared_act.get(id(act_sum))
            if held is not None and held[0] is act_sum and held[1] == module.activation_count:
                return held[2].to(device)
        act = eigendecompose(factors.activation_cov(name).to(device), f"{name} activation_cov")
        if act_sum is not None:
            self._shared_act[id(act_sum)] = (act_sum, module.activation_count, act.to("cpu"))
        return act

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    def _load(self, key: str, device) -> tuple[Eigen, Eigen] | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(path), device=str(device))
            return Eigen(t["grad_values"], t["grad_vectors"]), Eigen(t["act_values"], t["act_vectors"])
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("ignoring unreadable eigen cache entry %s (%s)", path, exc)
            return None

    def _save(self, key: str, name: str, grad: Eigen, act: Eigen) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        tensors = {
            "grad_values": grad.values,
            "grad_vectors": grad.vectors,
            "act_values": act.values,
            "act_vectors": act.vectors,
        }
        try:
            with atomic_path(path) as tmp:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"module": name}
                )
        except OSError as exc:
            log.warning("cannot write the eigen cache %s (%s); continuing without it", path, exc)

    def _remember(self, key: str, pair: tuple[Eigen, Eigen]) -> None:
        self._memory[key] = (pair[0].to("cpu"), pair[1].to("cpu"))  # held on the CPU: no GPU memory kept
        self._memory.move_to_end(key)
        while len(self._memory) > 1 and self._memory_used() > self.memory_bytes:
            self._memory.popitem(last=False)

    def _memory_used(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for pair in self._memory.values()
            for eig in pair
            for t in (eig.values, eig.vectors)
        )


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModuleEdit:
    """What one projection's edit kept.

    ``mass_fraction``: share of the method's own mass kept (curvature mass ``λ_G[i]·μ_A[j]`` for ``kfac`` and
    ``kfac-independent``, Σσ² for ``svd``, ``None`` for ``random``). ``pairs_kept``/``pairs_total``: coefficients
    kept (eigen-pairs; for ``svd`` singular directions out of ``min(out, in)``). ``grad_vectors_used`` /
    ``act_vectors_used``: distinct G / A eigenvectors (left / right singular vectors for ``svd``).
    ``weight_change``: ``‖W' − W‖ / ‖W‖`` (Frobenius).
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
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        d = asdict(self)
        d["kfac_edit_version"] = __version__
        return d

    def summary(self) -> str:
        lines = []
        for m in self.modules:
            mass = f"mass {m.mass_fraction:.4f}" if m.mass_fraction is not None else "mass n/a"
            lines.append(
                f"{m.name}: {m.method} keep {m.keep_mass:g}: {m.pairs_kept} of {m.pairs_total} coefficients "
                f"({100 * m.pairs_fraction:.3g}%), {mass}, weight change {m.weight_change:.3f}, {m.seconds:.2f} s"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Apply / restore
# ---------------------------------------------------------------------------------------------------------------

# Original weights of edited modules, per model: {module name: copy of module.weight as stored}.
_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _factor_blocks(names: list[str]) -> list[int]:
    blocks = set()
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m:
            blocks.add(int(m.group(1)))
    return sorted(blocks)


def resolve_targets(model: nn.Module, spec: EditSpec) -> list[tuple[Projection, float]]:
    """The projections ``spec`` edits, with their keep_mass; :class:`UserError` for blocks or kinds the model lacks."""
    if not spec.keep_mass:
        return []
    n = num_blocks(model)
    kinds = projection_kinds(model)
    for block, kind in spec.keep_mass:
        if not 0 <= block < n:
            raise UserError(f"block {block} does not exist: the model has blocks 0..{n - 1}; fix the layers JSON")
        if kind not in kinds:
            raise UserError(
                f"projection '{kind}' does not exist in a {model_type(model)} model (it has {', '.join(kinds)}); "
                "remove it from the layers JSON"
            )
    used = sorted({kind for _, kind in spec.keep_mass}, key=PROJECTIONS.index)
    found = find_projections(model, layers=spec.blocks, projections=used)
    return [(p, spec.keep_mass[(p.block, p.kind)]) for p in found if (p.block, p.kind) in spec.keep_mass]


def check_factors(targets: list[tuple[Projection, float]], factors, where: str = "the factors") -> None:
    """:class:`UserError` when a target has no factors or factors of another shape (factors of another model)."""
    if factors is None:
        raise UserError("this edit method needs K-FAC factors; pass --factors DIR (made by `kfac-edit collect`)")
    names = list(factors.names)
    for proj, _ in targets:
        if proj.name not in factors:
            have = _factor_blocks(names)
            raise UserError(
                f"no factors for {proj.name} (block {proj.block} {proj.kind}): {where} cover blocks "
                f"{have or 'none'}; collect factors for block {proj.block} or drop it from the layers JSON"
            )
        fshape = tuple(factors.shape(proj.name))
        if fshape != tuple(proj.shape):
            raise UserError(
                f"factors for {proj.name} fit a weight of shape {fshape[0]}x{fshape[1]} (out x in) but the model's "
                f"weight is {proj.shape[0]}x{proj.shape[1]}: the factors come from another model; collect factors "
                "for this model"
            )


def restore(model: nn.Module) -> list[str]:
    """Put back the original weights of every module :func:`apply_edit` changed (exactly); returns their names."""
    originals = _ORIGINALS.pop(model, {})
    with torch.no_grad():
        for name, weight in originals.items():
            module = model.get_submodule(name)
            module.weight.copy_(weight.to(module.weight.device))
    return list(originals)


def is_edited(model: nn.Module) -> bool:
    return bool(_ORIGINALS.get(model))


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _edit_one(
    proj: Projection, keep: float, spec: EditSpec, factors, cache: EigenCache, originals: dict[str, torch.Tensor]
) -> ModuleEdit:
    """Edit one projection in place (its original goes into ``originals`` first) and describe the edit."""
    t0 = time.perf_counter()
    weight = proj.weight().detach()
    device = weight.device
    eigen_seconds = 0.0
    grad_eig = act_eig = None
    if spec.needs_factors:
        grad_eig, act_eig = cache.get(factors, proj.name, device)
        eigen_seconds = time.perf_counter() - t0
    out_dim, in_dim = proj.shape
    if spec.method in ("kfac", "kfac-independent"):
        if spec.method == "kfac":
            mask = select_pairs(grad_eig.values, act_eig.values, keep)
        else:
            mask = independent_mask(grad_eig.values, act_eig.values, keep)
        new_weight = project_weight(weight, grad_eig, act_eig, mask.to(device))
        stats = pair_stats(grad_eig.values, act_eig.values, mask)
        kept = (
            stats.mass_fraction,
            stats.pairs_kept,
            stats.pairs_total,
            stats.grad_vectors_used,
            stats.act_vectors_used,
        )
    elif spec.method == "svd":
        new_weight, rank, energy = svd_truncate(weight, keep)
        kept = (energy, rank, min(out_dim, in_dim), rank, rank)
    else:  # random: as many coefficients as the kfac edit keeps
        mask = select_pairs(grad_eig.values, act_eig.values, keep)
        n_keep = int(mask.view(torch.uint8).sum(dtype=torch.int64))
        del mask
        new_weight = random_basis_edit(weight, n_keep, seed=_module_seed(spec.seed, proj.name))
        kept = (None, n_keep, out_dim * in_dim, None, None)
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    norm = float(weight.to(wide).norm())
    change = float((new_weight.to(wide) - weight.to(wide)).norm()) / norm if norm > 0 else 0.0
    originals[proj.name] = proj.module.weight.detach().to("cpu", copy=True)
    proj.set_weight(new_weight)
    mass_fraction, pairs_kept, pairs_total, grad_used, act_used = kept
    record = ModuleEdit(
        name=proj.name,
        block=proj.block,
        kind=proj.kind,
        shape=(out_dim, in_dim),
        method=spec.method,
        keep_mass=keep,
        mass_fraction=mass_fraction,
        pairs_kept=pairs_kept,
        pairs_total=pairs_total,
        pairs_fraction=pairs_kept / pairs_total if pairs_total else 0.0,
        grad_vectors_used=grad_used,
        act_vectors_used=act_used,
        weight_change=change,
        eigen_seconds=round(eigen_seconds, 4),
        seconds=round(time.perf_counter() - t0, 4),
    )
    log.debug("%s", record)
    return record


def apply_edit(model: nn.Module, factors, spec: EditSpec, cache: EigenCache | None = None) -> EditReport:
    """Edit ``model`` in place as ``spec`` says and return an :class:`EditReport`.

    Every check (blocks, projection kinds, factors present and of the right shape) runs before any weight
    changes. A model edited earlier is first restored: edits never compound, so a sweep just calls this again.
    ``factors`` may be ``None`` for the ``svd`` method. Pass an :class:`EigenCache` to reuse eigendecompositions
    across calls (and, with a directory, across runs); without one each call keeps its own in memory.
    """
    from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    start = time.perf_counter()
    restore(model)
    targets = resolve_targets(model, spec)
    if spec.needs_factors:
        check_factors(targets, factors)
        recorded = (getattr(factors, "manifest", None) or {}).get("model_fingerprint")
        if recorded and targets and recorded != model_fingerprint(model):
            log.warning(
                "the factors were collected on a model with another config (fingerprint %s, this model %s); "
                "shapes match, so editing goes on",
                recorded,
                model_fingerprint(model),
            )
    cache = cache if cache is not None else EigenCache(None)
    originals: dict[str, torch.Tensor] = {}
    _ORIGINALS[model] = originals
    modules: list[ModuleEdit] = []
    try:
        for proj, keep in tqdm(targets, desc=f"edit ({spec.method})", unit="module", disable=None):
            modules.append(_edit_one(proj, keep, spec, factors, cache, originals))
    except BaseException:  # a failure part-way (NaN factors, out of memory, Ctrl-C) leaves the model as it was
        restore(model)
        raise
    cfg = getattr(model, "config", None)
    return EditReport(
        method=spec.method,
        spec=spec.to_dict(),
        modules=modules,
        factor_manifest=dict(getattr(factors, "manifest", {}) or {}) if factors is not None else {},
        model=getattr(cfg, "_name_or_path", None) or None,
        model_fingerprint=model_fingerprint(model),
        seconds=round(time.perf_counter() - start, 4),
        eigen_cache={"directory": str(cache.directory) if cache.directory else None, **asdict(cache.stats)},
    )


# ---------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------


def check_output_dir(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """:class:`UserError` unless ``out_dir`` is new, empty, or an earlier edited directory (which is replaced)."""
    out = Path(out_dir).expanduser()
    if source is not None and Path(source).expanduser().exists():
        if out.resolve() == Path(source).expanduser().resolve():
            raise UserError(f"--out {out} is the model's own directory; write the edited model somewhere else")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; choose a new path")
        if any(out.iterdir()) and not (out / REPORT_FILE).exists():
            raise UserError(
                f"--out {out} exists and is not an edited model directory (no {REPORT_FILE}); choose a new path "
                "or remove it"
            )
    return out


def save_edited(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: EditReport) -> Path:
    """Write ``out_dir`` atomically: ``save_pretrained`` of the model (and tokenizer) plus ``edit_report.json``.

    The directory appears complete or not at all; an earlier edited directory there is replaced whole.
    """
    out = check_output_dir(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT_FILE, report.to_dict())
    return out


def _resolve_dtype(model: str, dtype: str) -> torch.dtype:
    """``auto``: the dtype the checkpoint was saved in (float32 when it does not say)."""
    from .models import DTYPES

    if dtype != "auto":
        return DTYPES[dtype]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{model}': {str(exc).splitlines()[0]}") from None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored.removeprefix("torch."))
    return stored if isinstance(stored, torch.dtype) else torch.float32


def edit_model_dir(
    model: str,
    spec: EditSpec,
    out_dir: str | os.PathLike,
    factors_dir: str | os.PathLike | None = None,
    device: str | None = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> EditReport:
    """What ``kfac-edit edit`` does: load, check everything, edit, save ``out_dir`` (nothing is written on error).

    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    from .factors.store import Factors
    from .models import load_model

    if not spec.keep_mass:
        raise UserError(
            "the layers JSON edits nothing (no projection has keep_mass below 0.9999); give e.g. " + _EXAMPLE
        )
    check_output_dir(out_dir, source=model)
    if spec.needs_factors:
        if factors_dir is None:
            raise UserError(
                f"method {spec.method} needs K-FAC factors: pass --factors DIR (made by `kfac-edit collect`)"
            )
        if not Path(factors_dir).is_dir():
            raise UserError(f"--factors {factors_dir} is not a directory; give the directory `kfac-edit collect` wrote")
    net, _ = load_model(model, dtype=_resolve_dtype(model, dtype), device=device)
    targets = resolve_targets(net, spec)
    factors = None
    if spec.needs_factors:
        factors = Factors.load(factors_dir, names=[p.name for p, _ in targets])
        check_factors(targets, factors, where=f"the factors in {factors_dir}")
    cache = EigenCache(cache_dir if cache_dir is not None else default_cache_dir())
    report = apply_edit(net, factors, spec, cache=cache)
    report.factor_manifest.setdefault("directory", str(factors_dir) if factors_dir is not None else None)
    tokenizer = load_tokenizer_as_saved(model)
    save_edited(net, tokenizer, out_dir, report)
    return report


def load_tokenizer_as_saved(model: str):
    """The model's tokenizer exactly as stored (no pad token or padding side added), to save beside the edit."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        log.warning("the model has no loadable tokenizer (%s); the edited directory will hold none", exc)
        return None
