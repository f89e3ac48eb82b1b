"""Pareto front, choice of the best point, and the report (HTML page checked in headless Chromium)."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kfac_edit.cli import main
from kfac_edit.fileio import append_jsonl, write_json
from kfac_edit.pareto import (
    BASE_CONFIG,
    PointConfig,
    SweepRecord,
    choose_best,
    pareto_front,
    read_results,
)
from kfac_edit.report import (SAMPLE_ROWS, format_delta, format_value, load_report_data, write_records, write_report,
                              write_spectra)


def brute_front(values):
    """Indices not dominated by any other point (O(n^2) definition), NaN points excluded."""
    out = []
    for i, v in enumerate(values):
        if any(math.isnan(x) for x in v):
            continue
        dominated = False
        for j, w in enumerate(values):
            if j == i or any(math.isnan(x) for x in w):
                continue
            if all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)):
                dominated = True
        if not dominated:
            out.append(i)
    return out


def test_pareto_front_hand_example():
    pts = [
        (0.5, 10.0),  # 0 front
        (0.2, 12.0),  # 1 front
        (0.2, 12.0),  # 2 duplicate of 1: also front
        (0.2, 13.0),  # 3 dominated by 1 (same strict, worse ppl)
        (0.6, 10.0),  # 4 dominated by 0 (same ppl, worse strict)
        (0.0, 20.0),  # 5 front
        (0.1, 25.0),  # 6 dominated by 5
        (math.nan, 1.0),  # 7 NaN: never on the front
        (0.9, 9.0),  # 8 front (best perplexity)
    ]
    front = pareto_front(pts, objectives=lambda p: p)
    assert front == [5, 1, 2, 0, 8]  # sorted by (strict, perplexity)
    assert pareto_front([], objectives=lambda p: p) == []
    assert pareto_front([(1.0, 1.0)], objectives=lambda p: p) == [0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=25))
def test_pareto_front_equals_brute_force(int_points):
    # small integer grid: many ties and duplicates
    values = [(float(a), float(b)) for a, b in int_points]
    assert sorted(pareto_front(values, objectives=lambda p: p)) == brute_front(values)


def rec(blocks, keep, strict, ppl, projections=("gate", "up"), loose=None, method="kfac"):
    metrics = {"strict": strict, "perplexity": ppl}
    if loose is not None:
        metrics["loose"] = loose
    return SweepRecord(PointConfig(method, tuple(blocks), tuple(projections), keep), metrics)


def test_choose_best_budget_and_ties():
    pts = [
        rec([1], 0.9, 0.30, 10.5),
        rec([1, 2], 0.6, 0.00, 13.0),  # best strict but over budget 1.2 * 10 = 12
        rec([2], 0.7, 0.10, 11.9),
        rec([2, 3], 0.7, 0.10, 11.5),  # same strict, lower perplexity: wins
        rec([3], 0.8, 0.10, 11.5, loose=0.2),  # same strict+ppl, loose given -> beats missing loose
        SweepRecord(BASE_CONFIG, {"strict": 0.0, "perplexity": 1.0}, kind="base"),  # never chosen
    ]
    best = choose_best(pts, base_ppl=10.0, ppl_budget=1.2)
    assert best is pts[4]
    assert best.config.layers() == {"3": {"gate": 0.8, "up": 0.8}}
    # ties in everything but size: the smaller edit (fewer blocks) wins
    a, b = rec([4, 5], 0.8, 0.1, 11.0), rec([4], 0.8, 0.1, 11.0)
    assert choose_best([a, b], 10.0, 1.2) is b
    # budget boundary is inclusive, and nothing within budget -> None
    assert choose_best([rec([1], 0.5, 0.2, 12.0)], 10.0, 1.2) is not None
    assert choose_best([rec([1], 0.5, 0.2, 12.0001)], 10.0, 1.2) is None
    with pytest.raises(ValueError):
        choose_best(pts, base_ppl=float("nan"), ppl_budget=1.2)


def test_record_round_trip_and_resume_semantics(tmp_path):
    r = rec([20, 21, 22], 0.8, 0.12, 15.2, loose=0.3)
    d = r.to_dict()
    assert d["id"] == "kfac|b20-22|gate,up|k0.8"
    assert d["layers"] == {"20": {"gate": 0.8, "up": 0.8}, "21": {"gate": 0.8, "up": 0.8}, "22": {"gate": 0.8, "up": 0.8}}
    assert d["config"] == {"method": "kfac", "blocks": [20, 21, 22], "projections": ["gate", "up"], "keep_mass": 0.8}
    path = tmp_path / "results.jsonl"
    append_jsonl(path, d)
    updated = dict(d, metrics={"strict": 0.5, "perplexity": 1.0})
    append_jsonl(path, updated)
    with open(path, "a") as fh:
        fh.write('{"torn": ')  # a killed writer's partial last line
    back = read_results(path)
    assert len(back) == 1 and back[0].id == r.id and back[0].strict == 0.5  # last record of an id wins


# ------------------------------------------------------------------------------------------------- report


SYNTHETIC_RECORDS = 60  # memorized records in the synthetic sweep's records.jsonl


def synthetic_sweep(directory: Path, with_spectra: bool = True) -> None:
    """A sweep directory with a base record, two methods (kfac: 3 blocks x 4 keep_mass x 2 projection sets; svd:
    one group x 6 keep_mass), held-out split and capability metrics, per-record outputs and provenance."""
    base = SweepRecord(BASE_CONFIG, {"strict": 0.95, "loose": 0.98, "avg_levenshtein_norm": 0.02, "perplexity": 10.0,
                                     "selection_strict": 0.95, "heldout_strict": 0.95,
                                     "rule_heldout_accuracy": 0.99}, kind="base")
    append_jsonl(directory / "results.jsonl", base.to_dict())
    for projections in (("gate", "up"), ("gate", "up", "down")):
        for blocks in ([0], [1], [2], [0, 1], [1, 2], [0, 1, 2]):
            for keep in (0.6, 0.7, 0.8, 0.9):
                # later blocks hold more memorization and cost less perplexity; down adds strength
                strength = sum(0.7 + 0.2 * b for b in blocks) * (1 - keep) * (1.5 if len(projections) == 3 else 1.0)
                cost = sum(1.2 - 0.2 * b for b in blocks) * (1 - keep) * (1.5 if len(projections) == 3 else 1.0)
                strict = max(0.0, 0.95 - 1.5 * strength)
                r = rec(blocks, keep, strict, 10.0 * (1 + 0.4 * cost ** 1.5),
                        projections=projections, loose=min(1.0, 0.98 - strength))
                r.metrics.update(avg_levenshtein_norm=strength, selection_strict=strict,
                                 heldout_strict=min(1.0, strict + 0.05), rule_heldout_accuracy=0.99 - 0.3 * cost)
                append_jsonl(directory / "results.jsonl", r.to_dict())
    for keep in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):  # the baseline: memorization falls only as perplexity rises
        strict = max(0.0, 0.95 - 1.6 * (1 - keep))
        r = rec([1, 2], keep, strict, 10.0 * (1 + 2.0 * (1 - keep) ** 1.2), projections=("gate", "up"),
                loose=min(1.0, strict + 0.1), method="svd")
        r.metrics.update(selection_strict=strict, heldout_strict=min(1.0, strict + 0.1),
                         rule_heldout_accuracy=0.99 - 0.8 * (1 - keep))
        append_jsonl(directory / "results.jsonl", r.to_dict())
    write_json(directory / "sweep.json", {
        "ppl_budget": 1.2, "split": {"holdout_fraction": 0.5, "seed": 0, "selection": 15, "heldout": 15},
        "grid": {"blocks": [0, 1, 2], "methods": ["kfac", "svd"], "projection_sets": [["gate", "up"],
                                                                                    ["gate", "up", "down"]],
                 "keep_masses": {"kfac": [0.6, 0.7, 0.8, 0.9], "svd": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]},
                 "groups": None, "max_combo": 3, "points": 54}})
    write_json(directory / "provenance.json", {
        "model": {"name": "hub/tiny-model", "fingerprint": "abc123", "parameters": 140000, "dtype": "float32"},
        "factors": {"data": "corpus.jsonl", "tokens": 200018, "labels": "sampled", "seed": 0},
        "memorized": ["memorized.jsonl"], "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00", "seconds": 60.0, "versions": {"kfac_edit": "0.0", "torch": "2"}})
    write_synthetic_records(directory / "records.jsonl", SYNTHETIC_RECORDS)
    if with_spectra:
        write_spectra(
            directory / "spectra.json",
            {
                f"model.layers.{b}.mlp.{p}_proj": {
                    "keep_mass": 0.8,
                    "grad_eigvals": [1.0 / (k + 1) for k in range(24)],
                    "act_eigvals": [2.0 ** -k for k in range(16)],
                    "grad_used": 7,
                    "act_used": 5,
                    "mass_fraction": 0.8012,
                }
                for b in (1, 2)
                for p in ("gate", "up")
            },
        )


class WordTokenizer:
    """Decodes ids as words ``w<id>``, the way the report's writers use a tokenizer."""

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def record_outputs(n: int, edited: bool) -> dict[str, list[dict]]:
    """Per-record outputs of ``n`` records over two sets: record i has suffix 10 tokens; the base recites every
    suffix; the edited model recites records i % 3 == 0 and keeps the first i % 10 tokens of the others."""
    sets: dict[str, list[dict]] = {"selection": [], "heldout": []}
    for i in range(n):
        suffix = [100 + i + k for k in range(10)]
        keep = 10 if (i % 3 == 0 or not edited) else i % 10
        generated = suffix[:keep] + [7] * (10 - keep)
        lev = (10 - keep) / 10
        sets["selection" if i % 2 == 0 else "heldout"].append(
            {"prefix_ids": list(range(i, i + 30)), "suffix_ids": suffix, "generated": generated,
             "strict": keep == 10, "match_len": keep, "lev_norm": lev, "source": None})
    return sets


