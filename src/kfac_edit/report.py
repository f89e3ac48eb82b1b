"""The report of a sweep, a demo or a run: one HTML page and one Markdown summary, the only plotting path.

Inputs, all in one directory ``DIR`` (each optional, but at least one of the first two must exist):

* ``results.jsonl`` -- sweep records, schema in :mod:`kfac_edit.pareto` (several methods, held-out split metrics
  ``selection_*``/``heldout_*``, capability metrics ``*_accuracy``).
* ``before_after.json`` -- ``{"before": {"label": str, "metrics": {...}}, "after": {"label": str, "metrics": {...}}}``;
  when absent it is derived from the base record and the chosen point of ``results.jsonl``.
* ``records.jsonl`` -- what the model says after the edit, one line per memorized record (:func:`write_records`)::

      {"set": "heldout", "part": "heldout", "index": 3, "point": "b0-1 gate,up k=0.97",
       "prefix_ids": [...], "suffix_ids": [...],
       "base": {"generated": [...], "strict": true, "match_len": 12, "similarity": 1.0},    # absent without a base
       "edited": {"generated": [...], "strict": false, "match_len": 2, "similarity": 0.25},
       "text": {"prefix": "...", "suffix": ["tok", ...], "base": [...], "edited": [...]}}  # with a tokenizer

  ``similarity`` is ``1 - levenshtein / len(suffix)`` over tokens; ``text`` holds the decoded prefix and each
  continuation decoded token by token (so that matching tokens can be marked).
* ``spectra.json`` -- eigenvalue spectra of edited modules (written by :func:`write_spectra`)::

      {"modules": {"model.layers.20.mlp.up_proj": {
          "keep_mass": 0.8,
          "grad_eigvals": [...], "act_eigvals": [...],   # eigenvalues of G (out x out) and A (in x in), descending
          "grad_used": 10, "act_used": 12,             # eigenvectors that appear in at least one kept pair
          "mass_fraction": 0.801}}}                    # kept share of (sum lambda_G)(sum mu_A)

* ``provenance.json`` -- model, factors, memorized sets, times and versions (:func:`provenance`).
* ``sweep.json`` -- the sweep's configuration: ``ppl_budget`` chooses the best point, ``grid`` and ``split`` go
  into the provenance header.

Outputs: ``DIR/report.html`` (self-contained: plots embedded as base64 PNG, opens offline), ``DIR/report.md`` and the
PNG plots it links in ``DIR/plots/``: ``tradeoff.png`` (memorization vs perplexity ratio, one colour and marker per
method, each method's Pareto front; all points on a log axis beside a zoom on the budget region), ``keep_mass.png``
(memorization, perplexity ratio and every capability metric against keep_mass, per method), ``spectra.png`` (when
spectra exist). Every figure element of the page carries ``data-legend``: its legend entries, ``|``-separated.

Number formats: rates (``strict``, ``loose``, ``*_strict``, ``*_loose``, ``*_accuracy``) as percentages, their
changes in percentage points; everything else (perplexity, losses, nDCG) to 3 significant digits, changes with the
relative change beside for perplexities and losses.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from .constants import (BEFORE_AFTER_FILE, HTML_FILE, MARKDOWN_FILE, PLOTS_DIR, PROVENANCE_FILE, RECORDS_FILE,
                        RESULTS_FILE, SPECTRA_FILE, SWEEP_FILE)
from .errors import UserError
from .fileio import atomic_path, read_jsonl, write_json
from .pareto import SweepRecord, base_record, choose_best, format_blocks, pareto_front, read_results

DEFAULT_PPL_BUDGET = 1.2
MAX_SPECTRA_MODULES = 12
SAMPLE_ROWS = 20  # per-record rows shown per group before "show all"
MAX_RECORD_ROWS = 2000  # per-record rows written into the page at most (all of them stay in records.jsonl)
PREFIX_CHARS = 60  # the per-record table shows the end of each prefix, this many characters

# (metric key, column title) in the order tables show them; formats follow format_value
_COLUMNS = (
    ("selection_strict", "selection strict"),
    ("heldout_strict", "held-out strict"),
    ("strict", "strict (all)"),
    ("loose", "loose (all)"),
    ("heldout_loose", "held-out loose"),
    ("avg_levenshtein_norm", "avg Lev./L"),
    ("perplexity", "perplexity"),
    ("ndcg", "nDCG"),
)

# one colour and marker per method; later methods take the next free pair
_METHOD_STYLES = {"kfac": ("tab:blue", "o"), "kfac-independent": ("tab:green", "s"), "svd": ("tab:red", "^"),
                  "random": ("tab:purple", "D")}
_SPARE_STYLES = (("tab:brown", "v"), ("tab:pink", "P"), ("tab:olive", "X"), ("tab:cyan", "<"), ("tab:gray", ">"))


def method_style(method: str, methods: Sequence[str]) -> tuple[str, str]:
    """(colour, marker) of ``method``; methods without a fixed style get the spare ones in the order of ``methods``."""
    if method in _METHOD_STYLES:
        return _METHOD_STYLES[method]
    others = [m for m in methods if m not in _METHOD_STYLES]
    return _SPARE_STYLES[others.index(method) % len(_SPARE_STYLES)] if method in others else _SPARE_STYLES[0]


# ---------------------------------------------------------------------------------------------------- formats


def is_rate(key: str) -> bool:
    """Whether a metric is a fraction of records (shown as a percentage)."""
    last = key.rsplit(".", 1)[-1]
    return last in ("strict", "loose") or last.endswith(("_strict", "_loose", "_accuracy"))


def _sig3(f: float) -> str:
    if f == 0 or not math.isfinite(f):
        return f"{f:g}"
    if abs(f) >= 1000:
        return f"{f:.0f}"
    return f"{f:#.3g}".rstrip(".")


def format_value(key: str, value: Any) -> str:
    """A metric as the report shows it: ``12.5%`` for rates, 3 significant digits otherwise, ``-`` when absent."""
    if value is None:
        return "-"
    if not _is_number(value):
        return str(value)
    f = float(value)
    if math.isnan(f):
        return "nan"
    if is_rate(key):
        return f"{100 * f:.1f}%"
    return str(value) if isinstance(value, int) else _sig3(f)  # counts (records, tokens) as they are


def format_delta(key: str, before: Any, after: Any) -> str:
    """``after - before``: percentage points for rates, else 3 significant digits (perplexities and losses with the
    relative change beside)."""
    if not (_is_number(before) and _is_number(after)):
        return "-"
    b, a = float(before), float(after)
    d = a - b
    if math.isnan(d):
        return "nan"
    if is_rate(key):
        return f"{100 * d:+.1f} pp"
    if isinstance(before, int) and isinstance(after, int):
        return f"{after - before:+d}"
    text = "+0" if d == 0 else ("+" if d > 0 else "") + _sig3(d)
    if b != 0 and math.isfinite(b) and ("perplexity" in key or "loss" in key):
        text += f" ({100 * d / abs(b):+.1f}%)"
    return text


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------- inputs: writers


def write_spectra(path: str | os.PathLike, modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``spectra.json`` (layout in the module docstring); eigenvalues are rounded to 6 significant digits."""
    out = {}
    for name, m in modules.items():
        entry = dict(m)
        for key in ("grad_eigvals", "act_eigvals"):
            values = m[key].tolist() if hasattr(m[key], "tolist") else list(m[key])
            entry[key] = [float(f"{float(v):.6g}") for v in values]
        out[name] = entry
    write_json(path, {"modules": out})


