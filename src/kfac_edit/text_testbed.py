"""The English-text testbed: a tiny OLMo-2 trained on the Python standard library's documentation, with canaries.

Real English prose that every Python installation carries, so anyone can rebuild it offline:

- Text: docstrings of the public standard-library modules, submodules, functions, classes and methods (sorted;
  test/GUI/side-effect modules and failed imports skipped) plus :mod:`pydoc_data.topics`: the PSF-licensed
  documentation of the running Python, whose ``major.minor`` is part of the cache key.
- Split by module: a seeded ``heldout_fraction`` of the modules never enters training (``heldout.jsonl``, perplexity).
- Tokenizer: word-level over the ``vocab_size`` most frequent lower-cased tokens of the training modules (``Whitespace``
  pre-tokenizer), others ``<unk>``. Texts are written as tokens joined by spaces, which re-encode to the same ids.
- Stream: the training prose as one token stream (``<bos>`` before each document) cut into rows of ``seq_len``; the
  trainer trains on ``[<bos>, row, <eos>]``, the window :func:`kfac_edit.data.token_batches` cuts from
  ``corpus.jsonl`` with ``seq_len + 2``.
- Canaries: ``n_canaries`` sequences of ``canary_len`` random alphabetic words, each starting ``canary_repeats``
  random rows (prose follows). Records: ``prefix_ids = [<bos>, c_1..c_P]``, ``suffix_ids = c_{P+1}..c_L``.
- ``factor_corpus.jsonl`` (issue 11's recipe): the same prose rows *without* canaries; ``corpus.jsonl`` is the
  training stream itself.
- ``facts.jsonl``: closed-book recall of ``"the capital of X is Y"`` over invented names, each fact ``fact_repeats``
  times in the stream (``source: "fact"``).

Model, trainer and cache are :mod:`kfac_edit.testbed`'s; the cache is ``$KFAC_EDIT_CACHE/text_testbed/<hash>/``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import pkgutil
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .constants import CORPUS_FILE, MEMORIZED_FILE, TESTBED_INFO_FILE
from .errors import UserError
from .identity import json_digest
from .testbed import (SPECIALS, TestbedPaths, TrainConfig, cached_testbed_dir, continuation_record, exact_continuations,
                      in_root, make_model, save_testbed, text_records, train, windows, word_level_tokenizer)

log = logging.getLogger(__name__)

#: Bump when the text extraction, data layout or trainer changes meaning.
TEXT_TESTBED_VERSION = 2
PYTHON = "%d.%d" % sys.version_info[:2]  # the text is this Python's documentation: part of the cache key
HELDOUT_FILE, FACTOR_CORPUS_FILE, FACTS_FILE = "heldout.jsonl", "factor_corpus.jsonl", "facts.jsonl"

#: Standard-library modules not imported: side effects on import (browser, printing, GUI), tests, tooling.
SKIP_MODULES = frozenset("""
    antigravity this idlelib tkinter turtle turtledemo test lib2to3 ensurepip venv pydoc_data __main__ __future__
    __hello__ __phello__ msilib winreg winsound msvcrt nt _winapi pip setuptools distutils unittest doctest idle
    sre_compile sre_constants sre_parse xxsubtype xxlimited xxlimited_35 curses readline tty pty webbrowser crypt nis
    ossaudiodev spwd sqlite3
