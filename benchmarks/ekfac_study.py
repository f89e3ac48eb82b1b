"""EK-FAC vs K-FAC, protected capabilities, and the predicted cost of an edit, on the quick arithmetic testbed.

    python benchmarks/ekfac_study.py --out benchmarks/results/ekfac_study.json
    python benchmarks/ekfac_study.py --testbed text --out benchmarks/results/ekfac_study_text.json

``--testbed text``: the default English-text testbed (``TextTestbedConfig()``, the demo's; cached under
``KFAC_EDIT_CACHE``), factors and the EK-FAC pass on ``factor_corpus.jsonl`` (the training prose without the
canaries, the recipe), perplexity on the held-out text (packed windows of ``seq_len + 2`` tokens, the first 13,200
tokens as ``DemoConfig.text()``), the capability is fact recall (``facts.jsonl``, when the testbed has it); only
step 2 runs there (protection and prediction are arithmetic-only).

One process, one torch thread, CPU. Steps (all through the public API):

1. the quick testbed (:func:`kfac_edit.testbed.build_testbed`, cached); K-FAC factors of gate/up/down of blocks 0
   and 1 over the training corpus (sampled labels), then the EK-FAC pass over the same batches;
2. **EK-FAC vs K-FAC**: both methods over one keep_mass grid; at +5/+10/+20% rule perplexity each method's point is
   chosen on the *selection* half of the canaries (lowest strict memorization within the budget) and reported on
   the *held-out* half (the split of :func:`kfac_edit.sweep.split_records`, seed 0);
3. **protection**: factors collected on fresh rule sequences (pairs ``(a, d)`` of neither held-out rule set), the
   K-FAC grid again with ``--protect`` at two weights; at equal canary removal (all canaries at most a level of
   strict memorization) the rule accuracy each variant loses;
4. **prediction**: for the K-FAC edit chosen at +10% perplexity, ``predict`` shares (3 modes) of 8 tasks vs
   the measured increase of their mean token loss and the drop of their exact-continuation accuracy; Spearman.

Writes one JSON: configuration, every grid point, the tables, timings (CPU seconds from ``time.process_time``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kfac_edit.data import token_batches
from kfac_edit.edit import Protection, apply_edit, restore
from kfac_edit.eigen import EigenCache
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.ekfac import collect_ekfac
from kfac_edit.fileio import read_jsonl, write_json
from kfac_edit.models import load_model
from kfac_edit.predict import predict_cost, task_batches
from kfac_edit.spec import EditSpec
from kfac_edit.sweep import split_records
from kfac_edit.testbed import TestbedConfig, build_testbed, continuation_records, exact_continuations
from kfac_edit.testbed import rule_sequences, to_text

GRID = (0.9995, 0.999, 0.998, 0.995, 0.9925, 0.99, 0.9875, 0.985, 0.9825, 0.98, 0.9775, 0.975, 0.9725, 0.97, 0.965,
        0.96, 0.95, 0.94, 0.92, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)  # fmt: skip
PPL_BUDGETS = (1.05, 1.10, 1.20)
TEXT_PPL_BUDGETS = (1.0025, 1.005, 1.01, *PPL_BUDGETS)  # text: both reach 0 held-out within +1.1%, so finer too
CANARY_LEVELS = (0.5, 0.25, 0.1, 0.0)  # equal canary removal: all-canary strict memorization at most this
BLOCKS, KINDS = (0, 1), ("gate", "up", "down")
TEXT_PPL_TOKENS = 13_200  # DemoConfig.text(): perplexity tokens of the held-out text
MODES = ("curvature", "activation", "loss")  # predict modes


def rows_of(records):
    return [list(r["prefix_ids"]) + list(r["suffix_ids"]) for r in records]


def padded(rows, batch_size=256):
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        out.append((ids, mask))
    return out


@torch.no_grad()
def mean_loss(model, batches) -> float:
    total, count = 0.0, 0
    for ids, mask in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(F.cross_entropy(logits[valid].double(), ids[:, 1:][valid], reduction="sum"))
        count += int(valid.sum())
    return total / count


def spearman(x, y) -> float:
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties: the mean rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", choices=["arith", "text"], default="arith")
    parser.add_argument("--out", default=None, help="default benchmarks/results/ekfac_study[_text].json")
    parser.add_argument("--factor-tokens", type=int, default=100_000)
    parser.add_argument("--labels", choices=["sampled", "gold"], default="sampled", help="labels of both passes")
    parser.add_argument("--protect-records", type=int, default=400, help="fresh rule sequences for --protect factors")
    parser.add_argument("--protect-weights", default="0.9,0.95,0.97,0.98,0.99")
    args = parser.parse_args()
    text = args.testbed == "text"
    args.out = args.out or f"benchmarks/results/ekfac_study{'_text' if text else ''}.json"
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    timings = {}

    if text:
        from kfac_edit.text_testbed import TextTestbedConfig, build_text_testbed

        tb_config = TextTestbedConfig()
        paths = build_text_testbed(tb_config, progress=False)
    else:
        tb_config = TestbedConfig.quick()
        paths = build_testbed(tb_config, progress=False)
    model, tokenizer = load_model(str(paths.model_dir), dtype="float32", device="cpu")
    canaries = read_jsonl(paths.memorized)
    selection, heldout = split_records(canaries, 0.5, seed=0)
    rule = read_jsonl(paths.rule_heldout) if paths.rule_heldout.exists() else []  # text: the facts
    if text:  # packed windows of the held-out text, as the sweep's perplexity
        clean_rows = None
        clean = [(b["input_ids"], b["attention_mask"]) for b in token_batches(
            str(paths.clean), tokenizer, seq_len=tb_config.seq_len + 2, batch_size=64, max_tokens=TEXT_PPL_TOKENS)]
    else:
        clean_rows = [tokenizer(r["text"])["input_ids"] for r in read_jsonl(paths.clean)]
        clean = padded(clean_rows)
    eval_sets = {"selection": padded(rows_of(selection)), "clean": clean}

    def metrics() -> dict:
        sel = exact_continuations(model, selection)
        held = exact_continuations(model, heldout)
        return {
            "selection_strict": sum(sel) / len(sel), "heldout_strict": sum(held) / len(held),
            "heldout_memorized": int(sum(held)), "canary_strict": (sum(sel) + sum(held)) / (len(sel) + len(held)),
            "rule_accuracy": sum(exact_continuations(model, rule)) / len(rule) if rule else None,
            "perplexity": math.exp(mean_loss(model, eval_sets["clean"])),
        }  # fmt: skip

    base = metrics()

    # 1. factors and the EK-FAC pass over the same batches
    t = time.process_time()
    batches = list(token_batches(str(paths.factor_corpus if text else paths.corpus), tokenizer, seq_len=tb_config.seq_len + 2, batch_size=128,
                                 max_tokens=args.factor_tokens, with_index=True))  # fmt: skip
    factors = collect_factors(model, batches, layers=list(BLOCKS), kinds=list(KINDS), labels=args.labels, seed=0,
                              max_tokens=args.factor_tokens, progress=False)  # fmt: skip
    timings["collect_cpu_s"] = time.process_time() - t
    cache = EigenCache(None)
    t = time.process_time()
    ekfac = collect_ekfac(model, factors, batches, cache=cache, max_tokens=args.factor_tokens, progress=False)
    timings["ekfac_pass_cpu_s"] = time.process_time() - t

    def layers(keep: float) -> dict:
        return {str(b): {k: keep for k in KINDS} for b in BLOCKS}

    def run_grid(method: str, protect=None) -> list[dict]:
        points = []
        for keep in GRID:
            report = apply_edit(model, factors, EditSpec.from_json(layers(keep), method=method), cache=cache,
                                ekfac=ekfac, protect=protect)  # fmt: skip
            m = metrics()
            m.update(keep_mass=keep, pairs_fraction=sum(r.pairs_kept for r in report.modules)
                     / sum(r.pairs_total for r in report.modules))  # fmt: skip
            if protect is not None:
                m["protected_mass_fraction"] = float(np.mean([r.protected_mass_fraction for r in report.modules]))
            points.append(m)
            restore(model)
        return points

    # 2. EK-FAC vs K-FAC at equal held-out perplexity
    t = time.process_time()
    grids = {"kfac": run_grid("kfac"), "ekfac": run_grid("ekfac")}
    timings["grids_cpu_s"] = time.process_time() - t

    def chosen(points, budget):
        within = [p for p in points if p["perplexity"] <= budget * base["perplexity"]]
        return min(within, key=lambda p: (p["selection_strict"], p["perplexity"])) if within else None

    comparison = []
    for budget in TEXT_PPL_BUDGETS if text else PPL_BUDGETS:
        row = {"ppl_budget": budget}
        for method, points in grids.items():
            p = chosen(points, budget)
            row[method] = None if p is None else {k: p[k] for k in ("keep_mass", "perplexity", "heldout_memorized",
                                                                    "heldout_strict", "selection_strict", "rule_accuracy")}  # fmt: skip
        k, e = row["kfac"], row["ekfac"]
        row["ekfac_fewer_heldout"] = (
            None if not (k and e) or k["heldout_memorized"] == 0 else 1 - e["heldout_memorized"] / k["heldout_memorized"]
        )
        comparison.append(row)
    if text:
        return finish(args, tb_config, base, factors, ekfac, comparison, grids, timings, cpu0, wall0,
                      capability=f"{paths.rule_heldout.stem}_accuracy" if rule else None)

    # 3. protection of the rule capability
    t = time.process_time()
    n = tb_config.n_numbers
    excluded = set()
    for rec in rule + [{"prefix_ids": r} for r in clean_rows]:
        ids = list(rec["prefix_ids"])
        a, b = ids[1], ids[2]  # ids of numbers are the numbers (number_tokenizer), after bos
        excluded.add((a, (b - a) % n))
    rng = np.random.default_rng(1234)
    pairs = []
    while len(pairs) < args.protect_records:
        a, d = int(rng.integers(0, n)), int(rng.integers(1, (tb_config.max_step or n - 1) + 1))
        if (a, d) not in excluded:
            pairs.append((a, d))
    protect_seqs = rule_sequences(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), tb_config.seq_len, n)
    protect_batches = list(token_batches([to_text(s) for s in protect_seqs], tokenizer, seq_len=tb_config.seq_len + 2,
                                         batch_size=128, with_index=True))  # fmt: skip
    protect_factors = collect_factors(model, protect_batches, layers=list(BLOCKS), kinds=list(KINDS), labels=args.labels,
                                      seed=0, progress=False)  # fmt: skip
    weights = [float(w) for w in args.protect_weights.split(",")]
    for w in weights:
        grids[f"kfac+protect{w:g}"] = run_grid("kfac", Protection(protect_factors, w))
    timings["protect_cpu_s"] = time.process_time() - t
    protection = []
    for level in CANARY_LEVELS:
        row = {"canary_strict_at_most": level}
        for name in ["kfac"] + [f"kfac+protect{w:g}" for w in weights]:
            within = [p for p in grids[name] if p["canary_strict"] <= level + 1e-12]
            best = max(within, key=lambda p: (p["rule_accuracy"], -p["perplexity"])) if within else None
            row[name] = None if best is None else {
                "keep_mass": best["keep_mass"], "rule_accuracy": best["rule_accuracy"],
                "rule_loss": base["rule_accuracy"] - best["rule_accuracy"], "canary_strict": best["canary_strict"],
                "perplexity": best["perplexity"],
            }  # fmt: skip
        unprotected = row["kfac"]
        for w in weights:
            mine = row[f"kfac+protect{w:g}"]
            row[f"loss_ratio_protect{w:g}"] = (
                None if not (mine and unprotected) or unprotected["rule_loss"] <= 0
                else mine["rule_loss"] / unprotected["rule_loss"]
            )  # fmt: skip
        protection.append(row)

    # 4. predicted share vs measured drop over 7 tasks, for the K-FAC edit chosen at +10% perplexity
    t = time.process_time()
    rng = np.random.default_rng(99)
    steps_of = lambda lo, hi, k: rule_sequences(rng.integers(0, n, k), rng.integers(lo, hi + 1, k), tb_config.seq_len, n)
    tasks = {
        "canaries_selection": selection,
        "canaries_heldout": heldout,
        "rule_heldout": rule,
        "rule_small_steps": continuation_records(steps_of(1, 3, 200), tb_config, tokenizer, "rule"),
        "rule_large_steps": continuation_records(steps_of(8, 10, 200), tb_config, tokenizer, "rule"),
        "random_unseen": continuation_records(rng.integers(0, n, (200, tb_config.seq_len)), tb_config, tokenizer, "r"),
        "rule_mid_steps": continuation_records(steps_of(4, 7, 200), tb_config, tokenizer, "rule"),
        "training_mixture": [{"prefix_ids": ids[: tb_config.prefix_len + 1], "suffix_ids": ids[tb_config.prefix_len + 1 :]}
                             for ids in (tokenizer(r["text"])["input_ids"] for r in read_jsonl(paths.corpus)[:400])],
    }
    edit_point = chosen(grids["kfac"], 1.10)
    spec = EditSpec.from_json(layers(edit_point["keep_mass"]), method="kfac")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, records in tasks.items():
            files[name] = Path(tmp) / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
        task_data = {name: task_batches(path, tokenizer) for name, path in files.items()}
        predicted = {}
        for mode in MODES:
            costs = predict_cost(model, factors, spec, task_data, mode=mode, cache=cache)
            predicted[mode] = {c.task: c.share for c in costs}
            predicted["loss_estimate"] = {c.task: c.loss_estimate for c in costs}
    before = {name: (mean_loss(model, padded(rows_of(r))), float(np.mean(exact_continuations(model, r))))
              for name, r in tasks.items()}  # fmt: skip
    apply_edit(model, factors, spec, cache=cache)
    after = {name: (mean_loss(model, padded(rows_of(r))), float(np.mean(exact_continuations(model, r))))
             for name, r in tasks.items()}  # fmt: skip
    restore(model)
    task_rows = [
        {"task": name, "records": len(tasks[name]), **{f"predicted_{m}": predicted[m][name] for m in MODES},
         "predicted_loss_estimate": predicted["loss_estimate"][name], "loss_before": before[name][0],
         "loss_increase": after[name][0] - before[name][0], "accuracy_before": before[name][1],
         "accuracy_drop": before[name][1] - after[name][1]}
        for name in tasks
    ]  # fmt: skip
    prediction = {
        "edit": {"method": "kfac", "keep_mass": edit_point["keep_mass"], "perplexity": edit_point["perplexity"]},
        "tasks": task_rows,
        "spearman": {
            f"{mode}_vs_{measure}": spearman([r[f"predicted_{mode}"] for r in task_rows], [r[measure] for r in task_rows])
            for mode in (*MODES, "loss_estimate") for measure in ("loss_increase", "accuracy_drop")
        },  # fmt: skip
    }
    timings["predict_cpu_s"] = time.process_time() - t
    timings["total_cpu_s"] = time.process_time() - cpu0
    timings["total_wall_s"] = time.perf_counter() - wall0
    result = {
        "benchmark": "ekfac_study",
        "command": " ".join(["python", *sys.argv]),
        "config": {"testbed": tb_config.to_dict(), "testbed_hash": tb_config.config_hash(), "blocks": BLOCKS,
                   "projections": KINDS, "factor_tokens": args.factor_tokens, "labels": args.labels, "grid": GRID,
                   "ppl_budgets": PPL_BUDGETS, "canary_levels": CANARY_LEVELS, "holdout_fraction": 0.5,
                   "protect_records": args.protect_records, "protect_weights": weights, "torch_threads": 1},  # fmt: skip
        "base": base,
        "factors": {"tokens": factors.manifest.get("tokens"), "ekfac_labelled_tokens": ekfac.manifest["labelled_tokens"]},
        "ekfac_vs_kfac": comparison,
        "protection": protection,
        "prediction": prediction,
        "grids": grids,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("base", "ekfac_vs_kfac", "protection", "timings")}, indent=1))
    print(json.dumps(prediction, indent=1))
    return 0


def finish(args, tb_config, base, factors, ekfac, comparison, grids, timings, cpu0, wall0, capability) -> int:
    """The text testbed's result (step 2 only): ``rule_accuracy`` holds ``capability`` (fact recall) there."""
    timings["total_cpu_s"] = time.process_time() - cpu0
    timings["total_wall_s"] = time.perf_counter() - wall0
    result = {
        "benchmark": "ekfac_study",
        "command": " ".join(["python", *sys.argv]),
        "config": {"testbed": tb_config.to_dict(), "testbed_kind": "text", "testbed_hash": tb_config.config_hash(),
                   "blocks": BLOCKS, "projections": KINDS, "factor_tokens": args.factor_tokens,
                   "factor_data": "factor_corpus.jsonl", "ppl_tokens": TEXT_PPL_TOKENS, "labels": args.labels,
                   "grid": GRID, "ppl_budgets": TEXT_PPL_BUDGETS, "holdout_fraction": 0.5, "torch_threads": 1,
                   "rule_accuracy_is": capability},  # fmt: skip
        "base": base,
        "factors": {"tokens": factors.manifest.get("tokens"), "ekfac_labelled_tokens": ekfac.manifest["labelled_tokens"]},
        "ekfac_vs_kfac": comparison,
        "grids": grids,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("base", "ekfac_vs_kfac", "timings")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