def write_synthetic_records(path: Path, n: int) -> int:
    return write_records(path, record_outputs(n, edited=False), record_outputs(n, edited=True), WordTokenizer(),
                         parts={"selection": "selection", "heldout": "heldout"}, point="b1-2 gate,up k=0.8")


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    """A synthetic sweep directory and its report (written once for the tests that read it)."""
    directory = tmp_path_factory.mktemp("sweep")
    synthetic_sweep(directory)
    return directory, write_report(directory)


def test_report_contains_every_plot_and_table(sweep_report):
    tmp_path, paths = sweep_report
    data = load_report_data(tmp_path)
    assert len(data.points) == 54 and data.base.perplexity == 10.0 and data.ppl_budget == 1.2
    chosen = data.chosen
    assert chosen is not None and chosen.perplexity <= 12.0
    # the chosen point is the lowest selection strict memorization within budget, computed by hand here
    within = [p for p in data.points if p.perplexity <= 12.0]
    assert chosen.metrics["selection_strict"] == min(p.metrics["selection_strict"] for p in within)

    assert set(paths.plots) == {"tradeoff", "keep_mass", "spectra"}
    for png in paths.plots.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = paths.html.read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "src=\"plots/" not in page  # self-contained: no file references
    assert "Before / after" in page and "Pareto front" in page and chosen.label() in page
    md = paths.markdown.read_text()
    for name in ("tradeoff", "keep_mass", "spectra"):
        assert f"](plots/{name}.png)" in md
    # before/after derived from base and chosen point: strict 95% -> chosen.strict, the change in points
    assert f"| strict | 95.0% | {100 * chosen.strict:.1f}% | {100 * (chosen.strict - 0.95):+.1f} pp |" in md
    assert f"| perplexity | 10.0 | {chosen.perplexity:#.3g} | +{chosen.perplexity - 10:#.3g} " \
           f"(+{10 * (chosen.perplexity - 10):.1f}%) |" in md
    assert json.dumps(chosen.config.layers()) in md
    # provenance header and per-record view
    assert "hub/tiny-model" in page and "200,018 tokens, sampled labels, seed 0" in page
    assert "15 selection records (the choice), 15 held out (reported)" in page
    assert "kfac: 4 keep_mass values 0.6..0.9; svd: 6 keep_mass values 0.5..0.95" in page
    assert page.count('<tr class="rec') == SYNTHETIC_RECORDS
    assert page.count('data-status="survived"') == 20 and page.count('data-status="removed"') == 40
    assert "### survived (20)" in md and "### removed (40)" in md
    # record 4 (edited keeps its first 4 of 10 tokens): the matched run is marked, the rest is not
    assert ('<mark class="lead">w104 </mark><mark class="lead">w105 </mark><mark class="lead">w106 </mark>'
            '<mark class="lead">w107 </mark>w7 w7 ') in page
    assert "10 → 4 / 10" in page and "100% → 40%" in page


