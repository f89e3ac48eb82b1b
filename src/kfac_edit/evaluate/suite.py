"""One evaluation of a model: memorized sets, quotes, perplexity, nDCG and the perturbation stress test.

:func:`evaluate` checks every input first (record files, data paths, the reference's tokenizer), then runs the
asked-for metrics and returns one record::

    {"kind": "eval", "timestamp", "model", "model_fingerprint", "weights_digest", "dtype", "device",
     "config": {...EvalConfig...}, "metrics": {"memorized": {NAME: {...}}, "quotes": {NAME: {...}},
     "perplexity": {...}, "ndcg": {...}}, "seconds"}

Memorization metrics are documented in :mod:`.memorization`, perplexity in :mod:`.perplexity`, nDCG in
:mod:`.ndcg`, the stress test in :mod:`.perturbation` (run on the memorized sets, under ``perturb``). NAME is the
file's stem (its full path when two files share a stem). The record is appended to ``config.out`` only once the
whole evaluation succeeded.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..data import check_source, describe_source
from ..errors import UserError
from ..fileio import append_jsonl, utc_timestamp
from ..identity import model_fingerprint, path_identity, weights_digest
from . import memorization, ndcg, perplexity, perturbation
from .records import MemRecord, load_records


def config_field(default: Any, help: str) -> Any:
    """A config field with its CLI help text; a list, dict or dataclass default is copied for each config."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    """What to evaluate and how; each field's ``help`` is its CLI help."""

    memorized: list[str] = config_field([], "memorized-set JSONL files (token ids or text records)")
    quotes: list[str] = config_field([], "quotes JSONL files (text records)")
    perplexity_data: str | None = config_field(None, "text SOURCE or .pt token tensor for perplexity")
    ndcg_data: str | None = config_field(None, "text SOURCE for nDCG@k against the reference")
    reference_model: str | None = config_field(None, "reference (unedited) model for nDCG: hub id or local directory")
    prefix_len: int | None = config_field(
        64, "prefix tokens kept (the last ones); token-id records must have them, text records are cut")
    suffix_len: int | None = config_field(
        48, "suffix tokens kept (the first ones); token-id records must have them, text records are cut")
    loose: float = config_field(0.75, "loose match threshold on 1 - levenshtein/len")
    ndcg_k: int = config_field(10, "k of nDCG@k")
    ndcg_seq_len: int = config_field(1024, "window length of the nDCG pass")
    ppl_block: int = config_field(112, "block length of the perplexity pass")
    max_tokens: int = config_field(200_000, "token budget of the perplexity and nDCG passes each")
    batch_size: int = config_field(32, "prompts per generation batch; blocks per perplexity batch")
    forward_tokens: int = config_field(16384, "tokens per forward pass of the nDCG pass")
    perturb: int | None = config_field(None, "run the position-perturbation stress test with budget T (paper: 20)")
    out: str | None = config_field(None, "results JSONL to append one line to")
    model: str | None = config_field(None, "model path recorded in the results")

    def validate(self) -> None:
        """Raise :class:`UserError` for settings that cannot work."""
        minimums = {"prefix_len": 1, "suffix_len": 1, "ndcg_k": 1, "ndcg_seq_len": 2, "ppl_block": 2, "max_tokens": 1,
                    "batch_size": 1, "forward_tokens": 1, "perturb": 1}  # None: prefix/suffix whole, no perturb
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                note = " (paper: 20)" if name == "perturb" else ""
                raise UserError(f"--{name.replace('_', '-')} {value}: use at least {minimum}{note}")
        if not 0.0 <= self.loose <= 1.0:
            raise UserError(f"--loose {self.loose}: use a threshold in [0, 1]")
        if not (self.memorized or self.quotes or self.perplexity_data or self.ndcg_data):
            raise UserError("nothing to evaluate; give --memorized, --quotes, --perplexity-data or --ndcg-data")


def _set_names(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return [stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths)]


def _check_source(source: str, option: str) -> None:
    described = describe_source(source)
    if not described.startswith("hf:") and not Path(described).exists():
        raise UserError(f"{option} '{source}' does not exist; give a local file/directory or hf:DATASET")
    if not described.startswith("hf:") and not described.endswith(".pt"):  # a local text source: one document?
        check_source(source)


