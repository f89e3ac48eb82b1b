"""``kfac-edit sweep``: which blocks, which projections, which keep_mass? A grid search with a resumable log.

The grid: every single block of ``blocks`` and every run of up to ``max_combo`` adjacent blocks, times each
projection set, times each keep_mass. For each point the model is edited in place (:func:`~kfac_edit.edit.apply_edit`
with a shared :class:`~kfac_edit.edit.EigenCache`, so each factor is eigendecomposed once for the whole sweep),
evaluated (:func:`~kfac_edit.evaluate.suite.evaluate`: memorization strict/loose, perplexity, optionally quotes and
nDCG against the unedited model) and restored bit for bit.

Files in the output directory ``DIR``:

* ``results.jsonl``: one record per point as it finishes, plus one ``base`` record for the unedited model (schema in
  :mod:`kfac_edit.pareto`). A rerun skips points already there (resume); a torn last line is repaired.
* ``sweep.json``: the settings that make results comparable (model, weights digest, factors, method, evaluation
  options); a rerun with other settings is refused. Also the grid and the perplexity budget.
* ``best.json``: the point with the lowest strict memorization whose perplexity is within ``ppl_budget`` x the
  base perplexity, in the layers-json format ``kfac-edit edit --layers-file DIR/best.json`` applies.
* ``spectra.json``: eigenvalues of G and A of the chosen point's modules; ``report.html``, ``report.md``,
  ``plots/*.png``: the report (:mod:`kfac_edit.report`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .edit import METHODS, NO_EDIT_AT, EditSpec, EigenCache, apply_edit, check_factors, resolve_targets, restore
from .errors import UserError
from .fileio import append_jsonl, atomic_path, write_json
from .models import PROJECTIONS, find_projections, model_fingerprint, num_blocks
from .pareto import RESULTS_FILE, BASE_CONFIG, PointConfig, SweepRecord, base_record, choose_best, read_results

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
BEST_FILE = "best.json"
SPECTRA_FILE = "spectra.json"


@dataclass
class SweepConfig:
    """The grid of a sweep and how its best point is chosen."""

    blocks: list[int] | None = field(
        default=None, metadata={"help": "blocks to sweep, e.g. 20-27 (default: every block the factors cover)"}
    )
    projection_sets: list[tuple[str, ...]] = field(
        default_factory=lambda: [("gate", "up")], metadata={"help": "projection sets, each edited as a whole"}
    )
    keep_masses: list[float] = field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9], metadata={"help": "keep_mass values to try"}
    )
    max_combo: int = field(default=3, metadata={"help": "longest run of adjacent blocks edited together"})
    ppl_budget: float = field(
        default=1.2, metadata={"help": "best point: perplexity at most this multiple of the base perplexity"}
    )
    method: str = field(default="kfac", metadata={"help": "edit method (kfac, kfac-independent, svd, random)"})
    seed: int = field(default=0, metadata={"help": "seed of the random method"})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown edit method '{self.method}'; use one of {', '.join(METHODS)}")
        if not self.keep_masses:
            raise UserError("no keep_mass to try; give e.g. --keep-mass 0.6,0.7,0.8,0.9")
        for k in self.keep_masses:
            if not 0.0 <= k < NO_EDIT_AT:
                raise UserError(f"--keep-mass {k} is outside [0, 1) (keep_mass >= {NO_EDIT_AT} edits nothing)")
        if not self.projection_sets:
            raise UserError("no projection set; give e.g. --projections gate,up")
        for s in self.projection_sets:
            if not s or any(k not in PROJECTIONS for k in s):
                raise UserError(f"--projections {','.join(s)} is not a subset of gate,up,down")
        if self.max_combo < 1:
            raise UserError(f"--max-combo {self.max_combo} must be at least 1")
        if not (self.ppl_budget > 0 and math.isfinite(self.ppl_budget)):
            raise UserError(f"--ppl-budget {self.ppl_budget} must be a positive number, e.g. 1.2")
        if self.blocks is not None and not self.blocks:
            raise UserError("--blocks names no block; give e.g. 20-27")


def block_groups(blocks: Sequence[int], max_combo: int) -> list[tuple[int, ...]]:
    """Single blocks, then runs of 2..max_combo adjacent blocks all in ``blocks`` (``[0, 1, 3]``, 2 ->
    ``(0,), (1,), (3,), (0, 1)``)."""
    have = sorted(set(blocks))
    groups: list[tuple[int, ...]] = []
    for size in range(1, max_combo + 1):
        for start in have:
            run = tuple(range(start, start + size))
            if all(b in have for b in run):
                groups.append(run)
    return groups


def sweep_points(config: SweepConfig, blocks: Sequence[int]) -> list[PointConfig]:
    """The grid, in order: projection set, then block group (short runs first), then keep_mass."""
    points = []
    for projections in config.projection_sets:
        ordered = tuple(k for k in PROJECTIONS if k in projections)
        for group in block_groups(blocks, config.max_combo):
            for keep in config.keep_masses:
                points.append(PointConfig(config.method, group, ordered, float(keep)))
    return points


def point_spec(point: PointConfig, seed: int = 0) -> EditSpec:
    return EditSpec({(b, k): point.keep_mass for b in point.blocks for k in point.projections}, point.method, seed)


def point_metrics(eval_record: dict[str, Any]) -> dict[str, float]:
    """A sweep record's metrics: the headline metrics of :func:`~kfac_edit.evaluate.suite.headline_metrics`
    (``strict``, ``loose``, ``avg_levenshtein_norm`` pooled over the memorized sets, ``perplexity``, ``ndcg``,
    ``quotes_*`` ...), then every other scalar of the evaluation under its dotted name."""
    from .evaluate.suite import flat_metrics, headline_metrics

    out = headline_metrics(eval_record["metrics"])
    for name, value in flat_metrics(eval_record["metrics"]).items():
        out.setdefault(name, value)
    return out


@dataclass
class SweepOutcome:
    records: list[SweepRecord]
    chosen: SweepRecord | None
    best_path: Path | None
    evaluated: int  # points evaluated by this call (the others were already in results.jsonl)


def _factor_blocks(model, names) -> list[int]:
    names = set(names)
    return sorted({p.block for p in find_projections(model) if p.name in names})


def sweep_blocks(model, config: SweepConfig, factor_names: Sequence[str] | None) -> list[int]:
    """``config.blocks`` checked against the model, else every block the factors cover (every block without)."""
    n_blocks = num_blocks(model)
    if config.blocks is not None:
        bad = [b for b in config.blocks if not 0 <= b < n_blocks]
        if bad:
            raise UserError(f"block {bad[0]} does not exist: the model has blocks 0..{n_blocks - 1}; fix --blocks")
        return sorted(set(config.blocks))
    if factor_names is not None:
        blocks = _factor_blocks(model, factor_names)
        if not blocks:
            raise UserError("the factors cover no block of this model; collect factors for it or pass --blocks")
        return blocks
    return list(range(n_blocks))


def needed_modules(model, config: SweepConfig, factor_names: Sequence[str] | None) -> list[str]:
    """Names of every module some point of the grid edits (the factors to load)."""
    blocks = sweep_blocks(model, config, factor_names)
    kinds = sorted({k for s in config.projection_sets for k in s}, key=PROJECTIONS.index)
    return [p.name for p in find_projections(model, layers=blocks, projections=kinds)]


def _identity(model, factors, config: SweepConfig, eval_config) -> dict[str, Any]:
    """What must match for a rerun to resume: results under other settings would not be comparable."""
    from .evaluate.ndcg import weights_digest

    manifest = getattr(factors, "manifest", {}) or {}
    eval_settings = {k: v for k, v in asdict(eval_config).items() if k not in ("out", "model")}
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "model_fingerprint": model_fingerprint(model),
        "weights_digest": weights_digest(model),
        "factors": manifest.get("run_id") or manifest.get("directory") or manifest.get("model"),
        "method": config.method,
        "seed": config.seed,
        "eval": eval_settings,
    }


def _check_resume(out: Path, identity: dict[str, Any]) -> None:
    import json

    path = out / SWEEP_FILE
    if not path.exists():
        if (out / RESULTS_FILE).exists():
            raise UserError(f"{out} holds {RESULTS_FILE} but no {SWEEP_FILE}; use a new --out DIR")
        return
    try:
        old = json.loads(path.read_text()).get("identity", {})
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; remove {out} or use a new --out DIR") from None
    differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if "eval" in differ:
        differ.remove("eval")
        oe, ne = old.get("eval", {}), identity.get("eval", {})
        differ += sorted(f"--{k.replace('_', '-')}" for k in set(oe) | set(ne) if oe.get(k) != ne.get(k))
    if differ:
        raise UserError(
            f"{out} holds a sweep with other settings ({', '.join(differ)} differ); rerun with the same settings to "
            "resume, or use a new --out DIR"
        )


def _repair_torn_tail(path: Path) -> None:
    """Cut a partial last line (left by a killed run) so that appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        log.warning("%s: dropping a partial last line left by an interrupted run", path)
        with atomic_path(path) as tmp:
            tmp.write_bytes(keep)


