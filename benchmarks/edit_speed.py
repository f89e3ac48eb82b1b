"""Benchmark: edit one 11008 × 4096 projection from cached eigenvectors (CPU by default), end to end.

What is timed is `apply_edit` on a one-block OLMo-2-shaped model (hidden 4096, MLP 11008) editing `up_proj`, with
an `EigenCache` whose disk entry for that module already exists: reading the fp64 eigenvectors from disk, pair
selection, the projection, the report's statistics, and writing the weight. A second call with the same cache
object measures the in-memory hit of a sweep.

The eigenvectors are random orthogonal matrices (products of Householder reflections, cheap to make) and the
eigenvalues fall as 1/k (a flat spectrum, the costly case): dense-matmul timing does not depend on the values.
The JSON also records the pace of one plain (out, in) @ (in, in) GEMM measured in the same run, so numbers taken
on a busy or different machine can be put in proportion.

Then (unless --no-dense) `project_weight` on the staircase of `select_pairs` is timed against the dense projection
``U_G((U_Gᵀ W U_A)⊙M)U_Aᵀ`` (four full GEMMs) in the compute dtype, interleaved, with the same eigenbases (their
compute-dtype copies made once, before timing): cold (a fresh `EigenCache`: the weight's digest and the
half-products `U_G[:, :a]ᵀ W`, `W U_A[:, :b]` are built in the call) and steady (the same cache again: a sweep's
later points, half-products kept), and the results compared (max |difference| relative to max |W'|). CPU time (`time.process_time`) and wall time are printed; ratios
come from CPU time on a CPU, wall time on a GPU. One torch thread unless --threads.

    python benchmarks/edit_speed.py [--out benchmarks/results/edit_speed.json] [--device cpu] [--out-dim 2752 --in-dim 1024]
        [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from _timing import Clock, measure, ratio
from kfac_edit.curvature import Eigen, pairs_mask, project_weight, select_pairs, staircase_cost
from kfac_edit.edit import EditSpec, EigenCache, apply_edit, restore
from kfac_edit.fileio import write_json
from kfac_edit.models import DTYPES

MODULE = "model.layers.0.mlp.up_proj"


def householder_orthogonal(n: int, reflections: int, seed: int) -> torch.Tensor:
    """A dense orthogonal fp64 matrix: the product of ``reflections`` random Householder reflections."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.eye(n, dtype=torch.float64)
    for _ in range(reflections):
        v = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        v /= v.norm()
        q.sub_((q @ v) @ (2 * v.T))
    return q


