"""The synthetic testbed: data generator, metrics, file formats and the cache (tiny configs, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kfac_edit import testbed
from kfac_edit.errors import UserError
from kfac_edit.fileio import read_jsonl
from kfac_edit.testbed import (
    TestbedConfig,
    build_testbed,
    continuation_records,
    exact_continuations,
    generate_data,
    number_tokenizer,
    rule_accuracy,
    rule_sequences,
    cached_testbed_dir,
)

TINY = dict(
    n_numbers=30, seq_len=10, prefix_len=4, n_canaries=5, canary_repeats=3, n_heldout=7, n_clean=6,
    hidden_size=16, n_layers=2, n_heads=2, mlp_size=24, steps=4, batch_size=8, warmup_steps=2,
)


def tiny_config(**overrides) -> TestbedConfig:
    return TestbedConfig(**{**TINY, **overrides})


def is_rule(seq: np.ndarray, n: int) -> bool:
    d = (seq[1] - seq[0]) % n
    return d != 0 and all((seq[t + 1] - seq[t]) % n == d for t in range(len(seq) - 1))


def test_rule_sequences_formula():
    seqs = rule_sequences(np.array([3, 28]), np.array([7, 5]), 5, 30)
    assert seqs.tolist() == [[3, 10, 17, 24, 1], [28, 3, 8, 13, 18]]


def test_generator_rules_canaries_and_heldout():
    config = tiny_config(steps=20, canary_repeats=4)
    data = generate_data(config)
    n = config.n_numbers
    assert data.train.shape == (config.steps * config.batch_size, config.seq_len)
    assert data.is_canary.sum() == config.n_canaries * config.canary_repeats
    # every non-canary document obeys the rule with its recorded (a, d); held-out sets too
    for seq, (a, d), canary in zip(data.train, data.train_steps, data.is_canary):
        if not canary:
            assert 1 <= d < n and seq.tolist() == rule_sequences(np.array([a]), np.array([d]), len(seq), n)[0].tolist()
    assert all(is_rule(s, n) for s in data.heldout) and all(is_rule(s, n) for s in data.clean)
    # each canary occurs exactly canary_repeats times, and canary documents are exactly the canaries
    canary_docs = [tuple(s) for s in data.train[data.is_canary]]
    for c in data.canaries:
        assert canary_docs.count(tuple(c)) == config.canary_repeats
    assert set(canary_docs) == {tuple(c) for c in data.canaries}
    # held-out (a, d) pairs never occur in training
    train_pairs = {tuple(p) for p in data.train_steps[~data.is_canary]}
    assert not train_pairs & {tuple(p) for p in data.heldout_steps}
    assert len({tuple(s) for s in data.heldout} | {tuple(s) for s in data.clean}) == config.n_heldout + config.n_clean
    # the canaries are spread over the stream (shuffled), not in one block at the end
    positions = np.flatnonzero(data.is_canary)
    assert positions[0] < len(data.train) // 2 < positions[-1]


def test_generator_is_deterministic_under_seed():
    a, b, c = generate_data(tiny_config()), generate_data(tiny_config()), generate_data(tiny_config(seed=1))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.canaries, b.canaries)
    assert np.array_equal(a.heldout, b.heldout)
    assert not np.array_equal(a.train, c.train)


def test_config_hash_and_validation():
    assert tiny_config().config_hash() == tiny_config().config_hash()
    assert tiny_config().config_hash() != tiny_config(lr=1e-3).config_hash()
    assert len(tiny_config().config_hash()) == 16
    with pytest.raises(UserError, match="prefix_len"):
        tiny_config(prefix_len=10)
    with pytest.raises(UserError, match="raise steps"):
        tiny_config(n_canaries=100, canary_repeats=100)
    quick = TestbedConfig.quick()
    assert quick.steps < TestbedConfig().steps and 0 < quick.mixing_rate < 0.5


def test_records_go_through_the_tokenizer():
    config = tiny_config()
    tok = number_tokenizer(config.n_numbers)
    seqs = np.array([[3, 10, 17, 24, 1, 8, 15, 22, 29, 6]])
    (record,) = continuation_records(seqs, config, tok, "rule")
    assert record["prefix_ids"] == [tok.bos_token_id, 3, 10, 17, 24]
    assert record["suffix_ids"] == [1, 8, 15, 22, 29, 6]
    assert record["prefix_text"] == "3 10 17 24" and record["suffix_text"] == "1 8 15 22 29 6"
    assert record["source"] == "rule" and record["prefix_len"] == 5 and record["suffix_len"] == 6


class _Oracle(torch.nn.Module):
    """A fake causal LM whose argmax next token is the arithmetic continuation, except after token ``wrong``."""

    def __init__(self, n: int, wrong: int = -1):
        super().__init__()
        self.n, self.wrong = n, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        nxt = (2 * input_ids - torch.roll(input_ids, 1, dims=1)) % self.n
        nxt = torch.where(input_ids == self.wrong, (nxt + 1) % self.n, nxt)
        logits = torch.nn.functional.one_hot(nxt, self.n + 4).double()
        return type("Out", (), {"logits": logits})()


def test_rule_accuracy_counts_exact_continuations():
    config = tiny_config()
    tok = number_tokenizer(config.n_numbers)
    seqs = rule_sequences(np.array([0, 5, 9, 2]), np.array([1, 2, 3, 4]), config.seq_len, config.n_numbers)
    records = continuation_records(seqs, config, tok, "rule")
    assert rule_accuracy(_Oracle(config.n_numbers), records) == 1.0
    # the oracle errs after token 7; guesses for the suffix are made after seq[prefix_len - 1 : -1]
    in_suffix_before_end = [7 in s[config.prefix_len - 1 : -1] for s in seqs.tolist()]
    expected = 1 - sum(in_suffix_before_end) / len(seqs)
    assert rule_accuracy(_Oracle(config.n_numbers, wrong=7), records, batch_size=3) == pytest.approx(expected)
    assert expected == 0.75  # only 0, 1, ..., 9 has a 7 there
    # records of unequal lengths are padded, not truncated
    short = dict(records[0], suffix_ids=records[0]["suffix_ids"][:2])
    assert exact_continuations(_Oracle(config.n_numbers), [short, records[1]]) == [True, True]


def test_build_writes_files_and_second_build_is_a_cache_hit(tmp_path, monkeypatch):
    config = tiny_config()
    calls = []
    real_train = testbed.train

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(testbed, "train", counting_train)
    paths = build_testbed(config, cache_dir=tmp_path, progress=False)
    assert paths.root == cached_testbed_dir(config, tmp_path) == tmp_path / "testbed" / config.config_hash()
    assert not paths.cached and calls == [1]

    # file formats
    info = paths.load_info()
    assert info["config"] == config.to_dict() and info["config_hash"] == config.config_hash()
    assert set(info["base_metrics"]) == {"canary_strict", "rule_accuracy"}
    assert info["training"]["train_tokens"] == config.steps * config.batch_size * (config.seq_len + 2)
    tok = number_tokenizer(config.n_numbers)
    memorized = read_jsonl(paths.memorized)
    assert len(memorized) == config.n_canaries
    for r in memorized:
        assert r["source"] == "canary" and r["prefix_ids"][0] == tok.bos_token_id
        assert len(r["prefix_ids"]) == config.prefix_len + 1 and len(r["suffix_ids"]) == config.seq_len - config.prefix_len
        assert tok(r["prefix_text"] + " " + r["suffix_text"])["input_ids"] == r["prefix_ids"] + r["suffix_ids"]
    heldout = read_jsonl(paths.rule_heldout)
    assert len(heldout) == config.n_heldout and {r["source"] for r in heldout} == {"rule"}
    corpus = read_jsonl(paths.corpus)
    assert len(corpus) == config.n_documents and all(len(r["text"].split()) == config.seq_len for r in corpus)
    canary_texts = {r["prefix_text"] + " " + r["suffix_text"] for r in memorized}
    assert sum(r["text"] in canary_texts for r in corpus) == config.n_canaries * config.canary_repeats
    assert len(read_jsonl(paths.clean)) == config.n_clean
    # packing the corpus with seq_len = L + 2 gives exactly the training windows [bos, x_1..x_L, eos]
    from kfac_edit.data import token_batches

    batch = next(token_batches(str(paths.corpus), tok, seq_len=config.seq_len + 2, batch_size=3))
    first = [int(x) for x in corpus[0]["text"].split()]
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id, *first, tok.eos_token_id]
    assert batch["input_ids"][:, 0].tolist() == [tok.bos_token_id] * 3 and bool(batch["attention_mask"].all())

    # the saved model loads with transformers and reproduces the recorded metrics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(paths.model_dir)
    assert type(model).__name__ == "Olmo2ForCausalLM"
    assert AutoTokenizer.from_pretrained(paths.model_dir)("1 2")["input_ids"] == [tok.bos_token_id, 1, 2]
    assert rule_accuracy(model, heldout) == info["base_metrics"]["rule_accuracy"]

    # second build: cache hit, no training, same directory; a different config trains again
    again = build_testbed(config, cache_dir=tmp_path, progress=False)
    assert again.cached and again.root == paths.root and calls == [1]
    other = build_testbed(tiny_config(seed=3), cache_dir=tmp_path, progress=False)
    assert not other.cached and calls == [1, 1] and other.root != paths.root
    assert not list((tmp_path / "testbed").glob(".*"))  # no temporary directories left behind


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KFAC_EDIT_CACHE", str(tmp_path))
    assert cached_testbed_dir(tiny_config()) == tmp_path / "testbed" / tiny_config().config_hash()


def test_interrupted_build_leaves_no_testbed(tmp_path, monkeypatch):
    def failing_train(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(testbed, "train", failing_train)
    with pytest.raises(RuntimeError):
        build_testbed(tiny_config(), cache_dir=tmp_path, progress=False)
    assert not cached_testbed_dir(tiny_config(), tmp_path).exists()


def test_training_is_deterministic_and_learns(tmp_path):
    config = tiny_config(steps=60, lr=1e-2)
    tok = number_tokenizer(config.n_numbers)
    data = generate_data(config)
    stats = []
    weights = []
    for _ in range(2):
        model = testbed.make_model(config, tok)
        stats.append(testbed.train(model, data, config, tok, progress=False))
        weights.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert stats[0]["final_loss"] == stats[1]["final_loss"]
    # starts near the uniform-guess loss log(vocab) and falls (measured: 3.52 -> 3.33)
    assert abs(stats[0]["first_loss"] - np.log(config.n_numbers + 4)) < 0.1
    assert stats[0]["final_loss"] < stats[0]["first_loss"] - 0.1
    json.dumps(stats[0])  # statistics are JSON-serializable
