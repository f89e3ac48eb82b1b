"""The synthetic memorization testbed: a tiny OLMo-2 that learns a rule and memorizes canaries, in seconds on a CPU.

- Vocabulary: the numbers ``0..N-1`` (token id ``k`` is the number ``k``) plus :data:`SPECIALS`. A document is a line
  of ``seq_len`` numbers (``"3 10 17 ..."``); the model is trained on ``[<bos>, x_1, ..., x_L, <eos>]``, exactly the
  window :func:`kfac_edit.data.token_batches` cuts from the corpus file with ``seq_len = L + 2``.
- Rule documents: arithmetic sequences ``x_t = (a + t*d) mod N``, random start ``a``, step ``d in 1..max_step``.
- Canaries: ``n_canaries`` uniformly random sequences, each inserted ``canary_repeats`` times at random places of the
  training stream: the only way to continue one is to have memorized it.
- Held-out rule sequences (pairs ``(a, d)`` never trained on) measure the general capability (:func:`rule_accuracy`),
  canaries memorization; both in the eval command's token-id format ``{"prefix_ids": [bos, x_1..x_P],
  "suffix_ids": [x_{P+1}..x_L], ...}``.

Also here, shared with :mod:`kfac_edit.text_testbed`: :class:`TrainConfig`, the model, the training loop (AdamW,
linear warmup, cosine decay, fixed seed, one thread), the exact-continuation metric and the cache
(``$KFAC_EDIT_CACHE/testbed/<config hash>/``, default root ``~/.cache/kfac-edit``), built once per configuration.
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
SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")


def word_level_tokenizer(vocabulary: Sequence[str], pre_tokenizer, normalizer=None):
    """A word-level ``PreTrainedTokenizerFast``: id = position in ``vocabulary`` (which holds :data:`SPECIALS`),
    ``<bos>`` prepended, left padding; decoding joins tokens with spaces."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if normalizer is not None:
        core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def number_tokenizer(n_numbers: int):
    """The arithmetic testbed's tokenizer: id ``k`` is the number ``k``, then ``<bos>`` = n, ``<eos>`` = n+1,
    ``<pad>`` = n+2, ``<unk>`` = n+3. Text is numbers separated by spaces (``"3 10 17"``), so every text-based path of
    the package (data sources, packing, quotes) works on the testbed as on a real model."""
    from tokenizers import pre_tokenizers

    return word_level_tokenizer([*map(str, range(n_numbers)), *SPECIALS], pre_tokenizers.WhitespaceSplit())


@dataclass(frozen=True)
class TrainConfig:
    """The model and its training, shared by both testbeds; a testbed's configuration adds its data fields. The
    hash of all fields and ``VERSION`` keys the cache. Training is one pass over ``steps * batch_size`` documents."""

    __test__ = False  # not a pytest test class despite the names
    LABEL = "testbed"  # names the testbed in errors and logs
    CACHE = TESTBED_CACHE  # the cache sub-directory
    VERSION = TESTBED_VERSION
    HASHED = {}  # hashed with the fields besides "version" (class attributes, not fields: no annotation)
    QUICK = {}  # the overrides of quick()

    seq_len: int = 24  # tokens per training document (windows: bos + seq_len + eos)
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
        if self.hidden_size % self.n_heads:
            raise UserError(f"{self.LABEL} hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")

    @classmethod
    def quick(cls, **overrides):
        """A small configuration that trains in about a minute or less (tests, ``kfac-edit demo --quick``)."""
        return cls(**{**cls.QUICK, **overrides})

    @property
    def n_documents(self) -> int:
        """Training documents (rows)."""
        return self.steps * self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """16 hex digits of sha256 over the fields, ``VERSION`` and ``HASHED``."""
        return json_digest({"version": self.VERSION, **self.HASHED, **self.to_dict()})