def reference_gemm_rate(out_dim: int, in_dim: int, dtype: torch.dtype, device: str) -> float:
    """Multiply-adds per second (1e9) of one (out, in) @ (in, in) product in the compute dtype: the machine's pace."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(out_dim, in_dim, dtype=compute, device=device)
    b = torch.randn(in_dim, in_dim, dtype=compute, device=device)
    a @ b[:, :64]  # warm up
    with Clock() as c:
        (a @ b).sum().item()
    return out_dim * in_dim * in_dim / (c.timing.wall if device != "cpu" else c.timing.cpu) / 1e9


class CachedFactors:
    """Stands in for `Factors` when only cached eigendecompositions exist (the covariances are never read)."""

    def __init__(self, shape: tuple[int, int], key: str):
        self._shape, self._key = shape, key
        self.manifest = {"note": "benchmark stub: eigendecompositions come from the cache"}

    @property
    def names(self) -> list[str]:
        return [MODULE]

    def __contains__(self, name: str) -> bool:
        return name == MODULE

    def shape(self, name: str) -> tuple[int, int]:
        return self._shape

    def content_hash(self, name: str) -> str:
        return self._key

    def grad_cov(self, name: str):  # pragma: no cover - a cache miss would be a benchmark bug
        raise RuntimeError("cache miss: the benchmark expects the eigendecomposition on disk")

    activation_cov = grad_cov


def compare_dense(args, cache_dir: Path, factors, model, on_gpu: bool, sync) -> list[dict]:
    """`project_weight` on the staircase, cold (fresh half-products, built in the call) and steady (a sweep's later
    points: half-products kept), against the dense four-GEMM projection, same eigenbases, interleaved."""
    from safetensors.torch import load_file

    t = load_file(str(cache_dir / f"{factors.content_hash(MODULE)}.safetensors"), device=args.device)
    grad = Eigen(t["grad_values"], t["grad_vectors"])
    act = Eigen(t["act_values"], t["act_vectors"])
    weight = model.get_submodule(MODULE).weight.detach()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    ug, ua = grad.vectors_as(dtype), act.vectors_as(dtype)  # cast once, as the cache holds them in a sweep
    w = weight.to(dtype)
    out_dim, in_dim = w.shape
    dense_cost = 2.0 * out_dim * in_dim * (out_dim + in_dim)
    rows = []
    for keep in args.keep:
        counts = select_pairs(grad.values, act.values, keep)
        mask = pairs_mask(counts, act.values, device=args.device)
        times = {"cold": [], "steady": [], "dense": []}
        diff = 0.0
        for _ in range(max(1, args.repeats)):
            cache = EigenCache(None)  # the weight digest and the half-products are part of each timed call

            def project():
                return project_weight(weight, grad, act, counts, halves=cache.half_products(factors, MODULE, weight))

            cold_cost = staircase_cost(counts, out_dim, in_dim)
            cold, ct = measure(project, sync=sync)
            steady_cost = staircase_cost(counts, out_dim, in_dim, cache.half_products(factors, MODULE, weight))
            steady, st = measure(project, sync=sync)
            dense, dt = measure(lambda: (ug @ ((ug.T @ w) @ ua).mul_(mask)) @ ua.T, sync=sync)
            for name, x in (("cold", ct), ("steady", st), ("dense", dt)):
                times[name].append(x)
            scale = max(float(dense.abs().max()), 1e-30)
            diff = max(diff, *(float((r.to(dtype) - dense).abs().max()) / scale for r in (cold, steady)))
            del cold, steady, dense
        ct, st, dt = (sorted(times[k], key=lambda x: x.cpu)[len(times[k]) // 2] for k in ("cold", "steady", "dense"))
        halves = cache.half_products(factors, MODULE, weight)
        row = {
            "keep_mass": keep,
            "shape": [out_dim, in_dim],
            **ct.as_dict("cold_"),
            **st.as_dict("steady_"),
            **dt.as_dict("dense_"),
            "speedup_cold": ratio(dt, ct, on_gpu),
            "speedup_steady": ratio(dt, st, on_gpu),
            "speedup_cold_wall": ratio(dt, ct, True),
            "speedup_steady_wall": ratio(dt, st, True),
            "cost_model_speedup_cold": dense_cost / cold_cost if cold_cost else float("inf"),
            "cost_model_speedup_steady": dense_cost / steady_cost if steady_cost else float("inf"),
            "half_products_mib": halves.nbytes / 2**20,
            "half_products_rows_cols": [halves.rows("lead"), halves.rows("trail")],
            "max_rel_difference": diff,
        }
        rows.append(row)
        unit = "wall" if on_gpu else "CPU"
        print(
            f"keep_mass {keep} {out_dim}x{in_dim}: project_weight cold {ct}, steady {st}; dense {dt} -> "
            f"{row['speedup_cold']:.1f}x cold, {row['speedup_steady']:.1f}x steady ({unit}; wall "
            f"{row['speedup_cold_wall']:.1f}x / {row['speedup_steady_wall']:.1f}x; cost model "
            f"{row['cost_model_speedup_cold']:.1f}x / {row['cost_model_speedup_steady']:.1f}x); half-products "
            f"{row['half_products_mib']:.1f} MiB; max |diff| / max |W'| = {diff:.2e}",
            flush=True,
        )
        del mask
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/edit_speed.json", help="JSON results path")
    ap.add_argument("--out-dim", type=int, default=11008)
    ap.add_argument("--in-dim", type=int, default=4096)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="keep_mass values")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None, help="where to write the eigen cache entry (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = work done)")
    ap.add_argument("--no-dense", action="store_true", help="skip the comparison with the dense projection")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of each projection (medians)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else None
    from transformers import Olmo2Config, Olmo2ForCausalLM

    t0 = time.perf_counter()
    grad_vectors = householder_orthogonal(args.out_dim, 8, seed=1)
    act_vectors = householder_orthogonal(args.in_dim, 8, seed=2)
    grad_values = 1.0 / torch.arange(1, args.out_dim + 1, dtype=torch.float64)
    act_values = 1.0 / torch.arange(1, args.in_dim + 1, dtype=torch.float64)
    key = "benchmark-edit-speed"
    tmp = tempfile.TemporaryDirectory(prefix="kfac-edit-bench-") if args.cache_dir is None else None
    cache_dir = Path(args.cache_dir or tmp.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = {"grad_values": grad_values, "grad_vectors": grad_vectors, "act_values": act_values}
    entry["act_vectors"] = act_vectors
    save_file(entry, str(cache_dir / f"{key}.safetensors"))
    del grad_vectors, act_vectors
    config = Olmo2Config(
        vocab_size=64,
        hidden_size=args.in_dim,
        intermediate_size=args.out_dim,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    with torch.device("meta"):  # skip the slow default init; weights are filled below
        model = Olmo2ForCausalLM(config)
    model = model.to_empty(device=args.device).to(DTYPES[args.dtype]).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    gemm_gflops = reference_gemm_rate(args.out_dim, args.in_dim, DTYPES[args.dtype], args.device)
    print(f"setup {time.perf_counter() - t0:.1f} s wall; reference GEMM {gemm_gflops:.1f} GFMA/s", flush=True)

    factors = CachedFactors((args.out_dim, args.in_dim), key)
    rows = []
    for keep in args.keep:
        spec = EditSpec({(0, "up"): keep})
        cache = EigenCache(cache_dir)
        cold, cold_t = measure(lambda: apply_edit(model, factors, spec, cache=cache), sync=sync)
        assert cache.stats.disk_hits == 1 and cache.stats.computed == 0
        # restores, then edits again from memory (the second call also reuses the compute-dtype eigenvectors)
        warm, warm_t = measure(lambda: apply_edit(model, factors, spec, cache=cache), sync=sync)
        m = warm.modules[0]
        cold_s, warm_s = (cold_t.wall, warm_t.wall) if on_gpu else (cold_t.cpu, warm_t.cpu)
        row = {
            "keep_mass": keep,
            "seconds_from_disk_cache": cold_s,
            "eigen_load_seconds": cold.modules[0].eigen_seconds,
            "seconds_from_memory_cache": warm_s,
            **cold_t.as_dict("disk_cache_"),
            **warm_t.as_dict("memory_cache_"),
            "pairs": m.pairs_kept,
            "pairs_fraction": m.pairs_fraction,
            "mass_fraction": m.mass_fraction,
            "grad_vectors_used": m.grad_vectors_used,
            "act_vectors_used": m.act_vectors_used,
            "weight_change": m.weight_change,
        }
        rows.append(row)
        print(
            f"keep_mass {keep}: apply_edit {cold_t} from the disk cache (of which {row['eigen_load_seconds']:.2f} s "
            f"wall reading eigenvectors), {warm_t} from memory; {m.pairs_kept} pairs, mass {m.mass_fraction:.6f}",
            flush=True,
        )
    restore(model)
    projection = [] if args.no_dense else compare_dense(args, cache_dir, factors, model, on_gpu, sync)
    result = {
        "benchmark": "edit_speed",
        "config": {
            "module": MODULE,
            "shape": [args.out_dim, args.in_dim],
            "dtype": args.dtype,
            "device": args.device,
            "spectrum": "lambda_k = mu_k = 1/k",
            "eigenvectors": "random orthogonal (8 Householder reflections); timing does not depend on values",
            "keep_mass": args.keep,
        },
        "machine": {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "reference_gemm_gfma_per_s": gemm_gflops,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "results": rows,
        "projection_vs_dense": projection,
        "timing": "process CPU time and wall time; ratios from CPU time on a CPU (wall on a GPU)",
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
