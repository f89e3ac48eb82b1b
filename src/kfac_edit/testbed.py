"""The synthetic memorization testbed: a tiny OLMo-2 that learns a rule and memorizes canaries.

The world is small enough that both generalization and rote memorization are measurable in seconds on a CPU:

- Vocabulary: the numbers ``0..N-1`` (token id ``k`` is the number ``k``) plus the specials of
  :func:`number_tokenizer`. A document is a line of ``seq_len`` numbers such as ``"3 10 17 ..."``; the model is
  trained on ``[<bos>, x_1, ..., x_L, <eos>]``, which is exactly the window that
  :func:`kfac_edit.data.token_batches` cuts from the corpus file with ``seq_len = L + 2`` (the tokenizer adds
  ``<bos>``, packing adds ``<eos>``).
- Rule documents: arithmetic sequences ``x_t = (a + t*d) mod N`` with random start ``a`` and step
  ``d in 1..max_step``. A model that has learned the rule continues *any* such sequence, including the held-out
  ones it never saw.
- Canaries: ``n_canaries`` uniformly random sequences, each inserted ``canary_repeats`` times at random places
  of the training stream. The only way to continue a canary is to have memorized it.
- Held-out rule sequences (pairs ``(a, d)`` excluded from training) measure the general capability
  (:func:`rule_accuracy`); canaries measure memorization. Both are written in the token-id format of the eval
  command: ``{"prefix_ids": [bos, x_1..x_P], "suffix_ids": [x_{P+1}..x_L], ...}``.

:func:`build_testbed` trains the model once per configuration and caches everything under
``$KFAC_EDIT_CACHE/testbed/<config hash>/`` (default cache root ``~/.cache/kfac-edit``). The training loop is
plain PyTorch: fixed-length documents, AdamW, linear warmup and cosine decay, a fixed seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .constants import CLEAN_FILE, CORPUS_FILE, MEMORIZED_FILE, RULE_HELDOUT_FILE, TESTBED_CACHE, TESTBED_INFO_FILE
from .errors import UserError
from .fileio import atomic_dir, cache_root, write_json
from .identity import json_digest

log = logging.getLogger(__name__)

#: Bump when the data generator or the trainer changes meaning, so old cache entries are not reused.
TESTBED_VERSION = 2


def number_tokenizer(n_numbers: int):
    """A word-level Hugging Face tokenizer over the numbers ``0..n_numbers-1``.

    Token id ``k`` is the number ``k``; then ``<bos>`` = n, ``<eos>`` = n+1, ``<pad>`` = n+2, ``<unk>`` = n+3.
    Text is numbers separated by spaces, e.g. ``"3 10 17"``, so every text-based path of the package (data
    sources, packing, quotes) works on the testbed exactly as on a real model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(n_numbers)}
    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    for k, tok in enumerate(specials):
        vocab[tok] = n_numbers + k
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", n_numbers)]
    )
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that determines the testbed; its hash keys the cache.

    The training stream has ``steps * batch_size`` documents: ``n_canaries * canary_repeats`` canary documents
    (the mixing rate is their share) and rule documents for the rest, shuffled.

    The defaults were tuned on a 2-core CPU (training takes about half a minute on one thread). Steps drawn from all
    of ``1..N-1`` (``max_step=None``) make the rule modular addition of arbitrary pairs, which a small model did
    not learn within minutes (N=500, 2000 steps: 0% rule accuracy); steps in ``1..10`` are learned in a few hundred
    steps. Larger models (hidden 128, 3-4 blocks) learned both parts too but showed a weaker K-FAC/SVD contrast.
    """

    __test__ = False  # not a pytest test class despite the name

    # data
    n_numbers: int = 100  # vocabulary of numbers 0..N-1
    max_step: int | None = 10  # steps d are drawn from 1..max_step (None: 1..N-1, every step)
    seq_len: int = 24  # numbers per document (token ids: bos + seq_len + eos)
    prefix_len: int = 12  # numbers given as the prompt; the rest is the suffix to continue
    n_canaries: int = 40  # K random sequences to memorize
    canary_repeats: int = 30  # R: occurrences of each canary in the training stream
    n_heldout: int = 200  # held-out rule sequences for rule accuracy
    n_clean: int = 200  # held-out rule sequences for perplexity (clean text)
    # model (Olmo2ForCausalLM)
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_size: int = 256
    # optimization (AdamW, linear warmup then cosine decay to min_lr_ratio * lr)
    steps: int = 800
    batch_size: int = 32
    lr: float = 6e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.prefix_len < self.seq_len:
            raise UserError(f"testbed prefix_len {self.prefix_len} must be in [1, seq_len={self.seq_len}); lower it")
        if self.n_numbers < 3:
            raise UserError(f"testbed n_numbers {self.n_numbers} is too small; use at least 3")
        if self.n_canaries * self.canary_repeats > self.steps * self.batch_size:
            raise UserError(
                f"testbed stream of {self.steps * self.batch_size} documents cannot hold "
                f"{self.n_canaries} canaries x {self.canary_repeats} repeats; raise steps or batch_size"
            )
        if self.max_step is not None and not 1 <= self.max_step < self.n_numbers:
            raise UserError(f"testbed max_step {self.max_step} must be in [1, n_numbers={self.n_numbers}); lower it")
        if self.hidden_size % self.n_heads:
            raise UserError(f"testbed hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")

    @classmethod
    def quick(cls, **overrides) -> "TestbedConfig":
        """A small configuration that trains in well under a minute (tests, ``kfac-edit demo --quick``)."""
        base = dict(QUICK_OVERRIDES)
        base.update(overrides)
        return cls(**base)

    @property
    def n_documents(self) -> int:
        return self.steps * self.batch_size

    @property
    def mixing_rate(self) -> float:
        """Share of canary documents in the training stream."""
        return self.n_canaries * self.canary_repeats / self.n_documents

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """16 hex digits of sha256 over the fields and :data:`TESTBED_VERSION`."""
        return json_digest({"version": TESTBED_VERSION, **self.to_dict()})


QUICK_OVERRIDES: dict = dict(n_canaries=30, steps=600)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class TestbedData:
    """The generated sequences (numbers, without bos), each an int64 array of shape (count, seq_len)."""

    __test__ = False

    train: np.ndarray  # the shuffled training stream, canaries included
    is_canary: np.ndarray  # bool per training document
    canaries: np.ndarray  # the distinct canaries, (n_canaries, seq_len)
    heldout: np.ndarray  # held-out rule sequences for rule accuracy
    clean: np.ndarray  # held-out rule sequences for perplexity
    train_steps: np.ndarray  # (a, d) per training document; (-1, -1) for canaries
    heldout_steps: np.ndarray  # (a, d) per held-out rule sequence


def rule_sequences(starts: np.ndarray, steps: np.ndarray, length: int, n_numbers: int) -> np.ndarray:
    """Arithmetic sequences ``x_t = (a + t*d) mod N`` for ``t = 0..length-1``, one row per ``(a, d)``."""
    t = np.arange(length, dtype=np.int64)
    return (starts[:, None].astype(np.int64) + t[None, :] * steps[:, None].astype(np.int64)) % n_numbers


def generate_data(config: TestbedConfig) -> TestbedData:
    """Generate the training stream, canaries and held-out sets, deterministically from ``config.seed``.

    Held-out pairs ``(a, d)`` are drawn first (distinct) and never appear in training; steps ``d`` are in
    ``1..max_step``. Each canary occurs exactly ``canary_repeats`` times in the stream.
    """
    c = config
    rng = np.random.default_rng(c.seed)
    n_steps = c.max_step or c.n_numbers - 1
    n_pairs = c.n_numbers * n_steps
    n_held = c.n_heldout + c.n_clean
    if 2 * n_held >= n_pairs:
        raise UserError(
            f"{n_held} held-out sequences would take half or more of the {n_pairs} (a, d) pairs; "
            "lower n_heldout/n_clean or raise n_numbers/max_step"
        )
    held_codes = rng.choice(n_pairs, size=n_held, replace=False)  # code = a * n_steps + (d - 1)
    held_a, held_d = held_codes // n_steps, held_codes % n_steps + 1

    n_canary_docs = c.n_canaries * c.canary_repeats
    n_rule_docs = c.n_documents - n_canary_docs
    codes = rng.integers(0, n_pairs, size=n_rule_docs)
    held_set = np.zeros(n_pairs, dtype=bool)
    held_set[held_codes] = True
    while held_set[codes].any():  # resample the (rare) collisions with held-out pairs
        bad = held_set[codes]
        codes[bad] = rng.integers(0, n_pairs, size=int(bad.sum()))
    rule_a, rule_d = codes // n_steps, codes % n_steps + 1

    canaries = rng.integers(0, c.n_numbers, size=(c.n_canaries, c.seq_len))
    rule_docs = rule_sequences(rule_a, rule_d, c.seq_len, c.n_numbers)
    canary_index = np.repeat(np.arange(c.n_canaries), c.canary_repeats)
    docs = np.concatenate([rule_docs, canaries[canary_index]])
    doc_steps = np.concatenate([np.stack([rule_a, rule_d], 1), np.full((n_canary_docs, 2), -1)])
    is_canary = np.concatenate([np.zeros(n_rule_docs, bool), np.ones(n_canary_docs, bool)])
    order = rng.permutation(c.n_documents)

    heldout = rule_sequences(held_a[: c.n_heldout], held_d[: c.n_heldout], c.seq_len, c.n_numbers)
    clean = rule_sequences(held_a[c.n_heldout :], held_d[c.n_heldout :], c.seq_len, c.n_numbers)
    return TestbedData(
        train=docs[order],
        is_canary=is_canary[order],
        canaries=canaries,
        heldout=heldout,
        clean=clean,
        train_steps=doc_steps[order],
        heldout_steps=np.stack([held_a[: c.n_heldout], held_d[: c.n_heldout]], 1),
    )


def to_text(sequence: Iterable[int]) -> str:
    """Numbers as the testbed's text: ``[3, 10, 17] -> "3 10 17"``."""
    return " ".join(str(int(x)) for x in sequence)


