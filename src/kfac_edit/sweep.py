"""``kfac-edit sweep``: which blocks, which projections, which keep_mass? A grid search with a resumable log.

The grid (:func:`sweep_points`): for each method, every single block of ``blocks`` and every run of up to
``max_combo`` adjacent blocks (or the explicit ``groups``), times each projection set, times each keep_mass of the
method. For each point the model is edited in place (:func:`~kfac_edit.edit.apply_edit` with a shared
:class:`~kfac_edit.eigen.EigenCache`: each factor is eigendecomposed once per sweep), evaluated
(:func:`~kfac_edit.evaluate.suite.evaluate`) and restored bit for bit.

Held-out selection: the memorized records are split (:func:`split_records`, ``holdout_fraction``, by a hash of each
record's content and the seed) into a selection part, on which the best point is chosen, and a held-out part that
measures the choice; each record's metrics hold both (``selection_strict``, ``heldout_strict`` ...; the plain
``strict`` pools both parts). Capability sets (``capability``: records only a working model continues exactly, e.g.
held-out rule sequences) are evaluated like memorized sets but reported as ``STEM_accuracy``, outside the pool.

Files in the output directory ``DIR``:

* ``results.jsonl``: one record per point as it finishes, plus one ``base`` record for the unedited model (schema in
  :mod:`kfac_edit.pareto`). A rerun skips points already there (resume); a torn last line is repaired.
* ``sweep.json``: the identity that makes results comparable (:func:`_identity`; a rerun with another is refused),
  the grid, the perplexity budget and the split (sizes, fraction, seed); ``split/{selection,heldout}.jsonl``: the
  two parts of the memorized records, as read.
* ``best.json``: the point with the lowest strict memorization on the selection part whose perplexity is within
  ``ppl_budget`` x the base perplexity, as ``kfac-edit edit --layers-file DIR/best.json`` applies it.
* ``spectra.json``, ``records.jsonl``, ``provenance.json``, ``report.html``, ``report.md``, ``plots/*.png``: the
  report of the chosen point (:mod:`kfac_edit.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .bsn import BsnConfig
from .constants import BEST_FILE, PROVENANCE_FILE, RECORDS_FILE, RESULTS_FILE, SPECTRA_FILE, SPLIT_DIR, SWEEP_FILE
from .edit import apply_edit, check_factors, resolve_targets, restore
from .eigen import EigenCache
from .errors import UserError
from .evaluate.suite import (_set_names, check_inputs, config_field, evaluate, flat_metrics, headline_metrics,
                             memorized_outputs, own_reference_topk)
from .fileio import append_jsonl, atomic_path, read_jsonl, write_json
from .identity import model_fingerprint, weights_digest
from .models import PROJECTIONS, find_projections, model_limits, num_blocks, projection_kinds
from .pareto import BASE_CONFIG, PointConfig, SweepRecord, base_record, chosen_point, read_results
from .spec import NO_EDIT_AT, EditSpec, Method

log = logging.getLogger(__name__)

SELECTION, HELDOUT = "selection", "heldout"  # the parts of the memorized records (metric prefixes, file stems)


@dataclass
class SweepConfig:
    """The grid of a sweep and how its best point is chosen."""

    blocks: list[int] | None = config_field(
        None, "blocks to sweep, e.g. 20-27 (default: every block the factors cover)")
    projection_sets: list[tuple[str, ...]] | None = config_field(
        None, "projection sets, each edited as a whole (default: gate,up; up in a model without gate)")
    keep_masses: list[float] = config_field([0.5, 0.6, 0.7, 0.8, 0.9], "keep_mass values to try")
    max_combo: int = config_field(3, "longest run of adjacent blocks edited together")
    ppl_budget: float = config_field(1.2, "best point: perplexity at most this multiple of the base perplexity")
    methods: list[str] = config_field(["kfac"], "edit methods to sweep (kfac, kfac-independent, svd, random, bsn)")
    method_keep_masses: dict[str, list[float]] = config_field(
        {}, "per-method keep_mass grids replacing keep_masses, e.g. svd=0.7,0.8")
    groups: list[tuple[int, ...]] | None = config_field(
        None, "block groups edited together, instead of the runs of --blocks/--max-combo")
    holdout_fraction: float = config_field(0.5, "share of the memorized records held out from the choice (0: no split)")
    capability: list[str] = config_field([], "capability record files, reported as STEM_accuracy (e.g. held-out rules)")
    skip_over: float | None = config_field(None, "points over this multiple of the base perplexity get no "
                                           "memorization pass (metrics: perplexity and memorization_skipped; "
                                           "never chosen)")
    seed: int = config_field(0, "seed of the held-out split and of the random method")
    clean_data: str | None = config_field(None, "clean text (SOURCE) whose loss bsn keeps; needed by method bsn")
    forget: str | None = config_field(None, "records bsn learns to forget (default: the selection part of the split)")
    bsn: BsnConfig = config_field(BsnConfig(), "hyper-parameters of method bsn")

    def keep_masses_of(self, method: str) -> list[float]:
        return list(self.method_keep_masses.get(method, self.keep_masses))

    def validate(self) -> None:
        if not self.methods:
            raise UserError("no edit method; give e.g. --method kfac,svd")
        for method in [*self.methods, *self.method_keep_masses]:
            Method.parse(method, "edit method")
        extra = sorted(set(self.method_keep_masses) - set(self.methods))
        if extra:
            raise UserError(f"--keep-mass {extra[0]}=... names a method the sweep does not run; add it to --method")
        for method in self.methods:
            if not self.keep_masses_of(method):
                raise UserError(f"no keep_mass to try for {method}; give e.g. --keep-mass 0.6,0.7,0.8,0.9")
            for k in self.keep_masses_of(method):
                if not 0.0 <= k < NO_EDIT_AT:
                    raise UserError(f"--keep-mass {k} is outside [0, 1) (keep_mass >= {NO_EDIT_AT} edits nothing)")
        if not (self.holdout_fraction == 0 or 0 < self.holdout_fraction < 1):
            raise UserError(f"--holdout-fraction {self.holdout_fraction} is outside (0, 1); e.g. 0.5 (0: no split)")
        if self.skip_over is not None and not (self.skip_over >= self.ppl_budget and math.isfinite(self.skip_over)):
            raise UserError(f"--skip-over {self.skip_over} must be at least --ppl-budget {self.ppl_budget:g}")
        if self.groups is not None and (not self.groups or not all(self.groups)):
            raise UserError("--group names no block; give e.g. --group 0-1")
        if self.projection_sets == []:
            raise UserError("no projection set; give e.g. --projections gate,up")
        for s in self.projection_sets or []:
            if not s or any(k not in PROJECTIONS for k in s):
                raise UserError(f"--projections {','.join(s)} is not a subset of gate,up,down")
        if self.max_combo < 1:
            raise UserError(f"--max-combo {self.max_combo} must be at least 1")
        if not (self.ppl_budget > 0 and math.isfinite(self.ppl_budget)):
            raise UserError(f"--ppl-budget {self.ppl_budget} must be a positive number, e.g. 1.2")
        if self.blocks is not None and not self.blocks:
            raise UserError("--blocks names no block; give e.g. 20-27")
        if Method.BSN.value in self.methods:
            if not self.clean_data:
                raise UserError("method bsn needs clean text: pass --clean-data SOURCE (e.g. the training mixture)")
            self.bsn.validate()


def block_groups(blocks: Sequence[int], max_combo: int) -> list[tuple[int, ...]]:
    """Single blocks, then runs of 2..max_combo adjacent blocks all in ``blocks`` (``[0, 1, 3]``, 2 ->
    ``(0,), (1,), (3,), (0, 1)``)."""
    have = set(blocks)
    return [tuple(range(start, start + size)) for size in range(1, max_combo + 1) for start in sorted(have)
            if all(b in have for b in range(start, start + size))]


def sweep_points(config: SweepConfig, blocks: Sequence[int]) -> list[PointConfig]:
    """The grid, in order: method, projection set, block group (``config.groups``, else the runs of
    :func:`block_groups`, short ones first), keep_mass; a point given twice (a repeated --group or projection set)
    comes once."""
    groups = [tuple(sorted(set(g))) for g in config.groups] if config.groups else block_groups(blocks, config.max_combo)
    points = [PointConfig(method, group, tuple(k for k in PROJECTIONS if k in projections), float(keep_mass))
              for method in config.methods for projections in config.projection_sets for group in groups
              for keep_mass in config.keep_masses_of(method)]
    return list({point.id: point for point in points}.values())


def split_records(records: Sequence[Any], holdout_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split ``records`` (JSON-able, e.g. the lines of memorized-set files) into (selection, held-out), each in the
    order given: the ``round(holdout_fraction * n)`` records first by SHA-256 of ``seed`` and their canonical JSON
    are held out, so a rerun, a shuffled file or the same records in another file give the same parts.
    :class:`UserError` when the fraction is outside (0, 1) or leaves either part empty."""
    n = len(records)
    if not 0 < holdout_fraction < 1:
        raise UserError(f"--holdout-fraction {holdout_fraction} is outside (0, 1); e.g. 0.5")
    n_heldout = round(holdout_fraction * n)
    if n_heldout == 0 or n_heldout == n:
        part = "held-out" if n_heldout == 0 else "selection"
        raise UserError(f"--holdout-fraction {holdout_fraction} of {n} memorized records leaves the {part} part "
                        "empty; give a fraction nearer 0.5 or more records")

    def rank(i: int) -> tuple[str, int]:
        text = f"{seed}\n" + json.dumps(records[i], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest(), i

    heldout = set(sorted(range(n), key=rank)[:n_heldout])
    return [r for i, r in enumerate(records) if i not in heldout], [r for i, r in enumerate(records) if i in heldout]


def point_metrics(eval_record: dict[str, Any], parts: dict[str, str] | None = None,
                  capability: dict[str, str] | None = None) -> dict[str, float]:
    """A sweep record's metrics: :func:`~kfac_edit.evaluate.suite.headline_metrics`, then every other scalar under its
    dotted name. ``parts`` maps set names to ``selection``/``heldout`` (their strict, loose, avg_levenshtein_norm come
    as ``selection_strict`` ...); ``capability`` maps set names to labels (left out of the pool; ``LABEL_accuracy``)."""
    metrics = eval_record["metrics"]
    capability = capability or {}
    memorized = metrics.get("memorized") or {}
    out = headline_metrics({**metrics, "memorized": {n: s for n, s in memorized.items() if n not in capability}})
    for name, part in (parts or {}).items():
        for key in ("strict", "loose", "avg_levenshtein_norm"):
            out[f"{part}_{key}"] = memorized[name][key]
    for name, label in capability.items():
        out[f"{label}_accuracy"] = memorized[name]["strict"]
    for name, value in flat_metrics(metrics).items():
        out.setdefault(name, value)
    return out


@dataclass
class SweepOutcome:
    records: list[SweepRecord]
    chosen: SweepRecord | None  # the best point over every method
    best_path: Path | None
    evaluated: int  # points evaluated by this call (the others were already in results.jsonl)
    split: dict[str, Any] | None = None  # sizes, fraction and seed of the held-out split (None: no split)


def sweep_blocks(model, config: SweepConfig, factor_names: Sequence[str] | None) -> list[int]:
    """The blocks of ``config.groups`` or ``config.blocks`` checked against the model, else every block the factors
    cover (every block without factors)."""
    n_blocks = num_blocks(model)
    wanted = sorted({b for g in config.groups for b in g}) if config.groups else config.blocks
    if wanted is not None:
        bad = [b for b in wanted if not 0 <= b < n_blocks]
        if bad:
            raise UserError(f"block {bad[0]} does not exist: the model has blocks 0..{n_blocks - 1}; "
                            "fix --blocks/--group")
        return sorted(set(wanted))
    if factor_names is None:
        return list(range(n_blocks))
    names = set(factor_names)
    blocks = sorted({p.block for p in find_projections(model) if p.name in names})
    if not blocks:
        raise UserError("the factors cover no block of this model; collect factors for it or pass --blocks")
    return blocks


def with_projection_sets(model, config: SweepConfig) -> SweepConfig:
    """``config`` with its default projection set made explicit: gate,up, or up alone in a model without gate (every
    kind it has when it has neither, e.g. ``--modules down=...``)."""
    if config.projection_sets is not None:
        return config
    kinds = projection_kinds(model)
    input_side = tuple(k for k in ("gate", "up") if k in kinds) or tuple(kinds)
    return dataclasses.replace(config, projection_sets=[input_side])


def needed_modules(model, config: SweepConfig, factor_names: Sequence[str] | None) -> list[str]:
    """Names of every module some point of the grid edits (the factors to load)."""
    config = with_projection_sets(model, config)
    kinds = sorted({k for s in config.projection_sets for k in s}, key=PROJECTIONS.index)
    return [p.name for p in find_projections(model, layers=sweep_blocks(model, config, factor_names),
                                             projections=kinds)]


def _identity(model, factors, config: SweepConfig, eval_config, split: tuple[list, list] | None) -> dict[str, Any]:
    """What must match for a rerun to resume (results under other settings would not be comparable).
    ``factors_digest``: per module, :meth:`~kfac_edit.factors.store.Factors.content_hash`, so factors with other
    content never resume each other's sweep, whatever their names (:func:`_check_resume` compares the modules both
    read). ``memorized_digest``: the split records themselves (an edited file under the same name splits otherwise)."""
    manifest = getattr(factors, "manifest", {}) or {}
    identity = {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "model_fingerprint": model_fingerprint(model),
        "weights_digest": weights_digest(model),
        "factors": manifest.get("run_id") or manifest.get("directory") or manifest.get("model"),
        "factors_digest": None if factors is None else {n: factors.content_hash(n) for n in sorted(factors.names)},
        "methods": sorted(config.methods),
        "seed": config.seed,
        "holdout_fraction": config.holdout_fraction,
        "capability": list(config.capability),
        "skip_over": config.skip_over,
        "eval": {k: v for k, v in asdict(eval_config).items() if k not in ("out", "model")},
    }
    if Method.BSN.value in config.methods:
        identity["bsn"] = {**asdict(config.bsn), "clean_data": config.clean_data, "forget": config.forget}
    if split is not None:
        identity["memorized_digest"] = hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()
    return identity


def _check_resume(out: Path, identity: dict[str, Any]) -> None:
    path, results = out / SWEEP_FILE, out / RESULTS_FILE
    if not path.exists():
        if results.exists():
            raise UserError(f"{out} holds {RESULTS_FILE} but no {SWEEP_FILE}; use a new --out DIR")
        return
    if not results.exists() or not results.read_bytes().strip():  # a sweep that failed before its first result:
        return  # nothing to resume, so its settings bind nothing (a corrected retry starts afresh)
    try:
        old = json.loads(path.read_text()).get("identity", {})
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; remove {out} or use a new --out DIR") from None
    differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    od, nd = old.get("factors_digest"), identity.get("factors_digest")
    if "factors_digest" in differ and od is not None and nd and all(od[n] == nd[n] for n in set(od) & set(nd)):
        differ.remove("factors_digest")
    differ = ["--factors content" if k == "factors_digest" else "--method" if k == "methods" else k for k in differ]
    if "eval" in differ:
        differ.remove("eval")
        oe, ne = old.get("eval", {}), identity.get("eval", {})
        differ += sorted(f"--{k.replace('_', '-')}" for k in set(oe) | set(ne) if oe.get(k) != ne.get(k))
    if differ:
        raise UserError(f"{out} holds a sweep with other settings ({', '.join(differ)} differ); rerun with the same "
                        "settings to resume, or use a new --out DIR")


def _repair_torn_tail(path: Path) -> None:
    """Cut a partial last line (left by a killed run) so that appended records start on a line of their own."""
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        log.warning("%s: dropping a partial last line left by an interrupted run", path)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data[: data.rfind(b"\n") + 1])


