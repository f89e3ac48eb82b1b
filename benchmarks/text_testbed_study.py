"""K-FAC vs SVD on the English-text testbed, with held-out selection and matched held-out perplexity.

For each seed: build (or load) the text testbed, split its canaries into a selection half and a held-out half
(seeded, disjoint), then for each factor-data variant collect K-FAC factors and sweep ``keep_mass``; SVD (data-free)
is swept once per edited set of projections. At each perplexity budget (+5/+10/+20/+30% held-out perplexity) each
method's point is chosen on the *selection* canaries (lowest selection strict within the budget, ties: lower
perplexity), and its *held-out* canary strict memorization is reported. Matching is by held-out-text perplexity:
both methods get the same budget.

Variants (each changes one thing from the reference ``ref``: factors from ``factor_corpus.jsonl`` (no canaries),
150k tokens, sampled labels, gate+up+down of both blocks):

    with_canaries   factors on the training stream (corpus.jsonl, canaries included)
    excluded        the training stream through kfac_edit.data.exclude_overlapping (the --exclude recipe)
    gold            gold labels (empirical Fisher)
    tok50k/tok270k  factor tokens
    gate_up         edit gate and up only
    block0/block1   edit one block only

Usage (writes JSON with its configuration, prints tables)::

    python benchmarks/text_testbed_study.py --seeds 0 --out benchmarks/results/text_testbed_study.json
    python benchmarks/text_testbed_study.py --quick --variants ref   # a smoke run on the quick testbed
    python benchmarks/text_testbed_study.py --summarize benchmarks/results/text_study_*.json   # markdown tables

Measured (default testbed, ``results/text_study_seed0_{a,b}.json``, ``_seed1``, ``_seed2``; 20 selection + 20
held-out canaries; perplexity on 200 held-out windows): K-FAC (ref) leaves 0% of the held-out canaries at 1.014x /
1.007x / 1.025x perplexity (seeds 0/1/2); the SVD point of the next perplexity at or above that cost leaves 100% /
90% / 85%. Given the whole +20% budget, SVD reaches 15% / 15% / 45%. Fact recall (base 15% / 7.5% / 37.5%) falls
to 0-2% at the K-FAC point. Factors with the canaries in them need keep_mass 0.9 / 0.9 / 0.8 (1.027x-1.070x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kfac_edit.data import exclude_overlapping, token_batches
from kfac_edit.edit import EditSpec, EigenCache, apply_edit, restore
from kfac_edit.evaluate import EvalConfig, evaluate
from kfac_edit.factors import collect_factors
from kfac_edit.fileio import read_jsonl, write_json
from kfac_edit.models import load_model
from kfac_edit.text_testbed import TextTestbedConfig, build_text_testbed

BUDGETS = (1.05, 1.10, 1.20, 1.30)
KFAC_GRID = (0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6)
SVD_GRID = tuple(round(0.98 - 0.03 * i, 3) for i in range(20))  # 0.98 .. 0.41; a sweep stops past 1.6x perplexity
PPL_TOKENS = 13_200  # held-out tokens of each perplexity pass (200 windows of 66)
REFERENCE = dict(data="factor_corpus", tokens=150_000, labels="sampled", kinds=("gate", "up", "down"), blocks=(0, 1))
VARIANTS = {
    "ref": {},
    "with_canaries": dict(data="corpus"),
    "excluded": dict(data="corpus_excluded"),
    "gold": dict(labels="gold"),
    "tok50k": dict(tokens=50_000),
    "tok270k": dict(tokens=270_000),
    "gate_up": dict(kinds=("gate", "up")),
    "block0": dict(blocks=(0,)),
    "block1": dict(blocks=(1,)),
}


def split_records(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded, disjoint halves ``(selection, held-out)`` of the memorized records."""
    order = np.random.default_rng([seed, 11]).permutation(len(records))
    half = len(records) // 2
    return [records[i] for i in order[:half]], [records[i] for i in order[half:]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def choose(points: list[dict], base_ppl: float, budget: float) -> dict | None:
    """Lowest selection strict among points within ``budget`` x base perplexity (ties: lower perplexity)."""
    ok = [p for p in points if p["perplexity"] <= budget * base_ppl]
    return min(ok, key=lambda p: (p["selection_strict"], p["perplexity"])) if ok else None


def run_seed(seed: int, args, work: Path, save=lambda partial: None) -> dict:
    config = TextTestbedConfig.quick(seed=seed) if args.quick else TextTestbedConfig(seed=seed)
    t0 = time.process_time()
    paths = build_text_testbed(config, progress=False)
    build_cpu = time.process_time() - t0
    info = paths.load_info()
    torch.manual_seed(0)
    model, tokenizer = load_model(str(paths.model_dir), dtype="float32", device="cpu")
    canaries = read_jsonl(paths.memorized)
    selection, heldout = split_records(canaries, seed)
    sets = work / f"seed{seed}"
    sets.mkdir(parents=True, exist_ok=True)
    write_jsonl(sets / "selection.jsonl", selection)
    write_jsonl(sets / "holdout.jsonl", heldout)
    memorized = [str(sets / "selection.jsonl"), str(sets / "holdout.jsonl")]
    if paths.facts.exists():
        memorized.append(str(paths.facts))
    evaluation = EvalConfig(memorized=memorized, perplexity_data=str(paths.heldout), prefix_len=None,
                            suffix_len=None, ppl_block=config.seq_len + 2, batch_size=64, max_tokens=PPL_TOKENS)

    def measure() -> dict:
        m = evaluate(model, tokenizer, evaluation)["metrics"]
        out = {"selection_strict": m["memorized"]["selection"]["strict"],
               "heldout_strict": m["memorized"]["holdout"]["strict"],
               "perplexity": m["perplexity"]["perplexity"]}
        if "facts" in m["memorized"]:
            out["fact_accuracy"] = m["memorized"]["facts"]["strict"]
        return out

    base = measure()
    print(f"base: {base} (testbed {info['config_hash']}, build {build_cpu:.0f} s CPU)", flush=True)
    cache = EigenCache(None)

    def sweep(method: str, grid, factors, kinds, blocks) -> list[dict]:
        points = []
        for keep in grid:
            spec = EditSpec({(b, k): keep for b in blocks for k in kinds}, method, seed)
            try:
                apply_edit(model, factors, spec, cache=cache)
                points.append({"keep_mass": keep, **measure()})
            finally:
                restore(model)
            if points[-1]["perplexity"] > 1.6 * base["perplexity"]:  # far past every budget
                break
        return points

    def factor_batches(data: str):
        source = paths.factor_corpus if data == "factor_corpus" else paths.corpus
        batches = token_batches(str(source), tokenizer, seq_len=config.seq_len + 2, batch_size=64, with_index=True)
        if data == "corpus_excluded":
            batches = exclude_overlapping(batches, [r["prefix_ids"][1:] + r["suffix_ids"] for r in canaries])
        return batches

    results: dict = {"seed": seed, "testbed": info, "base": base, "build_cpu_s": round(build_cpu, 1),
                     "svd": {}, "variants": {}}
    svd_done: dict = {}
    for name in args.variants:
        v = {**REFERENCE, **VARIANTS[name]}
        t1 = time.process_time()
        factors = collect_factors(model, factor_batches(v["data"]), layers=list(v["blocks"]), kinds=list(v["kinds"]),
                                  labels=v["labels"], seed=seed, max_tokens=v["tokens"], progress=False)
        collect_cpu = time.process_time() - t1
        t1 = time.process_time()
        points = sweep("kfac", KFAC_GRID, factors, v["kinds"], v["blocks"])
        key = f"{'+'.join(v['kinds'])}|{','.join(map(str, v['blocks']))}"
        if key not in svd_done:
            svd_done[key] = sweep("svd", SVD_GRID, None, v["kinds"], v["blocks"])
            results["svd"][key] = svd_done[key]
        results["variants"][name] = {
            "config": {**v, "kinds": list(v["kinds"]), "blocks": list(v["blocks"])},
            "factor_tokens": factors.manifest.get("tokens"),
            "collect_cpu_s": round(collect_cpu, 1), "sweep_cpu_s": round(time.process_time() - t1, 1),
            "points": points, "svd_key": key,
            "matched": {str(b): {"kfac": choose(points, base["perplexity"], b),
                                 "svd": choose(svd_done[key], base["perplexity"], b)} for b in BUDGETS},
        }
        print(table_rows(name, results["variants"][name], base), flush=True)
        save(results)
    return results


def _cell(p: dict | None, base: dict) -> str:
    if p is None:
        return f"{'none':>22}"
    ratio = p["perplexity"] / base["perplexity"]
    return f"{100 * p['heldout_strict']:5.1f}% ({100 * p['selection_strict']:3.0f}%) x{ratio:.2f}"


def table_rows(name: str, variant: dict, base: dict) -> str:
    lines = []
    for b in BUDGETS:
        m = variant["matched"][str(b)]
        budget = f"+{round(100 * (b - 1)):>2}%"
        lines.append(f"{name:<14} {budget}  K-FAC {_cell(m['kfac'], base)}   SVD {_cell(m['svd'], base)}")
    return "\n".join(lines)


def at_cost(points: list[dict], cost: float) -> dict | None:
    """The point whose perplexity is the smallest one at or above ``cost`` (the demo's matching rule)."""
    costlier = [p for p in points if p["perplexity"] >= cost]
    return min(costlier, key=lambda p: p["perplexity"]) if costlier else None


def summarize(paths: list[str]) -> str:
    """Markdown tables from study JSON files: per variant and budget, K-FAC chosen on selection, and SVD at the same
    budget and at K-FAC's own perplexity cost (the SVD point of smallest perplexity >= K-FAC's)."""
    lines = ["| seed | variant | budget | K-FAC keep | K-FAC held-out (sel.) | ppl x | facts | SVD same budget "
             "held-out (ppl x) | SVD at K-FAC's cost held-out (ppl x) |", "|" + "---|" * 9]
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            base = run["base"]
            for name, v in run["variants"].items():
                svd = run["svd"][v["svd_key"]]
                for b in BUDGETS:
                    k, s = v["matched"][str(b)]["kfac"], v["matched"][str(b)]["svd"]
                    if k is None:
                        continue
                    m = at_cost(svd, k["perplexity"])
                    fmt = lambda p: "none" if p is None else (  # noqa: E731
                        f"{100 * p['heldout_strict']:.0f}% (x{p['perplexity'] / base['perplexity']:.3f})")
                    lines.append(
                        f"| {run['seed']} | {name} | +{round(100 * (b - 1))}% | {k['keep_mass']:g} | "
                        f"{100 * k['heldout_strict']:.0f}% ({100 * k['selection_strict']:.0f}%) | "
                        f"{k['perplexity'] / base['perplexity']:.3f} | {100 * k.get('fact_accuracy', float('nan')):.0f}% | "
                        f"{fmt(s)} | {fmt(m)} |"
                    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="the quick testbed configuration")
    parser.add_argument("--out", default="benchmarks/results/text_testbed_study.json")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print tables from study JSON files and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    torch.set_num_threads(1)
    started = time.process_time()
    runs: list[dict] = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict | None = None) -> dict:
        """Write the JSON so far (after every variant, so an interrupted study keeps what it measured)."""
        out = {"command": " ".join(["python", *sys.argv]), "budgets": BUDGETS, "kfac_grid": KFAC_GRID,
               "svd_grid": SVD_GRID, "ppl_tokens": PPL_TOKENS,
               "reference": {**REFERENCE, "kinds": list(REFERENCE["kinds"])},
               "variants": {k: VARIANTS[k] for k in args.variants}, "quick": args.quick,
               "runs": runs + ([partial] if partial is not None else []),
               "cpu_s": round(time.process_time() - started, 1)}
        write_json(args.out, out)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(f"seed {seed}: held-out strict (selection strict) x perplexity ratio, chosen on selection",
                  flush=True)
            runs.append(run_seed(seed, args, Path(tmp), save))
            base = runs[-1]["base"]
            print(f"base: selection {100 * base['selection_strict']:.1f}%, "
                  f"held-out {100 * base['heldout_strict']:.1f}%, perplexity {base['perplexity']:.2f}, facts {base.get('fact_accuracy')}", flush=True)
    out = save()
    print(f"wrote {args.out} ({out['cpu_s']} s CPU)")


if __name__ == "__main__":
    main()
