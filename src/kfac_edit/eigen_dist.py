"""Eigendecompositions of many factors spread over data-parallel ranks by their cost.

``eigh`` of an ``n x n`` matrix costs about ``n³``. A module's work is ``out³`` for ``G`` plus ``in³`` for ``A``;
``gate`` and ``up`` of one block share their ``A`` (one tensor in :class:`~kfac_edit.factors.store.Factors`), so
they form one unit of work, ``A`` decomposed once. Units go to ranks by longest-processing-time-first: the most
expensive unit to the least loaded rank, which keeps the slowest rank within 4/3 of the best possible balance.

Each rank computes its units through its :class:`~kfac_edit.edit.EigenCache` (which writes them to the cache
directory when it has one: on a shared filesystem every rank then finds every entry there), and with ``share`` the
owner broadcasts each result so that every rank's cache holds every module in memory.

Use under ``torchrun``/``accelerate launch`` after :func:`kfac_edit.factors.distributed.init_distributed`::

    ctx = init_distributed("cuda")
    cache = EigenCache(cache_dir)
    distributed_eigendecompose(factors, names, cache, ctx, device=f"cuda:{ctx.local_rank}")
    apply_edit(model, factors, spec, cache=cache)   # every eigendecomposition is now a cache hit
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .curvature import Eigen
from .factors.distributed import DistContext, broadcast_tensor

__all__ = ["EigenAssignment", "assign_by_cost", "eigen_units", "distributed_eigendecompose"]


def eigen_units(factors, names: Sequence[str]) -> list[tuple[list[str], float]]:
    """Units of work ``(module names, cost)``: modules sharing an activation sum are one unit (``A`` once)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(factors.modules[name].activation_key, []).append(name)
    units = []
    for members in groups.values():
        n_in = factors.shape(members[0])[1]
        cost = float(n_in) ** 3 + sum(float(factors.shape(n)[0]) ** 3 for n in members)
        units.append((members, cost))
    return units


def assign_by_cost(units: Sequence[tuple[Sequence[str], float]], world_size: int) -> list[list[str]]:
    """Module names per rank, balancing the summed cost (largest unit first to the least loaded rank).

    Deterministic: ties go to the lower rank, equal costs keep the given order, so every rank computes the same plan.
    """
    load = [0.0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    order = sorted(range(len(units)), key=lambda i: (-units[i][1], i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += units[i][1]
        out[rank].extend(units[i][0])
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

    ``factors`` must be the same on every rank (e.g. each loaded the same directory). With ``share`` every rank's
    ``cache`` ends up holding every module (broadcast from its owner, so bit-identical on all ranks); without it a
    rank holds its own modules (and the cache directory, if shared, all of them). With one process this is a plain
    loop over ``cache.get``.
    """
    names = list(names)
    units = eigen_units(factors, names)
    plan = assign_by_cost(units, ctx.world_size)
    owner = {name: rank for rank, members in enumerate(plan) for name in members}
    cost_of = {name: cost for members, cost in units for name in members[:1]}
    cost = [sum(cost_of.get(n, 0.0) for n in plan[r]) for r in range(ctx.world_size)]
    start = time.perf_counter()
    mine: dict[str, tuple[Eigen, Eigen]] = {}
    for name in plan[ctx.rank]:
        mine[name] = cache.get(factors, name, device)
    seconds = time.perf_counter() - start
    if share and ctx.enabled:
        for name in names:  # the same order on every rank
            n_out, n_in = factors.shape(name)
            if owner[name] == ctx.rank:
                grad, act = (e.to(ctx.device) for e in mine[name])
            else:
                grad = Eigen(torch.empty(n_out, dtype=torch.float64, device=ctx.device),
                             torch.empty(n_out, n_out, dtype=torch.float64, device=ctx.device))  # fmt: skip
                act = Eigen(torch.empty(n_in, dtype=torch.float64, device=ctx.device),
                            torch.empty(n_in, n_in, dtype=torch.float64, device=ctx.device))  # fmt: skip
            for tensor in (grad.values, grad.vectors, act.values, act.vectors):
                broadcast_tensor(ctx, tensor, src=owner[name], what=f"sharing the eigendecomposition of {name}")
            if owner[name] != ctx.rank:
                cache.put(factors, name, grad.to(device), act.to(device))
    return EigenAssignment(owner, cost, seconds, list(mine))