def test_number_formats():
    assert format_value("strict", 0.034) == "3.4%" and format_value("heldout_loose", 1) == "100.0%"
    assert format_value("rule_heldout_accuracy", 0.985) == "98.5%"
    assert format_value("perplexity", 19.0) == "19.0" and format_value("perplexity", 1.7301) == "1.73"
    assert format_value("perplexity.mean_loss", 0.54843) == "0.548" and format_value("perplexity", 1234.5) == "1234"
    assert format_value("ndcg", None) == "-" and format_value("ndcg", float("nan")) == "nan"
    # one format per column: rates move in percentage points, the rest in 3 significant digits
    assert format_delta("strict", 0.999, 0.034) == "-96.5 pp"
    assert format_delta("perplexity", 19.0, 22.8) == "+3.80 (+20.0%)"
    assert format_delta("ndcg", 1.0, 0.93124) == "-0.0688" and format_delta("ndcg", 1, 1) == "+0"
    assert format_delta("strict", None, 0.5) == "-"


def test_write_records_layout(tmp_path):
    n = write_synthetic_records(tmp_path / "records.jsonl", 6)
    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert n == 6 == len(lines)
    first = lines[0]
    assert first["set"] == first["part"] == "selection" and first["point"] == "b1-2 gate,up k=0.8"
    assert first["base"] == {"generated": list(range(100, 110)), "strict": True, "match_len": 10, "similarity": 1.0}
    second = next(line for line in lines if line["set"] == "heldout" and line["index"] == 0)  # record 1
    assert second["edited"]["match_len"] == 1 and second["edited"]["similarity"] == pytest.approx(0.1)
    assert second["text"]["edited"][:2] == ["w101 ", "w7 "]  # word-level pieces get their space back
    assert second["text"]["prefix"].startswith("w1 w2")
    with pytest.raises(ValueError, match="2 base outputs but 3"):
        write_records(tmp_path / "bad.jsonl", {"s": [{}] * 2}, {"s": [{}] * 3})


