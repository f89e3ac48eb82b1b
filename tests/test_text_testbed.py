"""The English-text testbed: data generation, tokenizer, build and cache."""

import json

import numpy as np
import torch
import pytest

from kfac_edit.errors import UserError
from kfac_edit.text_testbed import (
    SPECIALS,
    TextTestbedConfig,
    build_text_testbed,
    canary_records,
    fact_records,
    generate_data,
    split_modules,
    stdlib_documents,
    word_tokenizer,
)

SMALL = dict(vocab_size=300, seq_len=32, n_canaries=6, canary_repeats=5, canary_len=12, prefix_len=4, n_facts=4,
             fact_repeats=3, steps=20, batch_size=8, n_heldout_rows=20, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def documents():
    return stdlib_documents()


@pytest.fixture(scope="module")
def small_data(documents):
    return generate_data(TextTestbedConfig(**SMALL), documents)


def _ngrams(rows, n):
    return {tuple(row[i : i + n]) for row in rows for i in range(len(row) - n + 1)}


def test_stdlib_text_is_there_and_deterministic(documents):
    assert len(documents) > 100  # modules with docstrings
    assert sum(len(d.split()) for docs in documents.values() for d in docs) > 150_000  # words
    assert "pydoc_data.topics" in documents and "json" in documents
    assert not any(name.startswith("_") or name in ("this", "antigravity") for name in documents)
    again = stdlib_documents()
    assert list(again) == list(documents) and again == documents


def test_generate_data_is_deterministic(documents, small_data):
    other = generate_data(TextTestbedConfig(**SMALL), documents)
    for field in ("train", "factor_rows", "heldout", "canaries", "canary_rows"):
        np.testing.assert_array_equal(getattr(small_data, field), getattr(other, field))
    assert other.facts == small_data.facts and other.vocabulary == small_data.vocabulary
    reseeded = generate_data(TextTestbedConfig(**{**SMALL, "seed": 1}), documents)
    assert not np.array_equal(reseeded.canaries, small_data.canaries)


def test_split_by_module(documents, small_data):
    train, held = small_data.train_modules, small_data.heldout_modules
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(documents)
    assert len(held) == round(0.2 * len(documents))
    assert split_modules(list(documents), 0.2, 0) == (train, held)
    assert split_modules(list(documents), 0.2, 1) != (train, held)


def test_canaries_placed_and_kept_out_of_heldout_and_factor_data(small_data):
    c, d = TextTestbedConfig(**SMALL), small_data
    assert d.train.shape == (c.steps * c.batch_size, c.seq_len)
    assert d.canary_rows.shape == (c.n_canaries, c.canary_repeats)
    assert len(np.unique(d.canary_rows)) == c.n_canaries * c.canary_repeats  # one canary per row
    for canary, rows in zip(d.canaries, d.canary_rows):
        # each canary starts each of its rows, and occurs in no other row
        np.testing.assert_array_equal(d.train[rows, : c.canary_len], np.repeat(canary[None], len(rows), 0))
        starts = np.flatnonzero((d.train[:, : c.canary_len] == canary).all(1))
        assert sorted(starts.tolist()) == sorted(rows.tolist())
    canary_grams = _ngrams(d.canaries.tolist(), 6)
    assert canary_grams.isdisjoint(_ngrams(d.heldout.tolist(), 6))
    assert canary_grams.isdisjoint(_ngrams(d.factor_rows.tolist(), 6))
    fact_grams = _ngrams([p + a for p, a in d.facts], 6)
    assert fact_grams.isdisjoint(_ngrams(d.factor_rows.tolist(), 6))
    words = set(d.vocabulary) - set(SPECIALS)
    assert all(d.vocabulary[t] in words and d.vocabulary[t].isalpha() for t in d.canaries.ravel())


def test_tokenizer_round_trips(tmp_path, small_data):
    from transformers import AutoTokenizer

    tok = word_tokenizer(small_data.vocabulary)
    assert len(tok) == 300 and tok.convert_ids_to_tokens(len(tok) - 1) == "<unk>"
    for row in small_data.train[:20]:
        text = tok.decode(row)
        assert tok(text, add_special_tokens=False)["input_ids"] == row.tolist()
        assert tok(text)["input_ids"][0] == tok.bos_token_id
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Return the value of X, or None (the default)."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert tok("The Return")["input_ids"] == tok("the return")["input_ids"]  # lower case


def test_records(small_data):
    c = TextTestbedConfig(**SMALL)
    tok = word_tokenizer(small_data.vocabulary)
    records = canary_records(small_data, c, tok)
    assert len(records) == c.n_canaries
    r = records[0]
    assert r["prefix_ids"][0] == tok.bos_token_id and r["prefix_len"] == c.prefix_len + 1
    assert r["prefix_ids"][1:] + r["suffix_ids"] == small_data.canaries[0].tolist()
    assert tok(r["prefix_text"])["input_ids"] == r["prefix_ids"]
    facts = fact_records(small_data, tok)
    assert len(facts) == 4 and facts[0]["prefix_text"].startswith("the capital of ")
    assert facts[0]["suffix_text"].endswith(" .") and facts[0]["suffix_len"] == 2


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="prefix_len"):
        TextTestbedConfig(prefix_len=30, canary_len=24)
    with pytest.raises(UserError, match="heldout_fraction"):
        TextTestbedConfig(heldout_fraction=1.0)
    with pytest.raises(UserError, match="cannot hold"):
        TextTestbedConfig(steps=10, batch_size=8)


