"""A whole factor collection: passes over the data, checkpoints and resume, data-parallel ranks.

:func:`run_collection` drives :class:`~kfac_edit.factors.collect.FactorCollector` (which does one batch) through

* **passes**: ``layers_per_pass`` blocks at a time (:func:`~kfac_edit.factors.memory.plan_passes`); every pass reads
  the same stream, so with labels seeded by (seed, window index) the merged result equals one pass over all blocks;
* **ranks** (:mod:`.distributed`): rank ``r`` of ``W`` takes windows ``r, r + W, ...``; the sums are reduced into
  rank 0 at each checkpoint and at the end of each pass; only rank 0 writes and returns the factors;
* **checkpoints** (:mod:`.checkpoint`): every ``checkpoint_every`` tokens (counted over all ranks, rounded up to
  whole steps) rank 0 writes the sums and the stream position; ``resume`` continues from the latest checkpoint.

Synchronisation: ranks meet only at checkpoint steps (the same step number on every rank, so no per-step
communication) and once their shard of the stream is exhausted. At each meeting they exchange "still have data",
reduce the sums and the token counters; if any rank still has data it is a checkpoint, otherwise the pass is over.
A rank that ran out of data early keeps meeting the others until they run out too (shards differ by at most one
batch, so it waits at most one step). At a meeting after ``k`` steps every window below ``max(windows consumed)``
is in the sums and none above, whatever the number of ranks: that is the position a checkpoint records.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models import Projection
from .checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from .collect import FactorCollector
from .distributed import DistContext, all_reduce_ints, broadcast_object, reduce_factors_to_main
from .memory import plan_passes
from .store import Factors

log = logging.getLogger(__name__)

# batches(skip_windows, (rank, world_size)) -> batches with "window_index" (e.g. data.token_batches(..., with_index=True))
BatchSource = Callable[[int, tuple[int, int]], Iterable[dict[str, torch.Tensor]]]


@dataclass
class CollectionConfig:
    """How a collection runs (what it collects is given by the projections and the batch source).

    ``seq_len`` and ``batch_size`` convert ``checkpoint_every`` (tokens over all ranks) into steps; ``max_tokens``
    only sizes the progress bar (the batch source stops the stream). ``out_dir`` holds the checkpoints
    (``out_dir/checkpoint``); ``fingerprint`` (:func:`~kfac_edit.factors.checkpoint.run_fingerprint`) is stored in
    each checkpoint and compared on resume.
    """

    labels: str = "sampled"
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 16
    max_tokens: int | None = None
    layers_per_pass: int | None = None
    checkpoint_every: int | None = None
    out_dir: Path | None = None
    resume: bool = False
    fingerprint: dict[str, Any] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be a positive number of tokens, got {self.checkpoint_every}")
        if (self.checkpoint_every or self.resume) and self.out_dir is None:
            raise ValueError("checkpoints need out_dir")


def _move_to_module_devices(factors: Factors, projections: Sequence[Projection]) -> Factors:
    """Put each module's sums on its weight's device (a shared gate/up activation sum stays shared)."""
    device_of = {p.name: p.module.weight.device for p in projections}
    moved: dict[int, torch.Tensor] = {}
    for name, mf in factors.modules.items():
        device = device_of[name]
        key = id(mf.activation_sum)
        if key not in moved:
            moved[key] = mf.activation_sum.to(device)
        mf.activation_sum = moved[key]
        mf.grad_sum = mf.grad_sum.to(device)
    return factors


def _subset(factors: Factors, names: Iterable[str]) -> Factors:
    return Factors({n: factors.modules[n] for n in names if n in factors.modules})


@dataclass
class _Start:
    """Where a run starts: from the beginning, or from a checkpoint (on rank 0, with its sums)."""

    pass_index: int = 0
    windows: int = 0
    tokens: int = 0
    labelled_tokens: int = 0
    sequence: int = 0
    history: list | None = None
    error: str | None = None


def _find_start(config: CollectionConfig, passes: list[list[str]], ctx: DistContext) -> tuple[_Start, Factors | None]:
    """Rank 0 reads the checkpoint (if resuming) and tells the others where to start; errors reach every rank."""
    start, loaded = _Start(history=[]), None
    if ctx.is_main and config.resume:
        try:
            found = load_checkpoint(config.out_dir, config.fingerprint)
        except UserError as exc:
            start.error = str(exc)
            found = None
        if found is not None:
            loaded, state = found
            if state.passes != passes:
                start.error = f"checkpoint in {config.out_dir} splits the modules into other passes; use the same --layers-per-pass"
            else:
                resumed = {"pass": state.pass_index, "windows": state.windows, "tokens": state.tokens, "at": state.created}
                start = _Start(
                    state.pass_index, state.windows, state.tokens, state.labelled_tokens, state.sequence,
                    history=[*state.history, resumed],
                )
                print(
                    f"resuming from checkpoint {state.sequence}: pass {state.pass_index + 1} of {len(passes)}, "
                    f"{state.windows:,} windows ({state.tokens:,} tokens) already in the sums",
                    flush=True,
                )
        elif start.error is None:
            print(f"--resume: no checkpoint in {config.out_dir}; starting from the beginning", flush=True)
    start = broadcast_object(ctx, start, what="sharing the resume point")
    if start.error:
        raise UserError(start.error)
    return start, loaded


def run_collection(
    model: nn.Module,
    projections: Sequence[Projection],
    batches: BatchSource,
    config: CollectionConfig | None = None,
    ctx: DistContext | None = None,
) -> Factors | None:
    """Collect factors of ``projections`` over ``batches`` in passes, with checkpoints, on one or several ranks.

    Returns the merged :class:`Factors` (sums + counts, manifest with the global token counts) on rank 0 and
    ``None`` on the other ranks. Nothing is written except checkpoints (``config.out_dir/checkpoint``).
    """
    config = config or CollectionConfig()
    ctx = ctx or DistContext()
    started = time.perf_counter()
    passes = plan_passes(projections, config.layers_per_pass)
    pass_names = [[p.name for p in group] for group in passes]
    start, loaded = _find_start(config, pass_names, ctx)
    done = Factors()  # finished passes, on the CPU (rank 0 only)
    partial = None
    if loaded is not None:
        finished = [n for group in pass_names[: start.pass_index] for n in group]
        done = _subset(loaded, finished).to("cpu")
        if start.pass_index < len(passes):
            partial = _subset(loaded, pass_names[start.pass_index]) if start.windows else None
    tokens_per_step = config.seq_len * config.batch_size * ctx.world_size
    steps_per_checkpoint = math.ceil(config.checkpoint_every / tokens_per_step) if config.checkpoint_every else None
    sequence = start.sequence
    manifest: dict[str, Any] = {}
    collector = None

    def checkpoint(state_pass: int, windows: int, tokens: int, labelled: int, current: Factors | None) -> None:
        nonlocal sequence
        if not ctx.is_main:
            return
        sequence += 1
        modules = dict(done.modules)
        if current is not None:
            modules.update(current.modules)
        state = CheckpointState(
            pass_index=state_pass, passes=pass_names, windows=windows, tokens=tokens, labelled_tokens=labelled,
            fingerprint=dict(config.fingerprint or {}), sequence=sequence, world_size=ctx.world_size,
            batch_size=config.batch_size, history=list(start.history or []),
        )  # fmt: skip
        t0 = time.perf_counter()
        path = save_checkpoint(config.out_dir, Factors(modules, {"checkpoint_of": "kfac-edit collect"}), state)
        log.info("checkpoint %s (%d windows, %d tokens) in %.1f s", path, windows, tokens, time.perf_counter() - t0)

    from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    for pass_index in range(start.pass_index, len(passes)):
        group = passes[pass_index]
        resumed = pass_index == start.pass_index
        position = start.windows if resumed else 0
        tokens_total = start.tokens if resumed else 0
        labelled_total = start.labelled_tokens if resumed else 0
        init = _move_to_module_devices(partial, group) if (resumed and partial is not None) else None
        collector = FactorCollector(model, group, labels=config.labels, seed=config.seed, factors=init, start_window=position)
        seen = [0, 0]  # this rank's tokens / labelled tokens at the last meeting
        desc = f"pass {pass_index + 1}/{len(passes)}" if len(passes) > 1 else "collecting factors"
        bar = tqdm(
            total=config.max_tokens, initial=tokens_total, unit="tok", unit_scale=True, desc=desc,
            disable=None if (config.progress and ctx.is_main) else True,
        )  # fmt: skip
        exhausted = False
        steps = 0
        try:
            with collector:
                stream = iter(batches(position, (ctx.rank, ctx.world_size)))
                while True:
                    if not exhausted:
                        batch = next(stream, None)
                        if batch is None:
                            exhausted = True
                        else:
                            before = collector.tokens
                            collector.accumulate(batch)
                            steps += 1
                            bar.update((collector.tokens - before) * ctx.world_size)
                            if steps_per_checkpoint is None or steps % steps_per_checkpoint:
                                continue
                    # a meeting: a checkpoint step of a rank with data, or a rank whose shard is exhausted
                    any_active, windows_total = all_reduce_ints(
                        ctx, [int(not exhausted), collector.windows], "max", what="status exchange"
                    )
                    reduce_factors_to_main(ctx, collector.factors)
                    delta = all_reduce_ints(
                        ctx, [collector.tokens - seen[0], collector.labelled_tokens - seen[1]], "sum", what="token counts"
                    )
                    seen = [collector.tokens, collector.labelled_tokens]
                    tokens_total += delta[0]
                    labelled_total += delta[1]
                    bar.n = tokens_total
                    bar.refresh()
                    if not any_active:
                        break
                    if config.checkpoint_every:
                        checkpoint(pass_index, windows_total, tokens_total, labelled_total, collector.factors)
        finally:
            bar.close()
        if ctx.is_main:
            manifest = collector.manifest()
            manifest.update(tokens=tokens_total, labelled_tokens=labelled_total, windows=windows_total)
            if labelled_total == 0:
                raise UserError("no token with a label was seen (every window was padding); give the run more text")
            pass_factors = _subset(collector.factors, [p.name for p in group]).to("cpu")
            done.modules.update(pass_factors.modules)
            if config.checkpoint_every and pass_index + 1 < len(passes):
                checkpoint(pass_index + 1, 0, 0, 0, None)
        partial = None
        collector.factors = Factors()  # free this pass's device memory

    if not ctx.is_main:
        return None
    if collector is None:  # resumed a checkpoint written after the last pass: nothing left to read
        raise UserError(f"the checkpoint in {config.out_dir} is already complete; pass --overwrite to collect again")
    manifest.update(
        layers=sorted({p.block for p in projections}),
        projections=[k for k in ("gate", "up", "down") if any(p.kind == k for p in projections)],
        world_size=ctx.world_size,
        passes=len(passes),
        layers_per_pass=config.layers_per_pass,
        checkpoint_every=config.checkpoint_every,
        resumed=start.history or [],
        seconds=round(time.perf_counter() - started, 3),
    )
    done.manifest.update(manifest)
    done.check_finite()
    # modules in the order they were asked for
    done.modules = {p.name: done.modules[p.name] for p in projections}
    return done