def _decode_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded alone; with a space after each when the tokenizer joins words with spaces (word-level
    tokenizers such as the testbed's) rather than holding them in the pieces (byte-level BPE)."""
    pieces = [tokenizer.decode([int(t)]) for t in ids]
    if len(pieces) > 1 and tokenizer.decode([int(t) for t in ids]) == " ".join(pieces):
        return [p + " " for p in pieces]
    return pieces


def write_records(
    path: str | os.PathLike,
    before: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    after: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer=None,
    parts: Mapping[str, str] | None = None,
    point: str = "",
) -> int:
    """Write ``records.jsonl`` (layout in the module docstring) from per-set outputs of the base model (``before``,
    may be empty) and of the edited one (``after``), as :func:`kfac_edit.evaluate.suite.memorized_outputs` returns
    them; ``parts`` maps set names to ``selection``/``heldout``. Returns the number of records written."""
    before = before or {}
    parts = parts or {}
    lines = []
    for name, rows in after.items():
        base_rows = before.get(name)
        if base_rows is not None and len(base_rows) != len(rows):
            raise ValueError(f"set {name}: {len(base_rows)} base outputs but {len(rows)} edited ones")
        for i, row in enumerate(rows):
            line: dict[str, Any] = {"set": name, "part": parts.get(name), "index": i, "point": point,
                                    "prefix_ids": list(row["prefix_ids"]), "suffix_ids": list(row["suffix_ids"])}
            if row.get("source") is not None:
                line["source"] = row["source"]
            sides = {"edited": row} if base_rows is None else {"base": base_rows[i], "edited": row}
            for side, r in sides.items():
                line[side] = {"generated": list(r["generated"]), "strict": bool(r["strict"]),
                              "match_len": int(r["match_len"]), "similarity": round(1.0 - float(r["lev_norm"]), 6)}
            if tokenizer is not None:
                text = {"prefix": tokenizer.decode(list(row["prefix_ids"])),
                        "suffix": _decode_pieces(tokenizer, row["suffix_ids"])}
                for side in sides:
                    text[side] = _decode_pieces(tokenizer, line[side]["generated"])
                line["text"] = text
            lines.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"kfac_edit": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            pass
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def provenance(
    model,
    model_name: str | None = None,
    factors_manifest: Mapping[str, Any] | None = None,
    memorized: Sequence[str] = (),
    started: float | None = None,
    weights_digest: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What a report came from: the model (name, fingerprint, dtype, parameters), the factors (data, tokens, labels,
    seed, from their manifest), the memorized files, start and finish times (``started``: a ``time.time()``), the
    package versions, and ``extra`` (e.g. ``split``, ``methods``, ``layers``) as given."""
    from .identity import model_fingerprint

    params = list(model.parameters())
    config = getattr(model, "config", None)
    manifest = dict(factors_manifest or {})
    now = time.time()
    out: dict[str, Any] = {
        "model": {
            "name": model_name or getattr(config, "_name_or_path", None),
            "model_type": getattr(config, "model_type", type(model).__name__),
            "fingerprint": model_fingerprint(model),
            "weights_digest": weights_digest,
            "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "parameters": sum(p.numel() for p in params),
        },
        "factors": {k: manifest.get(k) for k in ("directory", "data", "tokens", "labels", "seed", "seq_len",
                                                  "model", "created", "run_id") if manifest.get(k) is not None}
        if manifest else None,
        "memorized": list(memorized),
        "started": _iso(started) if started is not None else None,
        "finished": _iso(now),
        "seconds": round(now - started, 1) if started is not None else None,
        "versions": _versions(),
    }
    out.update(extra)
    return out


def write_provenance(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``provenance.json`` (:func:`provenance`)."""
    write_json(path, dict(record))


# -------------------------------------------------------------------------------------------- inputs: reader


@dataclass
class ReportData:
    """Everything the report shows, read from a directory."""

    directory: Path
    records: list[SweepRecord] = field(default_factory=list)
    ppl_budget: float = DEFAULT_PPL_BUDGET
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)
    before_after: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)  # records.jsonl
    provenance: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)  # sweep.json

    @property
    def base(self) -> SweepRecord | None:
        return base_record(self.records)

    @property
    def points(self) -> list[SweepRecord]:
        return [r for r in self.records if r.kind == "point"]

    @property
    def methods(self) -> list[str]:
        """Methods present among the points, in the order they first appear."""
        return list(dict.fromkeys(p.config.method for p in self.points))

    @property
    def split(self) -> bool:
        """Whether the points carry held-out split metrics."""
        return any("heldout_strict" in p.metrics for p in self.records)

    @property
    def chosen(self) -> SweepRecord | None:
        base = self.base
        if base is None or not (base.perplexity > 0 and math.isfinite(base.perplexity)):
            return None
        return choose_best(self.points, base.perplexity, self.ppl_budget)


