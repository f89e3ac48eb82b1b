"""Factor memory estimates, --layers-per-pass planning, the fit check, and the --device-map code path."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import N_NUMBERS, make_tiny_olmo2, random_number_texts

from kfac_edit.cli import main
from kfac_edit.data import token_batches
from kfac_edit.errors import UserError
from kfac_edit.factors.collector import FactorCollector
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.memory import check_memory, factor_nbytes, memory_plan, module_memory, parse_size, plan_passes
from kfac_edit.factors.store import Factors
from kfac_edit.models import find_projections
from kfac_edit.testbed import number_tokenizer


def test_module_memory_matches_allocated_sums():
    model = make_tiny_olmo2(torch.float32, layers=3)
    projections = find_projections(model)
    mem = {m.name: m for m in module_memory(projections)}
    gate, up, down = (mem[f"model.layers.0.mlp.{k}_proj"] for k in ("gate", "up", "down"))
    assert (gate.activation_bytes, gate.grad_bytes) == (4 * 16 * 16, 4 * 24 * 24)
    assert (up.activation_bytes, up.grad_bytes) == (0, 4 * 24 * 24)  # A shared with gate
    assert (down.activation_bytes, down.grad_bytes) == (4 * 24 * 24, 4 * 16 * 16)
    assert {n: m.total for n, m in mem.items()} == factor_nbytes(projections)
    collector = FactorCollector(model, projections)  # allocates the sums
    assert collector.factors.nbytes() == sum(m.total for m in mem.values()) == memory_plan(projections).total
    fp64 = module_memory(find_projections(make_tiny_olmo2(torch.float64)))
    assert fp64[0].total == 2 * gate.total  # fp64 models accumulate in fp64


def test_plan_passes_keeps_blocks_whole():
    projections = find_projections(make_tiny_olmo2(torch.float32, layers=5))
    passes = plan_passes(projections, 2)
    assert [sorted({p.block for p in group}) for group in passes] == [[0, 1], [2, 3], [4]]
    assert [len(group) for group in passes] == [6, 6, 3]
    assert plan_passes(projections, None) == [projections] == plan_passes(projections, 9)
    with pytest.raises(UserError, match="--layers-per-pass must be a positive integer"):
        plan_passes(projections, 0)


def test_check_memory_per_device_and_hint(caplog):
    """Mocked devices: blocks 0-3 on 'meta' (a stand-in for a GPU), block 4 on the CPU."""
    model = make_tiny_olmo2(torch.float32, layers=5)
    for block in range(4):
        model.model.layers[block].to("meta")
    projections = find_projections(model)
    block_bytes = 4 * (16 * 16 + 24 * 24 + 24 * 24 + 24 * 24 + 16 * 16)  # gate A+G, up G, down A+G
    caplog.set_level(logging.INFO, logger="kfac_edit")
    plan = check_memory(projections, layers_per_pass=2, budget=1 << 30)
    table = caplog.text
    assert "gate  24x16 on meta: A 1.00 KiB + G 2.25 KiB = 3.25 KiB per module, blocks 0-3 (4 modules" in table
    assert "on cpu" in table and "blocks 4 (1 modules" in table and "3 passes, largest" in table
    assert plan.need == {"meta": 2 * block_bytes, "cpu": 5 * block_bytes}  # the CPU holds every finished pass
    # a rank other than 0 drops each pass after the reduction: only the pass on its CPU counts there
    assert memory_plan(projections, 2, keeps_results=False).need == {"meta": 2 * block_bytes, "cpu": block_bytes}
    # the whole set does not fit on 'meta' in one pass; the error names the K that fits
    with pytest.raises(UserError, match=r"need 35\.00 KiB on meta but only 17\.50 KiB .* --layers-per-pass 2 \(or fewer\)"):
        check_memory(projections, None, budget={"meta": 2 * block_bytes, "cpu": 1 << 30}, print_table=False)
    with pytest.raises(UserError, match="even one block per pass does not fit"):
        check_memory(projections, 1, budget={"meta": block_bytes - 1, "cpu": 1 << 30}, print_table=False)
    with pytest.raises(UserError, match=r"on cpu .* every finished factor waits in CPU memory"):
        check_memory(projections, 1, budget={"meta": 1 << 30, "cpu": 4 * block_bytes}, print_table=False)


def test_parse_size():
    assert parse_size("12GB") == 12 * 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("3e3") == 3000
    assert parse_size("1.5 gib") == 3 << 29
    with pytest.raises(UserError, match="cannot read the size '12 parsecs'"):
        parse_size("12 parsecs")


def test_passes_merge_to_one_pass_fp64():
    model = make_tiny_olmo2(layers=3)  # fp64
    tokenizer = number_tokenizer(N_NUMBERS)
    texts = random_number_texts(12, seed=4)

    def batches(skip, shard):
        return token_batches(texts, tokenizer, 16, 4, skip_windows=skip, shard=shard, with_index=True)

    projections = find_projections(model)
    one = collect_factors(model, batches, projections=projections, seq_len=16, batch_size=4, progress=False)
    three = collect_factors(model, batches, projections=projections, seq_len=16, batch_size=4, layers_per_pass=1, progress=False)
    assert three.manifest["passes"] == 3 and one.manifest["passes"] == 1
    assert three.names == one.names and three.manifest["tokens"] == one.manifest["tokens"] > 0
    for name in one.names:
        assert three.tokens(name) == one.tokens(name)
        torch.testing.assert_close(three.grad_cov(name), one.grad_cov(name), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(three.activation_cov(name), one.activation_cov(name), rtol=1e-12, atol=1e-14)
    shared = three.modules["model.layers.2.mlp.gate_proj"].activation_sum
    assert shared is three.modules["model.layers.2.mlp.up_proj"].activation_sum


def cli_args(model_dir, corpus, out, *extra):
    return ["collect", "--model", str(model_dir), "--data", str(corpus), "--out", str(out), "--seq-len", "16",
            "--batch-size", "4", "--tokens", "400", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_cli_prints_memory_and_refuses_what_does_not_fit(tiny_model_dir, tiny_corpus_jsonl, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="kfac_edit")
    out = tmp_path / "f"
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, out, "--memory-budget", "1KiB")) == 2
    captured = capsys.readouterr()
    assert "total 17.50 KiB in 6 modules" in caplog.text  # the memory table is logged (INFO)
    assert "need 17.50 KiB on cpu but only 1.00 KiB may be used there" in captured.err
    assert not out.exists()  # nothing written
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, out, "--layers-per-pass", "0")) == 2
    assert "--layers-per-pass must be a positive integer" in capsys.readouterr().err
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, out, "--checkpoint-every", "0")) == 2
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, out, "--memory-budget", "lots")) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err


def test_cli_device_map_path(tiny_model_dir, tiny_corpus_jsonl, tmp_path, capsys):
    """``--device-map cpu``: the model is placed by transformers/accelerate and the factors live on each module's
    device (the CPU here); same factors as the plain path, in two passes."""
    pytest.importorskip("accelerate")
    mapped, plain = tmp_path / "mapped", tmp_path / "plain"
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, mapped, "--device-map", "cpu", "--layers-per-pass", "1")) == 0
    assert "2 passes" in capsys.readouterr().out
    assert main(cli_args(tiny_model_dir, tiny_corpus_jsonl, plain)) == 0
    a, b = Factors.load(mapped), Factors.load(plain)
    assert a.names == b.names
    for name in b.names:
        assert a.tokens(name) == b.tokens(name) > 0
        torch.testing.assert_close(a.grad_cov(name), b.grad_cov(name), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(a.activation_cov(name), b.activation_cov(name), rtol=1e-6, atol=1e-9)
