"""Checkpoints of a factor collection: the sums so far and where in the data stream it is.

A checkpoint ``OUT/checkpoint/ckpt-NNNNNN/`` holds ``factors.safetensors`` + ``manifest.json`` (every module
collected so far, finished passes and the pass in progress, in their accumulation dtype) and ``state.json``
(:class:`CheckpointState`: the pass in progress, the windows of the packed stream it has consumed over all ranks
(``0 .. windows-1`` are in the sums, none after), their tokens, the run's configuration fingerprint, and the tensor
file's size and run id). It is written into a hidden temporary directory and renamed into place, then older ones
are deleted: a process killed at any moment leaves the previous checkpoint or the new one, never half of one.

:func:`load_checkpoint` refuses, saying why, a damaged checkpoint or one that another configuration made (other
weights, data or options). The batch size, the number of ranks and ``--tokens`` may change between a run and its
resumption (sampled labels depend only on the seed and a window's index in the stream).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..constants import CHECKPOINT_DIR, STATE_FILE, TENSORS_FILE
from ..errors import UserError, first_line
from ..fileio import atomic_dir, utc_timestamp, write_json
from ..identity import data_digest, model_fingerprint, weights_digest
from ..models import Projection
from .store import Factors

log = logging.getLogger(__name__)

STATE_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{6,})$")

# Fingerprint entries that are no option, as messages name them (an option is named by its flag: --seed, --data)
FINGERPRINT_LABELS = {
    "model_fingerprint": "model architecture (config hash)",
    "weights_digest": "model weights",
    "modules": "collected modules (--layers/--projections/--modules)",
    "data_digest": "data content (file sizes and first bytes)",
}
FINGERPRINT_OPTIONS = ("layers_per_pass", "labels", "seed", "seq_len", "text_field")  # CollectConfig fields


# ---------------------------------------------------------------------------------------------------- fingerprint
def run_fingerprint(model: nn.Module, projections: Sequence[Projection], config: Any, data: str | None) -> dict[str, Any]:
    """Everything of a collection (``config``: its :class:`~kfac_edit.factors.collect.CollectConfig`) that changes
    the factors, in the order differences are reported; ``data=None``: batches given in Python (not fingerprinted)."""
    from ..data import describe_source

    fingerprint = {
        "model_fingerprint": model_fingerprint(model),
        "weights_digest": weights_digest((p.name, p.module.weight) for p in projections),
        "dtype": str(projections[0].module.weight.dtype).removeprefix("torch.") if projections else None,
        "modules": [p.name for p in projections],
        **{name: getattr(config, name) for name in FINGERPRINT_OPTIONS},
        "data": describe_source(data) if data is not None else None,
        "data_digest": data_digest(data, config.text_field) if data is not None else None,
    }
    if config.exclude:  # a resume must exclude the same records
        fingerprint["exclude"] = [data_digest(f) for f in config.exclude]
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out = []
    for key in [*current, *(k for k in saved if k not in current)]:
        a, b = saved.get(key), current.get(key)
        if a == b or (key == "weights_digest" and saved.get("modules") != current.get("modules")):
            continue  # the weights digest covers the collected modules only
        label = FINGERPRINT_LABELS.get(key) or "--" + key.replace("_", "-")
        if key == "modules":
            a, b = a or [], b or []
            first_only = [next((f"{m} {where} only" for m in x if m not in y), None)
                          for x, y, where in ((a, b, "in the checkpoint"), (b, a, "now"))]
            detail = ", ".join(d for d in first_only if d) or "in another order"
            out.append(f"{label}: {len(a)} modules in the checkpoint, {len(b)} now ({detail})")
        elif key.endswith(("_digest", "_fingerprint")):
            out.append(f"{label} differ")
        else:
            out.append(f"{label}: {a!r} in the checkpoint, {b!r} now")
    return out


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class CheckpointState:
    """Where a collection stands. ``windows``: packed windows of the stream consumed in pass ``pass_index``."""

    pass_index: int
    passes: list[list[str]]
    windows: int
    tokens: int
    labelled_tokens: int
    fingerprint: dict[str, Any]
    sequence: int = 0
    world_size: int = 1
    batch_size: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier resumes of this run
    created: str = field(default_factory=utc_timestamp)
    run_id: str | None = None
    tensors_bytes: int | None = None
    version: int = STATE_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointState":
        """The state ``asdict`` wrote (unknown keys ignored; a missing one is a ``TypeError``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (hidden temporary directories of a killed write excluded)."""
    found = (p for p in checkpoint_root(out_dir).glob("ckpt-*") if p.is_dir() and _NAME.match(p.name))
    return sorted(found, key=lambda p: int(p.name.removeprefix("ckpt-")))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    return (list_checkpoints(out_dir) or [None])[-1]


def save_checkpoint(out_dir: str | os.PathLike, factors: Factors, state: CheckpointState) -> Path:
    """Write checkpoint ``state.sequence`` atomically under ``OUT/checkpoint/`` and delete the older ones."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"ckpt-{state.sequence:06d}"
    with atomic_dir(target) as tmp:
        factors.save(tmp, keep_dtype=True)
        state.run_id = factors.manifest["run_id"]
        state.tensors_bytes = (tmp / TENSORS_FILE).stat().st_size
        write_json(tmp / STATE_FILE, asdict(state))
    for old in [*list_checkpoints(out_dir), *root.glob(".ckpt-*.tmp")]:  # older ones, and what killed writes left
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint %s: pass %d, %d windows", target, state.pass_index, state.windows)
    return target


def remove_checkpoints(out_dir: str | os.PathLike) -> None:
    shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)