def _edit_summary(report) -> dict[str, Any]:
    keys = ("name", "keep_mass", "mass_fraction", "pairs_fraction", "grad_vectors_used", "act_vectors_used",
            "weight_change")
    return {"seconds": report.seconds, "modules": [{k: getattr(m, k) for k in keys} for m in report.modules]}


def _apply(model, point: PointConfig, factors, cache: EigenCache, seed: int, method_inputs: dict | None):
    """Edit ``model`` in place at ``point``; ``method_inputs``: per method, the extra
    :func:`~kfac_edit.edit.apply_edit` arguments (``bsn``'s data, ``ekfac``'s eigenvalues)."""
    spec = EditSpec({(b, k): point.keep_mass for b in point.blocks for k in point.projections}, point.method, seed)
    return apply_edit(model, factors if spec.needs_factors else None, spec, cache=cache,
                      **(method_inputs or {}).get(spec.method, {}))


def check_sweep_configs(config: SweepConfig, eval_config) -> None:
    """What a sweep needs of its configs, checked before any model is loaded: :class:`UserError` otherwise."""
    config.validate()
    eval_config.validate()
    if not eval_config.memorized:
        raise UserError("the sweep needs a memorized set to measure: pass --memorized FILE")
    if not eval_config.perplexity_data:
        raise UserError("the sweep needs --perplexity-data SOURCE: the best point is chosen within a perplexity budget")
    memorized = {Path(p).resolve() for p in eval_config.memorized}
    both = next((p for p in config.capability if Path(p).resolve() in memorized), None)
    if both is not None:
        raise UserError(f"--capability {both} is also a --memorized set; give a file as one or the other")