def load_report_data(directory: str | os.PathLike, ppl_budget: float | None = None) -> ReportData:
    """Read the report inputs of ``directory``; ``ppl_budget`` overrides the one recorded in ``sweep.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise UserError(f"report directory {directory} {what}; give the --out DIR of a sweep or run")
    has_results = (directory / RESULTS_FILE).exists()
    has_table = (directory / BEFORE_AFTER_FILE).exists()
    if not has_results and not has_table:
        raise UserError(
            f"{directory} holds neither {RESULTS_FILE} nor {BEFORE_AFTER_FILE}; give the --out DIR of a sweep or run"
        )
    data = ReportData(directory=directory)
    if has_results:
        data.records = read_results(directory / RESULTS_FILE)
    data.sweep = _read_json(directory / SWEEP_FILE) or {}
    if ppl_budget is not None:
        data.ppl_budget = float(ppl_budget)
    elif "ppl_budget" in data.sweep:
        data.ppl_budget = float(data.sweep["ppl_budget"])
    spectra = _read_json(directory / SPECTRA_FILE)
    if spectra:
        data.spectra = dict(spectra.get("modules", {}))
    data.provenance = _read_json(directory / PROVENANCE_FILE) or {}
    if (directory / RECORDS_FILE).exists():
        try:
            data.outputs = read_jsonl(directory / RECORDS_FILE)
        except ValueError as exc:
            raise UserError(f"{directory / RECORDS_FILE} is not valid JSONL ({exc}); remove it or rerun") from None
        bad = next((i for i, r in enumerate(data.outputs, 1) if not {"suffix_ids", "edited"} <= set(r)), None)
        if bad is not None:
            raise UserError(f"{directory / RECORDS_FILE}: record {bad} lacks suffix_ids/edited; see kfac_edit.report")
    table = _read_json(directory / BEFORE_AFTER_FILE)
    if table is not None:
        if not isinstance(table, dict) or "before" not in table or "after" not in table:
            raise UserError(f"{directory / BEFORE_AFTER_FILE} must hold 'before' and 'after'; see kfac_edit.report")
        data.before_after = table
    else:
        base, chosen = data.base, data.chosen
        if base is not None and chosen is not None:
            data.before_after = {
                "before": {"label": "base", "metrics": base.metrics},
                "after": {"label": chosen.label(), "metrics": chosen.metrics},
            }
    return data


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}); fix or remove it") from None


# ----------------------------------------------------------------------------------------------------------- plots


@dataclass
class Plot:
    png: bytes
    legend: list[str]  # the legend entries drawn
    caption: str


def _new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _memorization_keys(data: ReportData) -> list[tuple[str, str, bool]]:
    """(metric, label, filled) of the memorization series: held-out (filled) and selection (hollow) with a split,
    else the pooled strict."""
    if data.split:
        return [("heldout_strict", "held-out strict (filled)", True),
                ("selection_strict", "selection strict (hollow)", False)]
    return [("strict", "strict", True)]


def _value(r: SweepRecord, key: str) -> float:
    v = r.metrics.get(key)
    return float(v) if _is_number(v) else math.nan


def _ratio(data: ReportData, r: SweepRecord) -> float:
    base = data.base
    if base is None or not (base.perplexity > 0):
        return r.perplexity
    return r.perplexity / base.perplexity


def _zoom_limits(ratios: Sequence[float], budget: float) -> tuple[float, float]:
    """The zoomed x range: from just below the lowest perplexity ratio to twice the budget's excess."""
    low = min([1.0, *ratios])
    high = 1.0 + 2.0 * max(budget - 1.0, 0.02)
    pad = 0.04 * (high - low)
    return low - pad, high + pad


def plot_tradeoff(data: ReportData) -> Plot:
    """Memorization vs perplexity ratio: one colour and marker per method, each with its own Pareto front; left all
    points (log axis), right a zoom on the budget region; base point, budget line and chosen point marked."""
    fig = _new_figure(12.5, 5.2)
    axes = fig.subplots(1, 2)
    base, chosen, methods = data.base, data.chosen, data.methods
    mem_keys = _memorization_keys(data)
    reported_key = mem_keys[0][0]
    budget = data.ppl_budget if base is not None else None
    legend: dict[str, Any] = {}
    ratios_all = []
    for ax, zoom in zip(axes, (False, True)):
        for method in methods:
            color, marker = method_style(method, methods)
            pts = [p for p in data.points if p.config.method == method and math.isfinite(p.perplexity)]
            for key, _, filled in mem_keys:
                shown = [p for p in pts if math.isfinite(_value(p, key))]
                if not shown:
                    continue
                x = [_ratio(data, p) for p in shown]
                ratios_all += x
                y = [_value(p, key) for p in shown]
                h = ax.scatter(x, y, marker=marker, s=34, alpha=0.8, zorder=3,
                               facecolors=color if filled else "none", edgecolors=color, linewidths=1.2)
                if filled:
                    legend.setdefault(method, h)
                front = [shown[i] for i in pareto_front(shown, lambda p, k=key: (_value(p, k), p.perplexity))]
                ax.step([_ratio(data, p) for p in front], [_value(p, key) for p in front], where="post",
                        color=color, lw=1.6 if filled else 1.0, ls="-" if filled else ":", zorder=2)
        if base is not None and math.isfinite(base.perplexity):
            for key, _, filled in mem_keys:
                if math.isfinite(_value(base, key)):
                    h = ax.scatter([1.0], [_value(base, key)], marker="s", s=80, zorder=5, edgecolors="black",
                                   facecolors="black" if filled else "none", linewidths=1.5)
                    if filled:
                        legend.setdefault("base model", h)
            h = ax.axvline(budget, color="gray", ls="--", lw=1.2)
            legend.setdefault(f"budget: {budget:g} x base perplexity", h)
        if chosen is not None:
            h = ax.scatter([_ratio(data, chosen)], [_value(chosen, reported_key)], marker="*", s=320, zorder=6,
                           color="gold", edgecolors="black")
            legend.setdefault(f"chosen: {chosen.label()}", h)
        ax.set_ylabel(f"{mem_keys[0][1].split(' (')[0]} memorization (lower is better)")
        ax.yaxis.set_major_formatter(_percent_formatter())
        ax.grid(alpha=0.3)
        if zoom:
            lo, hi = _zoom_limits(ratios_all or [1.0], budget or DEFAULT_PPL_BUDGET)
            ax.set_xlim(lo, hi)
            beyond = sum(1 for r in ratios_all if r > hi) // max(1, len(mem_keys))
            ax.set_title(f"zoom: perplexity up to {hi:.3g} x base" + (f" ({beyond} points beyond)" if beyond else ""),
                         fontsize=10)
        else:
            if ratios_all and max(ratios_all) / max(min(ratios_all), 1e-12) > 1.5:
                _log_axis(ax.xaxis, ax.set_xscale, min(ratios_all), max(ratios_all))
            ax.set_title("all points", fontsize=10)
        base_ppl = f" (base {_sig3(base.perplexity)})" if base is not None and math.isfinite(base.perplexity) else ""
        ax.set_xlabel(f"perplexity / base perplexity{base_ppl}")
    if data.split:
        from matplotlib.lines import Line2D

        for key, label, filled in mem_keys:
            legend[label] = Line2D([], [], ls="-" if filled else ":", marker="o", color="dimgray",
                                   mfc="dimgray" if filled else "none")
    if not data.points:
        axes[0].text(0.5, 0.5, "no points with finite metrics", ha="center", va="center", transform=axes[0].transAxes)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(4, len(legend)), fontsize=9)
    fig.suptitle("Memorization vs perplexity, per method (lines: each method's Pareto front)", fontsize=11)
    split = (" Filled markers: held-out records (reported); hollow: selection records (the choice)." if data.split
             else "")
    caption = ("Memorization against perplexity ratio for every sweep point, one colour and marker per method; lines "
               f"join each method's Pareto front; star: the chosen point (lowest selection strict memorization "
               f"within {data.ppl_budget:g} x base perplexity); square: the base model.{split}")
    return Plot(_png(fig), list(legend), caption)