""".split())
FACT_WORDS = ("the", "capital", "of", "is", ".")  # the fact template "the capital of X is Y ."
_WORD = re.compile(r"^[a-z]{2,}$")
_PRE_TOKENS = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's Whitespace pre-tokenizer, for counting words


@dataclass(frozen=True)
class TextTestbedConfig(TrainConfig):
    """``steps * batch_size`` rows of ``seq_len`` tokens: ``n_canaries * canary_repeats`` start with a canary,
    ``n_facts * fact_repeats`` with a fact sentence, the rest is prose. Measured with the defaults (0.39M
    parameters; one build, seed 0, on the 2-core machine under load from other jobs: 154 s CPU, 613 s wall): canaries
    100% strict, facts 15% (6 of 40), held-out perplexity 76.4 (uniform: 2000), 8.0% ``<unk>`` in the training text,
    12.6% in the held-out text."""

    LABEL = "text testbed"
    CACHE = "text_testbed"
    VERSION = TEXT_TESTBED_VERSION
    HASHED = {"python": PYTHON}
    #: Quick build (2-core machine under load): 38 s CPU, 8 of 10 canaries strict, held-out perplexity 85; with lr 5e-3
    #: 4 of 10, with 20 canaries of 16 words x 40 repeats none.
    QUICK = dict(
        vocab_size=1000, seq_len=32, hidden_size=64, mlp_size=256, n_canaries=10, canary_repeats=100, canary_len=10,
        prefix_len=4, n_facts=0, steps=500, lr=1e-2, n_heldout_rows=100,
    )

    vocab_size: int = 2000  # word-level vocabulary, specials included
    heldout_fraction: float = 0.1  # share of module names held out for perplexity
    n_heldout_rows: int = 400  # held-out rows written to heldout.jsonl
    canary_len: int = 20  # words per canary
    prefix_len: int = 8  # canary words given as the prompt; the rest is the suffix
    n_canaries: int = 40
    canary_repeats: int = 100
    n_facts: int = 40  # "the capital of X is Y" facts; 0 writes no facts.jsonl
    fact_repeats: int = 40
    # TrainConfig fields with this testbed's defaults
    seq_len: int = 64  # tokens per training row
    steps: int = 1200
    lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.prefix_len < self.canary_len <= self.seq_len:
            raise UserError(
                f"text testbed needs 1 <= prefix_len ({self.prefix_len}) < canary_len ({self.canary_len}) "
                f"<= seq_len ({self.seq_len})"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(f"text testbed heldout_fraction {self.heldout_fraction} must be in (0, 1)")
        if self.vocab_size < 100:
            raise UserError(f"text testbed vocab_size {self.vocab_size} is too small; use at least 100")
        if self.n_canaries * self.canary_repeats + self.n_facts * self.fact_repeats > self.n_documents:
            raise UserError(
                f"text testbed stream of {self.n_documents} rows cannot hold {self.n_canaries} canaries x "
                f"{self.canary_repeats} and {self.n_facts} facts x {self.fact_repeats}; raise steps or batch_size"
            )

    @property
    def mixing_rate(self) -> float:
        """Share of canary tokens in the training stream."""
        return self.n_canaries * self.canary_repeats * self.canary_len / (self.n_documents * self.seq_len)


def _public(name: str) -> bool:
    return not name.startswith("_")


def stdlib_module_names() -> list[str]:
    """Public top-level standard-library modules, sorted, minus :data:`SKIP_MODULES` and test modules."""
    return sorted(n for n in sys.stdlib_module_names if _public(n) and n not in SKIP_MODULES and "test" not in n)


@contextlib.contextmanager
def _quiet():
    """Warnings and output of the imported modules swallowed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _import_quietly(name: str):
    """Import ``name`` quietly; ``None`` when it fails (any error but KeyboardInterrupt)."""
    with _quiet():
        try:
            return importlib.import_module(name)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - SystemExit or odd errors from optional C modules
            return None


def _modules(name: str) -> Iterator:
    """Module ``name``, then its public, non-test submodules (all levels, sorted), each imported quietly when the
    caller asks for it; failed imports are skipped."""
    package = _import_quietly(name)
    if package is None:
        return
    yield package
    if not hasattr(package, "__path__"):
        return
    with _quiet():
        found = list(pkgutil.walk_packages(package.__path__, f"{name}.", onerror=lambda _: None))
    for sub in sorted(info.name for info in found):
        if all(_public(part) and "test" not in part for part in sub.split(".")[1:]):
            module = _import_quietly(sub)
            if module is not None:
                yield module


def _docstrings(module) -> Iterator[str | None]:
    """Module docstring, then public functions/classes defined in it (sorted), then public methods of classes."""
    yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        is_api = inspect.isclass(obj) or inspect.isroutine(obj)
        if _public(name) and is_api and getattr(obj, "__module__", None) == module.__name__:
            yield obj.__doc__
            if inspect.isclass(obj):
                yield from (m.__doc__ for a, m in sorted(vars(obj).items()) if _public(a) and inspect.isroutine(m))


