"""Data-parallel factor collection over ``torch.distributed`` (launched by ``torchrun`` or ``accelerate launch``).

Both launchers start one process per GPU and set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, which :func:`init_distributed` reads; without them a process is alone (world size 1: nothing here
communicates). Each rank streams a disjoint shard of the packed windows (window ``i`` goes to rank
``i % world_size``); at a checkpoint and at the end of a pass :func:`reduce_factors_to_main` adds every rank's sums
and counts into rank 0's and zeroes the others' (nothing is counted twice); only rank 0 writes files.

Every collective runs under the process group's timeout: a rank that died or hung makes the others fail with a
one-line :class:`RankFailure` instead of waiting forever (on NCCL that needs ``TORCH_NCCL_BLOCKING_WAIT=1``, which
:func:`init_distributed` sets unless the environment already chose).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from ..errors import first_line

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hung. The message is one line for the user."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job (``world_size == 1``: a single process, no communication).

    ``device`` is where collectives put their tensors: ``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # this context initialized the process group (and destroys it in shutdown)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or None
    try:
        return default if value is None else int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; fix the launcher's settings") from None


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device a rank computes on: ``cuda:LOCAL_RANK`` when ``device`` is a GPU in a multi-rank job."""
    return torch.device("cuda", ctx.local_rank) if ctx.enabled and device.type == "cuda" else device


def init_distributed(device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the launcher's process group (NCCL for GPUs, gloo for the CPU); a no-op for a single process.

    An existing process group (e.g. one made by ``accelerate``'s ``Accelerator``) is used as it is.
    """
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not fit together; launch with torchrun or accelerate")
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), timeout_s)
    if world == 1:
        return DistContext(timeout_s=timeout_s)
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run a single process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun or accelerate launch")
    backend = "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible; start at most that many "
                "processes per node"
            )
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timed-out collective raises here, not elsewhere
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    try:
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=_dt.timedelta(seconds=timeout_s), **kwargs
        )
    except (RuntimeError, ValueError) as exc:
        raise RankFailure(
            f"rank {rank} of {world}: could not join the process group ({first_line(exc)[:300]}); check that every "
            "rank was started and MASTER_ADDR/MASTER_PORT are reachable"
        ) from None
    log.info("rank %d of %d joined the %s process group", rank, world, backend)
    return DistContext(rank, world, local, backend, timeout_s, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` made it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def collective(ctx: DistContext, what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a failure or timeout becomes :class:`RankFailure` naming ``what`` and the likely cause."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo's connection errors, NCCL timeouts
        raise RankFailure(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed ({first_line(exc)[:300]}); another rank has probably "
            f"died or hung (collectives time out after {ctx.timeout_s:g} s): see its log, then rerun with --resume to "
            "continue from the last checkpoint"
        ) from None


def all_reduce_ints(ctx: DistContext, values: Sequence[int], op: str = "sum", what: str = "all-reduce") -> list[int]:
    """Element-wise sum (``op="sum"``) or max (``op="max"``) of integer lists over all ranks."""
    if not ctx.enabled:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=ctx.device)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    collective(ctx, what, lambda: dist.all_reduce(t, op=reduce_op))
    return [int(v) for v in t.tolist()]


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """``obj`` of rank ``src``, on every rank (picklable objects; small ones: it goes through the CPU)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    collective(ctx, what, lambda: dist.broadcast_object_list(box, src=src, device=ctx.device))
    return box[0]


def _through_device(ctx: DistContext, tensor: torch.Tensor, what: str, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """Run the in-place collective ``op`` on ``tensor``; one off the collective device goes through a copy there."""
    buf = tensor if tensor.device == ctx.device and tensor.is_contiguous() else tensor.to(ctx.device).contiguous()
    collective(ctx, what, lambda: op(buf))
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast_tensor(ctx: DistContext, tensor: torch.Tensor, src: int, what: str = "broadcast") -> torch.Tensor:
    """``tensor`` of rank ``src`` copied into ``tensor`` on every rank."""
    return _through_device(ctx, tensor, what, lambda t: dist.broadcast(t, src=src)) if ctx.enabled else tensor


def reduce_factors_to_main(ctx: DistContext, factors, counters: Sequence[int] = (), what: str = "factor all-reduce") -> list[int]:
    """Add every rank's sums and counts of ``factors`` (a :class:`~kfac_edit.factors.store.Factors` with the same
    modules on every rank; a shared activation sum reduced once) into the main rank's; the others' become zero, so
    a later call adds only what was collected in between. Returns ``counters`` summed over the ranks."""
    if not ctx.enabled:
        return list(counters)
    for tensor in factors.tensors():
        _through_device(ctx, tensor, what, dist.all_reduce)  # SUM
        if not ctx.is_main:
            tensor.zero_()
    modules = list(factors.modules.values())
    own = [c for mf in modules for c in (mf.activation_tokens, mf.grad_tokens)]
    summed = all_reduce_ints(ctx, [*counters, *own], "sum", what)
    totals, counts = summed[: len(counters)], summed[len(counters) :]
    for mf, activation_tokens, grad_tokens in zip(modules, counts[::2], counts[1::2]):
        mf.activation_tokens, mf.grad_tokens = (activation_tokens, grad_tokens) if ctx.is_main else (0, 0)
    factors._hashes.clear()
    return totals
