"""The visual report of a sweep (or of any before/after evaluation): one HTML page and one Markdown summary.

Inputs, all in one directory ``DIR`` (each optional, but at least one of the first two must exist):

* ``results.jsonl`` -- sweep records, schema in :mod:`kfac_edit.pareto`.
* ``before_after.json`` -- ``{"before": {"label": str, "metrics": {...}}, "after": {"label": str, "metrics": {...}}}``;
  when absent it is derived from the base record and the chosen point of ``results.jsonl``.
* ``spectra.json`` -- eigenvalue spectra of edited modules (written by :func:`write_spectra`)::

      {"modules": {"model.layers.20.mlp.up_proj": {
          "keep_mass": 0.8,
          "grad_eigvals": [...], "act_eigvals": [...],   # eigenvalues of G (out x out) and A (in x in), descending
          "grad_used": 10, "act_used": 12,             # eigenvectors that appear in at least one kept pair
          "mass_fraction": 0.801}}}                    # kept share of (sum lambda_G)(sum mu_A)

* ``sweep.json`` -- the sweep's configuration; its ``ppl_budget`` is used to choose the best point.

Outputs: ``DIR/report.html`` (self-contained: plots embedded as base64 PNG, opens offline), ``DIR/report.md`` and the
PNG plots it links in ``DIR/plots/``: ``tradeoff.png`` (strict memorization vs perplexity, Pareto front and chosen
point marked), ``keep_mass.png`` (memorization vs keep_mass per block group), ``spectra.png`` (when spectra exist).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .constants import BEFORE_AFTER_FILE, HTML_FILE, MARKDOWN_FILE, PLOTS_DIR, RESULTS_FILE, SPECTRA_FILE, SWEEP_FILE
from .errors import UserError
from .fileio import atomic_path, write_json
from .pareto import (
    SweepRecord,
    base_record,
    choose_best,
    format_blocks,
    pareto_front,
    read_results,
)

DEFAULT_PPL_BUDGET = 1.2
MAX_SPECTRA_MODULES = 12

# (metric key, column title, format) in the order tables show them
_COLUMNS = (
    ("strict", "strict mem.", "{:.3f}"),
    ("loose", "loose mem.", "{:.3f}"),
    ("avg_levenshtein_norm", "avg Lev./L", "{:.3f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("ndcg", "nDCG", "{:.3f}"),
)


@dataclass
class ReportData:
    """Everything the report shows, read from a directory."""

    directory: Path
    records: list[SweepRecord] = field(default_factory=list)
    ppl_budget: float = DEFAULT_PPL_BUDGET
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)
    before_after: dict[str, Any] | None = None

    @property
    def base(self) -> SweepRecord | None:
        return base_record(self.records)

    @property
    def points(self) -> list[SweepRecord]:
        return [r for r in self.records if r.kind == "point"]

    @property
    def chosen(self) -> SweepRecord | None:
        base = self.base
        if base is None or not (base.perplexity > 0 and math.isfinite(base.perplexity)):
            return None
        return choose_best(self.points, base.perplexity, self.ppl_budget)


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
    sweep_cfg = _read_json(directory / SWEEP_FILE) or {}
    if ppl_budget is not None:
        data.ppl_budget = float(ppl_budget)
    elif "ppl_budget" in sweep_cfg:
        data.ppl_budget = float(sweep_cfg["ppl_budget"])
    spectra = _read_json(directory / SPECTRA_FILE)
    if spectra:
        data.spectra = dict(spectra.get("modules", {}))
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


def _new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_tradeoff(data: ReportData) -> bytes:
    """Strict memorization vs perplexity for every point; Pareto front, base, budget and chosen point marked."""
    fig = _new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    points = [p for p in data.points if math.isfinite(p.strict) and math.isfinite(p.perplexity)]
    if points:
        sc = ax.scatter(
            [p.perplexity for p in points],
            [p.strict for p in points],
            c=[p.config.keep_mass for p in points],
            cmap="viridis",
            s=28,
            alpha=0.85,
            label="sweep points",
        )
        fig.colorbar(sc, ax=ax, label="keep_mass")
        front = [points[i] for i in pareto_front(points)]
        ax.step(
            [p.perplexity for p in front],
            [p.strict for p in front],
            where="post",
            color="tab:red",
            lw=1.5,
            marker="o",
            mfc="none",
            ms=9,
            label="Pareto front",
        )
    base = data.base
    if base is not None and math.isfinite(base.perplexity):
        ax.scatter([base.perplexity], [base.strict], marker="s", s=70, color="black", label="base model", zorder=5)
        ax.axvline(base.perplexity * data.ppl_budget, color="gray", ls="--", lw=1,
                   label=f"budget {data.ppl_budget:g}x base ppl")
    chosen = data.chosen
    if chosen is not None:
        ax.scatter([chosen.perplexity], [chosen.strict], marker="*", s=260, color="tab:orange", edgecolor="black",
                   zorder=6, label=f"chosen: {chosen.label()}")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel("strict memorization (lower is better)")
    ax.set_title("Memorization vs perplexity")
    ax.grid(alpha=0.3)
    if points or base is not None:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no points with finite metrics", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def plot_keep_mass(data: ReportData) -> bytes:
    """Strict memorization vs keep_mass, one line per block group, one panel per (method, projections)."""
    panels: dict[tuple[str, tuple[str, ...]], list[SweepRecord]] = {}
    for p in data.points:
        panels.setdefault((p.config.method, p.config.projections), []).append(p)
    n = max(1, len(panels))
    fig = _new_figure(7.5, 3.8 * n)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    base = data.base
    for ax, ((method, projections), recs) in zip(axes, sorted(panels.items())):
        groups: dict[tuple[int, ...], list[SweepRecord]] = {}
        for r in recs:
            groups.setdefault(r.config.blocks, []).append(r)
        keys = sorted(groups, key=lambda b: (len(b), b))
        cmap = _colormap("tab20" if len(keys) > 10 else "tab10")
        for k, blocks in enumerate(keys):
            g = sorted(groups[blocks], key=lambda r: r.config.keep_mass)
            ax.plot(
                [r.config.keep_mass for r in g],
                [r.strict for r in g],
                marker="o",
                ms=4,
                color=cmap(k % cmap.N),
                ls="-" if len(blocks) == 1 else ("--" if len(blocks) == 2 else ":"),
                label=f"b{format_blocks(blocks)}",
            )
        if base is not None and math.isfinite(base.strict):
            ax.axhline(base.strict, color="black", lw=1, ls="--", label="base")
        ax.set_title(f"{method}: {','.join(projections)}")
        ax.set_xlabel("keep_mass")
        ax.set_ylabel("strict memorization")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=max(1, min(4, (len(keys) + 7) // 8)), loc="upper left")
    if not panels:
        axes[0].text(0.5, 0.5, "no sweep points", ha="center", va="center", transform=axes[0].transAxes)
    return _png(fig)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def plot_spectra(spectra: Mapping[str, Mapping[str, Any]], max_modules: int = MAX_SPECTRA_MODULES) -> bytes:
    """Eigenvalues of G and A (each divided by its largest, descending, log scale), one panel per edited module.

    A dashed vertical line marks how many eigenvectors of each factor appear in at least one kept pair.
    """
    names = list(spectra)[:max_modules]
    cols = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / cols))
    width, height = 5.0 * cols, 3.2 * rows
    fig = _new_figure(width, height, layout=None)  # fixed margins: constrained layout doubles the draw time
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.55 / height, wspace=0.28,
                        hspace=1.1 / 3.2)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
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
            ax.plot(range(1, len(values) + 1), [v / top if v > 0 else floor for v in values], color=color, lw=1.3,
                    label=label)
            used = m.get(used_key)
            if used is not None:
                ax.axvline(float(used), color=color, ls="--", lw=1, label=f"{label.split()[0]} in kept pairs: "
                           f"{int(used)}/{len(values)}")
        from matplotlib.ticker import NullLocator

        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds of layout and add little
        if max(len(m.get("grad_eigvals", [])), len(m.get("act_eigvals", []))) > 200:
            ax.set_xscale("log")  # large layers: show the head of the spectrum
            ax.xaxis.set_minor_locator(NullLocator())
        keep_mass, frac = m.get("keep_mass"), m.get("mass_fraction")
        title = name + (f"\nkeep_mass {keep_mass:g}" if _is_number(keep_mass) else "")
        if _is_number(frac):
            title += f", kept mass {frac:.3f}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("eigenvalue index (descending)", fontsize=8)
        ax.set_ylabel("eigenvalue / largest", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    if not names:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no spectra", ha="center", va="center", transform=axes[0].transAxes)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "nan"
    return spec.format(f)


def _metric_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return [c for c in _COLUMNS if any(m.get(c[0]) is not None for m in records)]


def before_after_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[metric, before, after, delta]`` of the before/after table (every metric either side has)."""
    before = table["before"].get("metrics", {})
    after = table["after"].get("metrics", {})
    keys = [c[0] for c in _COLUMNS if c[0] in before or c[0] in after]
    keys += sorted(k for k in set(before) | set(after) if k not in keys and _is_number(before.get(k, after.get(k))))
    rows = []
    for k in keys:
        b, a = before.get(k), after.get(k)
        delta = float(a) - float(b) if _is_number(a) and _is_number(b) else None
        rows.append([k, _fmt(b), _fmt(a), "-" if delta is None else f"{delta:+.4g}"])
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def point_rows(records: Sequence[SweepRecord], columns: Sequence[tuple[str, str, str]]) -> list[list[str]]:
    rows = []
    for r in records:
        c = r.config
        rows.append(
            [r.label() if r.kind == "base" else c.method, format_blocks(c.blocks), ",".join(c.projections) or "-",
             "-" if r.kind == "base" else f"{c.keep_mass:g}"]
            + [_fmt(r.metrics.get(key), spec) for key, _, spec in columns]
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


# ---------------------------------------------------------------------------------------------------------- report


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.chosen td { background: #fff3cd; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
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
    images: dict[str, tuple[str, bytes]] = {}  # name -> (caption, png)
    if data.records:
        images["tradeoff"] = (
            "Strict memorization vs perplexity for every sweep point; red: Pareto front; star: chosen point "
            f"(lowest strict memorization with perplexity <= {data.ppl_budget:g} x base).",
            plot_tradeoff(data),
        )
        if data.points:
            images["keep_mass"] = ("Strict memorization vs keep_mass per block group.", plot_keep_mass(data))
    if data.spectra:
        shown = min(len(data.spectra), MAX_SPECTRA_MODULES)
        images["spectra"] = (
            f"Eigenvalue spectra of G and A for the edited modules ({shown} of {len(data.spectra)} shown); "
            "eigenvalues divided by the largest; dashed lines: eigenvectors that appear in at least one kept pair.",
            plot_spectra(data.spectra),
        )
    plot_paths: dict[str, Path] = {}
    for name, (_, png) in images.items():
        path = d / PLOTS_DIR / f"{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        plot_paths[name] = path

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
                    f"after ({ba['after'].get('label', 'after')})", "delta"],
            rows=before_after_rows(ba),
        ))
    points = data.points
    if points:
        columns = _metric_columns([r.metrics for r in data.records])
        header = ["method", "blocks", "projections", "keep_mass"] + [c[1] for c in columns]
        chosen = data.chosen
        front = [points[i] for i in pareto_front(points)]
        sections.append(_Section(
            title=f"Pareto front ({len(front)} of {len(points)} points)",
            header=header,
            rows=point_rows(front, columns),
            highlight=[p is chosen for p in front],
            note="Points no other point beats in both strict memorization and perplexity.",
        ))
        ordered = sorted(points, key=lambda p: (p.config.method, p.config.projections, len(p.config.blocks),
                                                p.config.blocks, p.config.keep_mass))
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
    if data.records:
        lines.append(f"{len(data.points)} sweep points evaluated.")
    if base is not None:
        lines.append(
            f"Base model: strict memorization {_fmt(base.strict, '{:.3f}')}, perplexity {_fmt(base.perplexity)}; "
            f"perplexity budget {data.ppl_budget:g} x base = {_fmt(base.perplexity * data.ppl_budget)}."
        )
    if chosen is not None:
        lines.append(
            f"Chosen point: {chosen.label()}: strict {_fmt(chosen.strict, '{:.3f}')}, "
            f"perplexity {_fmt(chosen.perplexity)}."
        )
    elif data.points and base is not None:
        lines.append("No point is within the perplexity budget; raise --ppl-budget or widen the grid.")
    elif data.points:
        lines.append("No base-model record: the best point cannot be chosen.")
    return lines