def _pad_id(tokenizer) -> int:
    return next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def check_inputs(config: EvalConfig, tokenizer, vocab_size: int | None = None, max_positions: int | None = None,
                 has_reference: bool = False) -> dict[str, dict[str, list[MemRecord]]]:
    """Check every input of ``config`` without running a model (call it before loading one, with
    :func:`kfac_edit.models.model_limits`; a reference's tokenizer is loaded, not its weights); return the record sets
    by kind and name."""
    config.validate()
    sets: dict[str, dict[str, list[MemRecord]]] = {"memorized": {}, "quotes": {}}
    for kind, paths in (("memorized", config.memorized), ("quotes", config.quotes)):
        for name, path in zip(_set_names(paths), paths):
            sets[kind][name] = load_records(path, tokenizer, config.prefix_len, config.suffix_len, vocab_size)
    longest = max((len(r.prefix_ids) + len(r.suffix_ids) for s in sets.values() for rs in s.values() for r in rs), default=0)
    if max_positions and longest > max_positions:
        raise UserError(f"records of {longest} tokens exceed the model's {max_positions} positions; "
                        "lower --prefix-len/--suffix-len")
    if config.perplexity_data:
        _check_source(config.perplexity_data, "--perplexity-data")
        if config.perplexity_data.endswith(".pt"):
            perplexity.load_token_tensor(config.perplexity_data, vocab_size)
    if config.ndcg_data:
        _check_source(config.ndcg_data, "--ndcg-data")
        if not has_reference and not config.reference_model:
            raise UserError("--ndcg-data needs --reference-model (the unedited model) to rank tokens against")
        if vocab_size and config.ndcg_k > vocab_size:
            raise UserError(f"--ndcg-k {config.ndcg_k} exceeds the model's vocabulary of {vocab_size} tokens; use at "
                            f"most {vocab_size} (e.g. 10)")
    if config.reference_model:
        from ..models import check_causal_lm, load_tokenizer

        check_causal_lm(config.reference_model, "--reference-model")
        if tokenizer.get_vocab() != load_tokenizer(config.reference_model).get_vocab():  # nDCG compares token ids
            raise UserError(f"reference model '{config.reference_model}' has another tokenizer than the evaluated "
                            "model; nDCG needs the same vocabulary: give the unedited version of the same model as "
                            "--reference-model")
    for flag, length, used in (("--ppl-block", config.ppl_block, config.perplexity_data),
                               ("--ndcg-seq-len", config.ndcg_seq_len, config.ndcg_data)):
        if max_positions and used and length > max_positions:
            raise UserError(f"{flag} {length} exceeds the model's context of {max_positions} positions; use at most "
                            f"{max_positions}")
    return sets