_NICE_TICKS = (1, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 1e4, 1e5, 1e6)


def _log_axis(axis, set_scale, low: float, high: float) -> None:
    """A log axis with plain tick labels (``1.1``, ``2``, ``50``) chosen from the data's range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    set_scale("log")
    candidates = [t for t in _NICE_TICKS if low / 1.02 <= t <= high * 1.02]
    gap = math.log(max(high, low * 1.0001) / low) / 8  # at most ~8 ticks, evenly spread on the log axis
    ticks: list[float] = []
    for t in candidates:
        if not ticks or math.log(t / ticks[-1]) >= gap:
            ticks.append(t)
    if len(ticks) >= 2:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _percent_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{100 * v:.0f}%")


def _capability_keys(data: ReportData) -> list[str]:
    keys = {k for p in data.records for k in p.metrics if k.endswith("_accuracy") or k.startswith("lm_eval.")}
    return sorted(k for k in keys if any(_is_number(p.metrics.get(k)) for p in data.points))


def plot_costs(data: ReportData) -> Plot:
    """Memorization, perplexity ratio and every capability metric against keep_mass, one colour per method; one line
    per (block group, projections) of the method, the chosen point's group drawn bold."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    mem_keys = _memorization_keys(data)
    panels = [("memorization", mem_keys[0][1].split(" (")[0] + " memorization")]
    panels.append(("perplexity", "perplexity / base perplexity"))
    panels += [(k, k.replace("_", " ")) for k in _capability_keys(data)]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(12.5, 3.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    base, chosen, methods = data.base, data.chosen, data.methods
    from matplotlib.lines import Line2D

    legend: dict[str, Any] = {m: Line2D([], [], color=method_style(m, methods)[0], marker=method_style(m, methods)[1],
                                        ms=5, lw=1.5) for m in methods}
    removed = sorted({1 - p.config.keep_mass for p in data.points if p.config.keep_mass < 1})
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
             if removed and removed[0] / 1.5 <= t <= removed[-1] * 1.5]
    for ax, (key, title) in zip(axes, panels):
        for method in methods:
            color, marker = method_style(method, methods)
            groups: dict[tuple, list[SweepRecord]] = {}
            for p in data.points:
                if p.config.method == method:
                    groups.setdefault((p.config.blocks, p.config.projections), []).append(p)
            bold = (chosen.config.blocks, chosen.config.projections) if chosen is not None else None
            for group, recs in groups.items():
                recs = sorted(recs, key=lambda r: r.config.keep_mass)
                x = [1 - r.config.keep_mass for r in recs]
                strong = len(groups) == 1 or group == bold
                series = ([(mk, filled) for mk, _, filled in mem_keys] if key == "memorization"
                          else [("perplexity", True)] if key == "perplexity" else [(key, True)])
                for mk, filled in series:
                    y = [_ratio(data, r) if mk == "perplexity" else _value(r, mk) for r in recs]
                    ax.plot(x, y, color=color, marker=marker, ms=4 if strong else 2.5, lw=1.5 if strong else 0.7,
                                 alpha=1.0 if strong else 0.45, ls="-" if filled else ":",
                                 mfc=color if filled else "none")
        if base is not None:
            level = 1.0 if key == "perplexity" else _value(base, mem_keys[0][0] if key == "memorization" else key)
            if math.isfinite(level):
                h = ax.axhline(level, color="black", lw=1, ls="--")
                legend.setdefault("base model", h)
            if key == "perplexity":
                h = ax.axhline(data.ppl_budget, color="gray", lw=1, ls="-.")
                legend.setdefault(f"budget: {data.ppl_budget:g} x base perplexity", h)
        ax.set_xscale("log")
        if ticks:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{1 - v:.4g}"))
        ax.invert_xaxis()  # mild edits (keep_mass near 1) on the left
        ax.set_xlabel("keep_mass (axis: log of 1 - keep_mass)", fontsize=9)
        ax.set_title(title, fontsize=10)
        if key == "memorization" or is_rate(key):
            ax.yaxis.set_major_formatter(_percent_formatter())
        elif key == "perplexity":
            top = max([data.ppl_budget * 1.5] + [_ratio(data, p) for p in data.points if p.config.keep_mass >= 0.9
                                                  and math.isfinite(p.perplexity)])
            ratios = [_ratio(data, p) for p in data.points if math.isfinite(p.perplexity)]
            if any(r > 3 * top for r in ratios):
                _log_axis(ax.yaxis, ax.set_yscale, min(ratios + [1.0]), max(ratios))
        ax.grid(alpha=0.3)
    if data.split:
        from matplotlib.lines import Line2D

        for _, label, filled in mem_keys:
            legend[label] = Line2D([], [], ls="-" if filled else ":", marker="o", color="dimgray",
                                   mfc="dimgray" if filled else "none")
    if not data.points:
        axes[0].text(0.5, 0.5, "no sweep points", ha="center", va="center", transform=axes[0].transAxes)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(5, max(1, len(legend))),
               fontsize=9)
    caption = ("What each edit costs, against keep_mass (mild edits on the left): memorization, perplexity ratio"
               + (" and each capability metric" if len(panels) > 2 else "") + ", one colour per method; "
               "with several block groups per method, faint lines are the other groups and the bold one holds the "
               "chosen point.")
    return Plot(_png(fig), list(legend), caption)