def run_sweep(model: torch.nn.Module, tokenizer, factors, config: SweepConfig, eval_config,
              out_dir: str | os.PathLike, cache: EigenCache | None = None, write_report: bool = True,
              outputs_for=None) -> SweepOutcome:
    """Run (or resume) the sweep of ``config`` (see the module docstring). ``factors`` may be ``None`` for methods
    without factors; ``outputs_for(records)`` picks the point whose ``records.jsonl`` and spectra the report shows
    (default: the chosen one). Wrong input: :class:`UserError` before any work."""
    from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log
    from . import report as report_module

    check_sweep_configs(config, eval_config)
    config = with_projection_sets(model, config)
    eval_config.out = None  # the sweep writes its own records
    restore(model)
    with_capability = dataclasses.replace(eval_config, memorized=[*eval_config.memorized, *config.capability])
    check_inputs(with_capability, tokenizer, model.get_input_embeddings().num_embeddings,  # before anything is written
                 model_limits(model.config)[1], has_reference=True)
    blocks = sweep_blocks(model, config, factors.names if factors is not None else None)
    points = sweep_points(config, blocks)
    targets = resolve_targets(model, EditSpec({(b, k): 0.5 for p in points for b in p.blocks for k in p.projections}))
    needs_factors = any(Method.parse(m).needs_factors for m in config.methods)
    if needs_factors:
        check_factors(targets, factors)
    split_parts = None  # the records of every --memorized file (checked by check_inputs above), split
    if config.holdout_fraction:
        records = [r for path in eval_config.memorized for r in read_jsonl(path)]
        split_parts = split_records(records, config.holdout_fraction, config.seed)

    out = Path(out_dir)
    started_at = time.time()
    identity = _identity(model, factors, config, eval_config, split_parts)
    _check_resume(out, identity)
    cache = cache if cache is not None else EigenCache(None)
    results = out / RESULTS_FILE
    done = {r.id for r in read_results(results)} if results.exists() else set()
    pending = [p for p in points if p.id not in done]
    if needs_factors and pending:  # before anything is written or evaluated: factors that cannot edit fail here
        names = sorted({proj.name for proj, _ in targets})
        for name in tqdm(names, desc="eigendecompositions", unit="module", disable=None):
            cache.get(factors, name)  # once for the whole sweep (memory, else disk)
    method_inputs = {Method.BSN: {"bsn": _bsn_inputs(config, split_parts, eval_config, tokenizer, model)},
                     Method.EKFAC: {"ekfac": _ekfac_inputs(config, factors, targets)}}  # checks before any file
    out.mkdir(parents=True, exist_ok=True)
    split, evaluated_sets = None, list(eval_config.memorized)
    if split_parts is not None:
        evaluated_sets = [f"{out / SPLIT_DIR / part}.jsonl" for part in (SELECTION, HELDOUT)]
        for path, records in zip(evaluated_sets, split_parts):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        split = {"holdout_fraction": config.holdout_fraction, "seed": config.seed, SELECTION: len(split_parts[0]),
                 HELDOUT: len(split_parts[1]), "files": [f"{SPLIT_DIR}/{part}.jsonl" for part in (SELECTION, HELDOUT)]}
    names = _set_names(evaluated_sets + list(config.capability))
    parts = dict(zip(names, (SELECTION, HELDOUT))) if split is not None else {}
    capability = {n: Path(p).stem for n, p in zip(names[len(evaluated_sets):], config.capability)}
    memorized_given = list(eval_config.memorized)
    eval_config = dataclasses.replace(eval_config, memorized=evaluated_sets + list(config.capability))
    grid = {"blocks": blocks, "methods": list(config.methods),
            "projection_sets": [list(s) for s in config.projection_sets],
            "keep_masses": {m: config.keep_masses_of(m) for m in config.methods},
            "groups": [list(g) for g in config.groups] if config.groups else None, "max_combo": config.max_combo,
            "points": len(points)}
    write_json(out / SWEEP_FILE, {"identity": identity, "grid": grid, "split": split, "ppl_budget": config.ppl_budget})
    _repair_torn_tail(results)
    reference_topk = own_reference_topk(model, tokenizer, eval_config)

    def measure(ppl_limit: float | None = None) -> dict[str, float]:
        if ppl_limit is None:
            return point_metrics(evaluate(model, tokenizer, eval_config, reference_topk=reference_topk), parts,
                                 capability)
        # perplexity first; memorization (the generation passes) only for a point within the limit
        first = evaluate(model, tokenizer, dataclasses.replace(eval_config, memorized=[], quotes=[], ndcg_data=None,
                                                               reference_model=None))
        if first["metrics"]["perplexity"]["perplexity"] > ppl_limit:
            return {**point_metrics(first), "memorization_skipped": 1.0}
        rest = evaluate(model, tokenizer, dataclasses.replace(eval_config, perplexity_data=None),
                        reference_topk=reference_topk)
        rest["metrics"]["perplexity"] = first["metrics"]["perplexity"]
        return point_metrics(rest, parts, capability)

    if "base" not in done:
        t0 = time.perf_counter()
        base = SweepRecord(BASE_CONFIG, measure(), kind="base", seconds=round(time.perf_counter() - t0, 3))
        append_jsonl(results, base.to_dict())
        log.info("base model: strict %.4f, perplexity %.4f", base.strict, base.perplexity)
    ppl_limit = None if config.skip_over is None else config.skip_over * base_record(read_results(results)).perplexity
    log.info("sweep: %d points, %d done, %d to run", len(points), len(points) - len(pending), len(pending))
    bar = tqdm(pending, desc="sweep", unit="point", disable=None)
    started = time.perf_counter()
    for i, point in enumerate(bar, 1):
        t0 = time.perf_counter()
        try:
            report = _apply(model, point, factors, cache, config.seed, method_inputs)
            metrics = measure(ppl_limit)
        finally:
            restore(model)
        record = SweepRecord(point, metrics, edit=_edit_summary(report), seconds=round(time.perf_counter() - t0, 3))
        append_jsonl(results, record.to_dict())
        summary = f"{record.label()}: strict {record.strict:.3f} ppl {record.perplexity:.3f}"
        bar.set_postfix_str(summary)
        if bar.disable:  # --no-progress: one log line per point, with the time left
            left = (time.perf_counter() - started) / i * (len(pending) - i)
            log.info("[%d/%d] %s (%s left)", i, len(pending), summary, bar.format_interval(left))

    records = read_results(results)
    chosen = chosen_point(records, config.ppl_budget)
    best_path = out / BEST_FILE
    if chosen is not None:
        write_json(best_path, chosen.config.layers_file(config.seed))
    else:
        best_path.unlink(missing_ok=True)
        (out / SPECTRA_FILE).unlink(missing_ok=True)
        log.warning("no point is within %g x the base perplexity; no %s written", config.ppl_budget, BEST_FILE)
        best_path = None
    shown = outputs_for(records) if outputs_for is not None else chosen
    if shown is not None:
        write_point_outputs(out, model, tokenizer, shown, factors, cache,
                            dataclasses.replace(eval_config, memorized=evaluated_sets), parts, config.seed,
                            method_inputs)
    else:
        (out / RECORDS_FILE).unlink(missing_ok=True)
    report_module.write_provenance(out / PROVENANCE_FILE, report_module.provenance(
        model, factors_manifest=getattr(factors, "manifest", None), memorized=memorized_given, split=split,
        started=started_at, weights_digest=identity["weights_digest"], capability=list(config.capability)))
    if write_report:
        report_module.write_report(out, ppl_budget=config.ppl_budget)
    return SweepOutcome(records=records, chosen=chosen, best_path=best_path, evaluated=len(pending), split=split)