def _rows(config: EvalConfig) -> int:
    return max(1, config.forward_tokens // config.ndcg_seq_len)


def reference_topk_for(reference, tokenizer, config: EvalConfig, reference_identity: dict | None = None) -> torch.Tensor:
    """The reference top-k of ``config``'s nDCG pass (``reference``: a model or a callable loading one; cached on
    disk, see :func:`.ndcg.reference_topk`)."""
    return ndcg.reference_topk(reference, tokenizer, config.ndcg_data, config.ndcg_k, config.ndcg_seq_len,
                               config.max_tokens, _rows(config), reference_identity=reference_identity)


def own_reference_topk(model: torch.nn.Module, tokenizer, config: EvalConfig) -> torch.Tensor | None:
    """With nDCG asked for and no ``reference_model``, the model is its own reference: its top-k, taken now (before
    an edit) to pass to :func:`evaluate` afterwards; ``None`` otherwise."""
    if not config.ndcg_data or config.reference_model:
        return None
    return reference_topk_for(model, tokenizer, config)


def evaluate(model: torch.nn.Module, tokenizer, config: EvalConfig,
             reference_model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
             reference_topk: torch.Tensor | None = None, outputs: dict[str, list[dict]] | None = None) -> dict:
    """Evaluate ``model`` as ``config`` asks and return the results record (see the module docstring).

    Args:
        reference_model: the reference for nDCG, held in memory (or a callable loading it); by default the model
            at ``config.reference_model`` is loaded, only when its top-k are not cached yet.
        reference_topk: precomputed reference top-k (:func:`.ndcg.reference_topk`), e.g. taken before an edit.
        outputs: filled, when given, with each memorized set's per-record outputs (:func:`memorized_outputs`).
    """
    started = time.time()
    vocab = model.get_input_embeddings().num_embeddings
    pad_id = _pad_id(tokenizer)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    # 1. Check every input before any expensive pass.
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    has_reference = reference_topk is not None or reference_model is not None
    sets = check_inputs(config, tokenizer, vocab, max_pos, has_reference=has_reference)  # validates config
    reference_identity = None
    if config.ndcg_data and not has_reference:
        from ..models import load_model

        reference_identity = path_identity(config.reference_model)
        reference_model = lambda: load_model(config.reference_model, dtype=dtype, device=str(device))[0]  # noqa: E731

    # 2. Run the passes.
    metrics: dict = {}
    timings: dict[str, float] = {}
    for kind in ("memorized", "quotes"):
        for name, records in sets[kind].items():
            t0 = time.time()
            summary, scores = memorization.memorization_metrics(model, records, config.loose, config.batch_size,
                                                                pad_id, desc=f"{kind} {name}")
            if config.perturb and kind == "memorized":
                summary["perturb"] = perturbation.perturbation_metrics(
                    model, records, config.perturb, [s.match_len for s in scores], config.batch_size, pad_id,
                    desc=f"perturb {name}")
            metrics.setdefault(kind, {})[name] = summary
            if outputs is not None and kind == "memorized":
                outputs[name] = [record_output(r, s) for r, s in zip(records, scores)]
            timings[f"{kind}:{name}"] = time.time() - t0
    if config.perplexity_data:
        t0 = time.time()
        metrics["perplexity"] = perplexity.perplexity_metrics(model, tokenizer, config.perplexity_data,
                                                              config.ppl_block, config.batch_size, config.max_tokens)
        timings["perplexity"] = time.time() - t0
    if config.ndcg_data:
        t0 = time.time()
        if reference_topk is None:
            reference_topk = reference_topk_for(reference_model, tokenizer, config, reference_identity)
        if reference_topk.shape[1] != config.ndcg_k:
            raise UserError(f"the reference top-k hold k={reference_topk.shape[1]}, not --ndcg-k {config.ndcg_k}")
        metrics["ndcg"] = ndcg.ndcg_at_k(model, tokenizer, config.ndcg_data, reference_topk, config.ndcg_seq_len,
                                         config.max_tokens, _rows(config))
        timings["ndcg"] = time.time() - t0

    record = {
        "kind": "eval",
        "timestamp": utc_timestamp(),
        "model": config.model or getattr(getattr(model, "config", None), "_name_or_path", None),
        "model_fingerprint": model_fingerprint(model),
        "weights_digest": weights_digest(model),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "kfac_edit_version": __version__,
        "config": asdict(config),
        "metrics": metrics,
        "timings_s": timings,
        "seconds": time.time() - started,
    }
    if config.out:
        append_jsonl(config.out, record)
    return record


def record_output(record: MemRecord, score: memorization.RecordScore) -> dict:
    """One record's output: its prefix and suffix ids, the greedy continuation and its scores."""
    return {"prefix_ids": list(record.prefix_ids), "suffix_ids": list(record.suffix_ids),
            "generated": list(score.generated or []), "strict": bool(score.strict), "match_len": score.match_len,
            "lev_norm": score.lev_norm, "source": record.source}


def memorized_outputs(model: torch.nn.Module, tokenizer, config: EvalConfig) -> dict[str, list[dict]]:
    """Per memorized set of ``config`` (by set name), per record: :func:`record_output` (one generation pass)."""
    vocab = model.get_input_embeddings().num_embeddings
    out = {}
    for name, path in zip(_set_names(config.memorized), config.memorized):
        records = load_records(path, tokenizer, config.prefix_len, config.suffix_len, vocab)
        scores = memorization.score_records(model, records, config.batch_size, _pad_id(tokenizer),
                                            desc=f"outputs {name}")
        out[name] = [record_output(r, s) for r, s in zip(records, scores)]
    return out


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Scalar metrics as ``{"memorized.NAME.strict": 0.12, "perplexity.perplexity": 21.3, ...}``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _pooled(sets: dict, key: str) -> float | None:
    """Mean of ``key`` over every record of several sets (each set's mean weighted by its record count)."""
    pairs = [(s["n"], s[key]) for s in sets.values() if s.get("n") and key in s]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The flat metrics that sweeps, reports and ``run`` tables show (names of :mod:`kfac_edit.pareto`).

    ``strict``, ``loose``, ``avg_levenshtein_norm``, ``mean_match_len``: pooled over all memorized sets;
    ``quotes_*``: the same over the quotes sets; ``perplexity``, ``perplexity_batch_mean``; ``ndcg`` (at the
    configured k); ``perturb_max_match_len`` and ``perturb_unperturbed_match_len`` (pooled). Absent when not run.
    """
    memorized, quotes = metrics.get("memorized") or {}, metrics.get("quotes") or {}
    perturb = {name: s["perturb"] for name, s in memorized.items() if "perturb" in s}
    keys = ("strict", "loose", "avg_levenshtein_norm", "mean_match_len")
    pooled = [*((memorized, key, key) for key in keys), *((quotes, key, f"quotes_{key}") for key in keys),
              (perturb, "mean_max_match_len", "perturb_max_match_len"),
              (perturb, "mean_unperturbed_match_len", "perturb_unperturbed_match_len")]  # (sets, key, name)
    out = {name: value for sets, key, name in pooled if (value := _pooled(sets, key)) is not None}
    if "perplexity" in metrics:
        out["perplexity"] = metrics["perplexity"]["perplexity"]
        out["perplexity_batch_mean"] = metrics["perplexity"]["perplexity_batch_mean"]
    if "ndcg" in metrics:
        out["ndcg"] = metrics["ndcg"][f"ndcg@{metrics['ndcg']['k']}"]
    return out
