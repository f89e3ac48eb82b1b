"""Sweep results: the record schema of ``results.jsonl``, the Pareto front, and the choice of the best point.

The sweep (:mod:`kfac_edit.sweep`) writes one JSON line per evaluated point to ``DIR/results.jsonl``; the report
(:mod:`kfac_edit.report`) reads them. One record (schema version 1)::

    {
      "schema": 1,
      "id": "kfac|b20-22|gate,up|k0.8",          # stable key of the point; resume skips ids already present
      "kind": "point",                           # "point" (an edit) or "base" (the unedited model, one per sweep)
      "config": {
        "method": "kfac",                        # edit method (kfac, kfac-independent, svd, random)
        "blocks": [20, 21, 22],                  # edited blocks (a run of adjacent blocks); [] for the base
        "projections": ["gate", "up"],           # edited projection kinds in each block; [] for the base
        "keep_mass": 0.8                         # fraction of the curvature mass kept; 1.0 for the base
      },
      "layers": {"20": {"gate": 0.8, "up": 0.8}, ...},   # the point in layers-json form (``kfac-edit edit``)
      "metrics": {
        "strict": 0.12,                          # fraction of memorized records still reproduced exactly
        "loose": 0.30,                           # fraction with 1 - d/L >= the loose threshold
        "avg_levenshtein_norm": 0.41,            # mean normalized token Levenshtein distance d/L
        "perplexity": 15.2,                      # exp(mean token loss) on the perplexity data
        "selection_strict": 0.10,                # with a held-out split (``sweep --holdout-fraction``): strict,
        "heldout_strict": 0.14,                  #   loose, avg_levenshtein_norm of each part, as selection_* and
        ...                                      #   heldout_*; the pooled keys above cover both parts
        "rule_heldout_accuracy": 0.98,           # optional: strict of a capability set (``--capability FILE``)
        "memorization_skipped": 1.0,             # optional: over ``--skip-over``, no memorization keys at all
        "ndcg": 0.93,                            # optional: nDCG@k against the base model
        ...                                      # optional extras, e.g. "quotes_strict", "quotes_loose"
      },
      "edit": {...},                             # optional: summary of the edit (kept mass, pairs kept, seconds)
      "seconds": 3.1,                            # wall time of the point (edit + evaluation + restore)
      "timestamp": "2025-01-01T12:00:00+00:00"
    }

Memorization metrics are fractions in [0, 1]; lower is better for ``strict``, ``loose``, ``perplexity``; higher is
better for ``avg_levenshtein_norm`` and ``ndcg``. The Pareto front minimizes (``strict``, ``perplexity``); a choice
(:func:`choose_best`, :func:`match_by_cost`) minimizes ``selection_strict`` when present, so that the held-out
part measures it honestly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .constants import RESULTS_FILE
from .errors import UserError
from .fileio import read_jsonl, utc_timestamp

SCHEMA_VERSION = 1


def format_blocks(blocks: Sequence[int]) -> str:
    """``[20, 21, 22]`` -> ``"20-22"``; ``[5]`` -> ``"5"``; non-adjacent blocks are listed: ``"3,5"``."""
    blocks = sorted(blocks)
    if not blocks:
        return "-"
    if len(blocks) > 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(str(b) for b in blocks)


@dataclass(frozen=True)
class PointConfig:
    """What one sweep point edits: ``projections`` of each of ``blocks`` at ``keep_mass`` with ``method``."""

    method: str
    blocks: tuple[int, ...]
    projections: tuple[str, ...]
    keep_mass: float

    @property
    def id(self) -> str:
        """Stable key: ``"kfac|b20-22|gate,up|k0.8"`` (keep_mass printed with ``repr`` of the float)."""
        return f"{self.method}|b{format_blocks(self.blocks)}|{','.join(self.projections)}|k{self.keep_mass!r}"

    def layers(self) -> dict[str, dict[str, float]]:
        """The point in the layers-json format of ``kfac-edit edit``: ``{"20": {"gate": 0.8, "up": 0.8}, ...}``."""
        return {str(b): {p: self.keep_mass for p in self.projections} for b in self.blocks}

    def layers_file(self, seed: int = 0) -> dict[str, Any]:
        """What ``best.json`` holds for this point: :meth:`layers` for ``kfac``, else ``{"method", "seed",
        "layers"}`` (``kfac-edit edit --layers-file`` reads both)."""
        return self.layers() if self.method == "kfac" else {"method": self.method, "seed": seed, "layers": self.layers()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "blocks": list(self.blocks), "projections": list(self.projections)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PointConfig":
        return cls(method=str(d.get("method", "kfac")), blocks=tuple(int(b) for b in d.get("blocks", ())),
                   projections=tuple(str(p) for p in d.get("projections", ())),
                   keep_mass=float(d.get("keep_mass", 1.0)))


BASE_CONFIG = PointConfig(method="none", blocks=(), projections=(), keep_mass=1.0)


@dataclass
class SweepRecord:
    """One line of ``results.jsonl`` (see the module docstring for the JSON layout)."""

    config: PointConfig
    metrics: dict[str, float]
    kind: str = "point"  # "point" | "base"
    edit: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timestamp: str = ""

    @property
    def id(self) -> str:
        return "base" if self.kind == "base" else self.config.id

    def metric(self, name: str) -> float:
        """``metrics[name]`` as a float; NaN when absent or not a number."""
        try:
            return float(self.metrics[name])
        except (KeyError, TypeError, ValueError):
            return math.nan

    strict = property(lambda self: self.metric("strict"))
    perplexity = property(lambda self: self.metric("perplexity"))

    def label(self) -> str:
        """Short human label: ``"b20-22 gate,up k=0.8"`` (``"base"`` for the unedited model)."""
        if self.kind == "base":
            return "base"
        c = self.config
        method = "" if c.method == "kfac" else f"{c.method} "
        return f"{method}b{format_blocks(c.blocks)} {','.join(c.projections)} k={c.keep_mass:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "id": self.id, "kind": self.kind, "config": self.config.to_dict(),
                "layers": self.config.layers(), "metrics": dict(self.metrics),
                **({"edit": self.edit} if self.edit else {}), "seconds": self.seconds,
                "timestamp": self.timestamp or utc_timestamp()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepRecord":
        kind = str(d.get("kind", "point"))
        if kind not in ("point", "base"):
            raise ValueError(f"unknown record kind '{kind}'")
        if "metrics" not in d:
            raise ValueError("record has no 'metrics'")
        return cls(config=BASE_CONFIG if kind == "base" else PointConfig.from_dict(d.get("config", {})),
                   metrics=dict(d["metrics"].items()), kind=kind, edit=dict(d.get("edit", {})),
                   seconds=float(d.get("seconds", 0.0)), timestamp=str(d.get("timestamp", "")))


def read_results(path: str | os.PathLike) -> list[SweepRecord]:
    """Read ``results.jsonl`` (or a directory holding it); a torn last line is skipped; the last record of an id wins."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise UserError(f"no sweep results at {path}; run `kfac-edit sweep --out DIR` first or give the right DIR")
    try:
        raw = read_jsonl(path)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSONL ({exc}); fix or remove the broken line") from None
    by_id: dict[str, SweepRecord] = {}
    for i, d in enumerate(raw, 1):
        try:
            rec = SweepRecord.from_dict(d)
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"{path}: record {i} does not follow the results schema ({exc})") from None
        by_id.pop(rec.id, None)  # keep file order of the latest version
        by_id[rec.id] = rec
    return list(by_id.values())