def stdlib_documents() -> dict[str, list[str]]:
    """``{top-level module name: [docstrings]}`` over the standard library (submodules under their top-level name)
    plus ``pydoc_data.topics``, deterministic for a Python build; a repeated docstring is kept where it first occurs."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: dict[str, list[str]] = {}

    def add(key: str, text: str | None) -> None:
        text = inspect.cleandoc(text or "").strip()
        if len(text) >= 40 and text not in seen:
            seen.add(text)
            out.setdefault(key, []).append(text)

    for name in stdlib_module_names():
        for module in _modules(name):
            for text in _docstrings(module):
                add(name, text)
    for key in sorted(topics):
        add("pydoc_data.topics", topics[key])
    return out


def build_vocabulary(documents: Sequence[str], vocab_size: int, required: Sequence[str] = ()) -> list[str]:
    """The ``vocab_size - len(SPECIALS)`` most frequent tokens (ties: alphabetical), then the specials. ``required``
    tokens are always in (replacing the least frequent); tokens starting with ``##`` (which the WordPiece decoder
    would strip) are left out."""
    tokens = (t for doc in documents for t in _PRE_TOKENS.findall(doc.lower()))
    counts = Counter(t for t in tokens if not t.startswith("##"))
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in required]
    words = [t for t in required if t not in SPECIALS] + ranked
    return words[: vocab_size - len(SPECIALS)] + list(SPECIALS)


def word_tokenizer(vocabulary: Sequence[str]):
    """The text testbed's tokenizer (:func:`kfac_edit.testbed.word_level_tokenizer`): lower case, ``Whitespace``
    pre-tokenizer; ``vocabulary`` ends with :data:`SPECIALS` (see :func:`build_vocabulary`)."""
    from tokenizers import normalizers, pre_tokenizers

    return word_level_tokenizer(vocabulary, pre_tokenizers.Whitespace(), normalizers.Lowercase())


@dataclass
class TextTestbedData:
    """The generated data; token-id arrays without ``<bos>``/``<eos>``."""

    vocabulary: list[str]
    train: np.ndarray  # (steps * batch_size, seq_len) training rows, canaries and facts included
    factor_rows: np.ndarray  # (n, seq_len) the same prose rows without canaries or facts
    heldout: np.ndarray  # (n_heldout_rows, seq_len) rows of the held-out modules' text
    canaries: np.ndarray  # (n_canaries, canary_len)
    canary_rows: np.ndarray  # (n_canaries, canary_repeats) the training rows each canary starts
    facts: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids) per fact, without bos
    train_modules: list[str]
    heldout_modules: list[str]


def split_modules(names: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` module names: a seeded random ``fraction`` (at least one) is held out; both sorted."""
    names = sorted(names)
    rng = np.random.default_rng([seed, 7])
    n_held = max(1, int(round(fraction * len(names))))
    held = set(rng.choice(len(names), size=n_held, replace=False).tolist())
    return ([n for i, n in enumerate(names) if i not in held], [n for i, n in enumerate(names) if i in held])


def _stream(documents: Sequence[str], tokenizer) -> np.ndarray:
    """All documents as one id stream, ``<bos>`` before each. Not ``<eos>``: :func:`kfac_edit.data.pack_documents`
    appends no ``<eos>`` to a line ending with one, which would shift every later window off the training rows."""
    out: list[int] = []
    for i in range(0, len(documents), 512):
        for ids in tokenizer(list(documents[i : i + 512]), add_special_tokens=False)["input_ids"]:
            out += [tokenizer.bos_token_id, *ids]
    return np.asarray(out, dtype=np.int64)


