"""The report of a sweep, a demo or a run: one HTML page and one Markdown summary, the only plotting path.

Inputs, all in one directory ``DIR`` (each optional, but ``results.jsonl`` or ``before_after.json`` must exist):

* ``results.jsonl`` -- sweep records (schema: :mod:`kfac_edit.pareto`); ``sweep.json`` -- the sweep's settings
  (``ppl_budget`` chooses the best point, ``grid`` and ``split`` go into the provenance header);
  ``provenance.json`` -- model, factors, memorized sets, times and versions (:func:`provenance`).
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
* ``spectra.json`` -- eigenvalue spectra of edited modules (:func:`write_spectra`)::

      {"modules": {"model.layers.20.mlp.up_proj": {
          "keep_mass": 0.8,
          "grad_eigvals": [...], "act_eigvals": [...],   # eigenvalues of G (out x out) and A (in x in), descending
          "grad_used": 10, "act_used": 12,             # eigenvectors that appear in at least one kept pair
          "mass_fraction": 0.801}}}                    # kept share of (sum lambda_G)(sum mu_A)

Outputs: ``DIR/report.html`` (self-contained: plots embedded as base64 PNG, opens offline) and ``DIR/report.md``, one
sequence of sections (:func:`_render`) through two formatters (:class:`_Html`, :class:`_Markdown`), and the plots
(:func:`plot_tradeoff`, :func:`plot_costs`, :func:`plot_spectra`) as ``DIR/plots/{tradeoff,keep_mass,spectra}.png``.
Every figure element of the page carries ``data-legend``: its legend entries, ``|``-separated.

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
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from .constants import (BEFORE_AFTER_FILE, BEST_FILE, HTML_FILE, MARKDOWN_FILE, PLOTS_DIR, PROVENANCE_FILE,
                        RECORDS_FILE, RESULTS_FILE, SPECTRA_FILE, SWEEP_FILE)
from .errors import UserError
from .fileio import atomic_path, read_jsonl, write_json
from .pareto import SweepRecord, base_record, chosen_point, format_blocks, pareto_front, read_results

DEFAULT_PPL_BUDGET = 1.2
MAX_SPECTRA_MODULES = 12
SAMPLE_ROWS = 20  # per-record rows shown per group before "show all" (and in the Markdown summary)
MAX_RECORD_ROWS = 2000  # per-record rows written into the page at most (all of them stay in records.jsonl)
PREFIX_CHARS = 60  # the per-record table shows the end of each prefix, this many characters
FIGURE_WIDTH = 12.5  # inches at 100 dpi: 1250 px, drawn at their own size in a 1280 px window

# (metric key, column title) in the order tables show them; formats follow format_value
_COLUMNS = (("selection_strict", "selection strict"), ("heldout_strict", "held-out strict"), ("strict", "strict (all)"),
            ("loose", "loose (all)"), ("heldout_loose", "held-out loose"), ("avg_levenshtein_norm", "avg Lev./L"),
            ("perplexity", "perplexity"), ("ndcg", "nDCG"))

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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sig3(f: float) -> str:
    if f == 0 or not math.isfinite(f):
        return f"{f:g}"
    return f"{f:.0f}" if abs(f) >= 1000 else f"{f:#.3g}".rstrip(".")


def format_value(key: str, value: Any) -> str:
    """A metric as the report shows it: ``12.5%`` for rates, 3 significant digits otherwise, ``-`` when absent."""
    if value is None:
        return "-"
    if not _is_number(value):
        return str(value)
    if math.isnan(value):
        return "nan"
    if is_rate(key):
        return f"{100 * value:.1f}%"
    return str(value) if isinstance(value, int) else _sig3(value)  # counts (records, tokens) as they are


def format_delta(key: str, before: Any, after: Any) -> str:
    """``after - before`` in the number formats of the module docstring."""
    if not (_is_number(before) and _is_number(after)):
        return "-"
    d = after - before
    if math.isnan(d):
        return "nan"
    if is_rate(key):
        return f"{100 * d:+.1f} pp"
    if isinstance(d, int):
        return f"{d:+d}"
    text = "+0" if d == 0 else ("+" if d > 0 else "") + _sig3(d)
    if before != 0 and math.isfinite(before) and ("perplexity" in key or "loss" in key):
        text += f" ({100 * d / abs(before):+.1f}%)"
    return text


# ------------------------------------------------------------------------------------------- inputs: writers


def write_spectra(path: str | os.PathLike, modules: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``spectra.json`` (layout in the module docstring); eigenvalues are rounded to 6 significant digits."""
    out = {}
    for name, m in modules.items():
        out[name] = dict(m)
        for key in ("grad_eigvals", "act_eigvals"):
            values = m[key].tolist() if hasattr(m[key], "tolist") else m[key]
            out[name][key] = [float(f"{float(v):.6g}") for v in values]
    write_json(path, {"modules": out})


