"""`kfac-edit run`: base eval, edit, save, eval again; the summary line, the saved model and bad input."""

from __future__ import annotations

import json

import pytest

from kfac_edit.cli import main
from kfac_edit.evaluate.memorization import greedy_generate
from kfac_edit.fileio import read_jsonl
from kfac_edit.models import load_model

LAYERS = '{"0": {"gate": 0.3, "up": 0.3}, "1": {"down": 0.3}}'


@pytest.fixture
def setup(tiny_model_dir, tiny_corpus_jsonl, tmp_path):
    """Factors collected by `kfac-edit collect`, and a memorized set made of the base model's own greedy output."""
    factors = tmp_path / "factors"
    assert main(["collect", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(factors),
                 "--tokens", "600", "--seq-len", "32", "--batch-size", "8", "--device", "cpu", "--no-progress"]) == 0
    model, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    prompts = [[(7 * i + j) % 60 for j in range(8)] for i in range(8)]
    suffixes = greedy_generate(model, prompts, 6, batch_size=8)
    mem = tmp_path / "mem.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": p, "suffix_ids": s}) + "\n" for p, s in zip(prompts, suffixes)))
    return {"factors": factors, "mem": mem, "text": tiny_corpus_jsonl}


def eval_args(setup):
    return ["--memorized", str(setup["mem"]), "--perplexity-data", str(setup["text"]), "--ndcg-data", str(setup["text"]),
            "--prefix-len", "8", "--suffix-len", "6", "--ndcg-seq-len", "32", "--ppl-block", "16", "--device", "cpu"]


def test_run_evaluates_edits_saves_and_summarizes(tiny_model_dir, setup, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--factors", str(setup["factors"]), "--layers-json", LAYERS,
            "--out", str(out), "--cache-dir", str(tmp_path / "eigen")] + eval_args(setup)
    assert main(argv) == 0
    assert len(list((tmp_path / "eigen").glob("*.safetensors"))) == 3  # one per edited module: --cache-dir on run too
    table = capsys.readouterr().out
    assert "strict" in table and "perplexity" in table and "delta" in table
    (summary,) = read_jsonl(out / "runs.jsonl")
    before, after, delta = summary["before"], summary["after"], summary["delta"]
    assert before["strict"] == 1.0 and before["mean_match_len"] == 6.0 and before["ndcg"] == 1.0
    assert after["strict"] < 1.0 and after["ndcg"] < 1.0 and after["perplexity"] != before["perplexity"]
    assert set(delta) == set(after)
    for key in delta:
        assert delta[key] == pytest.approx(after[key] - before[key])
    assert summary["edit"]["layers"] == json.loads(LAYERS)
    evals = read_jsonl(out / "evals.jsonl")
    assert [e["model"] for e in evals] == [str(tiny_model_dir), str(out / "edited")]
    assert (out / "edited" / "edit_report.json").exists()
    table_file = json.loads((out / "before_after.json").read_text())
    assert table_file["before"]["metrics"] == before and table_file["after"]["metrics"] == after

    # the saved model, evaluated on its own against the base directory, gives the same numbers
    again = tmp_path / "again.jsonl"
    assert main(["eval", "--model", str(out / "edited"), "--reference-model", str(tiny_model_dir), "--out", str(again)]
                + eval_args(setup)) == 0
    from kfac_edit.evaluate.suite import headline_metrics

    assert headline_metrics(read_jsonl(again)[0]["metrics"]) == pytest.approx(after, rel=1e-6)

    # --skip-baseline: after only, appended to the same results file
    assert main(argv + ["--skip-baseline"]) == 0
    lines = read_jsonl(out / "runs.jsonl")
    assert len(lines) == 2 and lines[1]["before"] is None and lines[1]["delta"] == {}
    assert lines[1]["after"] == pytest.approx(after, rel=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--layers-json", '{"0": {"gate": 1.5}}'], "outside [0, 1]"),
        (["--layers-json", '{"9": {"gate": 0.5}}'], "block 9 does not exist"),
        (["--factors", "MISSING"], "is not a directory"),
        (["--memorized", "MISSING.jsonl"], "does not exist"),
    ],
)
def test_run_bad_input_exits_2_and_writes_nothing(tiny_model_dir, setup, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--factors", str(setup["factors"]), "--layers-json", LAYERS,
            "--out", str(out)] + eval_args(setup)
    for i, item in enumerate(change):
        if item.startswith("--") and item in argv:
            argv[argv.index(item) + 1] = change[i + 1].replace("MISSING", str(tmp_path / "missing"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kfac-edit: error: ") and message in err
    assert not out.exists()


def test_sweep_takes_layers_as_the_same_option_as_blocks():
    from kfac_edit.cli import build_parser

    parser = build_parser()
    common = ["sweep", "--model", "m", "--out", "o"]
    assert parser.parse_args(common + ["--layers", "1-2"]).blocks == parser.parse_args(common + ["--blocks", "1-2"]).blocks == "1-2"


def test_run_takes_the_lm_eval_options_and_runs_lm_eval_before_and_after(tiny_model_dir, setup, tmp_path, monkeypatch):
    import kfac_edit.lm_eval_tasks as tasks

    calls = []
    monkeypatch.setattr(tasks, "check_lm_eval_args", lambda args: None)
    monkeypatch.setattr(tasks, "run_lm_eval", lambda model, tasks_, out_dir, **kw: calls.append((model, out_dir)) or {"metrics": {}})
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--factors", str(setup["factors"]), "--layers-json", LAYERS,
            "--out", str(out), "--lm-eval-tasks", "arc_easy", "--lm-eval-limit", "4"] + eval_args(setup)
    assert main(argv) == 0
    assert calls == [(str(tiny_model_dir), out / "lm_eval" / tiny_model_dir.name), (str(out / "edited"), out / "lm_eval" / "edited")]
