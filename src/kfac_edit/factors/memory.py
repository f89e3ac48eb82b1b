"""How much memory the factor sums take, and how to split the blocks into passes so that they fit.

A projection with weight ``(out, in)`` holds ``A`` ``(in, in)`` and ``G`` ``(out, out)`` sums in the accumulation
dtype (fp32; fp64 for an fp64 model); ``gate`` and ``up`` of one block share one ``A``, counted once (with
``gate``). For OLMo-2-7B (hidden 4096, MLP 11008) one block takes about 1.6 GiB, all 32 blocks about 51 GiB.

``--layers-per-pass K`` collects K blocks per pass over the data (the passes add up to one pass over every block).
During a pass only its blocks' sums are on the devices; finished passes wait on the CPU, which must hold all of
them in the end (the final file is written from there).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from itertools import groupby
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from ..models import Projection
from .collector import accumulate_dtype_for, activation_keys

log = logging.getLogger(__name__)

CUDA_FRACTION = 0.9  # default budget: this share of the free GPU memory (the rest holds activations)
CPU_FRACTION = 0.8  # default budget: this share of the available RAM
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


@dataclass(frozen=True)
class ModuleMemory:
    """Bytes of one projection's factor sums (``activation_bytes`` is 0 when it shares gate's ``A``)."""

    name: str
    block: int
    kind: str
    shape: tuple[int, int]
    device: str
    activation_bytes: int
    grad_bytes: int
    expert: bool = False  # one routed expert's matrix (a mixture-of-experts block holds one per expert and kind)

    @property
    def total(self) -> int:
        return self.activation_bytes + self.grad_bytes


def module_memory(projections: Sequence[Projection], dtype: torch.dtype | None = None) -> list[ModuleMemory]:
    """Factor bytes per projection, on the device of its weight. ``dtype``: default the accumulation dtype."""
    keys = activation_keys(projections)
    out = []
    for p in projections:
        size = torch.empty((), dtype=dtype or accumulate_dtype_for(p.module)).element_size()
        n_out, n_in = p.factor_shape  # A over [a; 1] for a homogeneous (biased) projection
        act = size * n_in * n_in if keys[p.name] == p.name else 0  # a shared A is counted once
        out.append(ModuleMemory(p.name, p.block, p.kind, (n_out, n_in), str(p.module.weight.device), act,
                                size * n_out * n_out, expert=p.expert is not None))  # fmt: skip
    return out


def factor_nbytes(projections: Sequence[Projection], dtype: torch.dtype | None = None) -> dict[str, int]:
    """``{module name: bytes of its factor sums}`` (a shared ``A`` counted once)."""
    return {m.name: m.total for m in module_memory(projections, dtype)}


def plan_passes(projections: Sequence[Projection], layers_per_pass: int | None) -> list[list[Projection]]:
    """Split ``projections`` into passes of ``layers_per_pass`` consecutive blocks (``None``: one pass); a block's
    projections are never split (gate and up share ``A``)."""
    if layers_per_pass is not None and layers_per_pass < 1:
        raise UserError(f"--layers-per-pass must be a positive integer, got {layers_per_pass}")
    blocks = sorted({p.block for p in projections})
    if layers_per_pass is None or layers_per_pass >= len(blocks):
        return [list(projections)] if projections else []
    groups = [set(blocks[i : i + layers_per_pass]) for i in range(0, len(blocks), layers_per_pass)]
    return [[p for p in projections if p.block in group] for group in groups]


def parse_size(text: str) -> int:
    """``"12GB"``, ``"512MiB"``, ``"3e9"`` -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or not math.isfinite(float(m.group(1))):  # 1e400: inf
        raise UserError(f"cannot read the size '{text}'; write e.g. 40GB, 512MiB or 3e9 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_bytes(device: str | torch.device) -> int:
    """Free memory on ``device``: ``cudaMemGetInfo`` for a GPU, ``MemAvailable`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(re.search(r"^MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024
    except (OSError, AttributeError):  # no /proc/meminfo (not Linux) or no MemAvailable (Linux < 3.14): no limit
        return 1 << 62


@dataclass
class MemoryPlan:
    """Factor memory per module, the passes, and ``need``: each device's peak bytes (on a GPU the largest pass's sums
    there; on the CPU of the process that keeps the results, every sum)."""

    modules: list[ModuleMemory]
    passes: list[list[str]]
    need: dict[str, int]

    @property
    def total(self) -> int:
        return sum(m.total for m in self.modules)

    def table(self) -> str:
        """Per-module factor memory (modules of the same kind, shape and device on one line) and the totals."""
        groups: dict[tuple, list[ModuleMemory]] = {}
        for m in self.modules:
            groups.setdefault((m.kind, m.shape, m.device, m.activation_bytes, m.grad_bytes, m.expert), []).append(m)
        shared = any(m.kind == "gate" for m in self.modules)
        lines = ["factor memory (sums; gate and up share A):" if shared else "factor memory (sums):"]
        for (kind, shape, device, act, grad, expert), members in groups.items():
            what = f"A {format_bytes(act)} + G {format_bytes(grad)}" if act else f"G {format_bytes(grad)} (A shared)"
            unit = "expert" if expert else "module"
            lines.append(
                f"  {kind:<5} {shape[0]}x{shape[1]} on {device}: {what} = {format_bytes(act + grad)} per {unit}, "
                f"blocks {_ranges([m.block for m in members])} ({len(members)} {unit}s, "
                f"{format_bytes((act + grad) * len(members))})"
            )
        sizes = {m.name: m.total for m in self.modules}
        largest = max((sum(sizes[n] for n in names) for names in self.passes), default=0)
        passes = f"; {len(self.passes)} passes, largest {format_bytes(largest)}" if len(self.passes) > 1 else ""
        lines.append(f"  total {format_bytes(self.total)} in {len(self.modules)} modules{passes}")
        return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs = groupby(enumerate(sorted(set(values))), key=lambda pair: pair[1] - pair[0])  # consecutive: same offset
    ends = [(run[0][1], run[-1][1]) for run in (list(r) for _, r in runs)]
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ends)


def memory_plan(
    projections: Sequence[Projection], layers_per_pass: int | None = None, keeps_results: bool = True
) -> MemoryPlan:
    """Bytes per module and the peak per device; ``keeps_results``: this process gathers every finished pass on the
    CPU and writes the file (a single process, or rank 0; the other ranks drop each pass once it is reduced)."""
    modules = module_memory(projections)
    by_name = {m.name: m for m in modules}
    passes = plan_passes(projections, layers_per_pass)
    need: Counter[str] = Counter()
    for group in passes:
        per_device: Counter[str] = Counter()
        for m in (by_name[p.name] for p in group):
            per_device[m.device] += m.total
        need |= per_device  # the largest pass on each device
    if keeps_results:
        need["cpu"] = sum(m.total for m in modules)
    return MemoryPlan(modules, [[p.name for p in group] for group in passes], dict(need))


def check_memory(
    projections: Sequence[Projection],
    layers_per_pass: int | None = None,
    budget: int | dict[str, int] | None = None,
    print_table: bool = True,
    keeps_results: bool = True,
) -> MemoryPlan:
    """Log the factor memory table (``print_table``) and raise :class:`UserError` when a device cannot hold its share.

    ``budget``: bytes the factors may take on each device (one number for all, or per device); default 90% of the
    free GPU memory and 80% of the available RAM, measured now (so after the model was loaded). The error names the
    device and the largest ``--layers-per-pass`` that would fit.
    """
    plan = memory_plan(projections, layers_per_pass, keeps_results)
    if print_table:
        log.info("%s", plan.table())
    for device, need in plan.need.items():
        limit = budget.get(device) if isinstance(budget, dict) else budget
        if limit is None:
            share = CUDA_FRACTION if torch.device(device).type == "cuda" else CPU_FRACTION
            limit = int(available_bytes(device) * share)
        if need > limit:
            raise UserError(
                f"the factor sums need {format_bytes(need)} on {device} but only {format_bytes(limit)} may be used "
                f"there; {_fitting_hint(projections, device, limit, layers_per_pass)}"
            )
    return plan


def _fitting_hint(projections: Sequence[Projection], device: str, limit: int, layers_per_pass: int | None) -> str:
    if torch.device(device).type == "cpu":
        return (
            "every finished factor waits in CPU memory until the end: collect fewer --layers, on a machine with more "
            "RAM, or raise --memory-budget"
        )
    n_blocks = len({p.block for p in projections})
    for k in range(min(layers_per_pass or n_blocks, n_blocks) - 1, 0, -1):
        if memory_plan(projections, k).need.get(device, 0) <= limit:
            return f"pass --layers-per-pass {k} (or fewer) to collect {k} blocks per pass over the data"
    return "even one block per pass does not fit: use a larger GPU, --device-map auto over several GPUs, or fewer --projections"
