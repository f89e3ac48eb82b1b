"""nDCG@k of a model's next-token ranking against a reference model's, over the positions of a text source.

At each position (a real token of a packed window, padding excluded) the reference's top-k next tokens at rank
``r = 1..k`` carry relevance ``k - r + 1``. The evaluated model's token at rank ``r`` gains that relevance when it
is in the reference top-k (0 otherwise), discounted by ``1 / log2(r + 1)``:

    DCG = sum_r rel(model_r) / log2(r + 1),   IDCG = sum_r (k - r + 1) / log2(r + 1),   nDCG = DCG / IDCG,

averaged over positions. The reference's top-k are computed once and cached on disk under
``$KFAC_EDIT_CACHE/ndcg`` (default ``~/.cache/kfac-edit/ndcg``), keyed by the reference model (path and weight
files, or config fingerprint and weight digest for a model in memory), the tokenizer, the data, k, the window
length and the token budget.
"""

from __future__ import annotations

import json
import math

import torch
from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

from ..data import describe_source, token_batches
from ..constants import NDCG_CACHE
from ..fileio import atomic_path, cache_root
from ..identity import json_digest, model_identity, path_identity, tokenizer_digest

CACHE_VERSION = 1


def ndcg_scores(model_topk: torch.Tensor, reference_topk: torch.Tensor) -> torch.Tensor:
    """Per-position nDCG@k, ``(N,)`` fp64, from ``(N, k)`` token ids ranked best first (see the module docstring)."""
    k = reference_topk.shape[1]
    if model_topk.shape != reference_topk.shape:
        raise ValueError(f"top-k shapes differ: {tuple(model_topk.shape)} vs {tuple(reference_topk.shape)}")
    relevance = torch.arange(k, 0, -1, dtype=torch.float64, device=reference_topk.device)  # rank r -> k - r + 1
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=reference_topk.device))
    match = model_topk[:, :, None] == reference_topk[:, None, :]  # (N, model rank, reference rank)
    gains = (match.to(torch.float64) * relevance).sum(-1)  # (N, model rank)
    return (gains * discount).sum(-1) / (relevance * discount).sum()


def cache_key(reference: dict, tokenizer, source: str, k: int, seq_len: int, max_tokens: int | None) -> dict:
    data = describe_source(source)
    return {
        "version": CACHE_VERSION,
        "reference": reference,
        "tokenizer": tokenizer_digest(tokenizer),
        "data": data if data.startswith("hf:") else path_identity(data),
        "k": k,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
    }


def _topk_batches(model, tokenizer, source: str, k: int, seq_len: int, max_tokens: int | None, rows: int, desc):
    """Per batch of packed windows, the model's top-k next-token ids at its real positions, ``(n, k)``."""
    device = next(model.parameters()).device
    with tqdm(total=max_tokens, desc=desc, unit="tok", unit_scale=True, disable=None if desc else True, leave=False) as bar:
        for batch in token_batches(source, tokenizer, seq_len=seq_len, batch_size=rows, max_tokens=max_tokens):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            yield model(input_ids=ids, attention_mask=mask).logits.topk(k, dim=-1).indices[mask.bool()]
            bar.update(int(mask.sum()))


@torch.inference_mode()
def topk_over_source(
    model: torch.nn.Module,
    tokenizer,
    source: str,
    k: int,
    seq_len: int,
    max_tokens: int | None,
    rows: int = 16,
    desc: str | None = "reference top-k",
) -> torch.Tensor:
    """The model's top-k next-token ids at every real position of the packed windows, ``(N, k)`` int32 on CPU."""
    batches = _topk_batches(model, tokenizer, source, k, seq_len, max_tokens, rows, desc)
    chunks = [top.to(torch.int32).cpu() for top in batches]
    return torch.cat(chunks) if chunks else torch.zeros((0, k), dtype=torch.int32)


def reference_topk(
    reference,
    tokenizer,
    source: str,
    k: int = 10,
    seq_len: int = 1024,
    max_tokens: int | None = 200_000,
    rows: int = 16,
    reference_identity: dict | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """The reference top-k ``(N, k)``, read from the disk cache or computed and cached.

    Args:
        reference: the reference model, or a zero-argument callable returning it (loaded only on a cache miss).
        reference_identity: the cache identity of the reference (:func:`~kfac_edit.identity.path_identity` of its directory);
            defaults to :func:`~kfac_edit.identity.model_identity` of the model (which needs it loaded).
    """
    from safetensors.torch import load_file, save_file

    if reference_identity is None:
        if callable(reference) and not isinstance(reference, torch.nn.Module):
            reference = reference()
        reference_identity = model_identity(reference)
    key = cache_key(reference_identity, tokenizer, source, k, seq_len, max_tokens)
    key_text = json.dumps(key, sort_keys=True)
    path = cache_root(NDCG_CACHE) / f"{json_digest(key, 24)}.safetensors"
    if use_cache and path.is_file():
        return load_file(path)["topk"]
    if callable(reference) and not isinstance(reference, torch.nn.Module):
        reference = reference()
    topk = topk_over_source(reference, tokenizer, source, k, seq_len, max_tokens, rows)
    if use_cache:
        with atomic_path(path) as tmp:
            save_file({"topk": topk.contiguous()}, str(tmp), metadata={"key": key_text})
    return topk


@torch.inference_mode()
def ndcg_at_k(
    model: torch.nn.Module,
    tokenizer,
    source: str,
    reference: torch.Tensor,
    seq_len: int = 1024,
    max_tokens: int | None = 200_000,
    rows: int = 16,
    desc: str | None = "nDCG",
) -> dict:
    """Mean nDCG@k of ``model`` against the reference top-k ``(N, k)`` from :func:`reference_topk`."""
    k = reference.shape[1]
    total, offset = 0.0, 0
    for top in _topk_batches(model, tokenizer, source, k, seq_len, max_tokens, rows, desc):
        n = top.shape[0]
        ref = reference[offset : offset + n].to(device=top.device, dtype=top.dtype)
        if ref.shape[0] != n:
            raise RuntimeError("the reference top-k cover fewer positions than the data; clear the nDCG cache")
        total += float(ndcg_scores(top, ref).sum())
        offset += n
    if offset != reference.shape[0]:
        raise RuntimeError("the reference top-k cover more positions than the data; clear the nDCG cache")
    return {f"ndcg@{k}": total / offset if offset else math.nan, "positions": offset, "k": k, "seq_len": seq_len}
