"""Pareto front, choice of the best point, and the report (HTML page checked in headless Chromium)."""

from __future__ import annotations

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
from kfac_edit.report import format_delta, format_value, load_report_data, write_records, write_report, write_spectra


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


SYNTHETIC_RECORDS = 30  # memorized records in the synthetic sweep's records.jsonl


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
    assert len(data.points) == 48 and data.base.perplexity == 10.0 and data.ppl_budget == 1.2
    chosen = data.chosen
    assert chosen is not None and chosen.perplexity <= 12.0
    # the chosen point is the lowest strict memorization within budget, computed by hand here
    within = [p for p in data.points if p.perplexity <= 12.0]
    assert chosen.strict == min(p.strict for p in within)

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
    # before/after derived from base and chosen point: strict 0.95 -> chosen.strict
    assert f"| strict | 0.95 | {chosen.strict:.4g} | {chosen.strict - 0.95:+.4g} |" in md
    assert json.dumps(chosen.config.layers()) in md


def test_report_before_after_only_and_errors(tmp_path):
    # a `run` directory: just a before/after table, no sweep
    write_json(tmp_path / "before_after.json", {
        "before": {"label": "base", "metrics": {"strict": 0.5, "perplexity": 20.0, "rule_accuracy": 1.0}},
        "after": {"label": "edited", "metrics": {"strict": 0.0, "perplexity": 21.0, "rule_accuracy": 0.98}},
    })
    paths = write_report(tmp_path)
    assert paths.plots == {}
    md = paths.markdown.read_text()
    assert "| perplexity | 20 | 21 | +1 |" in md and "| rule_accuracy | 1 | 0.98 | -0.02 |" in md

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    (empty / "results.jsonl").write_text('{"kind": "point"}\n{"kind": "point", "metrics": {}}\n')
    assert main(["report", str(empty)]) == 2  # first record lacks metrics: schema error, exit 2


def test_report_cli(tmp_path, capsys):
    synthetic_sweep(tmp_path, with_spectra=False)
    assert main(["report", str(tmp_path), "--ppl-budget", "1.05"]) == 0
    assert "report.html" in capsys.readouterr().out
    data = load_report_data(tmp_path, ppl_budget=1.05)
    assert data.chosen.perplexity <= 10.5
    assert (tmp_path / "plots" / "tradeoff.png").exists() and not (tmp_path / "plots" / "spectra.png").exists()
    assert data.chosen.label() in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------------ headless browser

# Appended to a copy of the page: reports each image as ok/broken; a deliberately broken control image is added
# last, so one browser launch shows both that the report's images load and that the check detects a broken one.
_CHECK_SCRIPT = """<img id="control" alt="control" src="data:image/png;base64,AAAA">
<script>
window.addEventListener('load', function () {
  var states = Array.prototype.slice.call(document.images).map(function (i) {
    return (i.complete && i.naturalWidth > 0) ? 'ok' : 'broken';
  });
  var d = document.createElement('div');
  d.id = 'img-check';
  d.textContent = 'images: ' + states.join(' ');
  document.body.appendChild(d);
});
</script>"""


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _image_states(browser: str, page: Path) -> list[str]:
    """Open ``page`` (with the checking script appended) in headless Chromium; return 'ok'/'broken' per image."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=60,
        )
    probe.unlink()
    m = re.search(r'id="img-check">images: ([a-z ]*)<', proc.stdout)
    assert m, f"checking script did not run; chromium said: {proc.stderr[-2000:]}"
    return m.group(1).split()


def test_report_page_renders_in_headless_chromium(sweep_report):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium chromium-driver); cannot check the page renders")
    _, paths = sweep_report
    # the report's three plots load; the broken control image appended last is detected as broken
    assert _image_states(browser, paths.html) == ["ok", "ok", "ok", "broken"]
