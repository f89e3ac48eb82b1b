"""Shared fixtures: tiny models built in code (fp64 for exactness checks) and small local data files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kfac_edit.testbed import number_tokenizer

N_NUMBERS = 60  # tokenizer vocabulary: 60 numbers + 4 specials = 64


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Each test gets its own cache root, ``tmp_path / "cache"`` (eigendecompositions, nDCG top-k, testbeds)."""
    monkeypatch.setenv("KFAC_EDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread: with two, each small op pays thread hand-off costs (~50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_olmo2(dtype: torch.dtype = torch.float64, layers: int = 2, seed: int = 0, vocab: int = N_NUMBERS + 4):
    """A random-initialized Olmo2ForCausalLM small enough for brute-force checks."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    cfg = Olmo2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=N_NUMBERS,
        eos_token_id=N_NUMBERS + 1,
        pad_token_id=N_NUMBERS + 2,
        initializer_range=0.2,
    )
    model = Olmo2ForCausalLM(cfg).to(dtype)
    model.eval()
    return model


@pytest.fixture
def tiny_tokenizer():
    return number_tokenizer(N_NUMBERS)


@pytest.fixture
def tiny_model():
    return make_tiny_olmo2()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A local model directory (fp32 weights + tokenizer) as a user would have after save_pretrained."""
    model = make_tiny_olmo2(dtype=torch.float32)
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def random_number_texts(n_docs: int, min_len: int = 5, max_len: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(str(rng.randrange(N_NUMBERS)) for _ in range(rng.randint(min_len, max_len))) for _ in range(n_docs)]


@pytest.fixture
def tiny_corpus_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as fh:
        for text in random_number_texts(30):
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def interrupt_collection(monkeypatch, args: list[str], after_batches: int = 5) -> None:
    """Run ``kfac-edit ARGS`` and stop it as Ctrl-C would after ``after_batches`` batches (exit 130)."""
    import kfac_edit.data
    from kfac_edit.cli import main

    real = kfac_edit.data.token_batches

    def stopping(*a, **kw):
        for i, batch in enumerate(real(*a, **kw)):
            if i == after_batches:
                raise KeyboardInterrupt()
            yield batch

    monkeypatch.setattr(kfac_edit.data, "token_batches", stopping)
    assert main(args) == 130
    monkeypatch.setattr(kfac_edit.data, "token_batches", real)