def _chosen_layers(data: ReportData) -> str | None:
    chosen = data.chosen
    return json.dumps(chosen.config.layers()) if chosen is not None else None


def _render_html(data: ReportData, sections: list[_Section], images: dict[str, tuple[str, bytes]]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kfac-edit report: {esc(data.directory.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>kfac-edit report: {esc(data.directory.name)}</h1>",
    ]
    parts += [f"<p>{esc(line)}</p>" for line in _summary_lines(data)]
    layers = _chosen_layers(data)
    if layers is not None:
        parts.append("<p>Apply it with <code>kfac-edit edit --layers-file DIR/best.json</code>; its layers JSON:</p>")
        parts.append(f"<pre>{esc(layers)}</pre>")
    for s in sections:
        if s.title == "Before / after":
            parts += [f"<h2>{esc(s.title)}</h2>", _html_table(s.header, s.rows)]
    for name, (caption, png) in images.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure id="fig-{name}"><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
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


def _render_markdown(data: ReportData, sections: list[_Section], images: dict[str, tuple[str, bytes]]) -> str:
    parts = [f"# kfac-edit report: {data.directory.name}", ""]
    parts += [line + "  " for line in _summary_lines(data)]
    layers = _chosen_layers(data)
    if layers is not None:
        parts += ["", "Apply it with `kfac-edit edit --layers-file DIR/best.json`; its layers JSON:", "",
                  "```json", layers, "```"]
    for s in sections:
        if s.title == "Before / after":
            parts += ["", f"## {s.title}", "", _md_table(s.header, s.rows)]
    for name, (caption, _) in images.items():
        parts += ["", f"![{name}]({PLOTS_DIR}/{name}.png)", "", f"*{caption}*"]
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
