"""On-disk and in-memory K-FAC factors: per module (named by its path, e.g. ``model.layers.23.mlp.up_proj``)
**sums** and **counts** (conventions in :mod:`kfac_edit.factors.collector`):

* ``activation_sum`` ``Σ a aᵀ`` ``(in, in)`` and ``grad_sum`` ``Σ g gᵀ`` ``(out, out)``;
* ``activation_tokens`` and ``grad_tokens``: the rows (tokens) that went into each.

Means (:meth:`Factors.activation_cov`, :meth:`Factors.grad_cov`) are ``sum / tokens``; sums and counts kept apart let
partial runs, resumes and ranks add up exactly (:meth:`Factors.add_`). Modules reading one input (a block's
``gate_proj`` and ``up_proj``) share an **activation key**, the name of the module owning the activation sum: one
tensor in memory, stored once.

Directory layout (format version 2)::

    DIR/factors.safetensors   tensors "<activation key>.activation_sum" and "<module>.grad_sum" (fp32 sums)
    DIR/manifest.json         configuration, per-module shapes, activation keys and token counts, and a run id

Both files carry the same ``run_id`` and the manifest is written last, so an interrupted save never loads. The
manifest's ``checksums`` (``{tensor name: sha256}``; absent in older directories) are verified for every tensor a
load reads, and :meth:`Factors.check_sane` checks what it read (finite, symmetric, positive trace, non-negative
diagonal, token counts > 0): damaged, zero or non-PSD factors never reach an edit. Version 1 directories (tensors
``*.activation_cov``/``*.grad_cov`` holding the same sums, named by ``activation_cov_key``/``grad_cov_key``) load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import MANIFEST_FILE, TENSORS_FILE
from ..errors import UserError, first_line
from ..fileio import atomic_path, json_text
from ..identity import tensor_checksum, tensors_digest

FORMAT_VERSION = 2
ACTIVATION_SUM = "activation_sum"  # tensor "<activation key>.activation_sum"
GRAD_SUM = "grad_sum"  # tensor "<module>.grad_sum"
V1_ACTIVATION_KEY, V1_GRAD_KEY = "activation_cov_key", "grad_cov_key"  # version 1 manifest: tensor names
CHECKSUMS = "checksums"  # manifest field: {tensor name: sha256 hex of the tensor's bytes}
SYMMETRY_TOLERANCE = 1e-3  # max |S - Sᵀ| allowed, relative to max |S|


@dataclass
class ModuleFactors:
    """Sums and counts for one module: ``activation_sum`` (in, in), ``grad_sum`` (out, out). ``activation_key``
    names the activation sum: the module's own name, or that of the module whose input it reads too (``up_proj`` ->
    its block's ``gate_proj``); modules with one key hold one tensor."""

    activation_sum: torch.Tensor
    grad_sum: torch.Tensor
    activation_tokens: int = 0
    grad_tokens: int = 0
    activation_key: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """The weight shape ``(out, in)`` these factors belong to."""
        return (self.grad_sum.shape[0], self.activation_sum.shape[0])


class ModuleSet:
    """Per-module results ``modules`` (by module name) and the ``manifest`` saying how they were made."""

    def __init__(self, modules: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None):
        self.modules = dict(modules or {})
        self.manifest: dict[str, Any] = dict(manifest or {})

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def __len__(self) -> int:
        return len(self.modules)


