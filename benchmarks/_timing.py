"""Timing shared by the benchmark scripts (imported as a sibling module: scripts run from benchmarks/).

Every measurement records both the process CPU time (``time.process_time``: all threads of this process) and
the wall time (``time.perf_counter``). On a shared CPU machine wall time varies 2-3x between repeats while CPU
time varies far less, so speed ratios on a CPU are taken from CPU time (:func:`ratio`); on a GPU (the host thread
waits for the device) wall time is the one that counts. Scripts print both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Timing:
    cpu: float  # process CPU seconds
    wall: float  # wall-clock seconds

    def __str__(self) -> str:
        return f"{fmt_seconds(self.cpu)} CPU / {fmt_seconds(self.wall)} wall"

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}cpu_seconds": round(self.cpu, 6), f"{prefix}wall_seconds": round(self.wall, 6)}


def fmt_seconds(s: float) -> str:
    return f"{1000 * s:.1f} ms" if s < 1 else f"{s:.2f} s"


class Clock:
    """``with Clock() as c: ...`` then ``c.timing`` (CPU and wall seconds of the block); ``sync`` runs before each read."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.timing = Timing(0.0, 0.0)

    def __enter__(self) -> "Clock":
        if self.sync:
            self.sync()
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.sync:
            self.sync()
        self.timing = Timing(time.process_time() - self._cpu, time.perf_counter() - self._wall)


def measure(fn: Callable[[], object], repeats: int = 1, sync: Callable[[], None] | None = None):
    """``(result of the last call, Timing)``: the best (least CPU time) of ``repeats`` calls."""
    best, result = None, None
    for _ in range(max(1, repeats)):
        with Clock(sync) as c:
            result = fn()
        if best is None or c.timing.cpu < best.cpu:
            best = c.timing
    return result, best


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int, sync=None) -> dict[str, Timing]:
    """Each function ``repeats`` times, in turn (ABAB...), so a burst of load hits all alike; medians per name."""
    runs: dict[str, list[Timing]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            with Clock(sync) as c:
                fn()
            runs[name].append(c.timing)
    return {name: median(ts) for name, ts in runs.items()}


def median(ts: list[Timing]) -> Timing:
    cpu = sorted(t.cpu for t in ts)
    wall = sorted(t.wall for t in ts)
    mid = len(ts) // 2
    pick = (lambda v: v[mid]) if len(ts) % 2 else (lambda v: 0.5 * (v[mid - 1] + v[mid]))
    return Timing(pick(cpu), pick(wall))


def ratio(slow: Timing, fast: Timing, on_gpu: bool = False) -> float:
    """How many times faster ``fast`` is: from CPU time on a CPU, from wall time on a GPU."""
    a, b = (slow.wall, fast.wall) if on_gpu else (slow.cpu, fast.cpu)
    return a / b if b > 0 else float("inf")
