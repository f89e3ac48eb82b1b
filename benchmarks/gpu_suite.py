"""GPU benchmark suite: random-initialized OLMo-2-1B- and 7B-shaped models, one command, a table and a JSON file.

Stages (each in its own Python process, so that an out-of-memory error or a missing package fails one stage, not
the suite, and every stage starts with an empty GPU):

* ``collect-1b``, ``collect-7b``: :mod:`collect_throughput` -- factor collection over every block x gate/up/down in
  one pass against a plain training forward+backward of the same model and batch (tokens/s and their ratio). On a
  GPU under 100 GiB the 7B factors (~51 GiB) and the training step's weight gradients do not fit together: the
  collection and the baselines are then measured in two processes (``--skip-train`` / ``--skip-collect``, batch 2)
  and the ratio is taken between them;
* ``eigen``: fp64 ``eigendecompose`` of one random SPD matrix of each factor size (7B: 11008, 4096; 1B: 8192, 2048)
  and, from those times, all blocks on one GPU against the n³-balanced split over 8 ranks
  (:func:`kfac_edit.eigen.assign_by_cost`: an estimate, not a measurement);
* ``select-1b``, ``select-7b``: :mod:`select_pairs` -- exact pair selection against the reference heap (CPU);
* ``edit-1b``, ``edit-7b``: factors of 3 blocks from a few batches, then ``apply_edit`` of those 3 blocks x
  gate/up/down at keep_mass 0.6: cold (eigendecompositions included) and again from the in-memory cache;
* ``eval-1b``, ``eval-7b``: :mod:`eval_throughput` -- memorization records/s (batched greedy with KV cache) and nDCG
  tokens/s.

The suite skips stages that would not fit its time budget (``--budget-s``, default 420 s) and says so; a stage
that overruns what is left is stopped.
``--cpu-smoke`` runs every stage on tiny shapes on the CPU (about a minute) to prove the script end to end.

    benchmarks/gpu_suite.sh                   # on one GPU; writes benchmarks/results/gpu_suite.json
    benchmarks/gpu_suite.sh --cpu-smoke       # tiny CPU run; writes benchmarks/results/gpu_suite_cpu_smoke.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import Clock  # noqa: E402  (sibling module)

SHAPES = {
    "1b": dict(hidden=2048, mlp=8192, layers=16, heads=16, vocab=100352),
    "7b": dict(hidden=4096, mlp=11008, layers=32, heads=32, vocab=100352),
    "tiny": dict(hidden=128, mlp=344, layers=4, heads=4, vocab=2048),
}
# (stage, shape, seconds it needs at least: it is not started with less time left)
GPU_PLAN = [
    ("collect", "7b", 60), ("collect", "1b", 40), ("eigen", "both", 40), ("edit", "7b", 90), ("eval", "7b", 60),
    ("select", "7b", 30), ("edit", "1b", 40), ("eval", "1b", 40), ("select", "1b", 20),
]  # fmt: skip
SMOKE_PLAN = [("collect", "tiny", 0), ("eigen", "tiny", 0), ("edit", "tiny", 0), ("eval", "tiny", 0), ("select", "tiny", 0)]


def _device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def _gpu_gib() -> float:
    """Total memory of GPU 0, read with nvidia-smi so that this process makes no CUDA context of its own."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