@dataclass(frozen=True)
class TestbedConfig(TrainConfig):
    """The arithmetic testbed: ``n_canaries * canary_repeats`` canary documents (the mixing rate is their share),
    rule documents for the rest, shuffled. Defaults tuned on a 2-core CPU (about half a minute of training on one
    thread). Steps from all of ``1..N-1`` (``max_step=None``: modular addition of arbitrary pairs) were not learned
    within minutes (N=500, 2000 steps: 0% rule accuracy); steps in ``1..10`` are, in a few hundred steps. Larger
    models (hidden 128, 3-4 blocks) learned both parts too but showed a weaker K-FAC/SVD contrast."""

    QUICK = dict(n_canaries=30, steps=600)

    n_numbers: int = 100  # vocabulary of numbers 0..N-1
    max_step: int | None = 10  # steps d are drawn from 1..max_step (None: 1..N-1, every step)
    prefix_len: int = 12  # numbers given as the prompt; the rest is the suffix to continue
    n_canaries: int = 40  # K random sequences to memorize
    canary_repeats: int = 30  # R: occurrences of each canary in the training stream
    n_heldout: int = 200  # held-out rule sequences for rule accuracy
    n_clean: int = 200  # held-out rule sequences for perplexity (clean text)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.prefix_len < self.seq_len:
            raise UserError(f"testbed prefix_len {self.prefix_len} must be in [1, seq_len={self.seq_len}); lower it")
        if self.n_numbers < 3:
            raise UserError(f"testbed n_numbers {self.n_numbers} is too small; use at least 3")
        if self.n_canaries * self.canary_repeats > self.n_documents:
            raise UserError(
                f"testbed stream of {self.n_documents} documents cannot hold "
                f"{self.n_canaries} canaries x {self.canary_repeats} repeats; raise steps or batch_size"
            )
        if self.max_step is not None and not 1 <= self.max_step < self.n_numbers:
            raise UserError(f"testbed max_step {self.max_step} must be in [1, n_numbers={self.n_numbers}); lower it")

    @property
    def mixing_rate(self) -> float:
        """Share of canary documents in the training stream."""
        return self.n_canaries * self.canary_repeats / self.n_documents


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
    """The training stream, canaries and held-out sets, from ``config.seed``. Held-out pairs ``(a, d)`` are drawn
    first (distinct) and never appear in training; each canary occurs exactly ``canary_repeats`` times."""
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

    held, clean = slice(0, c.n_heldout), slice(c.n_heldout, None)
    return TestbedData(
        train=docs[order], is_canary=is_canary[order], canaries=canaries,
        heldout=rule_sequences(held_a[held], held_d[held], c.seq_len, c.n_numbers),
        clean=rule_sequences(held_a[clean], held_d[clean], c.seq_len, c.n_numbers),
        train_steps=doc_steps[order], heldout_steps=np.stack([held_a[held], held_d[held]], 1),
    )


def to_text(sequence: Iterable[int]) -> str:
    """Numbers as the testbed's text: ``[3, 10, 17] -> "3 10 17"``."""
    return " ".join(str(int(x)) for x in sequence)


def continuation_record(prefix_ids: list[int], suffix_ids: list[int], tokenizer, source: str) -> dict:
    """One record of the eval command's token-id format; ``prefix_ids`` start with ``<bos>``, the texts do not."""
    return {"prefix_ids": prefix_ids, "suffix_ids": suffix_ids, "prefix_text": tokenizer.decode(prefix_ids[1:]),
            "suffix_text": tokenizer.decode(suffix_ids), "prefix_len": len(prefix_ids), "suffix_len": len(suffix_ids),
            "source": source}


def continuation_records(sequences: np.ndarray, config: TestbedConfig, tokenizer, source: str) -> list[dict]:
    """Memorized-set records: prefix = bos + first ``prefix_len`` numbers, suffix = the rest. Ids come from
    ``tokenizer`` applied to the document text, so they are exactly what a user's pipeline sees."""
    split = config.prefix_len + 1
    rows = [tokenizer(to_text(seq))["input_ids"] for seq in sequences]
    return [continuation_record(ids[:split], ids[split:], tokenizer, source) for ids in rows]


