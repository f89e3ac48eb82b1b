"""EK-FAC eigenvalues: a second pass over the data in the K-FAC eigenbasis (the eigenvalue correction).

K-FAC gives pair ``(i, j)`` (the Fisher eigenvector ``u_G[i] ⊗ u_A[j]``, conventions in :mod:`kfac_edit.curvature`)
the mass ``λ_G[i]·μ_A[j]``, exact only when gradient and activation statistics are independent. EK-FAC keeps the
eigenbasis and takes the true second moment of the per-token weight gradient ``g aᵀ`` along the pair::

    E[(u_G[i]ᵀ g aᵀ u_A[j])²] = E[(u_G[i]ᵀ g)² (u_A[j]ᵀ a)²]      over the labelled tokens

:func:`collect_ekfac` runs the collector's step (same hooks, rows and labels) with hooks that rotate each valid row,
``a' = U_Aᵀ a`` and ``g' = U_Gᵀ g``, and add ``(g'²)ᵀ (a'²)`` to an ``(out, in)`` **pair sum** and ``a'²`` to an
``(in,)`` activation energy sum (``E[a'_j²] = u_A[j]ᵀ A u_A[j]``, for :mod:`kfac_edit.predict`): sums and a token
count, so passes add up (:meth:`Ekfac.add_`). With one token, or ``A`` of rank one, the moment is ``λ_i·μ_j``
exactly (tested); its total is ``E[|g|²|a|²]``, not ``tr(G)·tr(A)``. A biased layer whose factors are over
``[a; 1]`` (``--bias joint``) is rotated as ``[a; 1]`` too: its sums are ``(out, in + 1)`` and ``(in + 1,)``,
the pairs of ``[W b]``. A routed expert's rows are the labelled tokens routed to it (the collector's experts
tap). One process, no ranks.

Stored beside the factors (``kfac-edit collect --ekfac``): ``DIR/ekfac.safetensors`` holds ``"<module>.pair_sum"``
and ``"<module>.activation_energy_sum"``; its header and ``manifest.json``'s ``"ekfac"`` entry record per module
the token count and the **basis** (:meth:`Factors.content_hash` of the factors whose eigenvectors were used), which
:meth:`Ekfac.check_basis` compares: EK-FAC eigenvalues of other factors are refused in one line.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..constants import EKFAC_FILE, MANIFEST_FILE
from ..errors import UserError
from ..fileio import atomic_path, write_json
from ..models import Projection
from .collector import FactorCollector, accumulate_dtype_for, take_tokens
from .store import Factors, ModuleFactors, ModuleSet

PAIR_SUM = "pair_sum"  # tensor "<module>.pair_sum": Σ_t (g'_t²)ᵀ(a'_t²), (out, in)
ACTIVATION_ENERGY_SUM = "activation_energy_sum"  # tensor "<module>.activation_energy_sum": Σ_t a'_t², (in,)


@dataclass
class EkfacModule:
    """Second-moment sums of one module in the eigenbasis of the factors whose content hash is ``basis``."""

    pair_sum: torch.Tensor  # (out, in)
    activation_energy_sum: torch.Tensor  # (in,)
    tokens: int
    basis: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pair_sum.shape)


class Ekfac(ModuleSet):
    """EK-FAC pair masses of several modules (``modules``: :class:`EkfacModule`; see the module docstring)."""

    def _get(self, name: str) -> EkfacModule:
        if name not in self.modules:
            raise UserError(
                f"no EK-FAC eigenvalues for {name}; run `kfac-edit collect --ekfac` with this module's layer"
            )
        return self.modules[name]

    def pair_mass(self, name: str) -> torch.Tensor:
        """``E[(u_G[i]ᵀ g aᵀ u_A[j])²]``, ``(out, in)`` fp64."""
        m = self._get(name)
        return m.pair_sum.to(torch.float64) / max(m.tokens, 1)

    def activation_energy(self, name: str) -> torch.Tensor:
        """``E[(u_A[j]ᵀ a)²]``, ``(in,)`` fp64."""
        m = self._get(name)
        return m.activation_energy_sum.to(torch.float64) / max(m.tokens, 1)

    def add_(self, other: "Ekfac") -> "Ekfac":
        """Add another pass's sums (same modules in the same basis) into this one."""
        for name, theirs in other.modules.items():
            mine = self.modules.get(name)
            if mine is None:
                self.modules[name] = replace(theirs, pair_sum=theirs.pair_sum.clone(),
                                             activation_energy_sum=theirs.activation_energy_sum.clone())  # fmt: skip
            elif mine.basis != theirs.basis or mine.shape != theirs.shape:
                raise UserError(f"cannot add EK-FAC sums of {name}: they were computed in different eigenbases")
            else:
                mine.pair_sum += theirs.pair_sum.to(mine.pair_sum)
                mine.activation_energy_sum += theirs.activation_energy_sum.to(mine.activation_energy_sum)
                mine.tokens += theirs.tokens
        return self

    def check_basis(self, factors: Factors, names: Iterable[str], where: str = "the EK-FAC eigenvalues") -> None:
        """:class:`UserError` unless every module of ``names`` was computed in the eigenbasis of ``factors``."""
        for name in names:
            m = self._get(name)
            if m.shape == (factors.shape(name)[0], factors.shape(name)[1] + 1):
                raise UserError(
                    f"{where} of {name} are over [a; 1] (factors collected with --bias joint), but this edit uses "
                    "--bias keep; drop --bias keep, or collect with --bias keep --ekfac"
                )
            if m.shape != tuple(factors.shape(name)):
                raise UserError(
                    f"{where} of {name} have shape {m.shape[0]}x{m.shape[1]} but its factors fit "
                    f"{factors.shape(name)[0]}x{factors.shape(name)[1]}: they belong to other factors; run "
                    "`kfac-edit collect --ekfac` again"
                )
            if m.basis != factors.content_hash(name):
                raise UserError(
                    f"{where} of {name} were computed in the eigenbasis of other factors (basis {m.basis}, these "
                    f"factors {factors.content_hash(name)}); run `kfac-edit collect --ekfac` on these factors"
                )

    # ------------------------------------------------------------------ I/O
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``DIR/ekfac.safetensors`` and record it in ``DIR/manifest.json`` (the factors' directory)."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.exists():
            raise UserError(f"'{directory}' holds no factors; EK-FAC eigenvalues are stored beside their factors")
        run_id = uuid.uuid4().hex
        entries = {name: {"tokens": m.tokens, "basis": m.basis, "shape": list(m.shape)} for name, m in self.modules.items()}
        meta = {k: v for k, v in self.manifest.items() if k != "modules"}
        record = {**meta, "file": EKFAC_FILE, "run_id": run_id, "modules": entries}
        tensors = {f"{name}.{key}": t.detach().cpu().contiguous() for name, m in self.modules.items()
                   for key, t in ((PAIR_SUM, m.pair_sum), (ACTIVATION_ENERGY_SUM, m.activation_energy_sum))}  # fmt: skip
        with atomic_path(directory / EKFAC_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"run_id": run_id, "ekfac": json.dumps(record, default=str)})
        manifest = json.loads(manifest_path.read_text())
        manifest["ekfac"] = record
        write_json(manifest_path, manifest)
        return directory / EKFAC_FILE

    @classmethod
    def exists(cls, directory: str | os.PathLike) -> bool:
        return (Path(directory) / EKFAC_FILE).exists()

    @classmethod
    def load(cls, directory: str | os.PathLike, names: Iterable[str] | None = None) -> "Ekfac":
        """Read ``DIR/ekfac.safetensors`` (``names``: only these modules)."""
        path = Path(directory) / EKFAC_FILE
        if not path.exists():
            raise UserError(
                f"'{directory}' holds no EK-FAC eigenvalues ({EKFAC_FILE}); run `kfac-edit collect --ekfac` "
                "for --method ekfac"
            )
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            record = json.loads((fh.metadata() or {}).get("ekfac", "{}"))
            entries = record.get("modules", {})
            modules = {}
            for name in list(entries) if names is None else list(names):
                if name not in entries:
                    raise UserError(
                        f"no EK-FAC eigenvalues for {name} in {path}; run `kfac-edit collect --ekfac` with its layer"
                    )
                e = entries[name]
                modules[name] = EkfacModule(
                    fh.get_tensor(f"{name}.{PAIR_SUM}"), fh.get_tensor(f"{name}.{ACTIVATION_ENERGY_SUM}"),
                    int(e["tokens"]), str(e["basis"]),
                )  # fmt: skip
        return cls(modules, record)