def _ekfac_inputs(config: SweepConfig, factors, targets):
    """The EK-FAC eigenvalues of ``factors`` (from their directory) when the sweep runs ``ekfac``, checked to be in
    their eigenbasis; else ``None``."""
    if Method.EKFAC.value not in config.methods:
        return None
    from .factors.ekfac import Ekfac

    names = [proj.name for proj, _ in targets]
    ekfac = Ekfac.load((factors.manifest or {}).get("directory") or "", names=names)
    ekfac.check_basis(factors, names)
    return ekfac


def _bsn_inputs(config: SweepConfig, split: tuple[list[dict], list[dict]] | None, eval_config, tokenizer, model):
    """The data of method bsn (``None`` when the sweep does not run it): forget records ``config.forget`` (refused
    when sharing a record with the held-out part of ``split``), else the selection part (all without a split)."""
    if Method.BSN.value not in config.methods:
        return None
    from .bsn import BsnInputs, check_disjoint, load_bsn_data
    from .evaluate.records import _parse_record, load_records

    vocab = model.get_input_embeddings().num_embeddings
    lengths = (eval_config.prefix_len, eval_config.suffix_len)

    def parse(records, part):
        return [_parse_record(r, f"{part} record {i + 1}", tokenizer, *lengths, vocab) for i, r in enumerate(records)]

    if config.forget is not None:
        forget = load_records(config.forget, tokenizer, *lengths, vocab)
        if split is not None:
            check_disjoint(forget, parse(split[1], HELDOUT), where=f"--forget {config.forget}")
    elif split is not None:
        forget = parse(split[0], SELECTION)
    else:
        forget = [r for path in eval_config.memorized for r in load_records(path, tokenizer, *lengths, vocab)]
    context = model_limits(model.config)[1]
    data = load_bsn_data(forget, config.clean_data, tokenizer, config.bsn, vocab_size=vocab, context=context)
    return BsnInputs(data, config.bsn)