def _decode_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded alone; with a space after each when the tokenizer joins words with spaces (word-level
    tokenizers such as the testbed's) rather than holding them in the pieces (byte-level BPE)."""
    pieces = [tokenizer.decode([int(t)]) for t in ids]
    if len(pieces) > 1 and tokenizer.decode([int(t) for t in ids]) == " ".join(pieces):
        return [p + " " for p in pieces]
    return pieces


def write_records(path: str | os.PathLike, before: Mapping[str, Sequence[Mapping[str, Any]]] | None,
                  after: Mapping[str, Sequence[Mapping[str, Any]]], tokenizer=None,
                  parts: Mapping[str, str] | None = None, point: str = "") -> int:
    """Write ``records.jsonl`` (layout in the module docstring) from per-set outputs of the base model (``before``,
    may be empty) and of the edited one (``after``), as :func:`kfac_edit.evaluate.suite.memorized_outputs` returns
    them; ``parts`` maps set names to ``selection``/``heldout``. Returns the number of records written."""
    before, parts = before or {}, parts or {}
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
                line["text"] = {"prefix": tokenizer.decode(line["prefix_ids"]),
                                "suffix": _decode_pieces(tokenizer, line["suffix_ids"]),
                                **{side: _decode_pieces(tokenizer, line[side]["generated"]) for side in sides}}
            lines.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def provenance(model, model_name: str | None = None, factors_manifest: Mapping[str, Any] | None = None,
               memorized: Sequence[str] = (), started: float | None = None, weights_digest: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """What a report came from: the model (name, fingerprint, dtype, parameters), the factors (data, tokens, labels,
    seed, from their manifest), the memorized files, start and finish times (``started``: a ``time.time()``), the
    package versions, and ``extra`` (e.g. ``split``, ``methods``, ``layers``) as given."""
    import torch
    import transformers

    from . import __version__
    from .identity import model_fingerprint

    params = list(model.parameters())
    config = getattr(model, "config", None)
    manifest = factors_manifest or {}
    now = time.time()
    return {
        "model": {"name": model_name or getattr(config, "_name_or_path", None),
                  "model_type": getattr(config, "model_type", type(model).__name__),
                  "fingerprint": model_fingerprint(model), "weights_digest": weights_digest,
                  "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
                  "parameters": sum(p.numel() for p in params)},
        "factors": {k: manifest[k] for k in ("directory", "data", "tokens", "labels", "seed", "seq_len", "model",
                                             "created", "run_id") if manifest.get(k) is not None} if manifest else None,
        "memorized": list(memorized),
        "started": _iso(started) if started is not None else None,
        "finished": _iso(now),
        "seconds": round(now - started, 1) if started is not None else None,
        "versions": {"kfac_edit": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        **extra,
    }


write_provenance = write_json  # provenance.json: write_provenance(path, provenance(...))


# -------------------------------------------------------------------------------------------- inputs: reader


@dataclass
class ReportData:
    """Everything the report shows, read from a directory."""

    directory: Path
    records: list[SweepRecord]  # results.jsonl
    ppl_budget: float
    spectra: dict[str, dict[str, Any]]  # spectra.json's modules
    before_after: dict[str, Any] | None
    outputs: list[dict[str, Any]]  # records.jsonl
    provenance: dict[str, Any]
    sweep: dict[str, Any]  # sweep.json

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
    def memorization(self) -> list[tuple[str, str, bool]]:
        """(metric, name, filled) of the memorization series: held-out strict (filled markers, the reported one) and
        selection strict (hollow, what the choice saw) with a split, else the pooled strict."""
        if self.split:
            return [("heldout_strict", "held-out strict", True), ("selection_strict", "selection strict", False)]
        return [("strict", "strict", True)]

    @property
    def budget_label(self) -> str:
        return f"budget: {self.ppl_budget:g} x base perplexity"

    @property
    def chosen(self) -> SweepRecord | None:
        return chosen_point(self.records, self.ppl_budget)

    def ratio(self, r: SweepRecord) -> float:
        """Perplexity of ``r`` over the base perplexity (the perplexity itself without a base)."""
        base = self.base
        return r.perplexity / base.perplexity if base is not None and base.perplexity > 0 else r.perplexity


def load_report_data(directory: str | os.PathLike, ppl_budget: float | None = None) -> ReportData:
    """Read the report inputs of ``directory``; ``ppl_budget`` overrides the one recorded in ``sweep.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise UserError(f"report directory {directory} {what}; give the --out DIR of a sweep or run")
    has_results = (directory / RESULTS_FILE).exists()
    if not has_results and not (directory / BEFORE_AFTER_FILE).exists():
        raise UserError(f"{directory} holds neither {RESULTS_FILE} nor {BEFORE_AFTER_FILE}; "
                        "give the --out DIR of a sweep or run")
    records_path = directory / RECORDS_FILE
    try:
        outputs = read_jsonl(records_path)
    except ValueError as exc:
        raise UserError(f"{records_path} is not valid JSONL ({exc}); remove it or rerun") from None
    bad = next((i for i, r in enumerate(outputs, 1) if not {"suffix_ids", "edited"} <= set(r)), None)
    if bad is not None:
        raise UserError(f"{records_path}: record {bad} lacks suffix_ids/edited; see kfac_edit.report")
    table = _read_json(directory / BEFORE_AFTER_FILE)
    if table is not None and not (isinstance(table, dict) and "before" in table and "after" in table):
        raise UserError(f"{directory / BEFORE_AFTER_FILE} must hold 'before' and 'after'; see kfac_edit.report")
    sweep = _read_json(directory / SWEEP_FILE) or {}
    budget = sweep.get("ppl_budget", DEFAULT_PPL_BUDGET) if ppl_budget is None else ppl_budget
    data = ReportData(directory=directory, records=read_results(directory / RESULTS_FILE) if has_results else [],
                      ppl_budget=float(budget), before_after=table, outputs=outputs, sweep=sweep,
                      spectra=dict((_read_json(directory / SPECTRA_FILE) or {}).get("modules", {})),
                      provenance=_read_json(directory / PROVENANCE_FILE) or {})
    if table is None and not data.records:
        raise UserError(f"{directory / RESULTS_FILE} holds no results; run the sweep first (a rerun resumes)")
    base, chosen = data.base, data.chosen
    if table is None and base is not None and chosen is not None:
        data.before_after = {"before": {"label": "base", "metrics": base.metrics},
                             "after": {"label": chosen.label(), "metrics": chosen.metrics}}
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


def _figure(n_panels: int, row_height: float, cols: int = 3, extra: float = 0.0, layout: str | None = "constrained"):
    """A figure :data:`FIGURE_WIDTH` wide with ``n_panels`` panels, ``cols`` per row at most (spare panels hidden),
    ``row_height`` inches per row plus ``extra``, each with a light grid. Returns (figure, panels)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    cols = min(cols, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(FIGURE_WIDTH, row_height * rows + extra), dpi=100, layout=layout)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_visible(i < n_panels)
        ax.grid(alpha=0.3)
    return fig, axes


def _finish(fig, legend: dict[str, Any], caption: str, data: ReportData | None = None, max_cols: int = 4,
            **legend_style) -> Plot:
    """Draw the figure legend (with a split in ``data``: what filled and hollow markers mean), render the PNG."""
    if data is not None and data.split:
        from matplotlib.lines import Line2D

        for _, name, filled in data.memorization:
            legend[f"{name} ({'filled' if filled else 'hollow'})"] = Line2D(
                [], [], ls="-" if filled else ":", marker="o", color="dimgray", mfc="dimgray" if filled else "none")
    if legend:
        fig.legend(list(legend.values()), list(legend), ncol=min(max_cols, len(legend)), **legend_style)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Plot(buf.getvalue(), list(legend), caption)


_NICE_TICKS = (1, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 1e4, 1e5, 1e6)


def _fixed_ticks(axis, ticks: Sequence[float], label=lambda v: f"{v:g}") -> None:
    """Major ticks at ``ticks`` labelled ``label(value)``, no minor ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))


def _log_axis(axis, set_scale, low: float, high: float) -> None:
    """A log axis with plain tick labels (``1.1``, ``2``, ``50``) chosen from the data's range."""
    set_scale("log")
    gap = math.log(max(high, low * 1.0001) / low) / 8  # at most ~8 ticks, evenly spread on the log axis
    ticks: list[float] = []
    for t in _NICE_TICKS:
        if low / 1.02 <= t <= high * 1.02 and (not ticks or math.log(t / ticks[-1]) >= gap):
            ticks.append(t)
    if len(ticks) >= 2:
        _fixed_ticks(axis, ticks)


def plot_tradeoff(data: ReportData) -> Plot:
    """Memorization vs perplexity ratio per method (see the caption); left all points (log axis), right a zoom from
    just below the lowest ratio to twice the budget's excess."""
    from matplotlib.ticker import PercentFormatter

    fig, axes = _figure(2, 5.2, cols=2)
    base, chosen, methods, series = data.base, data.chosen, data.methods, data.memorization
    has_base = base is not None and math.isfinite(base.perplexity)
    plotted = [p for p in data.points if math.isfinite(p.perplexity)
               and any(math.isfinite(p.metric(key)) for key, _, _ in series)]
    ratios = [data.ratio(p) for p in plotted]
    legend: dict[str, Any] = {}
    for ax in axes:
        for method in methods:
            color, marker = method_style(method, methods)
            for key, _, filled in series:
                shown = [p for p in plotted if p.config.method == method and math.isfinite(p.metric(key))]
                if not shown:
                    continue
                h = ax.scatter([data.ratio(p) for p in shown], [p.metric(key) for p in shown], marker=marker, s=34,
                               alpha=0.8, zorder=3, facecolors=color if filled else "none", edgecolors=color,
                               linewidths=1.2)
                if filled:
                    legend.setdefault(method, h)
                front = [shown[i] for i in pareto_front(shown, lambda p, k=key: (p.metric(k), p.perplexity))]
                ax.step([data.ratio(p) for p in front], [p.metric(key) for p in front], where="post",
                        color=color, lw=1.6 if filled else 1.0, ls="-" if filled else ":", zorder=2)
        if has_base:
            for key, _, filled in series:
                if math.isfinite(base.metric(key)):
                    h = ax.scatter([1.0], [base.metric(key)], marker="s", s=80, zorder=5, edgecolors="black",
                                   facecolors="black" if filled else "none", linewidths=1.5)
                    if filled:
                        legend.setdefault("base model", h)
            legend.setdefault(data.budget_label, ax.axvline(data.ppl_budget, color="gray", ls="--", lw=1.2))
        if chosen is not None:
            h = ax.scatter([data.ratio(chosen)], [chosen.metric(series[0][0])], marker="*", s=320, zorder=6,
                           color="gold", edgecolors="black")
            legend.setdefault(f"chosen: {chosen.label()}", h)
        ax.set_ylabel(f"{series[0][1]} memorization (lower is better)")
        ax.yaxis.set_major_formatter(PercentFormatter(1, decimals=0))
        ax.set_xlabel("perplexity / base perplexity" + (f" (base {_sig3(base.perplexity)})" if has_base else ""))
    low, high = min([1.0, *ratios]), 1.0 + 2.0 * max(data.ppl_budget - 1.0, 0.02)
    pad = 0.04 * (high - low)
    axes[1].set_xlim(low - pad, high + pad)
    beyond = sum(r > high + pad for r in ratios)
    note = f" ({beyond} points beyond)" if beyond else ""
    axes[1].set_title(f"zoom: perplexity up to {high + pad:.3g} x base{note}", fontsize=10)
    if ratios and max(ratios) / max(min(ratios), 1e-12) > 1.5:
        _log_axis(axes[0].xaxis, axes[0].set_xscale, min(ratios), max(ratios))
    axes[0].set_title("all points", fontsize=10)
    if not data.points:
        axes[0].text(0.5, 0.5, "no points with finite metrics", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle("Memorization vs perplexity, per method (lines: each method's Pareto front)", fontsize=11)
    split = (" Filled markers: held-out records (reported); hollow: selection records (the choice)." if data.split
             else "")
    caption = ("Memorization against perplexity ratio for every sweep point, one colour and marker per method; lines "
               f"join each method's Pareto front; star: the chosen point (lowest selection strict memorization "
               f"within {data.ppl_budget:g} x base perplexity); square: the base model.{split}")
    return _finish(fig, legend, caption, data, loc="outside lower center", fontsize=9)


def plot_costs(data: ReportData) -> Plot:
    """Memorization, perplexity ratio and every capability metric against keep_mass, one colour per method; one line
    per (block group, projections) of the method, the chosen point's group drawn bold."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    series = data.memorization
    keys = {k for r in data.records for k in r.metrics if k.endswith("_accuracy") or k.startswith("lm_eval.")}
    capability = sorted(k for k in keys if any(_is_number(p.metrics.get(k)) for p in data.points))
    panels = [("memorization", f"{series[0][1]} memorization"), ("perplexity", "perplexity / base perplexity")]
    panels += [(k, k.replace("_", " ")) for k in capability]
    fig, axes = _figure(len(panels), 3.9, extra=0.6)
    base, chosen, methods = data.base, data.chosen, data.methods
    bold = (chosen.config.blocks, chosen.config.projections) if chosen is not None else None
    legend: dict[str, Any] = {}
    lines = []  # (method, drawn bold, records by keep_mass): one per (block group, projections) of a method
    for method in methods:
        color, marker = method_style(method, methods)
        legend[method] = Line2D([], [], color=color, marker=marker, ms=5, lw=1.5)
        groups: dict[tuple, list[SweepRecord]] = {}
        for p in data.points:
            if p.config.method == method:
                groups.setdefault((p.config.blocks, p.config.projections), []).append(p)
        lines += [(method, len(groups) == 1 or group == bold, sorted(recs, key=lambda r: r.config.keep_mass))
                  for group, recs in groups.items()]
    removed = sorted({1 - p.config.keep_mass for p in data.points if p.config.keep_mass < 1})
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
             if removed and removed[0] / 1.5 <= t <= removed[-1] * 1.5]
    for ax, (key, title) in zip(axes, panels):
        drawn = [(k, filled) for k, _, filled in series] if key == "memorization" else [(key, True)]
        for method, strong, recs in lines:
            color, marker = method_style(method, methods)
            for metric, filled in drawn:
                ax.plot([1 - r.config.keep_mass for r in recs],
                        [data.ratio(r) if metric == "perplexity" else r.metric(metric) for r in recs],
                        color=color, marker=marker, ms=4 if strong else 2.5, lw=1.5 if strong else 0.7,
                        alpha=1.0 if strong else 0.45, ls="-" if filled else ":", mfc=color if filled else "none")
        if base is not None:
            level = 1.0 if key == "perplexity" else base.metric(drawn[0][0])
            if math.isfinite(level):
                legend.setdefault("base model", ax.axhline(level, color="black", lw=1, ls="--"))
            if key == "perplexity":
                legend.setdefault(data.budget_label, ax.axhline(data.ppl_budget, color="gray", lw=1, ls="-."))
        ax.set_xscale("log")
        if ticks:
            _fixed_ticks(ax.xaxis, ticks, lambda v: f"{1 - v:.4g}")
        ax.invert_xaxis()  # mild edits (keep_mass near 1) on the left
        ax.set_xlabel("keep_mass (axis: log of 1 - keep_mass)", fontsize=9)
        ax.set_title(title, fontsize=10)
        if key == "memorization" or is_rate(key):
            ax.yaxis.set_major_formatter(PercentFormatter(1, decimals=0))
        elif key == "perplexity":
            ratios = [data.ratio(p) for p in data.points if math.isfinite(p.perplexity)]
            top = max([data.ppl_budget * 1.5] + [data.ratio(p) for p in data.points
                                                 if p.config.keep_mass >= 0.9 and math.isfinite(p.perplexity)])
            if any(r > 3 * top for r in ratios):
                _log_axis(ax.yaxis, ax.set_yscale, min(ratios + [1.0]), max(ratios))
    caption = ("What each edit costs, against keep_mass (mild edits on the left): memorization, perplexity ratio"
               + (" and each capability metric" if capability else "") + ", one colour per method; "
               "with several block groups per method, faint lines are the other groups and the bold one holds the "
               "chosen point.")
    return _finish(fig, legend, caption, data, max_cols=5, loc="outside lower center", fontsize=9)


def plot_spectra(spectra: Mapping[str, Mapping[str, Any]]) -> Plot:
    """Eigenvalues of G and A (each divided by its largest, descending, log scale), one panel per edited module;
    the shaded region and dashed lines mark the eigenvectors that appear in at least one kept pair."""
    from matplotlib.ticker import NullLocator

    names = list(spectra)[:MAX_SPECTRA_MODULES]
    fig, axes = _figure(len(names), 3.3, layout=None)  # fixed margins: constrained layout doubles the draw time
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.6 / height,
                        wspace=0.3, hspace=1.15 / 3.3)
    legend: dict[str, Any] = {}
    for ax, name in zip(axes, names):
        m = spectra[name]
        for key, used_key, label, color in (("grad_eigvals", "grad_used", "G (out x out)", "tab:blue"),
                                            ("act_eigvals", "act_used", "A (in x in)", "tab:orange")):
            values = [max(float(v), 0.0) for v in m.get(key, [])]
            if not values or max(values) <= 0:
                continue
            top = max(values)
            floor = min(v for v in values if v > 0) / top
            h, = ax.plot(range(1, len(values) + 1), [v / top if v > 0 else floor for v in values], color=color,
                         lw=1.3)
            legend.setdefault(label, h)
            if m.get(used_key) is not None:
                used = float(m[used_key])
                ax.axvline(used, color=color, ls="--", lw=1)
                legend.setdefault(f"{label[0]}: kept region (in a kept pair)",
                                  ax.axvspan(1, max(1.0, used), color=color, alpha=0.08))
                right = used > 0.6 * len(values)  # near the right edge: the label goes left of the line
                text = f"{label[0]} {int(used)}/{len(values)}"
                ax.text(used, 0.02 + (0.1 if key == "act_eigvals" else 0), f"{text} " if right else f" {text}",
                        color=color, fontsize=7, ha="right" if right else "left", transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds of layout and add little
        if max(len(m.get("grad_eigvals", [])), len(m.get("act_eigvals", []))) > 200:
            ax.set_xscale("log")  # large layers: show the head of the spectrum
            ax.xaxis.set_minor_locator(NullLocator())
        keep_mass, frac = m.get("keep_mass"), m.get("mass_fraction")
        ax.set_title(name + (f"\nkeep_mass {keep_mass:g}" if _is_number(keep_mass) else "")
                     + (f", kept mass {100 * frac:.1f}%" if _is_number(frac) else ""), fontsize=8)
        ax.set_xlabel("eigenvalue index (descending)", fontsize=8)
        ax.set_ylabel("eigenvalue / largest", fontsize=8)
        ax.tick_params(labelsize=7)
    caption = (f"Eigenvalue spectra of G and A for the edited modules ({len(names)} of {len(spectra)} shown), each "
               "divided by its largest; shaded up to the dashed line: eigenvectors that appear in at least one kept "
               "pair.")
    return _finish(fig, legend, caption, loc="upper center", fontsize=8, frameon=False)


# ---------------------------------------------------------------------------------------------------------- tables


def _metric_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    cols = [c for c in _COLUMNS if any(m.get(c[0]) is not None for m in records)]
    caps = sorted({k for m in records for k in m if k.endswith("_accuracy") and _is_number(m[k])})
    return cols + [(k, k.replace("_", " ")) for k in caps]


def before_after_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[metric, before, after, change]`` of the before/after table (every metric either side has)."""
    before, after = table["before"].get("metrics", {}), table["after"].get("metrics", {})
    keys = [k for k, _ in _metric_columns([before, after])]
    keys += sorted(k for k in set(before) | set(after) if k not in keys and _is_number(before.get(k, after.get(k))))
    return [[k, format_value(k, before.get(k)), format_value(k, after.get(k)),
             format_delta(k, before.get(k), after.get(k))] for k in keys]


def point_rows(records: Sequence[SweepRecord], columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Rows ``[method, blocks, projections, keep_mass, *columns]`` of the point tables."""
    return [[r.label() if r.kind == "base" else r.config.method, format_blocks(r.config.blocks),
             ",".join(r.config.projections) or "-", "-" if r.kind == "base" else f"{r.config.keep_mass:g}"]
            + [format_value(key, r.metrics.get(key)) for key, _ in columns] for r in records]


# ----------------------------------------------------------------------------------------------- per-record view

SURVIVED, REMOVED, NOT_MEMORIZED = "survived", "removed", "not memorized by the base model"


def _record_groups(outputs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The records by status, each group closest to the suffix first, empty groups left out: ``survived`` (the edited
    model still recites the suffix), ``removed`` (the base did, or is not known; the edited does not), else
    ``not memorized by the base model``."""
    groups: dict[str, list[Mapping[str, Any]]] = {SURVIVED: [], REMOVED: [], NOT_MEMORIZED: []}
    for r in outputs:
        base_recited = r.get("base") is None or r["base"]["strict"]
        groups[SURVIVED if r["edited"]["strict"] else REMOVED if base_recited else NOT_MEMORIZED].append(r)
    return {status: sorted(recs, key=lambda r: (-r["edited"]["similarity"], -r["edited"]["match_len"]))
            for status, recs in groups.items() if recs}


def _pieces(record: Mapping[str, Any], side: str) -> list[str]:
    """The decoded tokens of the suffix or of a side's continuation (token ids without a tokenizer)."""
    text = record.get("text") or {}
    if side in text:
        return list(text[side])
    ids = record["suffix_ids"] if side == "suffix" else record[side]["generated"]
    return [f"{int(t)} " for t in ids]


def _short_prefix(record: Mapping[str, Any]) -> str:
    text = (record.get("text") or {}).get("prefix")
    text = " ".join((text if text is not None else " ".join(str(t) for t in record["prefix_ids"])).split())
    return text if len(text) <= PREFIX_CHARS else "…" + text[-PREFIX_CHARS:]


def _record_header(has_base: bool) -> list[str]:
    both = " base → edited" if has_base else ""
    return (["#", "set", "prefix (end)", "true suffix"] + (["base continuation"] if has_base else [])
            + ["edited continuation", "match length" + both, "similarity" + both])


def _record_cells(r: Mapping[str, Any], k: int, has_base: bool, text, continuation) -> list[tuple[str, str]]:
    """(class, cell) of one record's row under :func:`_record_header`: ``text(str)`` renders plain text,
    ``continuation(r, side)`` a continuation; match length and similarity base → edited when there is a base."""
    sides = [r[s] for s in ("base", "edited") if s in r]
    return ([("n", str(r.get("index", k))), ("set", text(str(r.get("part") or r.get("set", "")))),
             ("prefix", text(_short_prefix(r))), ("text", text("".join(_pieces(r, "suffix"))))]
            + [("text", continuation(r, side) if side in r else "-")
               for side in (("base", "edited") if has_base else ("edited",))]
            + [("n", " → ".join(str(s["match_len"]) for s in sides) + f" / {len(r['suffix_ids'])}"),
               ("n", " → ".join(f"{100 * s['similarity']:.0f}%" for s in sides))])


def _records_intro(outputs: Sequence[Mapping[str, Any]], groups: Mapping[str, list], has_base: bool) -> str:
    point = next((r["point"] for r in outputs if r.get("point")), "")
    counts = ", ".join(f"{len(v)} {k}" for k, v in groups.items())
    return (f"{len(outputs)} memorized records, each prompted with its prefix and continued greedily by the "
            + ("base model and by " if has_base else "") + "the edit" + (f" `{point}`" if point else "")
            + f": {counts}. Similarity: 1 - token Levenshtein distance / suffix length. Each group shows its "
            f"{SAMPLE_ROWS} records closest to the suffix first.")


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


def _join(bits: Sequence[Any]) -> str:
    return ", ".join(str(b) for b in bits if b)


def provenance_rows(data: ReportData) -> list[tuple[str, str]]:
    """(label, text) lines of the provenance header."""
    prov, sweep = data.provenance, data.sweep
    identity = sweep.get("identity") or {}
    rows: list[tuple[str, str]] = []
    m = prov.get("model") or {}
    name = m.get("name") or identity.get("model")
    if name or m:
        fingerprint = m.get("fingerprint") or identity.get("model_fingerprint")
        weights = m.get("weights_digest") or identity.get("weights_digest")
        rows.append(("model", _join([str(name), m.get("model_type"),
                                     m.get("parameters") and f"{m['parameters'] / 1e6:.3g}M parameters",
                                     m.get("dtype"), fingerprint and f"fingerprint {fingerprint}",
                                     weights and f"weights {str(weights)[:16]}"])))
    f = prov.get("factors")
    if f:
        tokens = f"{f['tokens']:,} tokens" if _is_number(f.get("tokens")) else "tokens ?"
        rows.append(("factors", _join([f.get("directory"), f"data {f.get('data', '?')}", tokens,
                                       f"{f.get('labels', '?')} labels", f"seed {f.get('seed', '?')}",
                                       f.get("created") and f"collected {f['created']}"])))
    mem = prov.get("memorized") or []
    split = sweep.get("split") or prov.get("split")
    if mem or split:
        text = _join(mem)
        if split:
            text += (f"; split by content hash (seed {split.get('seed')}): {split.get('selection')} selection records "
                     f"(the choice), {split.get('heldout')} held out (reported)")
        if data.outputs:
            text += f"; {len(data.outputs)} records continued in {RECORDS_FILE}"
        rows.append(("memorized", text))
    if prov.get("capability"):
        rows.append(("capability sets", _join(prov["capability"])))
    if sweep.get("grid"):
        rows.append(("methods and grid", _grid_text(sweep["grid"]) + f"; budget {data.ppl_budget:g} x base perplexity"))
    elif prov.get("methods"):
        layers = prov.get("layers")
        rows.append(("method", ", ".join(prov["methods"]) + (f"; layers {json.dumps(layers)}" if layers else "")))
    if prov.get("finished"):
        seconds = prov.get("seconds")
        rows.append(("time", f"{prov.get('started') or '?'} to {prov['finished']}"
                     + (f" ({seconds:.0f} s)" if _is_number(seconds) else "")))
    if prov.get("versions"):
        rows.append(("versions", _join(f"{k} {v}" for k, v in prov["versions"].items())))
    return rows


def _summary_lines(data: ReportData) -> list[str]:
    base, chosen = data.base, data.chosen
    mem, name, _ = data.memorization[0]

    def measured(r: SweepRecord) -> str:
        return (f"{name} memorization {format_value(mem, r.metrics.get(mem))}, perplexity "
                f"{format_value('perplexity', r.perplexity)}")

    lines = [f"{len(data.points)} sweep points evaluated ({', '.join(data.methods) or 'no method'})."
             ] if data.records else []
    if base is not None:
        lines.append(f"Base model: {measured(base)}; perplexity budget {data.ppl_budget:g} x base = "
                     f"{format_value('perplexity', base.perplexity * data.ppl_budget)}.")
    if chosen is not None:
        lines.append(f"Chosen point (lowest {'selection ' if data.split else ''}strict memorization within the "
                     f"budget): {chosen.label()}: {measured(chosen)}.")
    elif data.points and base is not None:
        lines.append("No point is within the perplexity budget; raise --ppl-budget or widen the grid.")
    elif data.points:
        lines.append("No base-model record: the best point cannot be chosen.")
    return lines


# ---------------------------------------------------------------------------------------------------------- report


def _render(data: ReportData, images: Mapping[str, Plot], fmt: "_Html | _Markdown") -> str:
    """The report's sections, top to bottom, through ``fmt``."""
    out = [fmt.definitions(provenance_rows(data))] + [fmt.paragraph(line) for line in _summary_lines(data)]
    chosen = data.chosen
    if chosen is not None:
        layers_file = chosen.config.layers_file(int(data.sweep.get("identity", {}).get("seed") or 0))
        try:
            on_disk = json.loads((data.directory / BEST_FILE).read_text())
        except (OSError, ValueError):
            on_disk = None
        if on_disk == layers_file:
            line = f"Apply it with `kfac-edit edit --layers-file DIR/{BEST_FILE}`, which holds:"
        elif on_disk is not None:  # report --ppl-budget other than the sweep's
            line = (f"DIR/{BEST_FILE} holds the sweep's choice at its own perplexity budget, not this point; apply "
                    "this one with `kfac-edit edit --layers-json` and:")
        else:
            line = "Apply it with `kfac-edit edit --layers-json` and:"
        out += [fmt.paragraph(line), fmt.code(json.dumps(layers_file))]
    if (ba := data.before_after) is not None:
        header = ["metric", f"before ({ba['before'].get('label', 'before')})",
                  f"after ({ba['after'].get('label', 'after')})", "change"]
        rows = before_after_rows(ba)
        main = [r for r in rows if "." not in r[0]] or rows
        out += [fmt.heading(2, "Before / after"),
                fmt.paragraph("Rates in percent, their changes in percentage points (pp); other metrics to 3 "
                              "significant digits, perplexity changes with the relative change."),
                fmt.table(header, main)]
        if len(main) < len(rows):
            detail = [r for r in rows if "." in r[0]]
            out.append(fmt.details(f"every metric per set ({len(detail)} more)", fmt.table(header, detail)))
    out += [fmt.figure(name, images[name]) for name in ("tradeoff", "keep_mass") if name in images]
    if data.outputs:
        out.append(fmt.records(data.outputs))
    if "spectra" in images:
        out += [fmt.heading(2, "Spectra of the edited modules"), fmt.figure("spectra", images["spectra"])]
    points = data.points
    if points:
        columns = _metric_columns([r.metrics for r in data.records])
        header = ["method", "blocks", "projections", "keep_mass"] + [title for _, title in columns]
        fronts = []
        for method in data.methods:
            pts = [p for p in points if p.config.method == method]
            fronts += [pts[i] for i in pareto_front(pts)]
        ordered = sorted(points, key=lambda p: (data.methods.index(p.config.method), p.config.projections,
                                                len(p.config.blocks), p.config.blocks, p.config.keep_mass))
        base = [data.base] if data.base is not None else []
        out += [fmt.heading(2, f"Pareto fronts per method ({len(fronts)} of {len(points)} points)"),
                fmt.paragraph("For each method, the points no other point of that method beats in both strict "
                              "memorization (all records) and perplexity; highlighted: the chosen point."),
                fmt.table(header, point_rows(fronts, columns), [p is chosen for p in fronts]),
                fmt.details(f"All points ({len(points)})", fmt.table(header, point_rows(base + ordered, columns),
                                                                      [p is chosen for p in base + ordered]))]
    return fmt.page(f"kfac-edit report: {data.directory.name}", [part for part in out if part])


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
summary { font-weight: bold; }
"""


class _Html:
    """The self-contained page: plots embedded as base64 PNG, the per-record view with its "show all" box."""

    esc = staticmethod(html.escape)

    def page(self, title: str, parts: Sequence[str]) -> str:
        head = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{self.esc(title)}</title>", f"<style>{_CSS}</style></head><body>", self.heading(1, title)]
        return "\n".join([*head, *parts, "</body></html>"]) + "\n"

    def heading(self, level: int, text: str) -> str:
        return f"<h{level}>{self.esc(text)}</h{level}>"

    def paragraph(self, text: str) -> str:
        return "<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", self.esc(text)) + "</p>"

    def code(self, text: str) -> str:
        return f"<pre>{self.esc(text)}</pre>"

    def definitions(self, rows: Sequence[tuple[str, str]]) -> str:
        items = "".join(f"<dt>{self.esc(k)}</dt><dd>{self.esc(v)}</dd>" for k, v in rows)
        return f'<dl class="prov" id="provenance">{items}</dl>' if rows else ""

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], highlight: Sequence[bool] = ()) -> str:
        out = ["<table>", "<tr>" + "".join(f"<th>{self.esc(h)}</th>" for h in header) + "</tr>"]
        for row, chosen in zip(rows, highlight or [False] * len(rows)):
            cells = "".join(f"<td>{self.esc(c)}</td>" for c in row)
            out.append(f'<tr class="chosen">{cells}</tr>' if chosen else f"<tr>{cells}</tr>")
        return "\n".join(out + ["</table>"])

    def details(self, summary: str, body: str) -> str:
        return f"<details><summary>{self.esc(summary)}</summary>{body}</details>"

    def figure(self, name: str, plot: Plot) -> str:
        legend = self.esc("|".join(plot.legend))
        b64 = base64.b64encode(plot.png).decode("ascii")
        return (f'<figure id="fig-{name}" data-legend="{legend}"><img alt="{self.esc(name)}: {legend}" '
                f'src="data:image/png;base64,{b64}"><figcaption>{self.esc(plot.caption)}</figcaption></figure>')

    def _continuation(self, r: Mapping[str, Any], side: str) -> str:
        """``mark.lead``: the run of tokens matching the suffix from its start; ``mark``: other tokens equal to the
        suffix token at the same position."""
        target, generated, out, leading = r["suffix_ids"], r[side]["generated"], [], True
        for i, piece in enumerate(_pieces(r, side)):
            same = i < len(target) and i < len(generated) and generated[i] == target[i]
            leading = leading and same
            text = self.esc(piece)
            out.append(f'<mark class="lead">{text}</mark>' if leading else f"<mark>{text}</mark>" if same else text)
        return "".join(out)

    def records(self, outputs: Sequence[Mapping[str, Any]]) -> str:
        shown = outputs[:MAX_RECORD_ROWS]
        has_base = any("base" in r for r in shown)
        groups = _record_groups(shown)
        note = (f" The page holds the first {MAX_RECORD_ROWS}; all are in {RECORDS_FILE}."
                if len(outputs) > MAX_RECORD_ROWS else "")
        parts = [f'<section id="records" data-records="{len(shown)}" data-sample="{SAMPLE_ROWS}">',
                 self.heading(2, "What the edited model says: memorized records"),
                 self.paragraph(_records_intro(outputs, groups, has_base) + " Highlighted: tokens equal to the true "
                                "suffix at the same position (dark: the run from the start, which is the match "
                                "length)." + note),
                 f'<label><input type="checkbox" id="show-all" onchange="document.body.classList.toggle('
                 f'\'show-all\', this.checked)"> show all {len(shown)} records</label>']
        header = "<tr>" + "".join(f"<th>{self.esc(h)}</th>" for h in _record_header(has_base)) + "</tr>"
        for status, recs in groups.items():
            parts += [self.heading(3, f"{status} ({len(recs)})"), '<table class="records">', header]
            for k, r in enumerate(recs):
                cells = _record_cells(r, k, has_base, self.esc, self._continuation)
                parts.append(f'<tr class="{"rec" if k < SAMPLE_ROWS else "rec more"}" data-status="{status}">'
                             + "".join(f'<td class="{c}">{v}</td>' for c, v in cells) + "</tr>")
            parts.append("</table>")
        return "\n".join(parts + ["</section>"])


class _Markdown:
    """The summary: the page's sections as Markdown, plots linked from ``plots/``, a sample of each record group."""

    def page(self, title: str, parts: Sequence[str]) -> str:
        return "\n\n".join([self.heading(1, title), *parts]) + "\n"

    def heading(self, level: int, text: str) -> str:
        return f"{'#' * level} {text}"

    def paragraph(self, text: str) -> str:
        return text

    def code(self, text: str) -> str:
        return f"```json\n{text}\n```"

    def definitions(self, rows: Sequence[tuple[str, str]]) -> str:
        return "\n".join(f"- **{k}**: {v}" for k, v in rows)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], highlight: Sequence[bool] = ()) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for row, b in zip(rows, highlight or [False] * len(rows)):
            cells = [c.replace("|", "\\|") for c in row]
            lines.append("| " + " | ".join(f"**{c}**" if b else c for c in cells) + " |")
        return "\n".join(lines)

    def details(self, summary: str, body: str) -> str:  # collapsed where Markdown renders HTML blocks (GitHub)
        return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"

    def figure(self, name: str, plot: Plot) -> str:
        return f"![{name}]({PLOTS_DIR}/{name}.png)\n\n*{plot.caption}*"

    def records(self, outputs: Sequence[Mapping[str, Any]]) -> str:
        has_base = any("base" in r for r in outputs)
        groups = _record_groups(outputs)
        parts = [self.heading(2, "What the edited model says: memorized records"),
                 _records_intro(outputs, groups, has_base) + f" All are in {RECORDS_FILE} and on the HTML page."]
        for status, recs in groups.items():
            rows = [[cell for _, cell in _record_cells(r, k, has_base, str.strip,
                                                       lambda r, side: "".join(_pieces(r, side)).strip())]
                    for k, r in enumerate(recs[:SAMPLE_ROWS])]
            parts += [self.heading(3, f"{status} ({len(recs)})"), self.table(_record_header(has_base), rows)]
        return "\n\n".join(parts)


@dataclass
class ReportPaths:
    html: Path
    markdown: Path
    plots: dict[str, Path]


def write_report(directory: str | os.PathLike, ppl_budget: float | None = None) -> ReportPaths:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into ``directory`` from the inputs found there."""
    data = load_report_data(directory, ppl_budget)
    images: dict[str, Plot] = {}
    if data.records:
        images["tradeoff"] = plot_tradeoff(data)
    if data.points:
        images["keep_mass"] = plot_costs(data)
    if data.spectra:
        images["spectra"] = plot_spectra(data.spectra)
    paths = ReportPaths(data.directory / HTML_FILE, data.directory / MARKDOWN_FILE, {})
    for name in ("tradeoff", "keep_mass", "spectra"):
        path = data.directory / PLOTS_DIR / f"{name}.png"
        if name in images:
            with atomic_path(path) as tmp:
                tmp.write_bytes(images[name].png)
            paths.plots[name] = path
        else:  # a plot of an earlier report that this one does not draw
            path.unlink(missing_ok=True)
    for path, fmt in ((paths.html, _Html()), (paths.markdown, _Markdown())):
        with atomic_path(path) as tmp:
            tmp.write_text(_render(data, images, fmt))
    return paths
