"""One factor collection: :class:`CollectConfig` says what and how, :func:`collect_factors` does it.

:func:`collect_factors` is the one entry point (CLI, demo and tests call it). It drives
:class:`~kfac_edit.factors.collector.FactorCollector` over **partitions**, each a partial :class:`Factors` (sums +
counts); the result is their sum:

* **passes**: ``layers_per_pass`` blocks at a time (:func:`~kfac_edit.factors.memory.plan_passes`), each over the
  same stream; labels seeded by (seed, window index) make the merged result equal one pass over all blocks;
* **ranks** (:mod:`.distributed`): rank ``r`` of ``W`` takes windows ``r, r + W, ...``; sums are reduced into rank 0
  at each checkpoint and at the end of each pass; only rank 0 writes and returns the factors;
* **checkpoints** (:mod:`.checkpoint`): every ``checkpoint_every`` tokens (over all ranks, rounded up to whole
  steps) rank 0 writes the finished passes, the pass in progress and the stream position; ``resume`` goes on.

Ranks meet only at checkpoint steps (the same step everywhere) and once their shard is exhausted: they exchange
"still have data", reduce sums and token counters, and go on while any rank has data (a rank that ran out early
waits at most one step). At a meeting every window below ``max(windows consumed)`` is in the sums and none above,
whatever the number of ranks: that is the position a checkpoint records.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..fileio import check_output, output_lock, utc_timestamp
from ..models import LAYOUT_KEY, Projection
from ..spec import LabelMode
from .checkpoint import (
    CheckpointState, latest_checkpoint, load_checkpoint, remove_checkpoints, run_fingerprint, save_checkpoint,
)  # fmt: skip
from .collector import FactorCollector, describe_projections, take_tokens
from .distributed import DistContext, all_reduce_ints, broadcast_object, reduce_factors_to_main
from .memory import plan_passes
from .store import Factors, check_writable

log = logging.getLogger(__name__)

# batches(skip_windows, (rank, world_size)) -> batches with "window_index" (e.g. data.token_batches(..., with_index=True))
BatchSource = Callable[[int, tuple[int, int]], Iterable[dict[str, torch.Tensor]]]
# what the manifest of factors collected from a source string records of the configuration (beside "data")
SOURCE_MANIFEST_KEYS = ("text_field", "seq_len", "batch_size", "max_tokens", "gradient_checkpointing")


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


@dataclass
class CollectConfig:
    """What a factor collection collects and how it runs (kronfluence's ``FactorArguments`` pattern): each field's
    help is the CLI's (:meth:`help`), each check in ``__post_init__`` names the CLI flag, and text options
    (``layers="20-27"``, ``kinds="up,down"``, ``memory_budget="60GB"``) are parsed. Loading options (``dtype``,
    ``device``, ``device_map``) and corpus options (``seq_len``, ``batch_size``, ``text_field``) apply when
    :func:`collect_factors` is given a model name and a data source string."""

    layers: Any = _opt("all", "block indices, e.g. 23,24,25 or 20-27 or all (default: all)")
    kinds: Any = _opt(None, "subset of gate,up,down (default: every one the architecture has)", "--projections")
    bias: str = _opt("joint", "biased layers: joint = A over [a; 1], the K-FAC of the affine map (the edit projects "
                     "[W b]); keep = A over a alone (the edit leaves biases as they are)")  # fmt: skip
    modules: Any = _opt(None, "for architectures not known: KIND=PATH inside a block, e.g. up=mlp.fc_in,down=mlp.fc_out")
    labels: str = _opt("sampled", "sampled: labels drawn from the model's softmax (true Fisher, default); gold: next "
                       "token (empirical)")  # fmt: skip
    seed: int = _opt(0, "seed of the sampled labels (default: 0)")
    max_tokens: int | None = _opt(None, "tokens to read from the data, rounded up to whole batches (default: 20000000; "
                                  "in Python: all the batches)", "--tokens")  # fmt: skip
    seq_len: int = _opt(512, "tokens per packed window (default: 512)")
    batch_size: int = _opt(16, "windows per forward/backward (default: 16)")
    text_field: str = _opt("text", "field/column holding the text (default: text)")
    dtype: str = _opt("auto", "model dtype (default auto: the checkpoint's own dtype); factors are always summed in "
                      "fp32 or fp64")  # fmt: skip
    device: str = _opt("auto", "cuda, cuda:1, cpu or auto (default: cuda when available)")
    device_map: str | None = _opt(None, "spread the model's blocks over the visible GPUs (transformers/accelerate "
                                  "device_map; needs accelerate); factors accumulate on each module's device. Not "
                                  "with several ranks")  # fmt: skip
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory)")
    layers_per_pass: int | None = _opt(None, "collect K blocks per pass over the data (several passes, merged; same "
                                       "result) to bound factor memory (default: every block in one pass)")  # fmt: skip
    checkpoint_every: int | None = _opt(None, "write a checkpoint (sums so far + stream position) into DIR/checkpoint "
                                        "every TOKENS tokens, counted over all ranks (default: no checkpoints)")  # fmt: skip
    memory_budget: Any = _opt(None, "memory the factor sums may take on each device, e.g. 60GB (default: 90%% of the "
                              "free GPU memory, 80%% of the available RAM on the CPU)")  # fmt: skip
    out: Path | None = _opt(None, "output directory for the factors (in Python: optional, nothing is written without it)")
    overwrite: bool = _opt(False, "replace factors already in --out")
    resume: bool = _opt(False, "continue from the checkpoint in DIR/checkpoint (start from the beginning when there is "
                        "none); the model, data and options must be those of the interrupted run (--batch-size, "
                        "--tokens and the number of ranks may change)")  # fmt: skip
    dist_timeout: float = _opt(1800.0, "with several ranks (torchrun / accelerate launch): how long a rank waits for "
                               "the others at a checkpoint or at the end before failing (default: 1800)")  # fmt: skip
    progress: bool = _opt(True, "show a progress bar (tokens/s)")
    exclude: Any = _opt(None, "memorized-set JSONL files (the eval command's record formats): windows sharing an "
                        "8-token n-gram with any record are dropped before collection, so the factors come from text "
                        "without the memorized set; --tokens counts the tokens kept")  # fmt: skip
    ekfac: bool = _opt(False, "then a second pass over the same data and labels in the eigenbasis of the factors as "
                       "written: EK-FAC eigenvalues E[(u_G[i]^T g a^T u_A[j])^2] per pair, stored as "
                       "DIR/ekfac.safetensors (for --method ekfac; one process; needs --out)")  # fmt: skip

    def __post_init__(self) -> None:
        from ..models import BIAS_MODES, parse_layers, parse_modules_option, parse_projections
        from .memory import parse_size

        for name in ("max_tokens", "batch_size", "checkpoint_every", "layers_per_pass"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{self.flag(name)} must be a positive integer, got {value}")
        if self.seq_len < 2:
            raise UserError(f"--seq-len {self.seq_len} is too short; use at least 2")
        if not 0 < self.dist_timeout < math.inf:  # nan too
            raise UserError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout:g}")
        LabelMode.parse(self.labels, "label mode")
        if self.ekfac and self.out is None:
            raise UserError("--ekfac stores its eigenvalues beside the factors: give the factors an output directory")
        if self.bias not in BIAS_MODES:
            raise UserError(f"unknown --bias '{self.bias}'; use one of {', '.join(BIAS_MODES)}")
        if isinstance(self.layers, str) or self.layers is None:
            self.layers = parse_layers(self.layers)
        for name, parse in (("kinds", parse_projections), ("modules", parse_modules_option), ("memory_budget", parse_size)):
            if isinstance(getattr(self, name), str):
                setattr(self, name, parse(getattr(self, name)))
        if self.exclude is not None:
            files = [self.exclude] if isinstance(self.exclude, (str, os.PathLike)) else self.exclude
            self.exclude = [str(f) for f in files] or None
            missing = [f for f in self.exclude or () if not Path(f).is_file()]
            if missing:
                raise UserError(f"--exclude file '{missing[0]}' does not exist; give memorized-set JSONL files")
        if self.out is not None:
            self.out = Path(self.out)
        elif self.checkpoint_every or self.resume:
            raise UserError("checkpoints (--checkpoint-every, --resume) need an output directory (--out)")

    @classmethod
    def flag(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata.get("flag", "--" + name.replace("_", "-"))


def collect_factors(
    model: nn.Module | str,
    data: str | os.PathLike | Iterable[dict[str, torch.Tensor]] | BatchSource,
    config: CollectConfig | None = None,
    *,
    tokenizer: Any = None,
    projections: Sequence[Projection] | None = None,
    ctx: DistContext | None = None,
    **options: Any,
) -> Factors | None:
    """K-FAC factors (sums + counts) of MLP projections; see the module docstring for passes, ranks, checkpoints.

    Args:
        model: a Hugging Face causal LM (its weights are not changed and get no gradients), or a hub id / local
            directory to load (then the process joins a ``torchrun`` job if launched by one).
        data: a source string (:func:`kfac_edit.data.token_batches`: packed with ``config.seq_len`` and
            ``config.batch_size``; needs ``tokenizer`` unless ``model`` is loaded here); an iterable of batches
            ``{"input_ids", "attention_mask"[, "window_index"]}`` (a list when there are several passes); or a
            :data:`BatchSource` ``(skip_windows, (rank, world_size)) -> batches`` (what resume and ranks need).
        config: a :class:`CollectConfig`; ``options`` override its fields (``layers=[1], labels="gold"``).
        projections: the modules to collect (default: ``config.layers`` x ``config.kinds``).
        ctx: the data-parallel context (default: joined here when ``model`` is a name, else a single process).

    Returns:
        On rank 0 the :class:`Factors` (written to ``config.out`` too, when given) whose manifest records model,
        labels, seed, token counts, dtype and versions; ``None`` on the other ranks.
    """
    from ..data import check_source, describe_source
    from ..models import resolve_device
    from .distributed import init_distributed, shutdown

    config = replace(config or CollectConfig(), **options)
    if config.out is not None:  # nothing is loaded and nothing is written until out may take the result
        check_output(config.out, "dir")
        check_writable(config.out, config.overwrite)
        pending = latest_checkpoint(config.out)
        if pending is not None and not (config.resume or config.overwrite):
            raise UserError(
                f"'{config.out}' holds a checkpoint of an unfinished collection ({pending.name}); pass --resume to "
                "continue it or --overwrite to start over"
            )
    source = str(data) if isinstance(data, (str, os.PathLike)) else None
    if source is not None:
        check_source(source, config.text_field)
    model_id = str(model) if isinstance(model, (str, os.PathLike)) else None
    device = resolve_device(None if config.device == "auto" else config.device) if model_id else None
    joined = ctx is None and model_id is not None
    ctx = init_distributed(device, timeout_s=config.dist_timeout) if joined else (ctx or DistContext())
    lock = contextlib.ExitStack()  # rank 0 holds --out's lock until the factors are saved
    try:
        if config.ekfac and ctx.enabled:
            raise UserError("--ekfac runs in one process; launch `kfac-edit collect --ekfac` without torchrun")
        if ctx.is_main and config.out is not None:
            lock.enter_context(output_lock(config.out))
            check_writable(config.out, config.overwrite)  # again, under the lock: no other writer got in between
        if model_id is not None:
            model, tokenizer = _load_model(model_id, config, ctx, device)
        projections = _prepare(model, config, ctx, projections, check_context=source is not None)
        fingerprint = None
        if config.checkpoint_every or config.resume:
            fingerprint = run_fingerprint(model, projections, config, source)
        if config.overwrite and ctx.is_main and config.out is not None:
            remove_checkpoints(config.out)
        exclusion: dict = {}
        batches = _batch_source(data, model, tokenizer, config, exclusion)
        factors = _collect_partitions(model, projections, batches, config, ctx, fingerprint)
    except BaseException:
        lock.close()
        raise
    finally:
        if joined:
            shutdown(ctx)
    if factors is None:  # not rank 0: rank 0 writes
        return None
    if model_id is not None:  # a local directory as an absolute path (the factors may be read from elsewhere)
        local = Path(model_id).expanduser()
        factors.manifest["model"] = str(local.resolve()) if local.is_dir() else model_id
    factors.manifest["bias"] = "joint" if any(p.homogeneous for p in projections) else "keep"
    factors.manifest.update(_recorded_layout(model, projections))
    if source is not None:
        factors.manifest["data"] = describe_source(source)
        factors.manifest.update({k: getattr(config, k) for k in SOURCE_MANIFEST_KEYS})
    if config.exclude:
        factors.manifest["exclude"] = exclusion
    with lock:
        if config.out is not None:
            factors.save(config.out)
            remove_checkpoints(config.out)
        if config.ekfac:  # over the same data, exclusion and labels, in the eigenbasis of the factors as written
            from ..eigen import EigenCache
            from .ekfac import collect_ekfac

            started = time.perf_counter()
            ekfac = collect_ekfac(
                model, Factors.load(config.out), _batch_source(data, model, tokenizer, config, {})(0, (0, 1)),
                cache=EigenCache.default(), max_tokens=config.max_tokens, progress=config.progress,
            )  # fmt: skip
            path = ekfac.save(config.out)
            log.info("EK-FAC eigenvalues of %d modules in %.1f s -> %s", len(ekfac.names),
                     time.perf_counter() - started, path)  # fmt: skip
    return factors


# ---------------------------------------------------------------------------------------------------- preparation
def _recorded_layout(model: nn.Module, projections: Sequence[Projection]) -> dict[str, dict[str, str]]:
    """``{LAYOUT_KEY: module paths}`` for the manifest (``edit``, ``run`` and ``sweep`` find the modules by it), or
    ``{}`` when the collected modules follow no one layout (projections passed by hand)."""
    from ..models import module_paths

    try:
        paths = module_paths(model)
    except UserError:
        return {}
    fits = all(p.kind in paths and p.name == f"{paths['blocks']}.{p.block}.{paths[p.kind]}" for p in projections)
    return {LAYOUT_KEY: paths} if fits else {}


def _load_model(model_id: str, config: CollectConfig, ctx: DistContext, device: torch.device):
    from ..models import load_model
    from .distributed import rank_device

    if ctx.enabled and config.device_map:
        raise UserError(
            f"--device-map {config.device_map} spreads one model over the GPUs of one process; it cannot be combined "
            f"with {ctx.world_size} ranks: launch a single process, or drop --device-map"
        )
    if config.device_map and importlib.util.find_spec("accelerate") is None:  # transformers needs it for device_map
        raise UserError("--device-map needs the accelerate package: pip install accelerate")
    device = None if config.device_map else str(rank_device(device, ctx))
    return load_model(model_id, dtype=config.dtype, device=device, device_map=config.device_map)


def _prepare(
    model: nn.Module, config: CollectConfig, ctx: DistContext, projections: Sequence[Projection] | None, check_context: bool
) -> list[Projection]:
    """The projections to collect, after the checks that need the model: context, offloading, memory."""
    from ..models import find_projections, model_limits, projection_kinds, use_modules
    from .memory import check_memory

    context = model_limits(model.config)[1]
    if check_context and context is not None and config.seq_len > context:
        raise UserError(
            f"--seq-len {config.seq_len} is beyond the model's context of {context} tokens; use at most {context}"
        )
    if config.modules:
        use_modules(model, config.modules)  # every block checked; the layout is recorded in the manifest
    if projections is None:
        projections = find_projections(model, config.layers, config.kinds or projection_kinds(model), bias=config.bias)
    offloaded = [p.name for p in projections if p.module.weight.device.type == "meta"]
    if offloaded:
        raise UserError(
            f"--device-map {config.device_map} offloaded {offloaded[0]} (and {len(offloaded) - 1} more) off the GPUs; "
            "factors need every collected module on a device: use more GPUs or collect fewer --layers"
        )
    if config.gradient_checkpointing:
        if any(p.expert is not None for p in projections):
            raise UserError(
                "--gradient-checkpointing cannot be combined with per-expert factors (the experts would be recomputed "
                "in backward and counted twice); collect a mixture-of-experts model without gradient checkpointing"
            )
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        try:
            enable()
        except ValueError as exc:
            raise UserError(f"--gradient-checkpointing: {exc}; run without it") from None
    check_memory(projections, config.layers_per_pass, config.memory_budget, ctx.is_main, keeps_results=ctx.is_main)
    return list(projections)


def _batch_source(data: Any, model: nn.Module, tokenizer: Any, config: CollectConfig, exclusion: dict) -> BatchSource:
    """``data`` as a :data:`BatchSource`, cut at ``config.max_tokens`` tokens (a callable: as it is); with
    ``config.exclude`` the tokens kept are counted (:func:`_excluding`, which fills ``exclusion``)."""
    max_tokens = None if config.exclude else config.max_tokens
    if isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            raise UserError("a data source string needs a tokenizer: pass tokenizer=, or the model's name to load both")

        def source(skip_windows: int, shard: tuple[int, int]):
            from .. import data as data_module  # looked up at call time (tests replace token_batches)

            return data_module.token_batches(
                str(data), tokenizer, config.seq_len, config.batch_size, max_tokens=max_tokens,
                skip_windows=skip_windows, shard=shard, text_field=config.text_field, with_index=True,
                warn_if_short="--tokens",
            )  # fmt: skip

    elif callable(data):
        source = data
    else:
        used = []

        def source(skip_windows: int, shard: tuple[int, int]):
            if skip_windows or shard != (0, 1):
                raise UserError("resuming or several ranks need the data as a source string or a BatchSource callable")
            if used and iter(data) is data:
                raise UserError("several passes (--layers-per-pass) read the batches again: give a list, not an iterator")
            used.append(True)
            return take_tokens(data, max_tokens)

    return _excluding(source, model, tokenizer, config, exclusion) if config.exclude else source


def _excluding(source: BatchSource, model: nn.Module, tokenizer: Any, config: CollectConfig, info: dict) -> BatchSource:
    """``source`` without the windows that overlap ``config.exclude``'s records (:func:`kfac_edit.data.exclude_overlapping`,
    n = :data:`kfac_edit.data.EXCLUDE_NGRAM`), cut at ``config.max_tokens`` tokens *kept*. ``info`` receives what the
    manifest records: files, digest of the records' token ids, n, records, windows seen / dropped (first pass).

    Every rank reads the whole stream, excluded and cut as one process from window 0 would (so the ``--tokens`` cut
    and the counts are those of one uninterrupted process, whatever the ranks or a resume), then takes its own
    windows from ``skip_windows`` on, in batches of ``config.batch_size``."""
    from ..data import EXCLUDE_NGRAM, exclude_overlapping
    from ..evaluate.records import load_records
    from ..identity import json_digest

    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    records = []
    for path in config.exclude:
        try:
            loaded = load_records(path, tokenizer, vocab_size=vocab)
        except ValueError:
            raise UserError(f"--exclude {path}: text records need the model's tokenizer; give token-id records "
                            "(prefix_ids/suffix_ids) or the model by name") from None
        records += [[t for t in r.prefix_ids + r.suffix_ids if t not in special] for r in loaded]
    info.update(files=[str(f) for f in config.exclude], digest=json_digest(records), n=EXCLUDE_NGRAM,
                records=len(records), windows_seen=0, windows_dropped=0)
    calls = []

    def excluded(skip_windows: int, shard: tuple[int, int]):
        calls.append(True)
        first, seen, kept = len(calls) == 1, [0], 0
        rank, world = shard
        pending: list[dict[str, torch.Tensor]] = []  # this rank's windows not yet yielded

        def counted(batches):
            for batch in batches:
                seen[0] += batch["input_ids"].shape[0]
                yield batch

        for batch in take_tokens(exclude_overlapping(counted(source(0, (0, 1))), records), config.max_tokens):
            kept += batch["input_ids"].shape[0]
            if first:
                info.update(windows_seen=seen[0], windows_dropped=seen[0] - kept)
            index = batch.get("window_index")
            if index is None:
                if skip_windows or world > 1:
                    raise UserError("resuming or several ranks need the data as a source string or a BatchSource "
                                    "callable (batches with window_index)")
                yield batch
                continue
            mine = ((index >= skip_windows) & (index % world == rank)).nonzero().flatten()
            if len(mine) == len(index) or (world == 1 and len(mine)):
                yield {key: value[mine] for key, value in batch.items()}
            elif len(mine):  # another rank's windows left out: rebatch this rank's to --batch-size
                pending.append({key: value[mine] for key, value in batch.items()})
                if sum(len(b["input_ids"]) for b in pending) >= config.batch_size:
                    yield {key: torch.cat([b[key] for b in pending]) for key in pending[0]}
                    pending = []
        if pending:
            yield {key: torch.cat([b[key] for b in pending]) for key in pending[0]}

    return excluded


# ---------------------------------------------------------------------------------------------------- partitions
def _find_start(
    config: CollectConfig, passes: list[list[str]], ctx: DistContext, fingerprint: dict[str, Any] | None
) -> tuple[CheckpointState, Factors | None]:
    """Where the run starts (the checkpoint's state, or the beginning); rank 0 reads the checkpoint and tells the
    others; an error reaches every rank."""
    start: CheckpointState | str = CheckpointState(0, passes, 0, 0, 0, dict(fingerprint or {}))
    loaded = None
    if ctx.is_main and config.resume:
        try:
            found = load_checkpoint(config.out, fingerprint, passes)
        except UserError as exc:
            start = str(exc)
        else:
            if found is None:
                log.info("--resume: no checkpoint in %s; starting from the beginning", config.out)
            else:
                loaded, state = found
                resumed = {"pass": state.pass_index, "windows": state.windows, "tokens": state.tokens, "at": state.created}
                start = replace(state, history=[*state.history, resumed], world_size=ctx.world_size)
                log.info(
                    "resuming from checkpoint %d: pass %d of %d, %s windows (%s tokens) already in the sums",
                    state.sequence, state.pass_index + 1, len(passes), f"{state.windows:,}", f"{state.tokens:,}",
                )  # fmt: skip
    start = broadcast_object(ctx, start, what="sharing the resume point")
    if isinstance(start, str):
        raise UserError(start)
    return start, loaded


def _collect_partitions(
    model: nn.Module,
    projections: Sequence[Projection],
    batches: BatchSource,
    config: CollectConfig,
    ctx: DistContext,
    fingerprint: dict[str, Any] | None,
) -> Factors | None:
    """The sum of the partial factors of every pass (rank 0; ``None`` elsewhere). Writes only checkpoints."""
    from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

    started = time.perf_counter()
    passes = plan_passes(projections, config.layers_per_pass)
    pass_names = [[p.name for p in group] for group in passes]
    start, loaded = _find_start(config, pass_names, ctx, fingerprint)
    done = Factors()  # the finished passes, on the CPU (rank 0 only)
    if loaded is not None:
        done = loaded.subset(n for group in pass_names[: start.pass_index] for n in group).to("cpu")
    tokens_per_step = config.seq_len * config.batch_size * ctx.world_size
    steps_per_checkpoint = math.ceil(config.checkpoint_every / tokens_per_step) if config.checkpoint_every else None
    state = start

    def checkpoint(current: Factors, **position: int) -> None:
        nonlocal state
        state = replace(state, **position, sequence=state.sequence + 1, world_size=ctx.world_size,
                        batch_size=config.batch_size, created=utc_timestamp())  # fmt: skip
        t0 = time.perf_counter()
        held = Factors({**done.modules, **current.modules}, {"checkpoint_of": "kfac-edit collect"})
        path = save_checkpoint(config.out, held, state)
        log.info("checkpoint %s (%d windows, %d tokens) in %.1f s", path, state.windows, state.tokens,
                 time.perf_counter() - t0)  # fmt: skip

    manifest: dict[str, Any] | None = None
    for pass_index in range(start.pass_index, len(passes)):
        group = passes[pass_index]
        resumed = pass_index == start.pass_index
        position, tokens, labelled = (start.windows, start.tokens, start.labelled_tokens) if resumed else (0, 0, 0)
        partial = None
        if resumed and position and loaded is not None:  # the checkpointed part of this pass, back on its devices
            partial = loaded.subset(pass_names[pass_index]).to({p.name: p.module.weight.device for p in group})
        collector = FactorCollector(model, group, config.labels, config.seed, factors=partial, start_window=position)
        seen = (0, 0)  # this rank's tokens / labelled tokens at the last meeting
        bar = tqdm(
            total=config.max_tokens, initial=tokens, unit="tok", unit_scale=True,
            desc=f"pass {pass_index + 1}/{len(passes)}" if len(passes) > 1 else "collecting factors",
            disable=None if (config.progress and ctx.is_main) else True,
        )  # fmt: skip
        with bar, collector:
            stream = iter(batches(position, (ctx.rank, ctx.world_size)))
            exhausted = False
            while True:
                batch = None if exhausted else next(stream, None)
                exhausted = batch is None
                if batch is not None:
                    before = collector.tokens
                    collector.accumulate(batch)
                    bar.update((collector.tokens - before) * ctx.world_size)
                    if steps_per_checkpoint is None or collector.steps % steps_per_checkpoint:
                        continue
                # a meeting: a checkpoint step of a rank with data, or a rank whose shard is exhausted
                any_active, windows = all_reduce_ints(
                    ctx, [int(not exhausted), collector.windows], "max", what="status exchange"
                )
                since = [collector.tokens - seen[0], collector.labelled_tokens - seen[1]]  # this rank's, since the last
                new = reduce_factors_to_main(ctx, collector.symmetrize(), since)
                seen = (collector.tokens, collector.labelled_tokens)
                tokens, labelled = tokens + new[0], labelled + new[1]
                bar.n = tokens
                bar.refresh()
                if not any_active:
                    break
                if config.checkpoint_every and ctx.is_main:
                    checkpoint(collector.factors, pass_index=pass_index, windows=windows, tokens=tokens,
                               labelled_tokens=labelled)  # fmt: skip
        if ctx.is_main:
            if labelled == 0:
                raise UserError("no token with a label was seen (every window was padding); give the run more text")
            manifest = {**collector.manifest(), "tokens": tokens, "labelled_tokens": labelled, "windows": windows}
            done.modules.update(collector.symmetrize().to("cpu").modules)  # passes hold disjoint modules: sum = union
            if config.checkpoint_every and pass_index + 1 < len(passes):
                checkpoint(Factors(), pass_index=pass_index + 1, windows=0, tokens=0, labelled_tokens=0)
        collector.factors = Factors()  # free this pass's device memory

    if not ctx.is_main:
        return None
    if manifest is None:  # resumed a checkpoint written after the last pass: nothing left to read
        raise UserError(f"the checkpoint in {config.out} is already complete; pass --overwrite to collect again")
    done.manifest.update(
        manifest,
        **describe_projections(projections),
        world_size=ctx.world_size,
        passes=len(passes),
        layers_per_pass=config.layers_per_pass,
        checkpoint_every=config.checkpoint_every,
        resumed=start.history,
        seconds=round(time.perf_counter() - started, 3),
    )
    done.check_finite()
    done.modules = {p.name: done.modules[p.name] for p in projections}  # in the order they were asked for
    return done