def write_point_outputs(out: Path, model, tokenizer, point: SweepRecord, factors, cache: EigenCache, eval_config,
                        parts: dict[str, str] | None = None, seed: int = 0, method_inputs: dict | None = None) -> None:
    """What the report shows of one point (``model`` restored on return): ``records.jsonl`` (every memorized record
    continued by the base and the edited model) and, for a method with factors, ``spectra.json``."""
    from .report import write_records, write_spectra

    restore(model)
    before = memorized_outputs(model, tokenizer, eval_config)
    try:
        _apply(model, point.config, factors, cache, seed, method_inputs)
        after = memorized_outputs(model, tokenizer, eval_config)
    finally:
        restore(model)
    write_records(out / RECORDS_FILE, before, after, tokenizer, parts, point=point.label())
    if not Method.parse(point.config.method).needs_factors:
        (out / SPECTRA_FILE).unlink(missing_ok=True)
        return
    modules = {}
    for m in point.edit.get("modules", []):
        if m["name"] in factors:
            grad, act = cache.get(factors, m["name"])
            modules[m["name"]] = {"keep_mass": m.get("keep_mass"), "grad_eigvals": grad.values.cpu(),
                                  "act_eigvals": act.values.cpu(), "grad_used": m.get("grad_vectors_used"),
                                  "act_used": m.get("act_vectors_used"), "mass_fraction": m.get("mass_fraction")}
    write_spectra(out / SPECTRA_FILE, modules)