def load_checkpoint(
    out_dir: str | os.PathLike, fingerprint: dict[str, Any] | None = None, passes: list[list[str]] | None = None
) -> tuple[Factors, CheckpointState] | None:
    """The latest checkpoint in ``out_dir`` (``None`` when there is none); a :class:`UserError` saying why when it
    is damaged, or when ``fingerprint`` or ``passes`` (of the run about to resume) differ from its own."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    start_over = f"delete {checkpoint_root(out_dir)} or pass --overwrite to start over"

    def corrupt(why: str) -> UserError:
        return UserError(f"checkpoint {path} is damaged: {why}; {start_over}")

    try:
        state = CheckpointState.from_dict(json.loads((path / STATE_FILE).read_text()))
    except FileNotFoundError:
        raise corrupt(f"{STATE_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:  # not an object
        raise corrupt(f"{STATE_FILE} is unreadable ({first_line(exc)})") from None
    if state.version != STATE_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {state.version}, this kfac-edit reads {STATE_VERSION}; {start_over}"
        )
    tensors = path / TENSORS_FILE
    if not tensors.exists():
        raise corrupt(f"{TENSORS_FILE} is missing")
    size = tensors.stat().st_size
    if state.tensors_bytes is not None and size != state.tensors_bytes:
        raise corrupt(f"{TENSORS_FILE} has {size} bytes, {state.tensors_bytes} were written")
    if fingerprint is not None:
        diffs = fingerprint_differences(state.fingerprint, fingerprint)
        if diffs:
            raise UserError(
                f"checkpoint {path} belongs to another run ({'; '.join(diffs)}); resume with the options it was made "
                f"with, or {start_over}"
            )
    try:
        factors = Factors.load(path)  # checksums and sanity (finite, symmetric, PSD diagonal) checked
    except Exception as exc:  # its UserError, or an OSError
        why = str(exc).split(";")[0] if isinstance(exc, UserError) else f"{TENSORS_FILE} cannot be read ({first_line(exc)})"
        raise corrupt(why) from None
    if factors.manifest.get("run_id") != state.run_id:
        raise corrupt(f"{STATE_FILE} and {TENSORS_FILE} come from different writes")
    held = state.passes[: state.pass_index + (1 if state.windows else 0)]  # a pass not yet started holds nothing
    expected = {n for group in held for n in group}
    if set(factors.names) != expected:
        raise corrupt(f"it holds {len(factors.names)} modules, its state says {len(expected)}")
    if passes is not None and state.passes != passes:
        raise UserError(f"checkpoint in {out_dir} splits the modules into other passes; use the same --layers-per-pass")
    return factors, state
