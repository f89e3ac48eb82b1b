"""Features x model kinds: what broke when a feature met a biased (GPT-2) or routed-experts (OLMoE) model.

One tiny GPT-2 directory (biased ``Conv1D`` c_fc/c_proj, no gate, 64 learned positions) with factors, EK-FAC
eigenvalues and a memorized set of its own greedy continuations, built once for the module; each test drives the CLI
as a user would and checks the numbers against the Python API.
"""

from __future__ import annotations

import json

import pytest
import torch

from kfac_edit.cli import main
from kfac_edit.fileio import read_jsonl

from test_architectures import tiny_model

PREFIX, SUFFIX = 8, 6


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from conftest import N_NUMBERS, random_number_texts
    from kfac_edit.evaluate.memorization import greedy_generate
    from kfac_edit.testbed import number_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    model = tiny_model("gpt2")
    model.save_pretrained(root / "model")
    number_tokenizer(N_NUMBERS).save_pretrained(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_number_texts(30)))
    prompts = [[(7 * i + j) % 60 for j in range(PREFIX)] for i in range(8)]
    suffixes = greedy_generate(model, prompts, SUFFIX, batch_size=8, pad_id=62, desc=None)
    mem = root / "mem.jsonl"
    mem.write_text("".join(json.dumps({"prefix_ids": p, "suffix_ids": s}) + "\n" for p, s in zip(prompts, suffixes)))
    factors = root / "factors"
    assert main(["collect", "--model", str(root / "model"), "--data", str(corpus), "--out", str(factors), "--ekfac",
                 "--tokens", "300", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    return {"model": root / "model", "corpus": corpus, "mem": mem, "factors": factors}


EVAL = ["--prefix-len", str(PREFIX), "--suffix-len", str(SUFFIX), "--device", "cpu"]


def test_run_with_method_ekfac_edits_with_the_ekfac_eigenvalues(gpt2, tmp_path, capsys):
    """`run --method ekfac` loads DIR/ekfac.safetensors (was refused as 'needs EK-FAC eigenvalues' although they
    were there): the saved model equals apply_edit with the same eigenvalues, bias included."""
    from kfac_edit.edit import EditSpec, apply_edit
    from kfac_edit.factors.ekfac import Ekfac
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model

    layers = '{"1": {"up": 0.5}}'
    out = tmp_path / "run"
    assert main(["run", "--model", str(gpt2["model"]), "--factors", str(gpt2["factors"]), "--layers-json", layers,
                 "--method", "ekfac", "--memorized", str(gpt2["mem"]), "--out", str(out), *EVAL]) == 0
    report = json.loads((out / "edited" / "edit_report.json").read_text())
    assert report["method"] == "ekfac" and report["modules"][0]["bias"]
    (summary,) = read_jsonl(out / "runs.jsonl")
    assert summary["edit"]["method"] == "ekfac" and summary["before"]["strict"] == 1.0

    model, _ = load_model(str(gpt2["model"]), dtype="float32", device="cpu")
    name = "transformer.h.1.mlp.c_fc"
    apply_edit(model, Factors.load(gpt2["factors"]), EditSpec.from_json(json.loads(layers), method="ekfac"),
               ekfac=Ekfac.load(gpt2["factors"], names=[name]))  # fmt: skip
    edited, _ = load_model(str(out / "edited"), dtype="float32", device="cpu")
    for suffix in ("weight", "bias"):
        expected = model.get_submodule(name).get_parameter(suffix)
        assert torch.equal(edited.get_submodule(name).get_parameter(suffix), expected), suffix
    capsys.readouterr()
    assert main(["run", "--model", str(gpt2["model"]), "--factors", str(tmp_path), "--layers-json", layers,
                 "--method", "ekfac", "--memorized", str(gpt2["mem"]), "--out", str(tmp_path / "r2"), *EVAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no EK-FAC eigenvalues" in err[0] and not (tmp_path / "r2").exists()


def test_sweep_on_a_model_without_gate_defaults_to_up(gpt2, tmp_path, capsys):
    """Without --projections the sweep edits gate,up; GPT-2 has no gate: up alone (was refused)."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(gpt2["model"]), "--factors", str(gpt2["factors"]), "--memorized",
                 str(gpt2["mem"]), "--perplexity-data", str(gpt2["corpus"]), "--ppl-block", "16", "--blocks", "1",
                 "--keep-mass", "0.5", "--max-combo", "1", "--out", str(out), *EVAL]) == 0
    assert [r["id"] for r in read_jsonl(out / "results.jsonl")] == ["base", "kfac|b1|up|k0.5"]
    assert json.loads((out / "sweep.json").read_text())["grid"]["projection_sets"] == [["up"]]
    from kfac_edit.models import use_modules
    from kfac_edit.sweep import SweepConfig, with_projection_sets

    model = tiny_model("gptj")
    use_modules(model, {"down": "mlp.fc_out"})  # neither gate nor up: the kinds it has (was an empty set)
    assert with_projection_sets(model, SweepConfig()).projection_sets == [("down",)]
    assert with_projection_sets(tiny_model("olmoe"), SweepConfig()).projection_sets == [("gate", "up")]


def test_bsn_windows_beyond_the_context_are_one_line(gpt2, tmp_path, capsys):
    """GPT-2's learned positions end at 64: BSN's default 128-token clean windows were an IndexError traceback in
    the embedding; now one line before anything is written, in sweep, edit and run; 64 works."""
    bsn = ["--method", "bsn", "--clean-data", str(gpt2["corpus"]), "--bsn-epochs", "1"]
    layers = ["--layers-json", '{"1": {"up": 0.5}}']
    commands = {
        "sweep": ["sweep", "--model", str(gpt2["model"]), "--memorized", str(gpt2["mem"]), "--perplexity-data",
                  str(gpt2["corpus"]), "--ppl-block", "16", "--blocks", "1", "--keep-mass", "bsn=0.5", "--max-combo",
                  "1", *EVAL],
        "edit": ["edit", "--model", str(gpt2["model"]), "--forget", str(gpt2["mem"]), *layers, "--device", "cpu"],
        "run": ["run", "--model", str(gpt2["model"]), "--forget", str(gpt2["mem"]), "--memorized", str(gpt2["mem"]),
                *layers, *EVAL],
    }  # fmt: skip
    capsys.readouterr()
    for command, argv in commands.items():
        out = tmp_path / command
        assert main([*argv, *bsn, "--out", str(out)]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["kfac-edit: error: --bsn-clean-seq-len 128 exceeds the model's context of 64 positions; use "
                       "at most 64"], (command, err)
        assert not out.exists()
    assert main([*commands["edit"], *bsn, "--bsn-clean-seq-len", "64", "--out", str(tmp_path / "ok")]) == 0
    report = json.loads((tmp_path / "ok" / "edit_report.json").read_text())
    assert report["method"] == "bsn" and report["modules"][0]["pairs_fraction"] == pytest.approx(0.5, abs=5e-3)


def test_a_forget_record_beyond_the_context_is_one_line():
    from kfac_edit.bsn import BsnConfig, load_bsn_data
    from kfac_edit.errors import UserError
    from kfac_edit.testbed import number_tokenizer

    record = {"prefix_ids": list(range(40)), "suffix_ids": list(range(30))}
    with pytest.raises(UserError, match=r"^a forget record of 70 tokens \(prefix \+ suffix\) exceeds the model's "
                                        r"context of 64 positions"):
        load_bsn_data([record], ["1 2 3"], number_tokenizer(60), BsnConfig(clean_seq_len=16), context=64)
    assert len(load_bsn_data([record], ["1 2 3"], number_tokenizer(60), BsnConfig(clean_seq_len=16)).forget[0]) == 70


def test_import_factors_of_a_biased_model(gpt2, tmp_path, capsys):
    """The reference format holds A over a: imported for GPT-2, the edit leaves the biases (as factors collected
    with --bias keep do); an A over [a; 1] is refused in one line that says so (was 'do not fit ... (32, 16)')."""
    from kfac_edit.factors.store import Factors

    keep = tmp_path / "keep"
    assert main(["collect", "--model", str(gpt2["model"]), "--data", str(gpt2["corpus"]), "--out", str(keep),
                 "--bias", "keep", "--tokens", "300", "--seq-len", "16", "--batch-size", "4", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    for label, directory in (("keep", keep), ("joint", gpt2["factors"])):
        factors = Factors.load(directory)
        entries = {}
        for name in factors.names:
            kind = "up" if name.endswith("c_fc") else "down"
            entries[f"blk{name.split('.')[2]}.{kind}"] = {"A": factors.activation_cov(name),
                                                         "G": factors.grad_cov(name), "n_tokens": factors.tokens(name)}
        torch.save(entries, tmp_path / f"{label}.pt")
    imported = tmp_path / "imported"
    assert main(["import-factors", str(tmp_path / "keep.pt"), "--model", str(gpt2["model"]), "--out",
                 str(imported)]) == 0
    name = "transformer.h.1.mlp.c_fc"
    torch.testing.assert_close(Factors.load(imported).modules[name].activation_sum,
                               Factors.load(keep).modules[name].activation_sum, rtol=1e-6, atol=1e-6)
    assert main(["edit", "--model", str(gpt2["model"]), "--factors", str(imported), "--layers-json",
                 '{"1": {"up": 0.5}}', "--out", str(tmp_path / "edited"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "edited" / "edit_report.json").read_text())
    assert not report["modules"][0]["bias"] and report["modules"][0]["shape"] == [32, 16]
    capsys.readouterr()
    assert main(["import-factors", str(tmp_path / "joint.pt"), "--model", str(gpt2["model"]), "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "A (17, 17) is over [a; 1] of the biased transformer.h.0.mlp.c_fc" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_an_fp64_moe_model_runs_blocks_outside_the_collected_ones(tmp_path, tiny_tokenizer, tiny_corpus_jsonl, capsys):
    """--dtype float64 on OLMoE: transformers' default grouped_mm experts have no fp64 kernel, so the blocks the
    collection does not tap (--layers 1, --layers-per-pass) and every eval forward were a RuntimeError traceback;
    load_model switches such a model to the eager experts (the model's own code: same logits)."""
    from test_experts import eager_fp64

    from kfac_edit.factors.store import Factors
    from kfac_edit.models import load_model

    model_dir = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    model, _ = load_model(str(model_dir), dtype="float64", device="cpu")
    ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager_fp64("olmoe")(input_ids=ids).logits,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    out = tmp_path / "factors"
    assert main(["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(out),
                 "--dtype", "float64", "--layers", "1", "--tokens", "96", "--seq-len", "16", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    factors = Factors.load(out)
    assert len(factors) == 12 and factors.manifest["dtype"] == factors.manifest["accumulate_dtype"] == "float64"
    assert factors.tokens("model.layers.1.mlp.experts.0.up") > 0


def test_predict_finds_the_modules_the_factors_were_collected_from(tmp_path, tiny_tokenizer, tiny_corpus_jsonl):
    """`predict` on factors of `collect --modules` (GPT-J, an attention projection as 'up'): the manifest's paths,
    as edit/run/sweep use them (was 'no factors for module transformer.h.1.mlp.fc_in')."""
    from kfac_edit.edit import EditSpec
    from kfac_edit.factors.store import Factors
    from kfac_edit.models import use_modules
    from kfac_edit.predict import predict_cost, task_batches

    model_dir = tmp_path / "gptj"
    model = tiny_model("gptj")
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    factors = tmp_path / "factors"
    assert main(["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(factors),
                 "--modules", "up=attn.q_proj,down=mlp.fc_out", "--layers", "1", "--tokens", "96", "--seq-len", "16",
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    task = tmp_path / "task.jsonl"
    records = [{"prefix_ids": [i + 1] * 5, "suffix_ids": [i + 2] * 4} for i in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "predict.json"
    layers = '{"1": {"up": 0.5}}'
    assert main(["predict", "--model", str(model_dir), "--factors", str(factors), "--layers-json", layers,
                 "--data", str(task), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    (result,) = json.loads(out.read_text())["tasks"]
    assert list(result["modules"]) == ["transformer.h.1.attn.q_proj"]
    use_modules(model, {"up": "attn.q_proj", "down": "mlp.fc_out"})
    (expected,) = predict_cost(model, Factors.load(factors), EditSpec.from_json(json.loads(layers)),
                               {"task": task_batches(task, tiny_tokenizer)})  # fmt: skip
    assert 0 < result["share"] < 1 and result["share"] == pytest.approx(expected.share, rel=1e-5)


def test_exclude_with_tokens_resumed_equals_one_run(gpt2, tmp_path, monkeypatch):
    """--exclude --tokens N --resume: the resumed run read N more kept tokens from the checkpoint on (585 labelled
    tokens for 375) and counted only the windows after it; now the cut and the counts are the uninterrupted run's."""
    from conftest import interrupt_collection

    from kfac_edit.factors.store import Factors

    from kfac_edit.testbed import number_tokenizer

    tokenizer = number_tokenizer(60)
    documents = [tokenizer(json.loads(line)["text"])["input_ids"] for line in gpt2["corpus"].read_text().splitlines()]
    memorized = tmp_path / "memorized.jsonl"  # 14 tokens of 4 documents: their windows are dropped
    memorized.write_text("".join(json.dumps({"prefix_ids": ids[1:9], "suffix_ids": ids[9:15]}) + "\n"
                                 for ids in [d for d in documents if len(d) > 16][:4]))
    argv = ["collect", "--model", str(gpt2["model"]), "--data", str(gpt2["corpus"]), "--exclude", str(memorized),
            "--tokens", "400", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--dtype", "float64", "--labels", "gold"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    resumed = [*argv, "--out", str(tmp_path / "resumed"), "--checkpoint-every", "64"]
    interrupt_collection(monkeypatch, resumed, after_batches=9)
    assert main([*resumed, "--resume"]) == 0
    one, two = Factors.load(tmp_path / "one"), Factors.load(tmp_path / "resumed")
    assert two.manifest["resumed"] and one.manifest["exclude"]["windows_dropped"] > 0
    assert two.manifest["exclude"] == one.manifest["exclude"]
    assert (two.manifest["tokens"], two.manifest["labelled_tokens"]) == (one.manifest["tokens"],
                                                                         one.manifest["labelled_tokens"])
    for name in one.names:
        assert two.tokens(name) == one.tokens(name)
        torch.testing.assert_close(two.modules[name].grad_sum, one.modules[name].grad_sum, rtol=1e-6, atol=1e-9)


def test_resuming_with_other_modules_names_one(tmp_path, tiny_tokenizer, tiny_corpus_jsonl, monkeypatch, capsys):
    """--resume with another --modules: the line names a module on each side (was '4 modules in the checkpoint, 4
    now (or other ones)')."""
    from conftest import interrupt_collection

    model_dir = tmp_path / "gptj"
    tiny_model("gptj").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    argv = ["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(tmp_path / "f"),
            "--tokens", "400", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--checkpoint-every", "64"]  # fmt: skip
    interrupt_collection(monkeypatch, [*argv, "--modules", "up=mlp.fc_in,down=mlp.fc_out"])
    capsys.readouterr()
    assert main([*argv, "--resume", "--modules", "up=attn.q_proj,down=mlp.fc_out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("4 modules in the checkpoint, 4 now (transformer.h.0.mlp.fc_in in the checkpoint "
                              "only, transformer.h.0.attn.q_proj now only)") in err[0], err


def test_the_memory_plan_of_a_biased_model_counts_the_homogeneous_row():
    """GPT-2 c_fc (in 16, out 32): A over [a; 1] is 17x17; no gate, so no 'gate and up share A' in the header."""
    from kfac_edit.factors.memory import memory_plan
    from kfac_edit.models import find_projections, projection_kinds

    model = tiny_model("gpt2")
    table = memory_plan(find_projections(model, layers=[0], projections=projection_kinds(model))).table()
    assert table.splitlines()[0] == "factor memory (sums):"
    assert "up    32x17 on cpu: A 1.13 KiB + G 4.00 KiB = 5.13 KiB per module, blocks 0 (1 modules" in table, table