def _edit_summary(report) -> dict[str, Any]:
    return {
        "seconds": report.seconds,
        "modules": [
            {
                "name": m.name,
                "keep_mass": m.keep_mass,
                "mass_fraction": m.mass_fraction,
                "pairs_fraction": m.pairs_fraction,
                "grad_vectors_used": m.grad_vectors_used,
                "act_vectors_used": m.act_vectors_used,
                "weight_change": m.weight_change,
            }
            for m in report.modules
        ],
    }


def run_sweep(
    model: torch.nn.Module,
    tokenizer,
    factors,
    config: SweepConfig,
    eval_config,
    out_dir: str | os.PathLike,
    cache: EigenCache | None = None,
    write_report: bool = True,
) -> SweepOutcome:
    """Run (or resume) the sweep of ``config`` on ``model``, evaluating each point as ``eval_config`` says.

    ``model`` is edited in place point by point and restored after each; on return it holds its original weights.
    ``factors`` may be ``None`` only for the ``svd`` method. ``cache`` defaults to an in-memory
    :class:`EigenCache`. Raises :class:`UserError` before any work when an input is wrong.
    """
    from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    from .evaluate.suite import evaluate

    config.validate()
    eval_config.validate()
    if not eval_config.memorized:
        raise UserError("the sweep needs a memorized set to measure: pass --memorized FILE")
    if not eval_config.perplexity_data:
        raise UserError("the sweep needs --perplexity-data SOURCE: the best point is chosen within a perplexity budget")
    eval_config.out = None  # the sweep writes its own records
    restore(model)
    blocks = sweep_blocks(model, config, factors.names if factors is not None else None)
    points = sweep_points(config, blocks)
    everything = EditSpec(
        {(b, k): 0.5 for p in points for b in p.blocks for k in p.projections}, config.method, config.seed
    )
    targets = resolve_targets(model, everything)
    if everything.needs_factors:
        check_factors(targets, factors)

    out = Path(out_dir)
    identity = _identity(model, factors, config, eval_config)
    _check_resume(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / SWEEP_FILE,
        {
            "identity": identity,
            "grid": {
                "blocks": blocks,
                "projection_sets": [list(s) for s in config.projection_sets],
                "keep_masses": list(config.keep_masses),
                "max_combo": config.max_combo,
                "points": len(points),
            },
            "ppl_budget": config.ppl_budget,
        },
    )
    results = out / RESULTS_FILE
    _repair_torn_tail(results)
    done = {r.id for r in read_results(results)} if results.exists() else set()
    cache = cache if cache is not None else EigenCache(None)

    reference_topk = None
    if eval_config.ndcg_data and not eval_config.reference_model:
        from .evaluate import ndcg

        rows = max(1, eval_config.forward_tokens // eval_config.ndcg_seq_len)
        reference_topk = ndcg.reference_topk(
            model, tokenizer, eval_config.ndcg_data, eval_config.ndcg_k, eval_config.ndcg_seq_len,
            eval_config.max_tokens, rows,
        )

    def measure() -> dict[str, float]:
        return point_metrics(evaluate(model, tokenizer, eval_config, reference_topk=reference_topk))

    if "base" not in done:
        t0 = time.perf_counter()
        base = SweepRecord(BASE_CONFIG, measure(), kind="base", seconds=round(time.perf_counter() - t0, 3))
        append_jsonl(results, base.to_dict())
        log.info("base model: strict %.4f, perplexity %.4f", base.strict, base.perplexity)

    pending = [p for p in points if p.id not in done]
    if everything.needs_factors and pending:
        names = sorted({proj.name for proj, _ in targets})
        for name in tqdm(names, desc="eigendecompositions", unit="module", disable=None):
            cache.get(factors, name)  # once for the whole sweep (memory, else disk)
    log.info("sweep: %d points, %d done, %d to run", len(points), len(points) - len(pending), len(pending))
    bar = tqdm(pending, desc="sweep", unit="point", disable=None)
    started = time.perf_counter()
    for i, point in enumerate(bar, 1):
        t0 = time.perf_counter()
        try:
            report = apply_edit(model, factors, point_spec(point, config.seed), cache=cache)
            metrics = measure()
        finally:
            restore(model)
        record = SweepRecord(point, metrics, edit=_edit_summary(report), seconds=round(time.perf_counter() - t0, 3))
        append_jsonl(results, record.to_dict())
        summary = f"{record.label()}: strict {record.strict:.3f} ppl {record.perplexity:.3f}"
        bar.set_postfix_str(summary)
        if bar.disable:  # no bar (not a terminal): one log line per point, with the time left
            elapsed = time.perf_counter() - started
            left = elapsed / i * (len(pending) - i)
            log.info("[%d/%d] %s (%s left)", i, len(pending), summary, _duration(left))

    records = read_results(results)
    base = base_record(records)
    chosen = None
    if base is not None and base.perplexity > 0 and math.isfinite(base.perplexity):
        chosen = choose_best([r for r in records if r.kind == "point"], base.perplexity, config.ppl_budget)
    best_path = out / BEST_FILE
    if chosen is not None:
        layers = chosen.config.layers()
        write_json(best_path, layers if chosen.config.method == "kfac" else
                   {"method": chosen.config.method, "seed": config.seed, "layers": layers})
        if everything.needs_factors and chosen.config.method != "svd":
            _write_spectra(out, chosen, factors, cache)
    else:
        best_path.unlink(missing_ok=True)
        (out / SPECTRA_FILE).unlink(missing_ok=True)
        log.warning("no point is within %g x the base perplexity; no %s written", config.ppl_budget, BEST_FILE)
        best_path = None
    if write_report:
        from .report import write_report as _write_report

        _write_report(out, ppl_budget=config.ppl_budget)
    return SweepOutcome(records=records, chosen=chosen, best_path=best_path, evaluated=len(pending))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _write_spectra(out: Path, chosen: SweepRecord, factors, cache: EigenCache) -> None:
    from .report import write_spectra

    modules = {}
    for m in chosen.edit.get("modules", []):
        name = m["name"]
        if name not in factors:
            continue
        grad, act = cache.get(factors, name)
        modules[name] = {
            "keep_mass": m.get("keep_mass"),
            "grad_eigvals": grad.values.cpu(),
            "act_eigvals": act.values.cpu(),
            "grad_used": m.get("grad_vectors_used"),
            "act_used": m.get("act_vectors_used"),
            "mass_fraction": m.get("mass_fraction"),
        }
    write_spectra(out / SPECTRA_FILE, modules)