# ---------------------------------------------------------------------------------------------------- stages
def stage_collect(shape: str, smoke: bool, work: Path, part: str = "auto") -> dict:
    """collect_throughput for one shape; split into collect / baselines runs when they do not fit together."""
    import collect_throughput

    split = smoke or (shape == "7b" and _gpu_gib() < 100)
    if part == "auto" and split:  # two child processes, so each starts with an empty GPU (smoke: tests this path)
        out = {}
        for sub in ("collect", "train"):
            out[sub] = _run_child("collect", shape, smoke, work, part=sub)
        merged = dict(out["collect"])
        merged["train"] = out["train"].get("train")
        merged["frozen_in_train_run"] = out["train"].get("frozen")
        merged["split_runs"] = "collect+frozen and train+frozen measured in separate processes (memory)"
        if merged.get("train") and "tokens_per_s" in merged.get("collect", {}):
            merged["ratio_collect_over_train"] = merged["collect"]["tokens_per_s"] / merged["train"]["tokens_per_s"]
        return merged
    argv = ["--preset", "tiny-cpu", "--steps", "2", "--warmup", "1"] if smoke else ["--preset", f"olmo2-{shape}"]
    if shape == "7b" and split:
        argv += ["--batch-size", "2"]
    if part == "collect":
        argv.append("--skip-train")
    elif part == "train":
        argv.append("--skip-collect")
    path = work / f"collect-{shape}-{part}.json"
    collect_throughput.main([*argv, "--out", str(path)])
    return json.loads(path.read_text())


def _spd(n: int, device: str, seed: int):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, n + 16, device=device, generator=gen)
    return (x @ x.T) / (n + 16)


def stage_eigen(shape: str, smoke: bool, work: Path) -> dict:
    """fp64 eigendecomposition time per factor size; all-block totals on 1 GPU and estimated over 8 ranks."""
    import torch

    from kfac_edit.curvature import eigendecompose
    from kfac_edit.eigen import assign_by_cost

    device = _device(smoke)
    shapes = ["tiny"] if smoke else ["7b", "1b"]
    sizes = sorted({SHAPES[s][k] for s in shapes for k in ("hidden", "mlp")}, reverse=True)
    eigendecompose(_spd(64, device, 0))  # library initialization outside the timings
    seconds, timings = {}, {}
    sync = torch.cuda.synchronize if device == "cuda" else None
    for n in sizes:
        cov = _spd(n, device, n)
        with Clock(sync) as clock:
            eig = eigendecompose(cov, f"random {n}x{n}")
        timings[n] = clock.timing
        seconds[n] = clock.timing.wall if device == "cuda" else clock.timing.cpu
        error = float((eig.vectors @ torch.diag(eig.values) @ eig.vectors.T - cov.double()).norm() / cov.double().norm())
        print(f"eigh fp64 n={n}: {clock.timing} (relative reconstruction error {error:.1e})", flush=True)
        del cov, eig
    result = {
        "device": _device_name(device),
        "seconds_by_size": {str(n): s for n, s in seconds.items()},  # wall on a GPU, CPU time on a CPU
        "timings_by_size": {str(n): t.as_dict() for n, t in timings.items()},
        "models": {},
    }
    for s in shapes:
        h, m, layers = SHAPES[s]["hidden"], SHAPES[s]["mlp"], SHAPES[s]["layers"]
        # units of work: gate+up share A (hidden) and have two G (mlp); down has A (mlp) and G (hidden)
        units = []
        for b in range(layers):
            units.append(([f"{b}.gate", f"{b}.up"], seconds[h] + 2 * seconds[m]))
            units.append(([f"{b}.down"], seconds[m] + seconds[h]))
        cost = {tuple(names): c for names, c in units}
        plan = assign_by_cost(units, 8)
        per_rank = [sum(c for names, c in cost.items() if names[0] in members) for members in plan]
        result["models"][s] = {
            "modules": 3 * layers,
            "all_blocks_one_gpu_s": sum(c for _, c in units),
            "all_blocks_8_ranks_estimate_s": max(per_rank),
        }
    return result


def _build(shape: str, smoke: bool, seq_len: int):
    import torch
    from collect_throughput import build_model

    args = SimpleNamespace(
        **SHAPES[shape], seq_len=seq_len, device=_device(smoke), dtype="float32" if smoke else "bfloat16"
    )
    if smoke:
        torch.set_num_threads(1)
    return build_model(args), args