def plot_spectra(spectra: Mapping[str, Mapping[str, Any]], max_modules: int = MAX_SPECTRA_MODULES) -> Plot:
    """Eigenvalues of G and A (each divided by its largest, descending, log scale), one panel per edited module;
    the shaded region and dashed lines mark the eigenvectors that appear in at least one kept pair."""
    from matplotlib.ticker import NullLocator

    names = list(spectra)[:max_modules]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    width, height = 12.5, 3.3 * rows
    fig = _new_figure(width, height, layout=None)  # fixed margins: constrained layout doubles the draw time
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.6 / height,
                        wspace=0.3, hspace=1.15 / 3.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax, name in zip(axes, names):
        m = spectra[name]
        for key, used_key, label, color in (
            ("grad_eigvals", "grad_used", "G (out x out)", "tab:blue"),
            ("act_eigvals", "act_used", "A (in x in)", "tab:orange"),
        ):
            values = [max(float(v), 0.0) for v in m.get(key, [])]
            if not values or max(values) <= 0:
                continue
            top = max(values)
            floor = min(v for v in values if v > 0) / top
            h, = ax.plot(range(1, len(values) + 1), [v / top if v > 0 else floor for v in values], color=color,
                         lw=1.3)
            legend.setdefault(label, h)
            used = m.get(used_key)
            if used is not None:
                ax.axvline(float(used), color=color, ls="--", lw=1)
                h = ax.axvspan(1, max(1.0, float(used)), color=color, alpha=0.08)
                legend.setdefault(f"{label.split()[0]}: kept region (in a kept pair)", h)
                right = float(used) > 0.6 * len(values)  # near the right edge: the label goes left of the line
                ax.text(float(used), 0.02 + (0.1 if key == "act_eigvals" else 0),
                        f"{label[0]} {int(used)}/{len(values)} " if right else f" {label[0]} {int(used)}/{len(values)}",
                        color=color, fontsize=7, ha="right" if right else "left", transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds of layout and add little
        if max(len(m.get("grad_eigvals", [])), len(m.get("act_eigvals", []))) > 200:
            ax.set_xscale("log")  # large layers: show the head of the spectrum
            ax.xaxis.set_minor_locator(NullLocator())
        keep_mass, frac = m.get("keep_mass"), m.get("mass_fraction")
        title = name + (f"\nkeep_mass {keep_mass:g}" if _is_number(keep_mass) else "")
        if _is_number(frac):
            title += f", kept mass {100 * frac:.1f}%"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("eigenvalue index (descending)", fontsize=8)
        ax.set_ylabel("eigenvalue / largest", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if not names:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no spectra", ha="center", va="center", transform=axes[0].transAxes)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8,
                   frameon=False)
    shown = len(names)
    caption = (f"Eigenvalue spectra of G and A for the edited modules ({shown} of {len(spectra)} shown), each divided "
               "by its largest; shaded up to the dashed line: eigenvectors that appear in at least one kept pair.")
    return Plot(_png(fig), list(legend), caption)


# ---------------------------------------------------------------------------------------------------------- tables


def _metric_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    cols = [c for c in _COLUMNS if any(m.get(c[0]) is not None for m in records)]
    caps = sorted({k for m in records for k in m if k.endswith("_accuracy") and _is_number(m[k])})
    return cols + [(k, k.replace("_", " ")) for k in caps]


def before_after_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[metric, before, after, change]`` of the before/after table (every metric either side has)."""
    before = table["before"].get("metrics", {})
    after = table["after"].get("metrics", {})
    keys = [c[0] for c in _metric_columns([before, after]) if c[0] in before or c[0] in after]
    keys += sorted(k for k in set(before) | set(after) if k not in keys and _is_number(before.get(k, after.get(k))))
    return [[k, format_value(k, before.get(k)), format_value(k, after.get(k)), format_delta(k, before.get(k),
                                                                                          after.get(k))]
            for k in keys]


def point_rows(records: Sequence[SweepRecord], columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    rows = []
    for r in records:
        c = r.config
        rows.append(
            [r.label() if r.kind == "base" else c.method, format_blocks(c.blocks), ",".join(c.projections) or "-",
             "-" if r.kind == "base" else f"{c.keep_mass:g}"]
            + [format_value(key, r.metrics.get(key)) for key, _ in columns]
        )
    return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], highlight: Sequence[bool] = ()) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="chosen"' if i < len(highlight) and highlight[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- per-record view

SURVIVED, REMOVED, NOT_MEMORIZED = "survived", "removed", "not memorized by the base model"


def record_status(record: Mapping[str, Any]) -> str:
    """``survived`` (the edited model still recites the suffix), ``removed`` (the base did, the edited does not), or
    ``not memorized by the base model``."""
    if record["edited"]["strict"]:
        return SURVIVED
    base = record.get("base")
    return REMOVED if base is None or base["strict"] else NOT_MEMORIZED


def _pieces(record: Mapping[str, Any], side: str) -> list[str]:
    text = record.get("text") or {}
    if side in text:
        return list(text[side])
    ids = record["suffix_ids"] if side == "suffix" else record[side]["generated"]
    return [f"{int(t)} " for t in ids]


def _continuation_html(pieces: Sequence[str], generated: Sequence[int], target: Sequence[int]) -> str:
    """Tokens of a continuation; ``mark.lead``: the run matching the suffix from its start, ``mark``: other tokens
    equal to the suffix token at the same position."""
    out, leading = [], True
    for i, piece in enumerate(pieces):
        same = i < len(target) and i < len(generated) and generated[i] == target[i]
        leading = leading and same
        text = html.escape(piece)
        out.append(f'<mark class="lead">{text}</mark>' if leading else f"<mark>{text}</mark>" if same else text)
    return "".join(out)


def _short_prefix(record: Mapping[str, Any]) -> str:
    text = (record.get("text") or {}).get("prefix")
    if text is None:
        text = " ".join(str(t) for t in record["prefix_ids"])
    text = " ".join(text.split())
    return text if len(text) <= PREFIX_CHARS else "…" + text[-PREFIX_CHARS:]


def _records_html(outputs: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    if len(outputs) > MAX_RECORD_ROWS:
        shown = list(outputs[:MAX_RECORD_ROWS])
        note = f" The page holds the first {MAX_RECORD_ROWS}; all are in {RECORDS_FILE}."
    else:
        shown, note = list(outputs), ""
    has_base = any("base" in r for r in shown)
    groups: dict[str, list[Mapping[str, Any]]] = {SURVIVED: [], REMOVED: [], NOT_MEMORIZED: []}
    for r in shown:
        groups[record_status(r)].append(r)
    point = next((r.get("point") for r in shown if r.get("point")), "")
    counts = ", ".join(f"{len(v)} {k}" for k, v in groups.items() if v)
    parts = [
        f'<section id="records" data-records="{len(shown)}" data-sample="{SAMPLE_ROWS}">',
        "<h2>What the edited model says: memorized records</h2>",
        f"<p>{len(outputs)} memorized records, each prompted with its prefix and continued greedily by the "
        + ("base model and by " if has_base else "") + f"the edit <b>{esc(point)}</b>: {esc(counts)}. "
        "Highlighted: tokens equal to the true suffix at the same position (dark: the run from the start, which is "
        "the match length). Similarity: 1 - token Levenshtein distance / suffix length. Each group shows "
        f"{SAMPLE_ROWS} records first, closest to the suffix first.{esc(note)}</p>",
        f'<label><input type="checkbox" id="show-all" onchange="document.body.classList.toggle(\'show-all\', '
        f'this.checked)"> show all {len(shown)} records</label>',
    ]
    header = ["#", "set", "prefix (end)", "true suffix"] + (["base continuation"] if has_base else []) + [
        "edited continuation", "match length" + (" base → edited" if has_base else ""), "similarity"
        + (" base → edited" if has_base else "")]
    for status, recs in groups.items():
        if not recs:
            continue
        recs = sorted(recs, key=lambda r: (-r["edited"]["similarity"], -r["edited"]["match_len"]))
        parts.append(f'<h3 class="group">{esc(status)} ({len(recs)})</h3>')
        parts.append('<table class="records">')
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for k, r in enumerate(recs):
            target = r["suffix_ids"]
            cells = [("n", str(r.get("index", k))), ("set", esc(str(r.get("part") or r.get("set", "")))),
                     ("prefix", esc(_short_prefix(r))), ("text", "".join(esc(p) for p in _pieces(r, "suffix")))]
            if has_base:
                cells.append(("text", _continuation_html(_pieces(r, "base"), r["base"]["generated"], target)
                              if "base" in r else "-"))
            cells.append(("text", _continuation_html(_pieces(r, "edited"), r["edited"]["generated"], target)))
            length, e = len(target), r["edited"]
            if has_base and "base" in r:
                b = r["base"]
                cells += [("n", f"{b['match_len']} → {e['match_len']} / {length}"),
                          ("n", f"{100 * b['similarity']:.0f}% → {100 * e['similarity']:.0f}%")]
            else:
                cells += [("n", f"{e['match_len']} / {length}"), ("n", f"{100 * e['similarity']:.0f}%")]
            cls = "rec" if k < SAMPLE_ROWS else "rec more"
            parts.append(f'<tr class="{cls}" data-status="{esc(status)}">'
                         + "".join(f'<td class="{c}">{v}</td>' for c, v in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)


def _records_markdown(outputs: Sequence[Mapping[str, Any]], limit: int = 10) -> list[str]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in outputs:
        groups.setdefault(record_status(r), []).append(r)
    lines = ["", "## What the edited model says: memorized records", "",
             ", ".join(f"{len(v)} {k}" for k, v in groups.items()) + f" (up to {limit} of each below; all in "
             f"{RECORDS_FILE}, all on the HTML page)."]
    for status, recs in groups.items():
        rows = []
        for r in recs[:limit]:
            rows.append([_short_prefix(r), "".join(_pieces(r, "suffix")).strip(),
                         "".join(_pieces(r, "base")).strip() if "base" in r else "-",
                         "".join(_pieces(r, "edited")).strip(), f"{r['edited']['match_len']}/{len(r['suffix_ids'])}",
                         f"{100 * r['edited']['similarity']:.0f}%"])
        lines += ["", f"### {status} ({len(recs)})", "",
                  _md_table(["prefix (end)", "true suffix", "base", "edited", "match", "similarity"], rows)]
    return lines


# ---------------------------------------------------------------------------------------------------- provenance


def _grid_text(grid: Mapping[str, Any]) -> str:
    parts = []
    for method, masses in (grid.get("keep_masses") or {}).items():
        masses = sorted(masses)
        parts.append(f"{method}: {len(masses)} keep_mass values {masses[0]:g}..{masses[-1]:g}" if masses else method)
    if grid.get("groups"):
        parts.append("block groups " + " ".join(format_blocks(g) for g in grid["groups"]))
    elif grid.get("blocks") is not None:
        parts.append(f"blocks {format_blocks(grid['blocks'])} (runs up to {grid.get('max_combo', '?')})")
    if grid.get("projection_sets"):
        parts.append("projections " + " | ".join(",".join(s) for s in grid["projection_sets"]))
    if grid.get("points") is not None:
        parts.append(f"{grid['points']} points")
    return "; ".join(parts)


def provenance_rows(data: ReportData) -> list[tuple[str, str]]:
    """(label, text) lines of the provenance header."""
    prov, sweep = data.provenance, data.sweep
    identity = sweep.get("identity") or {}
    rows: list[tuple[str, str]] = []
    m = prov.get("model") or {}
    name = m.get("name") or identity.get("model")
    if name or m:
        bits = [str(name)]
        if m.get("model_type"):
            bits.append(str(m["model_type"]))
        if m.get("parameters"):
            bits.append(f"{m['parameters'] / 1e6:.3g}M parameters")
        if m.get("dtype"):
            bits.append(str(m["dtype"]))
        fp = m.get("fingerprint") or identity.get("model_fingerprint")
        if fp:
            bits.append(f"fingerprint {fp}")
        wd = m.get("weights_digest") or identity.get("weights_digest")
        if wd:
            bits.append(f"weights {str(wd)[:16]}")
        rows.append(("model", ", ".join(bits)))
    f = prov.get("factors")
    if f:
        bits = [f"data {f.get('data', '?')}", f"{f['tokens']:,} tokens" if _is_number(f.get("tokens")) else "tokens ?",
                f"{f.get('labels', '?')} labels", f"seed {f.get('seed', '?')}"]
        if f.get("directory"):
            bits.insert(0, str(f["directory"]))
        if f.get("created"):
            bits.append(f"collected {f['created']}")
        rows.append(("factors", ", ".join(bits)))
    mem = prov.get("memorized") or []
    split = sweep.get("split") or prov.get("split")
    if mem or split:
        text = ", ".join(str(x) for x in mem)
        if split:
            text += (f"; split by content hash (seed {split.get('seed')}): {split.get('selection')} selection records "
                     f"(the choice), {split.get('heldout')} held out (reported)")
        if data.outputs:
            text += f"; {len(data.outputs)} records continued in {RECORDS_FILE}"
        rows.append(("memorized", text))
    if prov.get("capability"):
        rows.append(("capability sets", ", ".join(str(x) for x in prov["capability"])))
    grid = sweep.get("grid")
    if grid:
        rows.append(("methods and grid", _grid_text(grid) + f"; budget {data.ppl_budget:g} x base perplexity"))
    elif prov.get("methods"):
        layers = prov.get("layers")
        rows.append(("method", ", ".join(prov["methods"]) + (f"; layers {json.dumps(layers)}" if layers else "")))
    if prov.get("finished"):
        seconds = prov.get("seconds")
        rows.append(("time", f"{prov.get('started') or '?'} to {prov['finished']}"
                     + (f" ({seconds:.0f} s)" if _is_number(seconds) else "")))
    if prov.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())))
    return rows


# ---------------------------------------------------------------------------------------------------------- report


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1260px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child, td.set { text-align: left; }
tr.chosen td { background: #fff3cd; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 0.15em 1em; font-size: 0.9em;
          background: #f6f8fa; padding: 0.6em 0.8em; border: 1px solid #ddd; }
dl.prov dt { font-weight: bold; } dl.prov dd { margin: 0; overflow-wrap: anywhere; }
table.records td.text, table.records td.prefix { text-align: left; font-family: ui-monospace, monospace;
          font-size: 0.92em; max-width: 22em; overflow-wrap: anywhere; }
table.records td.prefix { color: #666; }
mark { background: #ffe08a; } mark.lead { background: #f4a259; }
tr.more { display: none; } body.show-all tr.more { display: table-row; }
"""


@dataclass
class ReportPaths:
    html: Path
    markdown: Path
    plots: dict[str, Path]


def write_report(directory: str | os.PathLike, ppl_budget: float | None = None) -> ReportPaths:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into ``directory`` from the inputs found there."""
    data = load_report_data(directory, ppl_budget)
    d = data.directory
    images: dict[str, Plot] = {}
    if data.records:
        images["tradeoff"] = plot_tradeoff(data)
        if data.points:
            images["keep_mass"] = plot_costs(data)
    if data.spectra:
        images["spectra"] = plot_spectra(data.spectra)
    plot_paths: dict[str, Path] = {}
    for name, plot in images.items():
        path = d / PLOTS_DIR / f"{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(plot.png)
        plot_paths[name] = path
    stale = {"tradeoff", "keep_mass", "spectra"} - set(images)
    for name in stale:  # a plot of an earlier report that this one does not draw
        (d / PLOTS_DIR / f"{name}.png").unlink(missing_ok=True)

    sections = _sections(data)
    html_path, md_path = d / HTML_FILE, d / MARKDOWN_FILE
    with atomic_path(html_path) as tmp:
        tmp.write_text(_render_html(data, sections, images))
    with atomic_path(md_path) as tmp:
        tmp.write_text(_render_markdown(data, sections, images))
    return ReportPaths(html=html_path, markdown=md_path, plots=plot_paths)


@dataclass
class _Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    highlight: list[bool] = field(default_factory=list)
    note: str = ""
    collapsed: bool = False


def _sections(data: ReportData) -> list[_Section]:
    sections = []
    if data.before_after is not None:
        ba = data.before_after
        sections.append(_Section(
            title="Before / after",
            header=["metric", f"before ({ba['before'].get('label', 'before')})",
                    f"after ({ba['after'].get('label', 'after')})", "change"],
            rows=before_after_rows(ba),
            note="Rates in percent, their changes in percentage points (pp); other metrics to 3 significant digits, "
                 "perplexity changes with the relative change.",
        ))
    points = data.points
    if points:
        columns = _metric_columns([r.metrics for r in data.records])
        header = ["method", "blocks", "projections", "keep_mass"] + [c[1] for c in columns]
        chosen = data.chosen
        fronts = []
        for method in data.methods:
            pts = [p for p in points if p.config.method == method]
            fronts += [pts[i] for i in pareto_front(pts)]
        sections.append(_Section(
            title=f"Pareto fronts per method ({len(fronts)} of {len(points)} points)",
            header=header,
            rows=point_rows(fronts, columns),
            highlight=[p is chosen for p in fronts],
            note="For each method, the points no other point of that method beats in both strict memorization (all "
                 "records) and perplexity; highlighted: the chosen point.",
        ))
        ordered = sorted(points, key=lambda p: (data.methods.index(p.config.method), p.config.projections,
                                                len(p.config.blocks), p.config.blocks, p.config.keep_mass))
        base = [data.base] if data.base is not None else []
        sections.append(_Section(
            title=f"All points ({len(points)})",
            header=header,
            rows=point_rows(base + ordered, columns),
            highlight=[False] * len(base) + [p is chosen for p in ordered],
            collapsed=True,
        ))
    return sections


def _summary_lines(data: ReportData) -> list[str]:
    lines = []
    base, chosen = data.base, data.chosen
    mem = "heldout_strict" if data.split else "strict"
    mem_name = "held-out strict memorization" if data.split else "strict memorization"
    if data.records:
        lines.append(f"{len(data.points)} sweep points evaluated ({', '.join(data.methods) or 'no method'}).")
    if base is not None:
        lines.append(
            f"Base model: {mem_name} {format_value(mem, base.metrics.get(mem))}, perplexity "
            f"{format_value('perplexity', base.perplexity)}; perplexity budget {data.ppl_budget:g} x base = "
            f"{format_value('perplexity', base.perplexity * data.ppl_budget)}."
        )
    if chosen is not None:
        lines.append(
            f"Chosen point (lowest {'selection ' if data.split else ''}strict memorization within the budget): "
            f"{chosen.label()}: {mem_name} {format_value(mem, chosen.metrics.get(mem))}, perplexity "
            f"{format_value('perplexity', chosen.perplexity)}."
        )
    elif data.points and base is not None:
        lines.append("No point is within the perplexity budget; raise --ppl-budget or widen the grid.")
    elif data.points:
        lines.append("No base-model record: the best point cannot be chosen.")
    return lines


def _chosen_layers(data: ReportData) -> str | None:
    chosen = data.chosen
    return json.dumps(chosen.config.layers()) if chosen is not None else None


def _render_html(data: ReportData, sections: list[_Section], images: dict[str, Plot]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>kfac-edit report: {esc(data.directory.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>kfac-edit report: {esc(data.directory.name)}</h1>",
    ]
    prov = provenance_rows(data)
    if prov:
        parts.append('<dl class="prov" id="provenance">' + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in prov) + "</dl>")
    parts += [f"<p>{esc(line)}</p>" for line in _summary_lines(data)]
    layers = _chosen_layers(data)
    if layers is not None:
        parts.append("<p>Apply it with <code>kfac-edit edit --layers-file DIR/best.json</code>; its layers JSON:</p>")
        parts.append(f"<pre>{esc(layers)}</pre>")
    for s in sections:
        if s.title == "Before / after":
            main = [r for r in s.rows if "." not in r[0]]
            detail = [r for r in s.rows if "." in r[0]]
            parts += [f"<h2>{esc(s.title)}</h2>", f"<p>{esc(s.note)}</p>", _html_table(s.header, main or s.rows)]
            if main and detail:
                parts.append(f"<details><summary>every metric per set ({len(detail)} more)</summary>"
                             f"{_html_table(s.header, detail)}</details>")

    def figure(name: str) -> str:
        plot = images[name]
        b64 = base64.b64encode(plot.png).decode("ascii")
        legend = "|".join(plot.legend)
        return (f'<figure id="fig-{name}" data-legend="{esc(legend)}"><img alt="{esc(name)}: {esc(legend)}" '
                f'src="data:image/png;base64,{b64}"><figcaption>{esc(plot.caption)}</figcaption></figure>')

    for name in ("tradeoff", "keep_mass"):
        if name in images:
            parts.append(figure(name))
    if data.outputs:
        parts.append(_records_html(data.outputs))
    if "spectra" in images:
        parts += ["<h2>Spectra of the edited modules</h2>", figure("spectra")]
    for s in sections:
        if s.title == "Before / after":
            continue
        table = _html_table(s.header, s.rows, s.highlight)
        note = f"<p>{esc(s.note)}</p>" if s.note else ""
        if s.collapsed:
            parts.append(f"<details><summary><b>{esc(s.title)}</b></summary>{note}{table}</details>")
        else:
            parts += [f"<h2>{esc(s.title)}</h2>", note, table]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _render_markdown(data: ReportData, sections: list[_Section], images: dict[str, Plot]) -> str:
    parts = [f"# kfac-edit report: {data.directory.name}", ""]
    parts += [f"- **{k}**: {v}" for k, v in provenance_rows(data)]
    if parts[-1] != "":
        parts.append("")
    parts += [line + "  " for line in _summary_lines(data)]
    layers = _chosen_layers(data)
    if layers is not None:
        parts += ["", "Apply it with `kfac-edit edit --layers-file DIR/best.json`; its layers JSON:", "",
                  "```json", layers, "```"]
    for s in sections:
        if s.title == "Before / after":
            main = [r for r in s.rows if "." not in r[0]] or s.rows
            parts += ["", f"## {s.title}", "", s.note, "", _md_table(s.header, main)]
            if len(main) < len(s.rows):
                parts += ["", f"Every metric per set ({len(s.rows) - len(main)} more): see the HTML page or "
                          f"{BEFORE_AFTER_FILE if (data.directory / BEFORE_AFTER_FILE).exists() else RESULTS_FILE}."]
    for name in ("tradeoff", "keep_mass"):
        if name in images:
            parts += ["", f"![{name}]({PLOTS_DIR}/{name}.png)", "", f"*{images[name].caption}*"]
    if data.outputs:
        parts += _records_markdown(data.outputs)
    if "spectra" in images:
        parts += ["", f"![spectra]({PLOTS_DIR}/spectra.png)", "", f"*{images['spectra'].caption}*"]
    for s in sections:
        if s.title == "Before / after":
            continue
        rows = [[f"**{c}**" if hl else c for c in row] for row, hl in
                zip(s.rows, s.highlight or [False] * len(s.rows))]
        parts += ["", f"## {s.title}", ""]
        if s.note:
            parts += [s.note, ""]
        parts.append(_md_table(s.header, rows))
    return "\n".join(parts) + "\n"