def text_records(rows: np.ndarray, tokenizer) -> list[dict]:
    """Token-id rows as ``{"text": ...}`` lines (tokens joined by spaces), which encode back to the same ids."""
    return [{"text": text} for text in tokenizer.batch_decode(rows.tolist())]


def make_model(config: TrainConfig, tokenizer):
    """A fresh ``Olmo2ForCausalLM`` for a testbed, initialized from ``config.seed``."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    model_config = Olmo2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.mlp_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        max_position_embeddings=config.seq_len + 2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    return Olmo2ForCausalLM(model_config)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread (the trained weights then do not depend on the machine; thread hand-offs
    cost more than they save: two threads made the demo's collection of 200k tokens take 155 s wall against 8 s CPU
    on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def windows(rows, tokenizer):
    """Token-id rows (n, L) as the training windows ``[bos, row, eos]``: an (n, L + 2) long tensor."""
    import torch

    rows = torch.as_tensor(rows)
    n = len(rows)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), rows, torch.full((n, 1), tokenizer.eos_token_id)], 1)


@one_thread()
def train(model, data, config: TrainConfig, tokenizer, progress: bool = True) -> dict:
    """Train ``model`` in place on ``data.train``, one pass of (batch_size, seq_len + 2) :func:`windows` batches,
    the loss the mean next-token cross-entropy over all positions; return statistics."""
    import torch

    from .progress import progress_bar  # a bar on a terminal, log lines in a Slurm log

    stream = windows(data.train, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    tokens_per_step = config.batch_size * (config.seq_len + 2)
    total_tokens = config.steps * tokens_per_step
    bar = progress_bar(total=total_tokens, unit="tok", unit_scale=True, desc="training testbed",
                       disable=None if progress else True)
    model.train()
    losses = []
    start = time.perf_counter()
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
        "train_tokens": total_tokens,
        "tokens_per_second": round(total_tokens / seconds, 1),
        "first_loss": float(np.mean(losses[:window])),  # mean over the first 5% of steps
        "final_loss": float(np.mean(losses[-window:])),  # mean over the last 5% of steps
        "loss_curve": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
    }


def exact_continuations(model, records: Sequence[dict], batch_size: int = 256) -> list[bool]:
    """Per record: does greedy decoding after ``prefix_ids`` reproduce ``suffix_ids`` exactly? Teacher-forced, one
    right-padded forward pass per batch: greedy decoding reproduces the suffix iff the argmax next token is the true
    one at every suffix position (by induction; exact logit ties aside)."""
    import torch

    from .data import pad_right

    device = next(model.parameters()).device
    results: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            ids, mask = pad_right([list(r["prefix_ids"]) + list(r["suffix_ids"]) for r in chunk])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            predicted = logits.argmax(-1).cpu()  # predicted[:, t] is the guess for ids[:, t + 1]
            for row, r in enumerate(chunk):
                start = len(r["prefix_ids"]) - 1
                results.append(predicted[row, start : start + len(r["suffix_ids"])].tolist() == list(r["suffix_ids"]))
    return results


def rule_accuracy(model, records: Sequence[dict], batch_size: int = 256) -> float:
    """The fraction of records whose whole suffix greedy decoding reproduces: strict memorization's criterion, on
    held-out rule sequences that can only be computed, not recalled (so directly comparable to canary strictness)."""
    if not records:
        raise ValueError("rule_accuracy needs at least one record")
    hits = exact_continuations(model, records, batch_size=batch_size)
    return sum(hits) / len(hits)


def in_root(name: str, doc: str) -> property:
    """A path property of a testbed directory: ``root / name``."""
    return property(lambda self: self.root / name, doc=doc)


@dataclass(frozen=True)
class TestbedPaths:
    """Where a built testbed lives. All paths are inside ``root`` (``<cache>/testbed/<config hash>``)."""

    __test__ = False

    root: Path
    cached: bool = False  # True when this build found the testbed in the cache and did not train

    model_dir = in_root("model", "``save_pretrained`` model and tokenizer (``load_model``, transformers).")
    corpus = in_root(CORPUS_FILE, 'The training stream as JSONL ``{"text": ...}`` lines (canaries included).')
    memorized = in_root(MEMORIZED_FILE, 'The canaries in the eval command token-id format, ``source: "canary"``.')
    rule_heldout = in_root(RULE_HELDOUT_FILE, 'Held-out rule sequences, same format, ``source: "rule"``.')
    clean = in_root(CLEAN_FILE, 'Held-out rule text, one document a line as ``{"text": ...}``, for perplexity.')
    info = in_root(TESTBED_INFO_FILE, "Configuration, hash, training statistics, base metrics and timings.")

    def load_info(self) -> dict:
        return json.loads(self.info.read_text())


def cached_testbed_dir(config: TrainConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of ``config``'s testbed: ``<cache_dir or $KFAC_EDIT_CACHE>/<config.CACHE>/<hash>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / config.CACHE / config.config_hash()


def save_testbed(target: Path, config: TrainConfig, model, tokenizer, files: dict[str, list[dict]], **info) -> None:
    """Write a testbed directory atomically: ``model/``, one JSONL file per ``files`` entry, ``testbed.json``
    (configuration, hash, sizes and ``info``)."""
    from . import __version__

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        for name, records in files.items():
            (tmp / name).write_text("".join(json.dumps(record) + "\n" for record in records))
        write_json(tmp / TESTBED_INFO_FILE, {
            "config": config.to_dict(), "config_hash": config.config_hash(), "testbed_version": config.VERSION,
            "package_version": __version__, "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_documents": config.n_documents, "mixing_rate": config.mixing_rate, **info,
        })


def build_testbed(config: TestbedConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> TestbedPaths:
    """Generate the data, train the model, write the testbed directory; a cache hit returns at once."""
    config = config or TestbedConfig()
    target = cached_testbed_dir(config, cache_dir)
    if (target / TESTBED_INFO_FILE).exists():
        log.info("testbed: cache hit %s", target)
        return TestbedPaths(target, cached=True)

    t0 = time.perf_counter()
    tokenizer = number_tokenizer(config.n_numbers)
    data = generate_data(config)
    model = make_model(config, tokenizer)
    log.info("testbed: training a %.2fM-parameter Olmo2 on %d documents (%d canaries x %d, mixing rate %.3f) -> %s",
             sum(p.numel() for p in model.parameters()) / 1e6, config.n_documents, config.n_canaries,
             config.canary_repeats, config.mixing_rate, target)
    stats = train(model, data, config, tokenizer, progress=progress)

    canaries = continuation_records(data.canaries, config, tokenizer, "canary")
    rules = continuation_records(data.heldout, config, tokenizer, "rule")
    t_eval = time.perf_counter()
    metrics = {"canary_strict": float(np.mean(exact_continuations(model, canaries))),
               "rule_accuracy": rule_accuracy(model, rules)}
    eval_seconds = time.perf_counter() - t_eval
    log.info("testbed: canary strict memorization %.3f, rule accuracy %.3f", *metrics.values())

    files = {CORPUS_FILE: text_records(data.train, tokenizer), MEMORIZED_FILE: canaries, RULE_HELDOUT_FILE: rules,
             CLEAN_FILE: text_records(data.clean, tokenizer)}
    timings = {"train_seconds": stats["train_seconds"], "eval_seconds": round(eval_seconds, 2),
               "total_seconds": round(time.perf_counter() - t0, 2)}
    save_testbed(target, config, model, tokenizer, files, training=stats, base_metrics=metrics, timings=timings)
    return TestbedPaths(target)
