"""Fingerprints and digests: short hashes that say whether two models, weights, tokenizers or paths are the same.

All are hex prefixes of sha256. They key caches (eigendecompositions, reference top-k, testbeds) and let a resumed
run check that it resumes the same thing (collection checkpoints, sweeps).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

_CONFIG_NOISE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_commit_hash")


def json_digest(obj: Any, length: int = 16) -> str:
    """``length`` hex digits of sha256 over ``obj`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config (architecture and sizes, not its weights), for manifests and cache keys."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None else {"type": type(model).__name__}
    return json_digest({k: v for k, v in d.items() if k not in _CONFIG_NOISE})


def weights_digest(weights: nn.Module | Iterable[tuple[str, torch.Tensor]], length: int = 16) -> str:
    """A short hash of weights: per tensor its name, shape, dtype, fp64 sum and norm, and a strided sample.

    ``weights`` is a model (all its parameters) or ``(name, tensor)`` pairs. Cheap (one read of each weight, no
    copy) and changes when any edit of this package changes a weight.
    """
    named = weights.named_parameters() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in named:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float64).cpu()
            stats = torch.stack([torch.sum(p, dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)])
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(stats.cpu().numpy().tobytes())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:length]


def _exact_bytes(t: torch.Tensor):
    """A tensor's bytes, read without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy() if t.numel() else b""


def tensors_digest(tensors: Iterable[torch.Tensor], extra: str = "", length: int = 24) -> str:
    """A hash of tensors' shapes, dtypes and exact bytes (plus ``extra``, e.g. counts)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(_exact_bytes(t))
    h.update(extra.encode())
    return h.hexdigest()[:length]


def tensor_checksum(t: torch.Tensor) -> str:
    """The full sha256 (hex) of one tensor's exact bytes (factor file checksums)."""
    return hashlib.sha256(_exact_bytes(t)).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary."""
    return json_digest(sorted(tokenizer.get_vocab().items()))


def path_identity(name_or_path: str) -> dict:
    """Identity of a model or data path for cache keys: a local path with its files' sizes and mtimes, or a hub id."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return {"id": name_or_path}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"path": str(path.resolve()), "files": stats}


def model_identity(model: nn.Module) -> dict:
    """Identity of a model held in memory: its source path, config fingerprint and weight digest."""
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "")
    return {"name_or_path": name_or_path, "fingerprint": model_fingerprint(model), "weights": weights_digest(model)}


def data_digest(source: str, text_field: str = "text") -> str | None:
    """For local data: a hash of each file's name, size and first 64 KiB; ``None`` for hub datasets."""
    from .data import _expand, _local_files

    source = _expand(source)
    if source.startswith("hf:"):
        return None
    h = hashlib.sha256()
    root = Path(source).expanduser()
    for file in _local_files(source):
        rel = file.name if root.is_file() else str(file.relative_to(root))
        h.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:24]