def test_config_hash():
    assert TextTestbedConfig().config_hash() == TextTestbedConfig().config_hash()
    assert TextTestbedConfig().config_hash() != TextTestbedConfig(seed=1).config_hash()


@pytest.fixture(scope="session")
def text_testbed_cache(tmp_path_factory):
    """One cache root for the quick text testbed, shared with tests/test_demo.py: trained once a session."""
    return tmp_path_factory.getbasetemp() / "shared-text-testbed-cache"


def test_quick_build_learns_the_canaries_and_is_cached(text_testbed_cache):
    """A quick build trains (about a minute on one CPU thread) and memorizes its canaries far above chance.

    The build is shared with the text demo test (whichever runs first trains it, in this session's cache)."""
    from kfac_edit.evaluate import EvalConfig, evaluate
    from kfac_edit.models import load_model

    config = TextTestbedConfig.quick()
    paths = build_text_testbed(config, cache_dir=text_testbed_cache, progress=False)
    assert paths.root.parent.parent == text_testbed_cache  # <cache>/text_testbed/<hash>
    info = paths.load_info()
    assert info["training"]["train_seconds"] > 0 and info["config_hash"] == config.config_hash()
    base = info["base_metrics"]
    # chance of a strict suffix is (1 / vocabulary) ** suffix_len, about 1e-30
    assert base["canary_strict"] >= 0.5, base  # measured 0.8
    assert base["heldout_perplexity"] < 400, base  # far below uniform (vocab_size = 1000)
    assert info["training"]["final_loss"] < info["training"]["first_loss"] - 1.5
    assert len(info["text"]["heldout_modules"]) >= 10
    for path in (paths.corpus, paths.factor_corpus, paths.heldout, paths.memorized):
        assert path.exists()
    assert paths.clean == paths.heldout
    first = json.loads(paths.factor_corpus.read_text().splitlines()[0])["text"]
    assert len(first.split()) == config.seq_len

    # every command path reads it: load_model + the eval command's memorized-set format
    model, tok = load_model(str(paths.model_dir), dtype="float32", device="cpu")
    cfg = EvalConfig(memorized=[str(paths.memorized)], perplexity_data=str(paths.heldout), prefix_len=None,
                     suffix_len=None, ppl_block=config.seq_len + 2, batch_size=64)
    metrics = evaluate(model, tok, cfg)["metrics"]
    assert metrics["memorized"]["memorized"]["strict"] == pytest.approx(base["canary_strict"])
    assert metrics["perplexity"]["perplexity"] == pytest.approx(base["heldout_perplexity"], rel=0.02)

    # token_batches cuts exactly the training rows [bos, row, eos] from corpus.jsonl and factor_corpus.jsonl
    from kfac_edit.data import token_batches

    for path, n_rows in ((paths.corpus, config.n_documents), (paths.factor_corpus, None)):
        windows = torch.cat([b["input_ids"] for b in token_batches(str(path), tok, config.seq_len + 2, 512)])
        assert (windows[:, 0] == tok.bos_token_id).all() and (windows[:, -1] == tok.eos_token_id).all()
        if n_rows:
            assert len(windows) == n_rows
    canary = json.loads(paths.memorized.read_text().splitlines()[0])
    canary_ids = torch.tensor(canary["prefix_ids"] + canary["suffix_ids"])
    starts = (windows[:, : len(canary_ids)] == canary_ids).all(1)  # factor_corpus: no canary anywhere
    assert not starts.any()

    again = build_text_testbed(config, cache_dir=text_testbed_cache, progress=False)
    assert again.cached and again.root == paths.root
