"""On-disk and in-memory K-FAC factors.

For each module (named by its path, e.g. ``model.layers.23.mlp.up_proj``) we keep **sums** and **counts**:

* ``activation_cov`` sum: Σ a aᵀ over the rows ``a`` of the layer input, shape ``(in, in)``;
* ``grad_cov`` sum: Σ g gᵀ over the rows ``g`` of the gradient of the summed token loss w.r.t. the layer output,
  shape ``(out, out)``;
* the number of rows (tokens) that went into each.

Means (``A = E[a aᵀ]``, ``G = E[g gᵀ]``) are ``sum / count``. Keeping sums and counts apart lets partial runs,
resumed runs and ranks add up exactly (:meth:`Factors.add_`). ``gate_proj`` and ``up_proj`` read the same input:
their ``activation_cov`` may be one shared tensor, stored once on disk.

Directory layout::

    DIR/factors.safetensors   tensors "<module>.activation_cov" and "<module>.grad_cov" (fp32 sums)
    DIR/manifest.json         configuration, per-module shapes, counts and aliases, and a run id

Both files carry the same ``run_id``; the manifest is written last, so an interrupted save never loads.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import MANIFEST_FILE, TENSORS_FILE
from ..errors import UserError
from ..fileio import atomic_path, write_json
from ..identity import tensors_digest

FORMAT_VERSION = 1


@dataclass
class ModuleFactors:
    """Sums and counts for one module. ``activation_sum`` is (in, in), ``grad_sum`` is (out, out)."""

    activation_sum: torch.Tensor
    grad_sum: torch.Tensor
    activation_count: int = 0
    grad_count: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """The weight shape ``(out, in)`` these factors belong to."""
        return (self.grad_sum.shape[0], self.activation_sum.shape[0])


class Factors:
    """K-FAC factors of several modules plus the manifest describing how they were collected."""

    def __init__(self, modules: dict[str, ModuleFactors] | None = None, manifest: dict[str, Any] | None = None):
        self.modules: dict[str, ModuleFactors] = dict(modules or {})
        self.manifest: dict[str, Any] = dict(manifest or {})
        self._hashes: dict[str, str] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_means(
        cls, means: dict[str, tuple[torch.Tensor, torch.Tensor, int]], manifest: dict[str, Any] | None = None
    ) -> "Factors":
        """Build from ``{name: (activation_cov_mean, grad_cov_mean, n_tokens)}`` (e.g. imported or in tests).

        Modules given the same activation tensor object with the same count (gate/up) share one activation sum.
        """
        modules = {}
        shared: dict[tuple[int, int], torch.Tensor] = {}
        for name, (act, grad, n) in means.items():
            n = int(n)
            key = (id(act), n)
            if key not in shared:
                shared[key] = act * n
            modules[name] = ModuleFactors(shared[key], grad * n, n, n)
        return cls(modules, manifest)

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def __len__(self) -> int:
        return len(self.modules)

    def _get(self, name: str) -> ModuleFactors:
        try:
            return self.modules[name]
        except KeyError:
            have = ", ".join(self.names[:6]) + (" ..." if len(self.modules) > 6 else "")
            raise UserError(
                f"no factors for module '{name}' (these factors hold: {have}); collect factors for that layer"
            ) from None

    def activation_cov(self, name: str) -> torch.Tensor:
        """Mean ``A = E[a aᵀ]`` of module ``name``, shape ``(in, in)``."""
        mf = self._get(name)
        return mf.activation_sum / max(mf.activation_count, 1)

    def grad_cov(self, name: str) -> torch.Tensor:
        """Mean ``G = E[g gᵀ]`` of module ``name``, shape ``(out, out)``."""
        mf = self._get(name)
        return mf.grad_sum / max(mf.grad_count, 1)

    def tokens(self, name: str) -> int:
        return self._get(name).grad_count

    def shape(self, name: str) -> tuple[int, int]:
        return self._get(name).shape

    def tensors(self) -> list[torch.Tensor]:
        """Every sum tensor once (a shared activation sum appears once): what to all-reduce or checkpoint."""
        seen: dict[int, torch.Tensor] = {}
        for mf in self.modules.values():
            for t in (mf.activation_sum, mf.grad_sum):
                seen.setdefault(id(t), t)
        return list(seen.values())

    def nbytes(self) -> int:
        """Memory held by the sums (shared tensors counted once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def content_hash(self, name: str) -> str:
        """A hash of the module's factor tensors and counts (a cache key for eigendecompositions)."""
        if name not in self._hashes:
            mf = self._get(name)
            counts = f"{mf.activation_count},{mf.grad_count}"
            self._hashes[name] = tensors_digest((mf.activation_sum, mf.grad_sum), extra=counts)
        return self._hashes[name]

    def check_finite(self) -> None:
        """Raise :class:`UserError` naming the first module whose factors hold NaN or Inf."""
        for name, mf in self.modules.items():
            for label, t in (("activation_cov", mf.activation_sum), ("grad_cov", mf.grad_sum)):
                if not torch.isfinite(t).all():
                    raise UserError(
                        f"{name}.{label} contains NaN/Inf; collect in float32 (--dtype float32) or check the model"
                    )

    # ------------------------------------------------------------------ arithmetic
    def add_(self, other: "Factors") -> "Factors":
        """Add another set of sums and counts into this one (resume, ranks, partial passes)."""
        seen: dict[int, torch.Tensor] = {}
        cloned: dict[int, torch.Tensor] = {}  # other's shared activation sums stay shared in the copy
        for name, mf in other.modules.items():
            if name not in self.modules:
                key = id(mf.activation_sum)
                if key not in cloned:
                    cloned[key] = mf.activation_sum.clone()
                self.modules[name] = ModuleFactors(cloned[key], mf.grad_sum.clone(), mf.activation_count, mf.grad_count)
                continue
            mine = self.modules[name]
            if mine.shape != mf.shape:
                raise UserError(f"cannot add factors of {name}: shapes {mine.shape} and {mf.shape} differ")
            key = id(mine.activation_sum)
            if key not in seen:  # a shared (gate/up) activation sum is added once
                mine.activation_sum += mf.activation_sum.to(mine.activation_sum)
                seen[key] = mine.activation_sum
            mine.grad_sum += mf.grad_sum.to(mine.grad_sum)
            mine.activation_count += mf.activation_count
            mine.grad_count += mf.grad_count
        self._hashes.clear()
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Factors":
        """Move every tensor (keeping shared activation sums shared)."""
        moved: dict[int, torch.Tensor] = {}
        for mf in self.modules.values():
            key = id(mf.activation_sum)
            if key not in moved:
                moved[key] = mf.activation_sum.to(device=device, dtype=dtype)
            mf.activation_sum = moved[key]
            mf.grad_sum = mf.grad_sum.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ I/O
    def save(self, directory: str | os.PathLike, keep_dtype: bool = False) -> Path:
        """Write ``factors.safetensors`` and ``manifest.json`` into ``directory`` (atomically, manifest last).

        Sums are stored as fp32 unless ``keep_dtype`` (checkpoints keep fp64 sums of an fp64 model exact).
        """
        stored_dtype = None if keep_dtype else torch.float32
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex
        tensors: dict[str, torch.Tensor] = {}
        stored_key: dict[int, str] = {}
        module_entries: dict[str, dict[str, Any]] = {}
        for name, mf in self.modules.items():
            entry: dict[str, Any] = {
                "shape": list(mf.shape),
                "activation_tokens": mf.activation_count,
                "grad_tokens": mf.grad_count,
            }
            key = id(mf.activation_sum)
            if key in stored_key:
                entry["activation_cov_key"] = stored_key[key]
            else:
                stored_key[key] = entry["activation_cov_key"] = f"{name}.activation_cov"
                tensors[f"{name}.activation_cov"] = mf.activation_sum.detach().to("cpu", stored_dtype).contiguous()
            entry["grad_cov_key"] = f"{name}.grad_cov"
            tensors[f"{name}.grad_cov"] = mf.grad_sum.detach().to("cpu", stored_dtype).contiguous()
            module_entries[name] = entry
        manifest = {k: v for k, v in self.manifest.items() if k not in ("modules", "run_id", "format_version")}
        stored = "fp32 sums" if stored_dtype is not None else "sums in their accumulation dtype"
        manifest.update(format_version=FORMAT_VERSION, run_id=run_id, stored=f"{stored}; mean = sum / tokens")
        manifest["modules"] = module_entries
        header = {"run_id": run_id, "manifest": json.dumps(manifest, default=str)}
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        write_json(directory / MANIFEST_FILE, manifest)
        self.manifest = manifest
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, names: Iterable[str] | None = None, device: str = "cpu") -> "Factors":
        """Load factors saved by :meth:`save`; ``names`` restricts which modules are read."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        tensors_path = directory / TENSORS_FILE
        if not manifest_path.exists() or not tensors_path.exists():
            raise UserError(
                f"'{directory}' holds no complete factors ({MANIFEST_FILE} or {TENSORS_FILE} missing); "
                "run `kfac-edit collect` (or `import-factors`) to make them"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest_path} is not valid JSON ({exc}); collect the factors again") from exc
        wanted = list(manifest.get("modules", {})) if names is None else list(names)
        modules: dict[str, ModuleFactors] = {}
        loaded: dict[str, torch.Tensor] = {}
        with safe_open(str(tensors_path), framework="pt", device=device) as fh:
            meta = fh.metadata() or {}
            if meta.get("run_id") != manifest.get("run_id"):
                raise UserError(
                    f"{tensors_path} and {manifest_path} come from different runs (an interrupted save?); "
                    "collect the factors again"
                )
            for name in wanted:
                if name not in manifest.get("modules", {}):
                    raise UserError(f"no factors for module '{name}' in {directory}; collect factors for that layer")
                entry = manifest["modules"][name]
                akey, gkey = entry["activation_cov_key"], entry["grad_cov_key"]
                if akey not in loaded:
                    loaded[akey] = fh.get_tensor(akey)
                modules[name] = ModuleFactors(
                    loaded[akey], fh.get_tensor(gkey), int(entry["activation_tokens"]), int(entry["grad_tokens"])
                )
        return cls(modules, manifest)