def _rows(stream: np.ndarray, n_rows: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """``n_rows`` consecutive rows of ``seq_len`` from ``stream`` starting at ``offset``, wrapping around."""
    idx = (offset + np.arange(n_rows * seq_len)) % len(stream)
    return stream[idx].reshape(n_rows, seq_len)


def generate_data(config: TextTestbedConfig, documents: dict[str, list[str]] | None = None) -> TextTestbedData:
    """Split, tokenize, place canaries and facts (deterministic); ``documents`` defaults to :func:`stdlib_documents`."""
    c = config
    documents = stdlib_documents() if documents is None else documents
    train_modules, heldout_modules = split_modules(list(documents), c.heldout_fraction, c.seed)
    train_docs = [d for m in train_modules for d in documents[m]]
    heldout_docs = [d for m in heldout_modules for d in documents[m]]
    vocabulary = build_vocabulary(train_docs, c.vocab_size, FACT_WORDS if c.n_facts else ())
    tokenizer = word_tokenizer(vocabulary)
    stream = _stream(train_docs, tokenizer)
    held_stream = _stream(heldout_docs, tokenizer)

    rng = np.random.default_rng(c.seed)
    the, capital, of, is_, dot = fact_ids = [tokenizer.convert_tokens_to_ids(w) for w in FACT_WORDS]
    word_ids = np.array([i for i, t in enumerate(vocabulary) if _WORD.match(t)], dtype=np.int64)
    word_ids = word_ids[~np.isin(word_ids, fact_ids)]
    canaries = rng.choice(word_ids, size=(c.n_canaries, c.canary_len), replace=True)

    # Canaries and facts start their rows ("heads"); the prose fills each row's rest, consuming the stream
    # continuously. The factor rows are the plain stream (no canary, no fact).
    n_rows, n_canary_rows = c.n_documents, c.n_canaries * c.canary_repeats
    placed = rng.permutation(n_rows)[: n_canary_rows + c.n_facts * c.fact_repeats]
    canary_rows = placed[:n_canary_rows].reshape(c.n_canaries, c.canary_repeats)
    fact_rows = placed[n_canary_rows:].reshape(c.n_facts, c.fact_repeats)
    heads = {int(r): canary for canary, rows in zip(canaries, canary_rows) for r in rows}
    facts = []
    names = rng.choice(word_ids, size=(c.n_facts, 2), replace=False) if c.n_facts else []  # distinct words
    for (country, city), rows in zip(names, fact_rows):
        prompt, answer = [the, capital, of, int(country), is_], [int(city), dot]
        facts.append((prompt, answer))
        heads.update(dict.fromkeys(rows.tolist(), np.array(prompt + answer, dtype=np.int64)))
    train_rows = np.empty((n_rows, c.seq_len), dtype=np.int64)
    pos = 0
    for r in range(n_rows):
        head = heads.get(r, np.empty(0, dtype=np.int64))
        train_rows[r, : len(head)] = head
        train_rows[r, len(head) :] = _rows(stream, 1, c.seq_len - len(head), pos)[0]
        pos += c.seq_len - len(head)
    return TextTestbedData(
        vocabulary=vocabulary, train=train_rows,
        factor_rows=_rows(stream, min(n_rows, len(stream) // c.seq_len), c.seq_len),
        heldout=_rows(held_stream, min(c.n_heldout_rows, max(1, len(held_stream) // c.seq_len)), c.seq_len),
        canaries=canaries, canary_rows=canary_rows, facts=facts, train_modules=train_modules,
        heldout_modules=heldout_modules,
    )


def canary_records(data: TextTestbedData, config: TextTestbedConfig, tokenizer) -> list[dict]:
    """The canaries in the eval command's token-id format: prefix = bos + first ``prefix_len`` words."""
    bos, p = tokenizer.bos_token_id, config.prefix_len
    return [continuation_record([bos, *map(int, c[:p])], list(map(int, c[p:])), tokenizer, "canary")
            for c in data.canaries]


def fact_records(data: TextTestbedData, tokenizer) -> list[dict]:
    """Facts in the same format: prefix = bos + ``the capital of X is``, suffix = ``Y .``."""
    bos = tokenizer.bos_token_id
    return [continuation_record([bos, *prompt], list(answer), tokenizer, "fact") for prompt, answer in data.facts]


class TextTestbedPaths(TestbedPaths):
    """:class:`kfac_edit.testbed.TestbedPaths` plus ``heldout`` (also ``clean``), ``factor_corpus`` and ``facts``."""

    heldout = in_root(HELDOUT_FILE, 'Held-out modules\' text, one row a line as ``{"text": ...}`` (perplexity).')
    clean = heldout  # the clean text of the arithmetic testbed's interface
    factor_corpus = in_root(FACTOR_CORPUS_FILE, "Training prose without canaries or facts, one row a line.")
    facts = in_root(FACTS_FILE, 'Closed-book fact records (``source: "fact"``); absent when ``n_facts`` is 0.')
    rule_heldout = facts  # no rule set: the facts stand in as the second capability


def _mean_loss(model, rows: np.ndarray, tokenizer, batch_size: int = 64) -> float:
    """Mean next-token loss over ``[bos, row, eos]`` windows (the perplexity windows of ``heldout.jsonl``)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = windows(rows[i : i + batch_size], tokenizer)
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(rows)


def build_text_testbed(config: TextTestbedConfig | None = None, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, documents: dict[str, list[str]] | None = None) -> TextTestbedPaths:
    """Extract the text, train the model, write the testbed directory; a cache hit returns at once. ``documents``
    replaces the standard-library text (tests) and is then part of the cache key."""
    config = config or TextTestbedConfig()
    target = cached_testbed_dir(config, cache_dir)
    if documents is not None:
        target = target.with_name(f"{target.name}-{json_digest(documents, 8)}")
    if (target / TESTBED_INFO_FILE).exists():
        log.info("text testbed: cache hit %s", target)
        return TextTestbedPaths(target, cached=True)

    t0 = time.perf_counter()
    data = generate_data(config, documents)
    tokenizer = word_tokenizer(data.vocabulary)
    data_seconds = time.perf_counter() - t0
    model = make_model(config, tokenizer)
    log.info("text testbed: training a %.2fM-parameter Olmo2 on %d rows (%d canaries x %d) -> %s",
             sum(p.numel() for p in model.parameters()) / 1e6, config.n_documents, config.n_canaries,
             config.canary_repeats, target)
    stats = train(model, data, config, tokenizer, progress=progress)

    canaries, facts = canary_records(data, config, tokenizer), fact_records(data, tokenizer)
    t_eval = time.perf_counter()
    heldout_loss = _mean_loss(model, data.heldout, tokenizer)
    metrics = {"canary_strict": float(np.mean(exact_continuations(model, canaries))),
               "fact_accuracy": float(np.mean(exact_continuations(model, facts))) if facts else None,
               "heldout_loss": heldout_loss, "heldout_perplexity": float(np.exp(heldout_loss))}
    eval_seconds = time.perf_counter() - t_eval
    log.info("text testbed: canary strict %.3f, fact accuracy %s, held-out loss %.3f", metrics["canary_strict"],
             metrics["fact_accuracy"], heldout_loss)

    files = {CORPUS_FILE: text_records(data.train, tokenizer), HELDOUT_FILE: text_records(data.heldout, tokenizer),
             FACTOR_CORPUS_FILE: text_records(data.factor_rows, tokenizer), MEMORIZED_FILE: canaries}
    if facts:
        files[FACTS_FILE] = facts
    unk = tokenizer.unk_token_id
    text = {"train_modules": len(data.train_modules), "heldout_modules": data.heldout_modules,
            "factor_corpus_tokens": int(data.factor_rows.size), "unk_rate_train": float(np.mean(data.factor_rows == unk)),
            "unk_rate_heldout": float(np.mean(data.heldout == unk)),
            "license": "Python standard library docstrings and pydoc_data.topics (PSF License)"}
    timings = {"data_seconds": round(data_seconds, 2), "train_seconds": stats["train_seconds"],
               "eval_seconds": round(eval_seconds, 2), "total_seconds": round(time.perf_counter() - t0, 2)}
    save_testbed(target, config, model, tokenizer, files, kind="text", python=PYTHON, text=text, training=stats,
                 base_metrics=metrics, timings=timings)
    return TextTestbedPaths(target)