def pareto_front(points: Sequence[Any],
                 objectives: Callable[[Any], Sequence[float]] = lambda p: (p.strict, p.perplexity)) -> list[int]:
    """Indices of the points no other point dominates (all ``objectives`` minimized; default ``(strict, perplexity)``
    of a :class:`SweepRecord`, ``lambda p: p`` for tuples), sorted by the objectives. ``p`` dominates ``q`` when it is
    <= in every objective and < in one: equal points are all on the front; a point with a NaN objective never is."""
    values = [tuple(float(v) for v in objectives(p)) for p in points]
    front: list[int] = []
    # in the objectives' order a point can only be dominated by an earlier point (or an equal one)
    for i in sorted((i for i, v in enumerate(values) if not any(map(math.isnan, v))), key=lambda i: values[i]):
        if not any(all(a <= b for a, b in zip(values[j], values[i])) and values[j] != values[i] for j in front):
            front.append(i)
    return front


def base_record(records: Sequence[SweepRecord]) -> SweepRecord | None:
    """The record of the unedited model, if the sweep wrote one."""
    return next((r for r in records if r.kind == "base"), None)


def memorization_key(record: SweepRecord, metric: str = "strict") -> float:
    """What a choice minimizes: ``selection_strict`` when the sweep split its records, else ``strict`` (``metric``
    for another memorization metric, e.g. ``loose``)."""
    return record.metric(f"selection_{metric}" if f"selection_{metric}" in record.metrics else metric)


