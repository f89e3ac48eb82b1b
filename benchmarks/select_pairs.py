"""Benchmark: vectorized `select_pairs` against a one-pair-at-a-time heap (the reference's algorithm).

Problem: an out × in projection (default 11008 × 4096, an OLMo-2-7B / Llama-7B MLP) whose G and A eigenvalues
fall as 1/k (a flat spectrum: many pairs are needed, the hard case for the heap), at several keep_mass values.

The heap reference pops pairs in descending order of λ_i·μ_j until their summed mass reaches
keep_mass·(Σλ)(Σμ). It keeps one frontier entry per row (row i's next column), the fastest exact heap variant
(no visited set); Python floats, `heapq`. Both selections are turned into masks and their masses computed by the
same function, so "identical selected mass" compares like with like.

    python benchmarks/select_pairs.py [--out benchmarks/results/select_pairs.json] [--heap-cap-seconds S]

With --heap-cap-seconds the heap stops after S seconds and its time is extrapolated linearly in pops (the heap's
per-pop cost grows only with log(out), so linear extrapolation slightly flatters it); the JSON says so.
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kfac_edit.curvature import pair_mass_fraction, select_pairs
from kfac_edit.fileio import write_json


def heap_select(lam: np.ndarray, mu: np.ndarray, keep_mass: float, cap_seconds: float | None = None):
    """One pair at a time. Returns (per-row counts, pops, seconds, finished). ``lam``, ``mu`` descending."""
    lam_l, mu_l = lam.tolist(), mu.tolist()
    n_in = len(mu_l)
    target = keep_mass * float(lam.sum()) * float(mu.sum())
    start = time.perf_counter()
    heap = [(-lam_l[i] * mu_l[0], i, 0) for i in range(len(lam_l))]
    heapq.heapify(heap)
    counts = [0] * len(lam_l)
    mass = 0.0
    pops = 0
    finished = True
    while mass < target and heap:
        neg, i, j = heapq.heappop(heap)
        mass -= neg
        counts[i] = j + 1
        pops += 1
        if j + 1 < n_in:
            heapq.heappush(heap, (-lam_l[i] * mu_l[j + 1], i, j + 1))
        if cap_seconds is not None and (pops & 0x3FFF) == 0 and time.perf_counter() - start > cap_seconds:
            finished = False
            break
    return np.array(counts), pops, time.perf_counter() - start, finished


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return result, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/select_pairs.json", help="JSON results path")
    ap.add_argument("--out-dim", type=int, default=11008, help="rows of W (G's size)")
    ap.add_argument("--in-dim", type=int, default=4096, help="columns of W (A's size)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.8, 0.9], help="keep_mass values")
    ap.add_argument("--repeats", type=int, default=5, help="select_pairs timing: best of this many runs")
    ap.add_argument("--heap-cap-seconds", type=float, default=None, help="stop the heap after S s and extrapolate")
    args = ap.parse_args(argv)

    lam = 1.0 / torch.arange(1, args.out_dim + 1, dtype=torch.float64)
    mu = 1.0 / torch.arange(1, args.in_dim + 1, dtype=torch.float64)
    lam_np, mu_np = lam.numpy(), mu.numpy()
    rank = np.arange(args.in_dim)
    rows = []
    for keep in args.keep:
        mask, fast_s = timed(lambda: select_pairs(lam, mu, keep), args.repeats)
        counts, pops, heap_s, finished = heap_select(lam_np, mu_np, keep, args.heap_cap_seconds)
        row = {
            "keep_mass": keep,
            "select_pairs_seconds": fast_s,
            "pairs": int(mask.sum()),
            "pairs_fraction": int(mask.sum()) / mask.numel(),
            "mass_fraction": pair_mass_fraction(lam, mu, mask),
            "heap_pops": pops,
            "heap_seconds": heap_s,
            "heap_finished": finished,
        }
        if finished:
            heap_mask = torch.from_numpy(rank[None, :] < counts[:, None])
            row["heap_mass_fraction"] = pair_mass_fraction(lam, mu, heap_mask)
            row["identical_mask"] = bool(torch.equal(heap_mask, mask))
            row["same_mass"] = row["heap_mass_fraction"] == row["mass_fraction"]
        else:
            row["heap_seconds_extrapolated"] = heap_s * row["pairs"] / pops
            row["note"] = f"heap stopped after {pops} pops; time extrapolated linearly to {row['pairs']} pops"
        heap_total = row.get("heap_seconds_extrapolated", heap_s)
        row["speedup"] = heap_total / fast_s
        rows.append(row)
        print(
            f"keep_mass {keep}: {row['pairs']} pairs ({100 * row['pairs_fraction']:.2f}%), "
            f"mass {row['mass_fraction']:.9f}; "
            f"select_pairs {1000 * fast_s:.1f} ms, heap {heap_total:.2f} s"
            + ("" if finished else " (extrapolated)")
            + f" -> {row['speedup']:.0f}x"
            + (f"; identical mask: {row['identical_mask']}, same mass: {row['same_mass']}" if finished else ""),
            flush=True,
        )
    result = {
        "benchmark": "select_pairs",
        "config": {
            "out_dim": args.out_dim,
            "in_dim": args.in_dim,
            "spectrum": "lambda_k = mu_k = 1/k",
            "keep_mass": args.keep,
            "repeats": args.repeats,
            "heap_cap_seconds": args.heap_cap_seconds,
            "heap": "Python heapq, one frontier entry per row, pops until mass >= keep_mass * total",
        },
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