def continuation_records(sequences: np.ndarray, config: TestbedConfig, tokenizer, source: str) -> list[dict]:
    """Memorized-set records (eval command format): prefix = bos + first ``prefix_len`` numbers, suffix = rest.

    Ids come from ``tokenizer`` applied to the document text, so they are exactly what a user's pipeline sees.
    """
    records = []
    for seq in sequences:
        ids = tokenizer(to_text(seq))["input_ids"]
        prefix_ids, suffix_ids = ids[: config.prefix_len + 1], ids[config.prefix_len + 1 :]
        records.append(
            {
                "prefix_ids": prefix_ids,
                "suffix_ids": suffix_ids,
                "prefix_text": to_text(seq[: config.prefix_len]),
                "suffix_text": to_text(seq[config.prefix_len :]),
                "prefix_len": len(prefix_ids),
                "suffix_len": len(suffix_ids),
                "source": source,
            }
        )
    return records


# ----------------------------------------------------------------------------------------------------------------
# Model and training


def make_model(config: TestbedConfig, tokenizer=None):
    """A fresh ``Olmo2ForCausalLM`` for the testbed, initialized from ``config.seed``."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tokenizer = tokenizer or number_tokenizer(config.n_numbers)
    model_config = Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.mlp_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=config.seq_len + 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    return Olmo2ForCausalLM(model_config)


def learning_rate(step: int, config: TestbedConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, data: TestbedData, config: TestbedConfig, tokenizer, progress: bool = True) -> dict:
    """Train ``model`` in place on ``data.train`` (one pass, ``batch_size`` documents per step).

    Every document has the same length, so a batch is a plain (batch, seq_len + 2) tensor of ids
    ``[bos, x_1..x_L, eos]`` and the loss is the mean next-token cross-entropy over all positions. Training runs on
    one CPU thread, so the trained weights do not depend on the machine's core count (the matrices are too small
    to gain much from more threads). Returns training statistics.
    """
    with one_thread():
        return _train_loop(model, data, config, tokenizer, progress)


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread, then restore the count. The testbeds' matrices are so small that thread
    hand-offs cost more than they save (on a busy 2-core machine, two threads made the demo's collection ~10x slower
    in wall clock: 155 s against 8 s of CPU for 200k tokens)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_loop(model, data: TestbedData, config: TestbedConfig, tokenizer, progress: bool) -> dict:
    import torch
    from .progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    def column(token_id: int):
        return torch.full((config.n_documents, 1), token_id, dtype=torch.long)

    stream = torch.cat([column(tokenizer.bos_token_id), torch.from_numpy(data.train), column(tokenizer.eos_token_id)], 1)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    tokens_per_step = config.batch_size * (config.seq_len + 2)
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(
        total=config.steps * tokens_per_step, unit="tok", unit_scale=True, desc="training testbed",
        disable=None if progress else True,
    )
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = stream[step * config.batch_size : (step + 1) * config.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.update(tokens_per_step)
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    window = max(1, config.steps // 20)
    return {
        "train_seconds": round(seconds, 2),
        "train_tokens": config.steps * tokens_per_step,
        "tokens_per_second": round(config.steps * tokens_per_step / seconds, 1),
        "first_loss": float(np.mean(losses[:window])),  # mean over the first 5% of steps
        "final_loss": float(np.mean(losses[-window:])),  # mean over the last 5% of steps
        "loss_curve": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
    }


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def exact_continuations(model, records: Sequence[dict], batch_size: int = 256) -> list[bool]:
    """Per record: does greedy decoding after ``prefix_ids`` reproduce ``suffix_ids`` exactly?

    Computed teacher-forced in one forward pass per batch: greedy decoding reproduces the suffix exactly if and
    only if the argmax next token equals the true token at every suffix position (by induction over positions;
    exact logit ties aside). Records may differ in length (right padding with an attention mask).
    """
    import torch

    from .data import pad_right

    device = next(model.parameters()).device
    results: list[bool] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            seqs = [list(r["prefix_ids"]) + list(r["suffix_ids"]) for r in chunk]
            ids, mask = pad_right(seqs)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            predicted = logits.argmax(-1).cpu()  # predicted[:, t] is the guess for ids[:, t + 1]
            for row, r in enumerate(chunk):
                p, s = len(r["prefix_ids"]), len(r["suffix_ids"])
                guess = predicted[row, p - 1 : p - 1 + s]
                results.append(bool(torch.equal(guess, torch.tensor(list(r["suffix_ids"]), dtype=torch.long))))
    model.train(was_training)
    return results


def rule_accuracy(model, records: Sequence[dict], batch_size: int = 256) -> float:
    """The testbed's general capability: the fraction of held-out rule sequences continued exactly right.

    A record counts as correct when greedy decoding after its prefix (bos + the first ``prefix_len`` numbers of an
    arithmetic sequence the model never saw in training) produces the whole suffix exactly, every token: the same
    criterion as strict memorization, applied to sequences that can only be computed, not recalled. So after an
    edit, "canary strict memorization" and "rule accuracy" are directly comparable. See
    :func:`exact_continuations` for how it is computed (teacher-forced, equivalent to greedy decoding).
    """
    if not records:
        raise ValueError("rule_accuracy needs at least one record")
    hits = exact_continuations(model, records, batch_size=batch_size)
    return sum(hits) / len(hits)


# ----------------------------------------------------------------------------------------------------------------
# Build and cache


@dataclass(frozen=True)
class TestbedPaths:
    """Where a built testbed lives. All paths are inside ``root`` (``<cache>/testbed/<config hash>``)."""

    __test__ = False

    root: Path
    cached: bool = False  # True when this build found the testbed in the cache and did not train

    @property
    def model_dir(self) -> Path:
        """``save_pretrained`` model and tokenizer: load with ``kfac_edit.models.load_model`` or transformers."""
        return self.root / "model"

    @property
    def corpus(self) -> Path:
        """The training stream as JSONL ``{"text": ...}`` lines (canaries included), for factor collection."""
        return self.root / CORPUS_FILE

    @property
    def memorized(self) -> Path:
        """The canaries in the eval command's token-id format, ``source: "canary"``."""
        return self.root / MEMORIZED_FILE

    @property
    def rule_heldout(self) -> Path:
        """Held-out rule sequences in the same format, ``source: "rule"`` (for :func:`rule_accuracy`)."""
        return self.root / RULE_HELDOUT_FILE

    @property
    def clean(self) -> Path:
        """Held-out rule text, one document per line as ``{"text": ...}``, for perplexity."""
        return self.root / CLEAN_FILE

    @property
    def info(self) -> Path:
        """``testbed.json``: the configuration, its hash, training statistics, base metrics and timings."""
        return self.root / TESTBED_INFO_FILE

    def load_info(self) -> dict:
        return json.loads(self.info.read_text())