def test_report_before_after_only_and_errors(tmp_path):
    # a `run` directory: just a before/after table, no sweep
    write_json(tmp_path / "before_after.json", {
        "before": {"label": "base", "metrics": {"strict": 0.5, "perplexity": 20.0, "rule_accuracy": 1.0}},
        "after": {"label": "edited", "metrics": {"strict": 0.0, "perplexity": 21.0, "rule_accuracy": 0.98}},
    })
    paths = write_report(tmp_path)
    assert paths.plots == {}
    md = paths.markdown.read_text()
    assert "| perplexity | 20.0 | 21.0 | +1.00 (+5.0%) |" in md and "| rule_accuracy | 100.0% | 98.0% | -2.0 pp |" in md
    # records.jsonl without a base side (run --skip-baseline): every row is edited-only
    write_records(tmp_path / "records.jsonl", {}, record_outputs(4, edited=True))
    page = write_report(tmp_path).html.read_text()
    assert page.count('<tr class="rec') == 4 and "base continuation" not in page
    assert page.count('data-status="survived"') == 2 and "2 / 10" in page and "100%" in page

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    (empty / "results.jsonl").write_text('{"kind": "point"}\n{"kind": "point", "metrics": {}}\n')
    assert main(["report", str(empty)]) == 2  # first record lacks metrics: schema error, exit 2


def test_report_cli(tmp_path, capsys):
    synthetic_sweep(tmp_path, with_spectra=False)
    own = load_report_data(tmp_path).chosen  # at the sweep's budget, 1.2: what the sweep wrote to best.json
    write_json(tmp_path / "best.json", own.config.layers_file(0))
    assert main(["report", str(tmp_path)]) == 0
    assert "(2 plots in " in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert "Apply it with `kfac-edit edit --layers-file DIR/best.json`" in text
    assert json.dumps(own.config.layers_file(0)) in text

    assert main(["report", str(tmp_path), "--ppl-budget", "1.05"]) == 0
    assert "report.html" in capsys.readouterr().out
    data = load_report_data(tmp_path, ppl_budget=1.05)
    assert data.chosen.perplexity <= 10.5 and data.chosen.config != own.config
    assert (tmp_path / "plots" / "tradeoff.png").exists() and not (tmp_path / "plots" / "spectra.png").exists()
    text = (tmp_path / "report.md").read_text()
    assert data.chosen.label() in text
    assert "holds the sweep's choice at its own perplexity budget, not this point" in text
    assert "--layers-file DIR/best.json" not in text and json.dumps(data.chosen.config.layers_file(0)) in text