class Factors(ModuleSet):
    """K-FAC factors of several modules plus the manifest describing how they were collected."""

    def __init__(self, modules: dict[str, ModuleFactors] | None = None, manifest: dict[str, Any] | None = None):
        super().__init__(modules, manifest)
        for name, mf in self.modules.items():
            mf.activation_key = mf.activation_key or name
        self._hashes: dict[str, str] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_means(
        cls, means: dict[str, tuple[torch.Tensor, torch.Tensor, int]], manifest: dict[str, Any] | None = None
    ) -> "Factors":
        """Build from ``{name: (activation_cov_mean, grad_cov_mean, n_tokens)}`` (e.g. imported or in tests); a module
        given the very activation tensor of an earlier one, with its count (gate/up), shares its activation sum."""
        modules: dict[str, ModuleFactors] = {}
        for name, (act, grad, n) in means.items():
            n = int(n)
            owner = next((k for k, (a, _, m) in means.items() if a is act and int(m) == n), name)
            act_sum = modules[owner].activation_sum if owner != name else act * n
            modules[name] = ModuleFactors(act_sum, grad * n, n, n, owner)
        return cls(modules, manifest)

    # ------------------------------------------------------------------ access
    def _get(self, name: str) -> ModuleFactors:
        if name not in self.modules:
            have = ", ".join(self.names[:6]) + (" ..." if len(self.modules) > 6 else "")
            raise UserError(f"no factors for module '{name}' (these factors hold: {have}); collect factors for that layer")
        return self.modules[name]

    def activation_cov(self, name: str) -> torch.Tensor:
        """Mean ``A = E[a aᵀ]`` of module ``name``, shape ``(in, in)``."""
        mf = self._get(name)
        return mf.activation_sum / max(mf.activation_tokens, 1)

    def grad_cov(self, name: str) -> torch.Tensor:
        """Mean ``G = E[g gᵀ]`` of module ``name``, shape ``(out, out)``."""
        mf = self._get(name)
        return mf.grad_sum / max(mf.grad_tokens, 1)

    def tokens(self, name: str) -> int:
        return self._get(name).grad_tokens

    def shape(self, name: str) -> tuple[int, int]:
        return self._get(name).shape

    def activation_sums(self) -> dict[str, torch.Tensor]:
        """``{activation key: sum}``: each activation sum once."""
        out: dict[str, torch.Tensor] = {}
        for mf in self.modules.values():
            out.setdefault(mf.activation_key, mf.activation_sum)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every sum tensor once (a shared activation sum appears once): what to all-reduce or checkpoint."""
        return [*self.activation_sums().values(), *(mf.grad_sum for mf in self.modules.values())]

    def nbytes(self) -> int:
        """Memory held by the sums (shared tensors counted once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def content_hash(self, name: str) -> str:
        """A hash of the module's factor tensors and counts (a cache key for eigendecompositions)."""
        if name not in self._hashes:
            mf = self._get(name)
            counts = f"{mf.activation_tokens},{mf.grad_tokens}"
            self._hashes[name] = tensors_digest((mf.activation_sum, mf.grad_sum), extra=counts)
        return self._hashes[name]

    def check_finite(self) -> None:
        """Raise :class:`UserError` naming the first module whose factors hold NaN or Inf."""
        for name, mf in self.modules.items():
            for label, t in ((ACTIVATION_SUM, mf.activation_sum), (GRAD_SUM, mf.grad_sum)):
                if not torch.isfinite(t).all():
                    raise UserError(
                        f"{name}.{label} contains NaN/Inf; collect in float32 (--dtype float32) or check the model"
                    )

    def check_sane(self, where: str = "") -> None:
        """Raise :class:`UserError` naming the first module whose factors could not come from a collection: sums of
        outer products are symmetric PSD with a positive trace and counts are positive integers; anything else
        (NaN/Inf, asymmetry, a zero trace, a negated G, no tokens) would make an edit keep nothing or nonsense."""
        for name, mf in self.modules.items():
            problem = _factor_problem(mf)
            if problem:
                place = f"factors in {where} for {name}" if where else f"factors of {name}"
                raise UserError(f"{place} are {problem}; recollect them")

    # ------------------------------------------------------------------ arithmetic
    def subset(self, names: Iterable[str]) -> "Factors":
        """The modules ``names`` (those held), sharing this object's tensors."""
        return Factors({n: self.modules[n] for n in names if n in self.modules})

    def add_(self, other: "Factors") -> "Factors":
        """Add another set of sums and counts into this one (resume, ranks, partial passes)."""
        mine = self.activation_sums()
        for key, theirs in other.activation_sums().items():  # each activation sum once
            if key in mine:
                if mine[key].shape != theirs.shape:
                    shapes = f"{tuple(mine[key].shape)} and {tuple(theirs.shape)}"
                    raise UserError(f"cannot add factors of {key}: activation shapes {shapes} differ")
                mine[key] += theirs.to(mine[key])
            else:
                mine[key] = theirs.clone()
        for name, mf in other.modules.items():
            if name not in self.modules:
                self.modules[name] = replace(mf, activation_sum=mine[mf.activation_key], grad_sum=mf.grad_sum.clone())
                continue
            have = self.modules[name]
            if have.shape != mf.shape:
                raise UserError(f"cannot add factors of {name}: shapes {have.shape} and {mf.shape} differ")
            have.grad_sum += mf.grad_sum.to(have.grad_sum)
            have.activation_tokens += mf.activation_tokens
            have.grad_tokens += mf.grad_tokens
        self._hashes.clear()
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Factors":
        """Move every tensor (keeping shared activation sums shared). ``device`` may be ``{module name: device}``."""
        where = {name: device.get(name) if isinstance(device, dict) else device for name in self.modules}
        key_device = {mf.activation_key: where[name] for name, mf in reversed(self.modules.items())}
        moved = {key: t.to(device=key_device[key], dtype=dtype) for key, t in self.activation_sums().items()}
        for name, mf in self.modules.items():
            mf.activation_sum = moved[mf.activation_key]
            mf.grad_sum = mf.grad_sum.to(device=where[name], dtype=dtype)
        return self

    # ------------------------------------------------------------------ I/O
    def save(self, directory: str | os.PathLike, keep_dtype: bool = False) -> Path:
        """Write ``factors.safetensors`` and ``manifest.json`` into ``directory`` (atomically, manifest last); sums are
        stored as fp32 unless ``keep_dtype`` (checkpoints keep fp64 sums of an fp64 model exact)."""
        directory = Path(directory)
        made = not directory.exists()
        run_id = uuid.uuid4().hex
        tensors = {f"{key}.{ACTIVATION_SUM}": t for key, t in self.activation_sums().items()}
        tensors.update({f"{name}.{GRAD_SUM}": mf.grad_sum for name, mf in self.modules.items()})
        tensors = {k: t.detach().to("cpu", None if keep_dtype else torch.float32).contiguous() for k, t in tensors.items()}
        manifest = {k: v for k, v in self.manifest.items() if k not in ("modules", "run_id", "format_version", CHECKSUMS)}
        kept = "sums in their accumulation dtype" if keep_dtype else "fp32 sums"
        manifest.update(format_version=FORMAT_VERSION, run_id=run_id, stored=f"{kept}; mean = sum / tokens")
        manifest["modules"] = {
            name: {"shape": list(mf.shape), "activation_key": mf.activation_key,
                   "activation_tokens": mf.activation_tokens, "grad_tokens": mf.grad_tokens}
            for name, mf in self.modules.items()
        }  # fmt: skip
        manifest[CHECKSUMS] = {key: tensor_checksum(t) for key, t in tensors.items()}
        header = {"run_id": run_id, "manifest": json.dumps(manifest, default=str)}
        try:  # both contents are written before either file is replaced (a full disk fails here, the old pair
            # intact); then the tensors are renamed into place, the manifest last
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(directory / MANIFEST_FILE) as manifest_tmp, atomic_path(directory / TENSORS_FILE) as tmp:
                save_file(tensors, str(tmp), metadata=header)  # I/O errors: one line (fileio)
                manifest_tmp.write_text(json_text(manifest))
        except BaseException:
            if made:  # a save that fails (a full disk) leaves no empty directory behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        self.manifest = manifest
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, names: Iterable[str] | None = None, device: str = "cpu") -> "Factors":
        """Load factors saved by :meth:`save` (format version 1 or 2; ``names``: only these modules), checksums and
        :meth:`check_sane` verified: a damaged or implausible directory is a one-line :class:`UserError`."""
        directory = Path(directory)
        manifest_path, tensors_path = directory / MANIFEST_FILE, directory / TENSORS_FILE
        if not manifest_path.is_file() or not tensors_path.is_file():
            raise UserError(
                f"'{directory}' holds no complete factors ({MANIFEST_FILE} or {TENSORS_FILE} missing); "
                "run `kfac-edit collect` (or `import-factors`) to make them"
            )

        def damaged(why: str) -> UserError:
            return UserError(f"factors in {directory} are damaged ({why}); recollect them")

        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise damaged(f"{MANIFEST_FILE} is not valid JSON: {first_line(exc)}") from None
        if not isinstance(manifest, dict):
            raise damaged(f"{MANIFEST_FILE} holds a {type(manifest).__name__}, not an object")
        version = manifest.get("format_version", 1)
        if version not in (1, FORMAT_VERSION):
            raise UserError(f"{manifest_path} has format version {version}; this kfac-edit reads 1 and {FORMAT_VERSION}")
        entries, checksums = manifest.get("modules", {}), manifest.get(CHECKSUMS) or {}
        if not isinstance(entries, dict) or not isinstance(checksums, dict):
            raise damaged(f"{MANIFEST_FILE} field 'modules' or '{CHECKSUMS}' is not an object")
        try:
            fh_context = safe_open(str(tensors_path), framework="pt", device=device)
        except Exception as exc:  # safetensors' errors for a truncated, empty or garbled file; OSError
            raise damaged(f"{TENSORS_FILE} cannot be read: {first_line(exc)}") from None
        modules: dict[str, ModuleFactors] = {}
        loaded: dict[str, torch.Tensor] = {}  # activation key -> its sum, read once
        with fh_context as fh:
            if (fh.metadata() or {}).get("run_id") != manifest.get("run_id"):
                raise UserError(
                    f"{tensors_path} and {manifest_path} come from different runs (an interrupted save?); "
                    "collect the factors again"
                )
            held = set(fh.keys())

            def read(tensor_name: str) -> torch.Tensor:
                if tensor_name not in held:
                    raise damaged(f"{TENSORS_FILE} has no tensor '{tensor_name}' that {MANIFEST_FILE} names")
                try:
                    t = fh.get_tensor(tensor_name)
                except Exception as exc:
                    raise damaged(f"tensor '{tensor_name}' cannot be read: {first_line(exc)}") from None
                if tensor_name in checksums and tensor_checksum(t) != checksums[tensor_name]:
                    raise damaged(f"tensor '{tensor_name}' does not match its checksum")
                return t

            for name in list(entries) if names is None else list(names):
                if name not in entries:
                    raise UserError(f"no factors for module '{name}' in {directory}; collect factors for that layer")
                entry = entries[name]
                try:
                    if version == 1:  # tensor names in the manifest; the activation key is the owner's module name
                        atensor, gtensor = entry[V1_ACTIVATION_KEY], entry[V1_GRAD_KEY]
                        akey = atensor.removesuffix(".activation_cov")
                    else:
                        akey = entry["activation_key"]
                        atensor, gtensor = f"{akey}.{ACTIVATION_SUM}", f"{name}.{GRAD_SUM}"
                    counts = entry["activation_tokens"], entry["grad_tokens"]  # integers: check_sane
                except (KeyError, TypeError, AttributeError) as exc:
                    raise damaged(f"the manifest entry of {name} is incomplete ({type(exc).__name__}: {exc})") from None
                if akey not in loaded:
                    loaded[akey] = read(atensor)
                modules[name] = ModuleFactors(loaded[akey], read(gtensor), *counts, akey)
        factors = cls(modules, manifest)
        factors.check_sane(str(directory))
        return factors


