"""Benchmark: vectorized `select_pairs` against a one-pair-at-a-time heap (the reference's algorithm), and the
staircase (per-row counts, what `select_pairs` returns) against building the dense mask from it.

Problem: an out × in projection (default 11008 × 4096, an OLMo-2-7B / Llama-7B MLP) whose G and A eigenvalues
fall as 1/k (a flat spectrum: many pairs are needed, the hard case for the heap), at several keep_mass values.

The heap reference pops pairs in descending order of λ_i·μ_j until their summed mass reaches
keep_mass·(Σλ)(Σμ). It keeps one frontier entry per row (row i's next column), the fastest exact heap variant
(no visited set); Python floats, `heapq`. Both selections are turned into masks and their masses computed by the
same function, so "identical selected mass" compares like with like.

"mask" times `select_pairs_mask` (the counts, then the 45M-element bool mask: what `select_pairs` returned before
it returned counts) and "mask+stats" adds `pair_stats` on that mask (the edit's former path), against
`select_pairs` and `pair_stats` on the counts. One thread; CPU time (`time.process_time`) and wall time, ratios
from CPU time; best of --repeats, interleaved.

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

from _timing import Timing, measure, ratio
from kfac_edit.curvature import pair_mass_fraction, pair_stats, pairs_mask, select_pairs, select_pairs_mask
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/select_pairs.json", help="JSON results path")
    ap.add_argument("--out-dim", type=int, default=11008, help="rows of W (G's size)")
    ap.add_argument("--in-dim", type=int, default=4096, help="columns of W (A's size)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="keep_mass values")
    ap.add_argument("--repeats", type=int, default=5, help="select_pairs timing: best of this many runs")
    ap.add_argument("--heap-cap-seconds", type=float, default=None, help="stop the heap after S s and extrapolate")
    ap.add_argument("--no-heap", action="store_true", help="skip the heap reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    lam = 1.0 / torch.arange(1, args.out_dim + 1, dtype=torch.float64)
    mu = 1.0 / torch.arange(1, args.in_dim + 1, dtype=torch.float64)
    lam_np, mu_np = lam.numpy(), mu.numpy()
    rank = np.arange(args.in_dim)
    rows = []
    for keep in args.keep:
        best = {"counts": None, "mask": None, "counts+stats": None, "mask+stats": None}

        def keep_best(name: str, t: Timing) -> None:
            best[name] = t if best[name] is None or t.cpu < best[name].cpu else best[name]

        for _ in range(args.repeats):  # interleaved, so load bursts hit both alike
            counts, t = measure(lambda: select_pairs(lam, mu, keep))
            keep_best("counts", t)
            mask, t = measure(lambda: select_pairs_mask(lam, mu, keep))
            keep_best("mask", t)
            _, t = measure(lambda: pair_stats(lam, mu, select_pairs(lam, mu, keep)))
            keep_best("counts+stats", t)
            _, t = measure(lambda: pair_stats(lam, mu, select_pairs_mask(lam, mu, keep)))
            keep_best("mask+stats", t)
            del mask
        mask = pairs_mask(counts, mu)
        fast = best["counts"]
        row = {
            "keep_mass": keep,
            "select_pairs_seconds": fast.cpu,
            **fast.as_dict("select_pairs_"),
            **best["mask"].as_dict("with_mask_"),
            **best["counts+stats"].as_dict("counts_stats_"),
            **best["mask+stats"].as_dict("mask_stats_"),
            "counts_vs_mask_cpu_ratio": ratio(best["mask"], fast),
            "stats_path_cpu_ratio": ratio(best["mask+stats"], best["counts+stats"]),
            "pairs": int(counts.sum()),
            "pairs_fraction": int(counts.sum()) / mask.numel(),
            "mass_fraction": pair_mass_fraction(lam, mu, mask),
            "mass_fraction_from_counts": pair_mass_fraction(lam, mu, counts),
        }
        line = (
            f"keep_mass {keep}: {row['pairs']} pairs ({100 * row['pairs_fraction']:.2f}%), "
            f"mass {row['mass_fraction']:.9f}; select_pairs (counts) {fast}; with mask {best['mask']} "
            f"-> {row['counts_vs_mask_cpu_ratio']:.2f}x CPU; selection+pair_stats: counts {best['counts+stats']}, "
            f"mask {best['mask+stats']} -> {row['stats_path_cpu_ratio']:.2f}x CPU"
        )
        if not args.no_heap:
            heap_counts, pops, heap_s, finished = heap_select(lam_np, mu_np, keep, args.heap_cap_seconds)
            row.update({"heap_pops": pops, "heap_seconds": heap_s, "heap_finished": finished})
            if finished:
                heap_mask = torch.from_numpy(rank[None, :] < heap_counts[:, None])
                row["heap_mass_fraction"] = pair_mass_fraction(lam, mu, heap_mask)
                row["identical_mask"] = bool(torch.equal(heap_mask, mask))
                row["same_mass"] = row["heap_mass_fraction"] == row["mass_fraction"]
            else:
                row["heap_seconds_extrapolated"] = heap_s * row["pairs"] / pops
                row["note"] = f"heap stopped after {pops} pops; time extrapolated linearly to {row['pairs']} pops"
            heap_total = row.get("heap_seconds_extrapolated", heap_s)
            row["speedup"] = heap_total / fast.wall  # the heap is timed in wall seconds
            line += (
                f"; heap {heap_total:.2f} s wall" + ("" if finished else " (extrapolated)") + f" -> {row['speedup']:.0f}x"
                + (f"; identical mask: {row['identical_mask']}, same mass: {row['same_mass']}" if finished else "")
            )
        del mask
        rows.append(row)
        print(line, flush=True)
    result = {
        "benchmark": "select_pairs",
        "config": {
            "out_dim": args.out_dim,
            "in_dim": args.in_dim,
            "spectrum": "lambda_k = mu_k = 1/k",
            "keep_mass": args.keep,
            "repeats": args.repeats,
            "heap_cap_seconds": None if args.no_heap else args.heap_cap_seconds,
            "timing": "best of repeats by process CPU time, one torch thread; ratios from CPU time",
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
