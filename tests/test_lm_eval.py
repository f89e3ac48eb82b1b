"""lm-evaluation-harness integration: a local task (YAML + JSONL in tests/data) on a tiny trained model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_olmo2
from kfac_edit.errors import UserError
from kfac_edit.constants import LM_EVAL_RESULTS_FILE as RESULTS_FILE, LM_EVAL_SAMPLES_FILE as SAMPLES_FILE
from kfac_edit.lm_eval_tasks import parse_tasks, run_lm_eval

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "lm_eval_tasks"
BOS = 60  # number_tokenizer(60): <bos> = 60; lm-eval's hf backend encodes with the tokenizer's specials (BOS first)


def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / "kfac_rule.jsonl").read_text().splitlines()]


def _brute_force(model) -> tuple[list[list[float]], list[int]]:
    """Per document: log p(choice | BOS + prompt) for each choice, and the greedy next token."""
    seqs = torch.tensor([[BOS] + [int(x) for x in d["prompt"].split()] for d in _docs()])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(seqs).logits[:, -1].double(), dim=-1)
    choice_lps = [[lp[int(c)].item() for c in d["choices"]] for d, lp in zip(_docs(), logprobs)]
    return choice_lps, logprobs.argmax(dim=-1).tolist()


def test_parse_tasks():
    assert parse_tasks("arithmetic, triviaqa,,arithmetic") == ["arithmetic", "triviaqa"]
    assert parse_tasks(["a,b", "c"]) == ["a", "b", "c"]
    with pytest.raises(UserError):
        parse_tasks(" , ")


def test_local_task_matches_brute_force(tmp_path, tiny_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'kfac-edit[lm-eval]')")
    monkeypatch.chdir(REPO)  # the task YAML names its JSONL relative to the repository root
    model = make_tiny_olmo2(dtype=torch.float32, seed=3)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    choice_lps, greedy = _brute_force(model)
    docs = _docs()
    acc = sum(max(range(4), key=lps.__getitem__) == d["answer"] for lps, d in zip(choice_lps, docs)) / len(docs)
    exact = sum(g == int(d["target"]) for g, d in zip(greedy, docs)) / len(docs)

    out = tmp_path / "eval"
    record = run_lm_eval(model_dir, "kfac_rule_mc,kfac_rule_gen", out, include_path=TASKS_DIR, batch_size=4,
                         device="cpu", log_samples=True)
    assert record["metrics"]["kfac_rule_mc"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert record["metrics"]["kfac_rule_gen"]["exact_match"] == pytest.approx(exact, abs=1e-12)
    assert record["n-samples"]["kfac_rule_mc"]["effective"] == 12
    # per document: lm-eval scored each choice with our model's log-probabilities (BOS + prompt as context) ...
    mc = sorted((r for r in record["samples"] if r["task"] == "kfac_rule_mc"), key=lambda r: r["doc_id"])
    got = [[resp[0] for resp in r["responses"]] for r in mc]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(choice_lps, dtype=torch.float64), atol=1e-4)
    # ... and generated our model's greedy next token
    gen = sorted((r for r in record["samples"] if r["task"] == "kfac_rule_gen"), key=lambda r: r["doc_id"])
    assert [r["responses"][0].strip() for r in gen] == [str(g) for g in greedy]

    on_disk = json.loads((out / RESULTS_FILE).read_text())
    assert on_disk["metrics"] == record["metrics"] and on_disk["model"] == str(model_dir)
    assert on_disk["tasks"] == ["kfac_rule_mc", "kfac_rule_gen"] and "samples" not in on_disk
    assert len((out / SAMPLES_FILE).read_text().splitlines()) == 24

    with pytest.raises(UserError, match="does not exist"):
        run_lm_eval(model_dir, "kfac_rule_mc", out, include_path=tmp_path / "nowhere")


def test_eval_cli_runs_lm_eval_beside_our_results(tmp_path, tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'kfac-edit[lm-eval]')")
    from kfac_edit.cli import main
    from kfac_edit.fileio import read_jsonl

    monkeypatch.chdir(REPO)
    mem = tmp_path / "mem.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": [i, i + 1, i + 2], "suffix_ids": [i + 3, i + 4]}) + "\n"
                           for i in range(4)))
    out = tmp_path / "results.jsonl"
    argv = ["eval", "--model", str(tiny_model_dir), "--memorized", str(mem), "--prefix-len", "3", "--suffix-len", "2",
            "--device", "cpu", "--out", str(out), "--lm-eval-tasks", "kfac_rule_mc",
            "--lm-eval-include", str(TASKS_DIR), "--lm-eval-limit", "4"]
    assert main(argv) == 0
    assert "lm-eval kfac_rule_mc" in capsys.readouterr().out
    assert read_jsonl(out)[0]["metrics"]["memorized"]["mem"]["n"] == 4  # our metrics, as without lm-eval
    lm = json.loads((tmp_path / "lm_eval" / tiny_model_dir.name / RESULTS_FILE).read_text())
    assert lm["limit"] == 4 and lm["n-samples"]["kfac_rule_mc"]["effective"] == 4 and lm["dtype"] == "float32"
    assert 0.0 <= lm["metrics"]["kfac_rule_mc"]["acc"] <= 1.0 and lm["metrics"]["kfac_rule_mc"]["acc"] * 4 % 1 == 0

    # bad input: one line, exit 2, before anything runs
    assert main(["eval", "--model", str(tiny_model_dir), "--memorized", str(mem), "--lm-eval-include", "x"]) == 2
    assert "need --lm-eval-tasks" in capsys.readouterr().err


def test_eval_out_is_written_when_only_lm_eval_tasks_ran(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``eval --out`` gets a line with the lm-eval metrics when no metric of ours was asked for (lm-eval stubbed)."""
    import kfac_edit.lm_eval_tasks as tasks
    from kfac_edit.cli import main
    from kfac_edit.fileio import read_jsonl

    monkeypatch.setattr(tasks, "check_lm_eval_args", lambda args: None)
    monkeypatch.setattr(tasks, "run_lm_eval", lambda *a, **k: {"metrics": {"arc_easy": {"acc": 0.25}}})
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--lm-eval-tasks", "arc_easy"]) == 0
    (line,) = read_jsonl(out)
    assert line["model"] == str(tiny_model_dir) and line["metrics"] == {"lm_eval": {"arc_easy": {"acc": 0.25}}}
    assert line["lm_eval_dir"] == str(tmp_path / "lm_eval" / tiny_model_dir.name)


def test_a_local_task_whose_data_is_not_found_is_one_line(tmp_path, tiny_tokenizer, monkeypatch):
    """The example YAMLs name their JSONL relative to the repository root; run elsewhere, datasets' FileNotFoundError
    was a 67-line traceback."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'kfac-edit[lm-eval]')")
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    make_tiny_olmo2(dtype=torch.float32, seed=3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    with pytest.raises(UserError, match=r"cannot read the data of kfac_rule_gen .*relative to the working directory"):
        run_lm_eval(model_dir, "kfac_rule_gen", tmp_path / "eval", include_path=TASKS_DIR, device="cpu")
    assert not (tmp_path / "eval").exists()
