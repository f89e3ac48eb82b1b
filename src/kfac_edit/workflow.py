"""The one-command workflow (``kfac-edit run``): evaluate the base model, edit it, save it, evaluate it again.

Everything lands in one directory ``DIR``::

    DIR/edited/             the edited model (save_pretrained + tokenizer + edit_report.json)
    DIR/evals.jsonl         the full evaluation records (:func:`kfac_edit.evaluate.evaluate`), base then edited
    DIR/before_after.json   headline metrics before and after, what ``kfac-edit report DIR`` shows
    DIR/records.jsonl, DIR/provenance.json, DIR/report.html, DIR/report.md   the report (:mod:`kfac_edit.report`)
    RESULTS (default DIR/runs.jsonl)   one summary line per run: before, after and delta side by side

nDCG compares with the base model unless ``EvalConfig.reference_model`` names another: its top-k are taken (and
cached) before the edit, and the base model's own nDCG is 1 (that pass is skipped). Every input is checked before
the first evaluation; no file is written when a check fails.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from .bsn import BsnInputs, load_bsn_data
from .constants import BEFORE_AFTER_FILE, EDITED_DIR, EVALS_FILE, PROVENANCE_FILE, RECORDS_FILE, RUNS_FILE
from .edit import (apply_edit, check_edit_inputs, check_output_dir, declare_modules, load_edit_factors,
                   resolve_targets, save_edited)
from .eigen import EigenCache
from .evaluate.suite import EvalConfig, check_inputs, evaluate, headline_metrics, own_reference_topk
from .factors.ekfac import Ekfac
from .fileio import append_jsonl, utc_timestamp, write_json
from .models import check_causal_lm, load_model, load_tokenizer, load_tokenizer_as_saved, model_limits, resolve_device
from .report import provenance, write_provenance, write_records, write_report
from .spec import EditSpec, Method


class RunPaths:
    """Where a run writes: ``out_dir`` and its ``edited``, ``evals``, ``before_after``; ``results`` (DIR/runs.jsonl)."""

    def __init__(self, out_dir: str | Path, results: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.edited, self.evals = self.out_dir / EDITED_DIR, self.out_dir / EVALS_FILE
        self.results = Path(results) if results else self.out_dir / RUNS_FILE
        self.before_after = self.out_dir / BEFORE_AFTER_FILE


def run_workflow(model_path: str, spec: EditSpec, factors_dir: str | None, config: EvalConfig, out_dir: str | Path,
                 results: str | Path | None = None, skip_baseline: bool = False, dtype: str = "auto",
                 device: str = "auto", modules: str | None = None, bsn: tuple | None = None,
                 cache_dir: str | Path | None = None) -> dict:
    """Load, evaluate, edit, save, evaluate again; return the summary line (also appended to the results JSONL).

    Every input is checked before the model loads; ``config.out`` is ignored (records go to ``DIR/evals.jsonl``).
    ``modules``: as ``collect`` takes them; ``bsn``: ``(forget records file, clean-text SOURCE, BsnConfig)`` for
    method bsn; ``cache_dir``: the eigen cache (default :func:`~kfac_edit.eigen.default_cache_dir`).
    """
    paths = RunPaths(out_dir, results)
    check_edit_inputs(spec, factors_dir)
    if spec.method is Method.EKFAC and not Ekfac.exists(factors_dir):
        Ekfac.load(factors_dir)  # the one-line error saying how to make them
    rows, positions = model_limits(check_causal_lm(model_path))  # token ids vs embedding rows, lengths vs context
    check_inputs(config, load_tokenizer(model_path), rows, positions, has_reference=True)
    check_output_dir(paths.edited, source=model_path)
    model, tokenizer = load_model(model_path, dtype=dtype, device=str(resolve_device(device)))
    declare_modules(model, modules, factors_dir)
    if bsn is not None:
        forget, clean, bsn_config = bsn
        vocab = model.get_input_embeddings().num_embeddings
        data = load_bsn_data(forget, clean, tokenizer, bsn_config, vocab_size=vocab, context=positions)
        bsn = BsnInputs(data, bsn_config)
    started = time.time()
    factors = load_edit_factors(model, spec, factors_dir)
    cache = EigenCache.default(cache_dir)
    names = [proj.name for proj, _ in resolve_targets(model, spec)]
    if factors is not None:  # every eigendecomposition before the first evaluation: bad factors fail here
        for name in names:
            cache.get(factors, name)
    ekfac = Ekfac.load(factors_dir, names=names) if spec.method is Method.EKFAC else None
    base_config = dataclasses.replace(config, out=str(paths.evals), model=model_path)
    records: list[dict] = []  # appended to evals.jsonl at the end: a failed run leaves no stale baseline there
    before_outputs, after_outputs = {}, {}  # per-record outputs of the memorized sets, for records.jsonl

    def evaluated(cfg: EvalConfig, **kwargs) -> dict:
        record = evaluate(model, tokenizer, dataclasses.replace(cfg, out=None), **kwargs)
        record["config"]["out"] = cfg.out
        records.append(copy.deepcopy(record))
        return record

    reference_topk = own_reference_topk(model, tokenizer, config)
    before_h = None
    if not skip_baseline:
        own = dataclasses.replace(base_config, ndcg_data=None) if reference_topk is not None else base_config
        asked = own.memorized or own.quotes or own.perplexity_data or own.ndcg_data
        before = evaluated(own, outputs=before_outputs) if asked else {"metrics": {}}
        if reference_topk is not None:
            before["metrics"]["ndcg"] = {f"ndcg@{config.ndcg_k}": 1.0, "positions": int(reference_topk.shape[0]),
                                         "k": config.ndcg_k, "seq_len": config.ndcg_seq_len,
                                         "note": "the base model is the reference"}
        before_h = headline_metrics(before["metrics"])

    report = apply_edit(model, factors, spec, cache=cache, ekfac=ekfac, bsn=bsn)
    report.factor_manifest.setdefault("directory", str(factors_dir) if factors_dir is not None else None)
    save_edited(model, load_tokenizer_as_saved(model_path), paths.edited, report)
    after = evaluated(dataclasses.replace(base_config, model=str(paths.edited)), reference_topk=reference_topk,
                      outputs=after_outputs)
    for record in records:
        append_jsonl(paths.evals, record)

    after_h = headline_metrics(after["metrics"])
    delta = {k: after_h[k] - before_h[k] for k in after_h if before_h and k in before_h}
    point = f"{spec.method} {spec.to_json()}"
    write_json(paths.before_after, {"before": {"label": "base", "metrics": before_h or {}},
                                    "after": {"label": point, "metrics": after_h}})
    if after_outputs:
        write_records(paths.out_dir / RECORDS_FILE, before_outputs, after_outputs, tokenizer, point=point)
    write_provenance(paths.out_dir / PROVENANCE_FILE, provenance(
        model, model_name=model_path, factors_manifest=report.factor_manifest, memorized=list(config.memorized),
        started=started, methods=[spec.method], layers=spec.layers()))
    write_report(paths.out_dir)
    summary = {
        "kind": "run", "timestamp": utc_timestamp(), "model": model_path, "edited_model": str(paths.edited),
        "edit": {"method": spec.method, "layers": spec.layers(), "seed": spec.seed, "seconds": report.seconds,
                 "pairs_fraction": {m.name: m.pairs_fraction for m in report.modules},
                 "weight_change": {m.name: m.weight_change for m in report.modules}},
        "factors": factors_dir, "before": before_h, "after": after_h, "delta": delta,
        "eval_config": dataclasses.asdict(base_config), "evals": str(paths.evals), "seconds": time.time() - started,
    }  # fmt: skip
    append_jsonl(paths.results, summary)
    return summary


def format_table(summary: dict) -> str:
    """The before / after / delta table of a run summary, as plain text."""
    before, after, delta = summary["before"] or {}, summary["after"], summary["delta"]
    lines = [f"{'metric':<32} {'before':>12} {'after':>12} {'delta':>12}"]
    for key, value in after.items():
        b = f"{before[key]:.4f}" if key in before else "-"
        d = f"{delta[key]:+.4f}" if key in delta else "-"
        lines.append(f"{key:<32} {b:>12} {value:>12.4f} {d:>12}")
    return "\n".join(lines)