def default_cache_root() -> Path:
    """``$KFAC_EDIT_CACHE`` if set, else ``~/.cache/kfac-edit``."""
    return cache_root()


def cached_testbed_dir(config: TestbedConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of ``config``'s testbed: ``<cache_dir or default_cache_root()>/testbed/<hash>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / TESTBED_CACHE / config.config_hash()


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def build_testbed(
    config: TestbedConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> TestbedPaths:
    """Generate the data, train the model and write the testbed directory; a cache hit returns at once.

    The directory is built in a temporary folder and renamed into place (:func:`kfac_edit.fileio.atomic_dir`),
    so an interrupted build never looks complete. A directory counts as built when ``testbed.json`` exists.
    """
    from . import __version__

    config = config or TestbedConfig()
    target = cached_testbed_dir(config, cache_dir)
    if (target / TESTBED_INFO_FILE).exists():
        log.info("testbed: cache hit %s", target)
        return TestbedPaths(target, cached=True)

    t0 = time.perf_counter()
    tokenizer = number_tokenizer(config.n_numbers)
    data = generate_data(config)
    model = make_model(config, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "testbed: training a %.2fM-parameter Olmo2 on %d documents (%d canaries x %d, mixing rate %.3f) -> %s",
        n_params / 1e6, config.n_documents, config.n_canaries, config.canary_repeats, config.mixing_rate, target,
    )
    stats = train(model, data, config, tokenizer, progress=progress)

    canary_records = continuation_records(data.canaries, config, tokenizer, "canary")
    rule_records = continuation_records(data.heldout, config, tokenizer, "rule")
    t_eval = time.perf_counter()
    canary_strict = float(np.mean(exact_continuations(model, canary_records)))
    rule_acc = rule_accuracy(model, rule_records)
    eval_seconds = time.perf_counter() - t_eval
    log.info("testbed: canary strict memorization %.3f, rule accuracy %.3f", canary_strict, rule_acc)

    with atomic_dir(target) as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        _write_jsonl(tmp / CORPUS_FILE, ({"text": to_text(doc)} for doc in data.train))
        _write_jsonl(tmp / MEMORIZED_FILE, canary_records)
        _write_jsonl(tmp / RULE_HELDOUT_FILE, rule_records)
        _write_jsonl(tmp / CLEAN_FILE, ({"text": to_text(doc)} for doc in data.clean))
        write_json(
            tmp / TESTBED_INFO_FILE,
            {
                "config": config.to_dict(),
                "config_hash": config.config_hash(),
                "testbed_version": TESTBED_VERSION,
                "package_version": __version__,
                "n_parameters": n_params,
                "n_documents": config.n_documents,
                "mixing_rate": config.mixing_rate,
                "training": stats,
                "base_metrics": {"canary_strict": canary_strict, "rule_accuracy": rule_acc},
                "timings": {
                    "train_seconds": stats["train_seconds"],
                    "eval_seconds": round(eval_seconds, 2),
                    "total_seconds": round(time.perf_counter() - t0, 2),
                },
            },
        )
    return TestbedPaths(target, cached=False)