def _factor_problem(mf: ModuleFactors) -> str | None:
    """What is wrong with one module's sums and counts, or ``None``."""
    for label, count in (("activation", mf.activation_tokens), ("grad", mf.grad_tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            return f"from no tokens ({label} token count {count!r}, not a positive integer)"
    for label, t in ((ACTIVATION_SUM, mf.activation_sum), (GRAD_SUM, mf.grad_sum)):
        if t.dim() != 2 or t.shape[0] != t.shape[1]:
            return f"not square ({label} has shape {tuple(t.shape)})"
        if not bool(torch.isfinite(t).all()):
            return f"not finite ({label} holds NaN or Inf)"
        t64 = t.detach().to(torch.float64)
        scale = float(t64.abs().max()) if t64.numel() else 0.0
        diagonal = torch.diagonal(t64)
        if not float(diagonal.sum()) > 0:
            return f"not positive semi-definite ({label} has trace {float(diagonal.sum()):.3g}, not > 0)"
        if float(diagonal.min()) < -SYMMETRY_TOLERANCE * scale:
            return f"not positive semi-definite ({label} has a negative diagonal entry)"
        asym = float((t64 - t64.T).abs().max())
        if asym > SYMMETRY_TOLERANCE * scale:
            return f"not symmetric ({label}: max |S - S^T| is {asym / scale:.2g} of max |S|)"
    return None


def check_writable(out: Path, overwrite: bool) -> None:
    """Raise :class:`UserError` unless ``out`` may receive factors (a directory without factors, or ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a directory")
    if ((out / MANIFEST_FILE).exists() or (out / TENSORS_FILE).exists()) and not overwrite:
        raise UserError(f"'{out}' already holds factors; pass --overwrite to replace them or pick another --out")
