"""BSN vs K-FAC vs SVD at matched held-out perplexity on a testbed's held-out canaries (issue 15, item 1).

One :func:`kfac_edit.sweep.run_sweep` per testbed with the methods ``kfac``, ``svd`` and ``bsn``, each over its own
keep_mass grid, on one block group (gate, up and down of every block), the canaries split into a selection half and a
held-out half (``--seed``, default 0). BSN learns its masks from the selection half only (the sweep's default forget set) and
from the same unlabeled text the K-FAC factors are collected on (the testbed's factor corpus) as clean text. A
second sweep runs ``bsn`` again with the paper's defaults as they are (5 epochs), labelled ``bsn-5ep``. For each
method and perplexity budget (+5/+10/+20% over the unedited model, on the held-out text), the point with the lowest
*selection* strict memorization within the budget is chosen (:func:`kfac_edit.pareto.match_by_cost`), and its
*held-out* strict memorization is what the table reports.

    python benchmarks/bsn_study.py [--testbed arith|text] [--seed N] [--bsn-epochs N] [--bsn-grid K,K,...] [--out FILE]

``--testbed text``: the default English-text testbed (``TextTestbedConfig()``, the demo's; cached under
``KFAC_EDIT_CACHE``), the K-FAC and SVD grids of ``DemoConfig.text()``, 150k factor tokens of ``factor_corpus.jsonl``,
perplexity on the first 13,200 tokens of the held-out text, fact recall (``facts.jsonl``) as the capability when the
testbed has it, and a coarser BSN grid (``--bsn-grid`` replaces it).
Writes the JSON (configuration, CPU/wall time, the table, every point) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Clock  # noqa: E402

BUDGETS = (0.05, 0.10, 0.20)
KFAC_GRID = (0.998, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.92, 0.9, 0.85, 0.8)
SVD_GRID = (0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.7, 0.65, 0.6)
BSN_GRID = (0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8)
# text testbed: the K-FAC and SVD grids of DemoConfig.text(); BSN over the ratios that moved the arithmetic testbed
TEXT_KFAC_GRID = (0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6)
TEXT_SVD_GRID = tuple(round(0.98 - 0.03 * i, 3) for i in range(20))
TEXT_BSN_GRID = (0.995, 0.99, 0.98, 0.95, 0.9, 0.8)
TEXT_PPL_TOKENS = 13_200  # DemoConfig.text(): perplexity tokens per point


def build(testbed: str):
    """(paths, config, seq_len of a training window, factor corpus) of ``testbed``: the quick arithmetic testbed, or
    the default text testbed (``TextTestbedConfig()``, the demo's; cached under ``KFAC_EDIT_CACHE``) whose factor
    corpus is ``factor_corpus.jsonl`` (the training prose without the canaries)."""
    if testbed == "arith":
        from kfac_edit.testbed import TestbedConfig, build_testbed

        config = TestbedConfig.quick()
        paths = build_testbed(config, progress=False)
        return paths, config, config.seq_len + 2, paths.corpus
    try:
        from kfac_edit.text_testbed import TextTestbedConfig, build_text_testbed
    except ImportError:
        raise SystemExit("--testbed text needs kfac_edit.text_testbed, which this checkout lacks") from None
    config = TextTestbedConfig()
    paths = build_text_testbed(config, progress=False)
    return paths, config, config.seq_len + 2, paths.factor_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", choices=["arith", "text"], default="arith")
    p.add_argument("--bsn-epochs", type=int, default=30,
                   help="epochs of the main bsn sweep (the paper's 5 make 15 steps on the quick testbed; the "
                   "second sweep keeps 5)")
    p.add_argument("--bsn-max-clean-tokens", type=int, default=20_000)
    p.add_argument("--factor-tokens", type=int, default=None,
                   help="factor tokens (default: 200000 arithmetic, 150000 text as in DemoConfig.text())")
    p.add_argument("--bsn-grid", default=None,
                   help="comma-separated bsn keep_mass grid replacing the testbed's (e.g. a finer one)")
    p.add_argument("--no-paper-sweep", action="store_true", help="skip the second bsn sweep with 5 epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the sampled labels and bsn")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    suffix = f"_seed{args.seed}" if args.seed else ""
    out = Path(args.out or f"benchmarks/results/bsn_study_{args.testbed}{suffix}.json")
    torch.set_num_threads(1)

    from kfac_edit.bsn import BsnConfig
    from kfac_edit.data import token_batches
    from kfac_edit.evaluate.suite import EvalConfig
    from kfac_edit.factors import collect_factors
    from kfac_edit.models import load_model
    from kfac_edit.pareto import base_record, match_by_cost, perplexity_increase
    from kfac_edit.sweep import SweepConfig, run_sweep

    text = args.testbed == "text"
    kfac_grid, svd_grid, bsn_grid = (TEXT_KFAC_GRID, TEXT_SVD_GRID, TEXT_BSN_GRID) if text else (
        KFAC_GRID, SVD_GRID, BSN_GRID)
    if args.bsn_grid:
        bsn_grid = tuple(float(v) for v in args.bsn_grid.split(","))
    if args.factor_tokens is None:
        args.factor_tokens = 150_000 if text else 200_000
    timings = {}
    with Clock() as c:
        paths, tb_config, window, factor_corpus = build(args.testbed)
    timings["testbed"] = c.timing.as_dict()
    model, tok = load_model(str(paths.model_dir), dtype="float32", device="cpu")
    blocks = list(range(model.config.num_hidden_layers))
    kinds = ("gate", "up", "down")
    with Clock() as c:
        batches = token_batches(str(factor_corpus), tok, seq_len=window, batch_size=128,
                                max_tokens=args.factor_tokens, with_index=True)
        factors = collect_factors(model, batches, layers=blocks, kinds=list(kinds), labels="sampled", seed=args.seed,
                                  max_tokens=args.factor_tokens, progress=False)
    timings["collect"] = c.timing.as_dict()
    evaluation = EvalConfig(memorized=[str(paths.memorized)], perplexity_data=str(paths.clean), prefix_len=None,
                            suffix_len=None, ppl_block=window, batch_size=64 if text else 128,
                            **({"max_tokens": TEXT_PPL_TOKENS} if text else {}))
    capability_file = Path(paths.rule_heldout)
    capability_files = [str(capability_file)] if capability_file.exists() else []
    bsn_main = BsnConfig(epochs=args.bsn_epochs, max_clean_tokens=args.bsn_max_clean_tokens, seed=args.seed)
    bsn_paper = BsnConfig(max_clean_tokens=args.bsn_max_clean_tokens, seed=args.seed)
    common = dict(projection_sets=[kinds], groups=[tuple(blocks)], holdout_fraction=0.5, seed=args.seed,
                  capability=capability_files, clean_data=str(factor_corpus), ppl_budget=1.2)
    sweeps = {
        "main": SweepConfig(methods=["kfac", "svd", "bsn"], keep_masses=list(kfac_grid),
                            method_keep_masses={"svd": list(svd_grid), "bsn": list(bsn_grid)}, bsn=bsn_main, **common),
    }
    if not args.no_paper_sweep:
        sweeps["bsn-5ep"] = SweepConfig(methods=["bsn"], keep_masses=list(bsn_grid), bsn=bsn_paper, **common)
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sweep in sweeps.items():
            with Clock() as c:
                outcome = run_sweep(model, tok, None if name != "main" else factors, sweep,
                                    dataclasses.replace(evaluation), Path(tmp) / name, write_report=False)
            timings[f"sweep_{name}"] = c.timing.as_dict()
            records[name] = outcome.records
    base = base_record(records["main"])
    cost = perplexity_increase(base)
    table = []
    capability = capability_file.stem + "_accuracy"
    for name, recs in records.items():
        chosen = match_by_cost(recs, cost, BUDGETS)
        for method, per_budget in chosen.items():
            label = method if name == "main" else name
            for budget, r in per_budget.items():
                row = {"method": label, "ppl_budget": budget}
                if r is not None:
                    m = r.metrics
                    row.update(keep_mass=r.config.keep_mass, heldout_strict=m["heldout_strict"],
                               selection_strict=m["selection_strict"], heldout_loose=m["heldout_loose"],
                               perplexity_increase=round(cost(r), 4), capability=m.get(capability))
                table.append(row)
    result = {
        "benchmark": "bsn_study",
        "command": "python benchmarks/bsn_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "testbed": args.testbed,
        "testbed_config": tb_config.to_dict(),
        "grids": {"kfac": kfac_grid, "svd": svd_grid, "bsn": bsn_grid},
        "ppl_tokens": TEXT_PPL_TOKENS if text else None,
        "blocks": blocks,
        "projections": kinds,
        "factor_tokens": args.factor_tokens,
        "bsn": {"main": dataclasses.asdict(bsn_main), "bsn-5ep": dataclasses.asdict(bsn_paper),
                "clean_data": "the factor corpus", "forget": "the selection half of the canaries"},
        "split": {"holdout_fraction": 0.5, "seed": args.seed},
        "base": {"perplexity": base.perplexity, "heldout_strict": base.metrics["heldout_strict"],
                 "selection_strict": base.metrics["selection_strict"], "capability": base.metrics.get(capability)},
        "capability_metric": capability,
        "table": table,
        "points": {name: [r.to_dict() for r in recs] for name, recs in records.items()},
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"base: perplexity {base.perplexity:.4f}, held-out strict {base.metrics['heldout_strict']:.3f}, "
          f"{capability} {base.metrics.get(capability)}")
    print("| method | ppl budget | keep_mass | held-out strict | selection strict | ppl increase | "
          f"{capability} |\n|---|---|---|---|---|---|---|")
    for row in table:
        if "keep_mass" not in row:
            print(f"| {row['method']} | +{100 * row['ppl_budget']:.0f}% | none within | | | | |")
            continue
        print(f"| {row['method']} | +{100 * row['ppl_budget']:.0f}% | {row['keep_mass']:g} | "
              f"{row['heldout_strict']:.3f} | {row['selection_strict']:.3f} | {100 * row['perplexity_increase']:+.1f}% | "
              f"{row['capability'] if row['capability'] is None else format(row['capability'], '.3f')} |")
    print(f"timings: {json.dumps(timings)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
