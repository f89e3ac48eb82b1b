"""Eigenbases of the K-FAC factors: where and how often :func:`kfac_edit.curvature.eigendecompose` runs.

**Cache.** :class:`EigenCache` holds ``(eig G, eig A)`` per module in memory (LRU) and on disk, keyed by the
factors' content hash: a sweep over ``keep_mass`` pays each ``eigh`` once, a rerun none. It also keeps each
module's :class:`~kfac_edit.curvature.HalfProducts`, since a sweep projects the same weight at every point.

**Spread over ranks.** A module costs ``out³ + in³``; ``gate`` and ``up`` of a block (one shared ``A``) are one
unit. Units go to ranks longest-processing-time-first (the slowest rank within 4/3 of the best balance); each
rank computes its units through its cache, and with ``share`` the owners broadcast the results to every rank.
``kfac-edit edit`` under ``torchrun`` does this before editing; by hand::

    ctx = init_distributed("cuda")
    cache = EigenCache(cache_dir)
    distributed_eigendecompose(factors, names, cache, ctx, device=f"cuda:{ctx.local_rank}")
    apply_edit(model, factors, spec, cache=cache)   # every eigendecomposition is now a cache hit
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .constants import EIGEN_CACHE
from .curvature import Eigen, HalfProducts, eigendecompose
from .errors import UserError
from .factors.distributed import DistContext, broadcast_tensor
from .fileio import atomic_path, cache_root
from .identity import tensor_checksum

log = logging.getLogger(__name__)

# Cache --------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$KFAC_EDIT_CACHE/eigen`` when that variable is set, else ``~/.cache/kfac-edit/eigen``."""
    return cache_root(EIGEN_CACHE)


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0


class EigenCache:
    """Eigendecompositions of ``G`` and ``A`` per module, in memory (LRU, ``memory_bytes``) and on disk.

    Disk entries are ``DIR/<content hash>.safetensors`` (fp64 ``grad_values``, ``grad_vectors``, ``act_values``,
    ``act_vectors``), keyed by :meth:`Factors.content_hash`: changed factors get new entries, never stale ones
    (``directory=None``: memory only). Modules sharing an activation sum share one eigendecomposition of ``A``.
    ``projection_bytes`` bounds the half-products of the modules projected before the current one (0 keeps none).
    """

    def __init__(
        self, directory: str | os.PathLike | None = None, memory_bytes: int = 4 << 30, projection_bytes: int = 2 << 30
    ):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.memory_bytes = int(memory_bytes)
        self.projection_bytes = int(projection_bytes)
        self._halves: OrderedDict[str, tuple[str, HalfProducts]] = OrderedDict()  # content hash -> (W digest, ..)
        self.stats = CacheStats()
        self._memory: OrderedDict[str, tuple[Eigen, Eigen]] = OrderedDict()
        self._shared_act: dict[str, tuple[torch.Tensor, int, Eigen]] = {}  # activation key -> (sum, tokens, eig A)

    @classmethod
    def default(cls, directory: str | os.PathLike | None = None) -> "EigenCache":
        """A cache on disk in ``directory`` (``--cache-dir``; not a file), or in :func:`default_cache_dir` when that
        is ``None``."""
        if directory is not None and Path(directory).expanduser().is_file():
            raise UserError(f"--cache-dir {directory} is a file; give a directory for the eigendecompositions")
        return cls(directory if directory is not None else default_cache_dir())

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
        """Hold an eigendecomposition made elsewhere (by another rank: :func:`distributed_eigendecompose`) in memory."""
        self._remember(factors.content_hash(name), (grad, act))

    def half_products(self, factors, name: str, weight: torch.Tensor) -> HalfProducts | None:
        """Module ``name``'s :class:`HalfProducts` for ``weight`` (new when the weight's bytes or the factors
        changed), to pass to :func:`~kfac_edit.curvature.project_weight`; ``None`` when ``projection_bytes`` is 0."""
        if self.projection_bytes <= 0:
            return None
        key, digest = factors.content_hash(name), tensor_checksum(weight)
        held = self._halves.pop(key, None)
        if held is None or held[0] != digest:
            held = (digest, HalfProducts())
        while self._halves and sum(h.nbytes for _, h in self._halves.values()) > self.projection_bytes:
            self._halves.popitem(last=False)
        self._halves[key] = held
        return held[1]

    def _activation_eigen(self, factors, name: str, device) -> Eigen:
        module = getattr(factors, "modules", {}).get(name)
        act_sum = getattr(module, "activation_sum", None)
        if act_sum is not None:
            held = self._shared_act.get(module.activation_key)
            if held is not None and held[0] is act_sum and held[1] == module.activation_tokens:
                return held[2].to(device)
        act = eigendecompose(factors.activation_cov(name).to(device), f"{name} activation_cov")
        if act_sum is not None:
            self._shared_act[module.activation_key] = (act_sum, module.activation_tokens, act.to("cpu"))
        return act

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    def _load(self, key: str, device) -> tuple[Eigen, Eigen] | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
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
        tensors = {f"{side}_{part}": getattr(eig, part).detach().cpu().contiguous()
                   for side, eig in (("grad", grad), ("act", act)) for part in ("values", "vectors")}  # fmt: skip
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"module": name})
        except OSError as exc:
            log.warning("cannot write the eigen cache %s (%s); continuing without it", path, exc)

    def _remember(self, key: str, pair: tuple[Eigen, Eigen]) -> None:
        self._memory[key] = (pair[0].to("cpu"), pair[1].to("cpu"))  # held on the CPU: no GPU memory kept
        self._memory.move_to_end(key)
        while len(self._memory) > 1 and self._memory_used() > self.memory_bytes:
            self._memory.popitem(last=False)

    def _memory_used(self) -> int:
        return sum(eig.nbytes for pair in self._memory.values() for eig in pair)  # compute-dtype copies too