# ---------------------------------------------------------------------------------------------------- the pass
class EkfacCollector(FactorCollector):
    """The collector's step and hooks, adding in the eigenbases ``{module name: (grad_eig, act_eig)}`` to
    ``pair_sums`` and ``energy_sums`` (``factors`` holds only the token counts)."""

    def __init__(self, model: nn.Module, projections: Sequence[Projection], bases: dict, labels: str = "sampled",
                 seed: int = 0):  # fmt: skip
        self.bases = bases
        self.pair_sums: dict[str, torch.Tensor] = {}
        self.energy_sums: dict[str, torch.Tensor] = {}
        self._rotated: dict[str, torch.Tensor] = {}  # (u_Aᵀ a)² of this step's rows, until the gradient arrives
        super().__init__(model, projections, labels, seed)

    def _allocate(self) -> None:
        for p in self.projections:
            device, dtype = p.module.weight.device, accumulate_dtype_for(p.module)
            self.bases[p.name] = tuple(eig.to(device) for eig in self.bases[p.name])  # (grad_eig, act_eig)
            empty = torch.zeros(0, 0, dtype=dtype, device=device)  # counts only (see the class docstring)
            self.factors.modules[p.name] = ModuleFactors(empty, empty, activation_key=p.name)
            self.pair_sums[p.name] = torch.zeros(p.factor_shape, dtype=dtype, device=device)
            self.energy_sums[p.name] = torch.zeros(p.factor_shape[1], dtype=dtype, device=device)

    def _add_input(self, index: int, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if self.projections[index].homogeneous:  # [a; 1], as the factors' A
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        self._rotate(index, rows)

    def _add_expert_input(self, indices: list[int], rows: torch.Tensor) -> None:
        for index in indices:
            self._rotate(index, rows)

    def _rotate(self, index: int, rows: torch.Tensor) -> None:
        """Add ``(U_Aᵀ a)²`` of ``rows`` to the energy sum and keep it for the gradient of the same rows."""
        name = self.projections[index].name
        dtype = self.pair_sums[name].dtype
        squared = (rows.to(dtype) @ self.bases[name][1].vectors_as(dtype)).square_()
        self.energy_sums[name] += squared.sum(0)
        self._rotated[name] = squared

    def _add_grad(self, index: int, rows: torch.Tensor) -> None:
        name = self.projections[index].name
        total = self.pair_sums[name]
        rotated = (rows.to(total.dtype) @ self.bases[name][0].vectors_as(total.dtype)).square_()
        total.addmm_(rotated.T, self._rotated.pop(name))


def _projections_of(model: nn.Module, factors: Factors, names: Sequence[str]) -> list[Projection]:
    """The model's projections ``names``, each of the shape of its factors."""
    from ..models import find_projections, projection_kinds

    found = {p.name: p for p in find_projections(model, None, projection_kinds(model))}
    for name in names:
        if name not in found:
            raise UserError(f"the model has no module {name}: the factors come from another model")
        if not found[name].fits(factors.shape(name)):  # a biased layer's factors may be over [a; 1]
            raise UserError(f"factors for {name} fit {tuple(factors.shape(name))} but the model's weight is "
                            f"{found[name].shape}: the factors come from another model")  # fmt: skip
    return [found[n] for n in names]


def collect_ekfac(
    model: nn.Module,
    factors: Factors,
    batches: Iterable[dict[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    labels: str | None = None,
    seed: int | None = None,
    cache=None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> Ekfac:
    """EK-FAC second moments of ``names`` (default: every module of ``factors``) in the eigenbasis of ``factors``.

    ``batches``: ``{"input_ids", "attention_mask"[, "window_index"]}`` as for the K-FAC pass; with the same data,
    ``labels`` and ``seed`` (default: those in ``factors.manifest``) the sampled labels are the same. ``cache``: an
    :class:`~kfac_edit.eigen.EigenCache` for the eigenbases (default: one in memory). ``max_tokens``: stop before
    the batch that would start beyond this many real tokens.
    """
    from ..eigen import EigenCache
    from ..progress import progress_bar as tqdm

    names = list(factors.names if names is None else names)
    labels = labels or factors.manifest.get("labels") or "sampled"
    seed = int(seed if seed is not None else factors.manifest.get("seed") or 0)
    cache = cache if cache is not None else EigenCache(None)
    projections = _projections_of(model, factors, names)
    device = next(model.parameters()).device
    collector = EkfacCollector(model, projections, {n: cache.get(factors, n, device) for n in names}, labels, seed)
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="EK-FAC pass", disable=None if progress else True)
    with bar, collector:
        for batch in take_tokens(batches, max_tokens):
            before = collector.tokens
            collector.accumulate(batch)
            bar.update(collector.tokens - before)
    if collector.labelled_tokens == 0:
        raise UserError("no token with a label was seen in the EK-FAC pass; give it more text")
    manifest = {"labels": labels, "seed": seed, "tokens": collector.tokens, "labelled_tokens": collector.labelled_tokens}
    modules = {}
    for name in names:
        if not bool(torch.isfinite(collector.pair_sums[name]).all()):
            raise UserError(f"{name}: the EK-FAC sums contain NaN/Inf; collect in float32 (--dtype float32)")
        tokens = collector.factors.modules[name].grad_tokens
        modules[name] = EkfacModule(collector.pair_sums[name].cpu(), collector.energy_sums[name].cpu(), tokens,
                                    factors.content_hash(name))  # fmt: skip
    return Ekfac(modules, manifest)