# ------------------------------------------------------------------------------------------ headless browser

# Appended to a copy of the page: reports each image as ok/broken, each figure's legend entries, the per-record rows
# (all and visible) and the page's size at the window width; a deliberately broken control image is added last, so one
# browser launch shows both that the report's images load and that the check detects a broken one.
_CHECK_SCRIPT = """<img id="control" alt="control" src="data:image/png;base64,AAAA">
<script>
window.addEventListener('load', function () {
  var all = function (sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); };
  var report = {
    images: all('img').map(function (i) { return (i.complete && i.naturalWidth > 0) ? 'ok' : 'broken'; }),
    widths: all('figure img').map(function (i) { return [i.naturalWidth, i.getBoundingClientRect().width]; }),
    legends: {},
    rows: all('tr.rec').length,
    visible_rows: all('tr.rec').filter(function (r) { return r.offsetParent !== null; }).length,
    height: document.documentElement.scrollHeight,
    scroll_width: document.documentElement.scrollWidth,
    window_width: window.innerWidth
  };
  all('figure[data-legend]').forEach(function (f) { report.legends[f.id] = f.dataset.legend.split('|'); });
  var box = document.getElementById('show-all');
  if (box) { box.click(); }
  report.rows_after_show_all = all('tr.rec').filter(function (r) { return r.offsetParent !== null; }).length;
  var d = document.createElement('pre');
  d.id = 'page-check';
  d.textContent = JSON.stringify(report);
  document.body.appendChild(d);
});
</script>"""


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=90,
        )