# Spread over ranks --------------------------------------------------------------------------------------------------


def eigen_units(factors, names: Sequence[str]) -> list[tuple[list[str], float]]:
    """Units of work ``(module names, cost)``: modules sharing an activation sum are one unit (``A`` once)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(factors.modules[name].activation_key, []).append(name)
    return [
        (members, float(factors.shape(members[0])[1]) ** 3 + sum(float(factors.shape(n)[0]) ** 3 for n in members))
        for members in groups.values()
    ]


def assign_by_cost(units: Sequence[tuple[Sequence[str], float]], world_size: int) -> list[list[str]]:
    """Module names per rank, balancing the summed cost (largest unit first to the least loaded rank). Deterministic
    (ties to the lower rank, equal costs in the given order), so every rank computes the same plan."""
    load = [0.0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    for members, cost in sorted(units, key=lambda unit: -unit[1]):  # a stable sort: equal costs keep their order
        rank = load.index(min(load))
        load[rank] += cost
        out[rank].extend(members)
    return out


@dataclass
class EigenAssignment:
    """Who computed what: ``owner[name]`` is a rank; ``cost[rank]`` the summed n³; ``seconds`` this rank's time."""

    owner: dict[str, int]
    cost: list[float]
    seconds: float
    computed: list[str] = field(default_factory=list)


def distributed_eigendecompose(
    factors,
    names: Sequence[str],
    cache,
    ctx: DistContext,
    device: torch.device | str = "cpu",
    share: bool = True,
) -> EigenAssignment:
    """Eigendecompose ``G`` and ``A`` of ``names``, each module on one rank, balanced by n³ cost.

    ``factors`` must be the same on every rank. With ``share`` every rank's ``cache`` ends up holding every module
    (broadcast from its owner: bit-identical on all ranks); without it a rank holds its own modules. With one
    process this is a loop over ``cache.get``.
    """
    names = list(names)
    units = eigen_units(factors, names)
    plan = assign_by_cost(units, ctx.world_size)
    owner = {name: rank for rank, members in enumerate(plan) for name in members}
    cost = [sum(c for members, c in units if owner[members[0]] == r) for r in range(ctx.world_size)]
    start = time.perf_counter()
    mine = {name: cache.get(factors, name, device) for name in plan[ctx.rank]}
    seconds = time.perf_counter() - start
    if share and ctx.enabled:
        for name in names:  # the same order on every rank
            n_out, n_in = factors.shape(name)
            if owner[name] == ctx.rank:
                grad, act = (e.to(ctx.device) for e in mine[name])
            else:
                empty = lambda *shape: torch.empty(shape, dtype=torch.float64, device=ctx.device)  # noqa: E731
                grad, act = (Eigen(empty(n), empty(n, n)) for n in (n_out, n_in))
            for tensor in (grad.values, grad.vectors, act.values, act.vectors):
                broadcast_tensor(ctx, tensor, src=owner[name], what=f"sharing the eigendecomposition of {name}")
            if owner[name] != ctx.rank:
                cache.put(factors, name, grad.to(device), act.to(device))
    return EigenAssignment(owner, cost, seconds, list(mine))