def stage_edit(shape: str, smoke: bool, work: Path) -> dict:
    """Factors of 3 blocks from a few batches, then apply_edit of those blocks (cold, then from the cache)."""
    import torch

    from kfac_edit.edit import EditSpec, EigenCache, apply_edit, restore
    from kfac_edit.factors.collect import FactorCollector
    from kfac_edit.models import find_projections

    seq_len, batch, steps = (64, 4, 2) if smoke else (512, 4, 4)
    model, args = _build(shape, smoke, seq_len)
    layers = SHAPES[shape]["layers"]
    blocks = [layers // 2 - 1, layers // 2, layers // 2 + 1]
    projections = find_projections(model, blocks)
    gen = torch.Generator().manual_seed(0)
    on_gpu = args.device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    with Clock(sync) as collect_clock:
        with FactorCollector(model, projections, labels="sampled", seed=0) as collector:
            for _ in range(steps):
                ids = torch.randint(0, args.vocab - 4, (batch, seq_len), generator=gen).to(args.device)
                collector.accumulate({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        factors = collector.finish()
    spec = EditSpec({(b, k): 0.6 for b in blocks for k in ("gate", "up", "down")})
    cache = EigenCache(None, memory_bytes=64 << 30)
    with Clock(sync) as cold_clock:
        report = apply_edit(model, factors, spec, cache=cache)
    with Clock(sync) as warm_clock:
        apply_edit(model, factors, spec, cache=cache)  # restores, then edits again from the in-memory eigenbases
    restore(model)
    pick = (lambda t: t.wall) if on_gpu else (lambda t: t.cpu)  # wall on a GPU, CPU time on a CPU
    collect_s, cold, warm = pick(collect_clock.timing), pick(cold_clock.timing), pick(warm_clock.timing)
    print(f"edit-{shape}: collect {collect_clock.timing}; edit cold {cold_clock.timing}; from cache {warm_clock.timing}",
          flush=True)
    return {
        "device": _device_name(args.device),
        "blocks": blocks,
        "modules": len(report.modules),
        "keep_mass": 0.6,
        "factor_tokens": collector.labelled_tokens,
        "collect_3_blocks_s": collect_s,
        "edit_cold_s": cold,
        "eigen_s": sum(m.eigen_seconds for m in report.modules),
        "edit_from_cache_s": warm,
        "timings": {
            "collect": collect_clock.timing.as_dict(),
            "edit_cold": cold_clock.timing.as_dict(),
            "edit_from_cache": warm_clock.timing.as_dict(),
        },
        "pairs_fraction_mean": statistics.mean(m.pairs_fraction for m in report.modules),
        "weight_change_mean": statistics.mean(m.weight_change for m in report.modules),
        "per_module": [
            {"name": m.name, "shape": list(m.shape), "eigen_s": m.eigen_seconds, "seconds": m.seconds}
            for m in report.modules
        ],
    }


def stage_eval(shape: str, smoke: bool, work: Path) -> dict:
    import eval_throughput

    if smoke:
        argv = ["--preset", "tiny-cpu", "--records", "48", "--batch-sizes", "16,48", "--single-records", "4",
                "--hf-records", "8", "--ndcg-tokens", "4000"]  # fmt: skip
    else:
        s = SHAPES[shape]
        argv = ["--preset", "olmo2-7b", "--hidden", str(s["hidden"]), "--mlp", str(s["mlp"]), "--layers",
                str(s["layers"]), "--heads", str(s["heads"])]  # fmt: skip
    path = work / f"eval-{shape}.json"
    eval_throughput.main([*argv, "--out", str(path)])
    return json.loads(path.read_text())


def stage_select(shape: str, smoke: bool, work: Path) -> dict:
    import select_pairs

    s = SHAPES[shape]
    path = work / f"select-{shape}.json"
    argv = ["--out", str(path), "--out-dim", str(s["mlp"]), "--in-dim", str(s["hidden"]), "--repeats", "3"]
    if not smoke:
        argv += ["--heap-cap-seconds", "3"]
    select_pairs.main(argv)
    return json.loads(path.read_text())


STAGES = {"collect": stage_collect, "eigen": stage_eigen, "edit": stage_edit, "eval": stage_eval, "select": stage_select}


def _device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()}"


# ---------------------------------------------------------------------------------------------------- driver
def _run_child(stage: str, shape: str, smoke: bool, work: Path, part: str = "auto", timeout: float | None = None) -> dict:
    """Run one stage in a fresh Python process; returns its result dict (raises on failure)."""
    out = work / f"{stage}-{shape}-{part}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--shape", shape, "--part", part,
           "--work", str(work), "--result", str(out)] + (["--cpu-smoke"] if smoke else [])  # fmt: skip
    # a session of its own: on timeout the stage and any process it started are stopped together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0 or not out.exists():
        sys.stdout.write(stdout[-4000:])
        tail = " | ".join(line for line in stdout.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {proc.returncode}: {tail[-600:]}")
    return json.loads(out.read_text())


def _rows(name: str, r: dict) -> list[tuple[str, str]]:
    """(metric, value) lines of the summary table for one stage's result."""
    rows = []
    kind = name.split("-")[0]

    def tps(x):
        return f"{x:,.0f}" if isinstance(x, (int, float)) else "n/a"

    if kind == "collect":
        for k in ("collect", "frozen", "train"):
            v = (r.get(k) or {})
            if "tokens_per_s" in v:
                peak = f", peak {v['peak_gb']:.1f} GiB" if v.get("peak_gb") else ""
                rows.append((f"{k} tokens/s", tps(v["tokens_per_s"]) + peak))
            elif v.get("error"):
                rows.append((f"{k}", v["error"][:80]))
        if "ratio_collect_over_train" in r:
            rows.append(("collect / train", f"{r['ratio_collect_over_train']:.2f}x"))
        gib = r.get("factor_gb_fp32", 0.0)
        size = f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
        rows.append(("factors (fp32)", f"{size}, {r.get('modules')} modules, batch {r.get('batch_size')}x{r.get('seq_len')}"))
    elif kind == "eigen":
        for n, s in r["seconds_by_size"].items():
            tn = r.get("timings_by_size", {}).get(n, {})
            rows.append((f"eigh fp64 n={n}", f"{tn.get('cpu_seconds', s):.2f} s CPU / {tn.get('wall_seconds', s):.2f} s wall"))
        for model, m in r["models"].items():
            rows.append((f"{model}: all {m['modules']} modules", f"{m['all_blocks_one_gpu_s']:.1f} s on 1 GPU, ~{m['all_blocks_8_ranks_estimate_s']:.1f} s over 8 ranks (estimate)"))
    elif kind == "edit":
        t = r.get("timings", {})
        cold, warm = t.get("edit_cold", {}), t.get("edit_from_cache", {})
        rows.append((f"edit {r['modules']} modules (blocks {','.join(map(str, r['blocks']))})",
                     f"{cold.get('cpu_seconds', float('nan')):.2f} s CPU / {cold.get('wall_seconds', r['edit_cold_s']):.2f} s wall cold, "
                     f"of which eigen {r['eigen_s']:.1f} s wall"))
        rows.append(("edit again from cache", f"{warm.get('cpu_seconds', float('nan')):.2f} s CPU / {warm.get('wall_seconds', r['edit_from_cache_s']):.2f} s wall"))
    elif kind == "eval":
        mem = r.get("memorization", {})
        batched = {k: v for k, v in mem.items() if k.startswith("batched")}
        if batched:
            best = max(batched.items(), key=lambda kv: kv[1]["records_per_s"])
            rows.append(("memorization records/s", f"{best[1]['records_per_s']:,.1f} ({best[0]})"))
            rows.append(("500 records", f"{mem.get('seconds_for_500_records_best_batched', float('nan')):.1f} s"))
            recited = next((v for k, v in mem.items() if k.startswith("recited_bs")), None)
            if recited is not None:
                rows.append(("500 recited records (true suffix as draft)",
                             f"{recited['seconds_for_500_records']:.1f} s, same tokens: {recited['same_tokens']}"))
        versus = next((v for k, v in mem.items() if k.startswith("vs_generate_bs")), None)
        if versus:
            ratios = ", ".join(f"{name} {v['speedup_over_generate']:.2f}x" for name, v in versus.items()
                               if isinstance(v, dict) and "speedup_over_generate" in v)
            same = all(v.get("same_tokens_as_generate", True) for v in versus.values() if isinstance(v, dict))
            rows.append(("vs model.generate", f"{ratios}; same tokens: {same}"))
        nd = r.get("ndcg", {})
        if nd:
            rows.append(("nDCG tokens/s", f"{tps(nd.get('ndcg_tokens_per_s'))} (seq {nd.get('seq_len')})"))
    elif kind == "select":
        for row in r.get("results", []):
            heap = row.get("heap_seconds_extrapolated", row.get("heap_seconds"))
            rows.append((f"select_pairs keep {row['keep_mass']}", f"{1000 * row['select_pairs_seconds']:.1f} ms, heap {heap:.1f} s, {row['speedup']:.0f}x"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: proves the suite end to end")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gpu_suite[_cpu_smoke].json)")
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="stop stages past this many seconds (default 420: the suite, "
        "model builds included, ends within 8 minutes)"
    )
    ap.add_argument("--only", default=None, help="comma-separated stage names to run, e.g. collect-7b,eigen-both")
    ap.add_argument("--in-process", action="store_true", help="run the stages in this process (faster start, no isolation)")
    # internal: one stage in a child process
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        import torch

        torch.set_num_threads(1)  # tiny shapes: one thread is faster, and steady on a shared machine
    if args.stage:  # child process: run one stage, write its result
        kwargs = {"part": args.part} if args.stage == "collect" else {}
        result = STAGES[args.stage](args.shape, args.cpu_smoke, Path(args.work), **kwargs)
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        return 0

    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device visible: run with --cpu-smoke for the CPU check", file=sys.stderr)
            return 2
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.only:
        wanted = set(args.only.split(","))
        plan = [p for p in plan if f"{p[0]}-{p[1]}" in wanted]
    out_path = Path(args.out or HERE / "results" / ("gpu_suite_cpu_smoke.json" if args.cpu_smoke else "gpu_suite.json"))
    started = time.perf_counter()
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kfac-edit-suite-") as tmp:
        work = Path(tmp)
        for stage, shape, needs in plan:
            name = f"{stage}-{shape}"
            left = args.budget_s - (time.perf_counter() - started)
            if left < needs:
                stages[name] = {"status": "skipped", "reason": f"{left:.0f} s of the {args.budget_s:.0f} s budget left"}
                print(f"== {name}: skipped ({stages[name]['reason']})", flush=True)
                continue
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                if args.in_process:
                    result = STAGES[stage](shape, args.cpu_smoke, work)
                else:
                    result = _run_child(stage, shape, args.cpu_smoke, work, timeout=left)
                stages[name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "result": result}
            except subprocess.TimeoutExpired:
                stages[name] = {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1)}
            except Exception as exc:  # one stage failing (OOM, missing package) does not stop the suite
                stages[name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 1), "error": str(exc)[-800:]}
            print(f"   {stages[name]['status']} in {time.perf_counter() - t0:.1f} s", flush=True)

    import torch

    table = ["| benchmark | metric | value |", "| --- | --- | --- |"]
    for name, entry in stages.items():
        if entry["status"] != "ok":
            table.append(f"| {name} | {entry['status']} | {entry.get('error') or entry.get('reason') or ''} |".replace("\n", " "))
            continue
        for metric, value in _rows(name, entry["result"]):
            table.append(f"| {name} | {metric} | {value} |")
    summary = {
        "suite": "kfac-edit gpu_suite" + (" (cpu smoke)" if args.cpu_smoke else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name("cpu" if args.cpu_smoke else "cuda"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "budget_s": args.budget_s,
        "seconds": round(time.perf_counter() - started, 1),
        "stages": stages,
        "table": table,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\n{summary['suite']} on {summary['device']}, {summary['date']}, {summary['seconds']:.0f} s\n")
    print("\n".join(table))
    print(f"\nwrote {out_path}")
    return 0 if all(e["status"] == "ok" for e in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