def choose_within(points: Sequence[SweepRecord], cost: Callable[[SweepRecord], float],
                  limit: float) -> SweepRecord | None:
    """The point with the lowest :func:`memorization_key` among those with ``cost(point) <= limit`` (``None`` if none);
    ties go to the lower perplexity, the lower loose memorization (selection part when split), then the smaller edit
    (fewer blocks, fewer projections, higher keep_mass). Base records and NaN memorization, perplexity or cost are
    ignored."""
    ok = [p for p in points if p.kind == "point" and not math.isnan(memorization_key(p))
          and not math.isnan(p.perplexity) and cost(p) <= limit]  # a NaN cost is never <= limit

    def key(p: SweepRecord):
        loose = memorization_key(p, "loose")
        return (memorization_key(p), p.perplexity, math.inf if math.isnan(loose) else loose, len(p.config.blocks),
                len(p.config.projections), -p.config.keep_mass, p.id)

    return min(ok, key=key, default=None)


def choose_best(points: Sequence[SweepRecord], base_ppl: float, ppl_budget: float) -> SweepRecord | None:
    """:func:`choose_within` with perplexity <= ``ppl_budget * base_ppl`` as the limit."""
    if not (base_ppl > 0 and math.isfinite(base_ppl)):
        raise ValueError(f"base perplexity must be positive and finite, got {base_ppl}")
    return choose_within(points, lambda p: p.perplexity, ppl_budget * base_ppl)


def chosen_point(records: Sequence[SweepRecord], ppl_budget: float) -> SweepRecord | None:
    """:func:`choose_best` against the base record of ``records``; ``None`` without a base of finite perplexity > 0."""
    base = base_record(records)
    if base is None or not (base.perplexity > 0 and math.isfinite(base.perplexity)):
        return None
    return choose_best(records, base.perplexity, ppl_budget)


PPL_INCREASES = (0.05, 0.10, 0.20, 0.30)  # matched-cost budgets: held-out perplexity at most +5% ... +30%
ACCURACY_DROPS = (0.01, 0.05, 0.10, 0.20)  # matched-cost budgets: capability accuracy at most 1 ... 20 points lower


def match_by_cost(records: Sequence[SweepRecord], cost: Callable[[SweepRecord], float],
                  budgets: Sequence[float]) -> dict[str, dict[float, SweepRecord | None]]:
    """Per method, per budget: :func:`choose_within` among the method's points, so that methods compared at one budget
    paid at most the same cost (:func:`perplexity_increase` or :func:`accuracy_drop`)."""
    methods = sorted({r.config.method for r in records if r.kind == "point"})
    return {m: {b: choose_within([r for r in records if r.config.method == m], cost, b) for b in budgets}
            for m in methods}


def perplexity_increase(base: SweepRecord) -> Callable[[SweepRecord], float]:
    """Cost: relative perplexity increase over ``base`` (0.1 = +10%)."""
    return lambda r: r.perplexity / base.perplexity - 1.0


def accuracy_drop(base: SweepRecord, metric: str) -> Callable[[SweepRecord], float]:
    """Cost: how much lower ``metric`` (a capability accuracy, e.g. ``rule_heldout_accuracy``) is than on ``base``."""
    return lambda r: base.metric(metric) - r.metric(metric)