def _page_check(browser: str, page: Path, width: int = 1280) -> dict:
    """Open ``page`` (with the checking script appended) in headless Chromium at ``width`` px; return its report."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    try:
        proc = _chromium(browser, f"--window-size={width},900", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    m = re.search(r'id="page-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"checking script did not run; chromium said: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_page_renders_in_headless_chromium(sweep_report):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium chromium-driver); cannot check the page renders")
    directory, paths = sweep_report
    check = _page_check(browser, paths.html)
    # the report's three plots load; the broken control image appended last is detected as broken
    assert check["images"] == ["ok", "ok", "ok", "broken"]
    # one legend entry per method present, in the trade-off and the cost panels
    data = load_report_data(directory)
    assert data.methods == ["kfac", "svd"]
    for fig in ("fig-tradeoff", "fig-keep_mass"):
        legend = check["legends"][fig]
        for method in data.methods:
            assert legend.count(method) == 1, (fig, legend)
        assert "base model" in legend and "held-out strict (filled)" in legend and "selection strict (hollow)" in legend
    assert f"chosen: {data.chosen.label()}" in check["legends"]["fig-tradeoff"]
    assert check["legends"]["fig-spectra"][:2] == ["G (out x out)", "G: kept region (in a kept pair)"]
    # the per-record table: every record is a row; a sample per group is shown until "show all" is ticked
    # (60 records: 20 survived, 40 removed; SAMPLE_ROWS = 20 per group)
    assert SAMPLE_ROWS == 20 and check["rows"] == SYNTHETIC_RECORDS
    assert check["visible_rows"] == 20 + 20
    assert check["rows_after_show_all"] == SYNTHETIC_RECORDS
    # readable at 1280 px: nothing wider than the window, plots drawn at (nearly) their own pixel size
    assert check["window_width"] == 1280 and check["scroll_width"] <= 1280
    for natural, shown in check["widths"]:
        assert natural >= 1200 and shown >= 0.9 * natural, (natural, shown)  # 9 pt legend text stays >= 10 px
    # a screenshot of the whole page: its height is the page's, in a sane range for three plots and two tables
    height = check["height"]
    assert 2500 <= height <= 12000, height
    shot = directory / "screenshot.png"
    proc = _chromium(browser, f"--window-size=1280,{height}", f"--screenshot={shot}", paths.html.as_uri())
    assert shot.exists(), proc.stderr[-2000:]
    assert _png_size(shot) == (1280, height)


# ------------------------------------------------------------------------ the writers: sweep and run, end to end

from test_sweep import _argv, sweep_inputs  # noqa: E402,F401  (a tiny model, its factors, memorized set, text)
from test_workflow import LAYERS, eval_args, setup  # noqa: E402,F401


def test_sweep_writes_per_record_outputs_and_provenance(sweep_inputs, tmp_path):  # noqa: F811
    """records.jsonl of the chosen point agrees with the sweep's own measurement of it, record by record."""
    inp, out = sweep_inputs, tmp_path / "sweep"
    assert main(_argv(inp, out, "--method", "kfac,svd", "--group", "0-1", "--holdout-fraction", "0.25")) == 0
    data = load_report_data(out)
    chosen = data.chosen
    assert chosen is not None and data.methods == ["kfac", "svd"]
    lines = data.outputs
    assert len(lines) == 16 and {line["point"] for line in lines} == {chosen.label()}
    by_part = {part: [line for line in lines if line["part"] == part] for part in ("selection", "heldout")}
    assert len(by_part["selection"]) == 12 and len(by_part["heldout"]) == 4
    for part, group in by_part.items():
        # the base recites every record (the set is its own continuations); the edited side reproduces the
        # point's strict and match lengths as the sweep measured them
        assert all(line["base"]["strict"] and line["base"]["match_len"] == 6 for line in group)
        strict = sum(line["edited"]["strict"] for line in group) / len(group)
        assert strict == pytest.approx(chosen.metrics[f"{part}_strict"])
        lev = sum(1 - line["edited"]["similarity"] for line in group) / len(group)
        assert lev == pytest.approx(chosen.metrics[f"{part}_avg_levenshtein_norm"], abs=1e-5)
        for line in group:
            assert len(line["text"]["edited"]) == len(line["edited"]["generated"]) == 6
    prov = json.loads((out / "provenance.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())
    manifest = json.loads((inp["factors"] / "manifest.json").read_text())
    assert prov["model"]["fingerprint"] == sweep["identity"]["model_fingerprint"]
    assert prov["factors"]["tokens"] == manifest["tokens"] and prov["factors"]["labels"] == "sampled"
    assert prov["memorized"] == [str(inp["mem"])] and prov["split"]["heldout"] == 4
    page = (out / "report.html").read_text()
    assert page.count('<tr class="rec') == 16 and f"fingerprint {prov['model']['fingerprint']}" in page
    legend = re.search(r'id="fig-tradeoff" data-legend="([^"]*)"', page).group(1).split("|")
    assert legend.count("kfac") == legend.count("svd") == 1


def test_run_writes_per_record_outputs_and_the_report(tiny_model_dir, setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_model_dir), "--factors", str(setup["factors"]), "--layers-json", LAYERS,
                 "--out", str(out)] + eval_args(setup)) == 0
    (summary,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    # the per-record outputs are those of the evaluations themselves
    assert sum(line["base"]["strict"] for line in lines) / 8 == summary["before"]["strict"] == 1.0
    assert sum(line["edited"]["strict"] for line in lines) / 8 == pytest.approx(summary["after"]["strict"])
    assert sum(line["edited"]["match_len"] for line in lines) / 8 == pytest.approx(summary["after"]["mean_match_len"])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"]["name"] == str(tiny_model_dir) and prov["layers"] == json.loads(LAYERS)
    page = (out / "report.html").read_text()
    assert page.count('<tr class="rec') == 8 and "Before / after" in page and "<dt>method</dt>" in page


def test_method_styles_are_distinct_and_bad_records_file_is_refused(tmp_path):
    from kfac_edit.report import method_style

    methods = ["kfac", "kfac-independent", "svd", "random", "later-a", "later-b"]
    styles = [method_style(m, methods) for m in methods]
    assert len(set(styles)) == len(methods) == len({c for c, _ in styles})
    write_json(tmp_path / "before_after.json", {"before": {"metrics": {"strict": 1.0}},
                                                "after": {"metrics": {"strict": 0.0}}})
    (tmp_path / "records.jsonl").write_text('{"suffix_ids": [1]}\n')
    assert main(["report", str(tmp_path)]) == 2  # a record without its edited side: one line, exit 2
    (tmp_path / "records.jsonl").write_text('{"suffix_ids": [1], "edi\n{"suffix_ids": [1], "edited": {}}\n')
    assert main(["report", str(tmp_path)]) == 2  # a broken line inside the file
    assert not (tmp_path / "report.html").exists()
