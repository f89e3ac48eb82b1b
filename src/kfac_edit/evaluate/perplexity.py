"""Perplexity over blocks of a text source or of a pre-tokenized tensor.

Text is packed into blocks of ``block_size`` tokens (default 112, the reference's setting; see
:func:`kfac_edit.data.token_batches`); each block is scored on its own, and a token counts when it and its label
(the next token of the block) are real (not padding). Two conventions are reported:

* ``perplexity`` = exp(total token loss / number of tokens), over the whole evaluation;
* ``perplexity_batch_mean`` = mean over batches of exp(mean token loss of the batch), the reference's convention
  (it depends on the batch size, which is recorded beside it).

A ``.pt`` file holds a LongTensor of token ids: ``[N, block]`` rows are blocks as they are; a flat ``[T]`` tensor is
cut into blocks of ``block_size`` (the last block right-padded and masked).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from ..progress import progress_bar as tqdm  # a bar on a terminal, log lines in a Slurm log

from ..data import token_batches
from ..errors import UserError, load_failure


def load_token_tensor(path: str | Path, vocab_size: int | None = None) -> torch.Tensor:
    """Read a ``.pt`` tensor of token ids (1-D or 2-D integers), checking the ids against the vocabulary."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise UserError(f"cannot read token tensor '{path}': {load_failure(exc)}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or tensor.is_floating_point():
        raise UserError(f"'{path}' must hold one integer tensor of token ids, [N, block] or flat [T]")
    if tensor.numel() < 2:
        raise UserError(f"token tensor '{path}' holds fewer than 2 tokens; it needs at least one (input, label) pair")
    tensor = tensor.long()
    if vocab_size is not None and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab_size):
        raise UserError(
            f"token tensor '{path}' has ids outside the model's vocabulary (0..{vocab_size - 1}); "
            "it was made with another tokenizer"
        )
    return tensor


def tensor_batches(
    tensor: torch.Tensor, block_size: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of blocks from a token tensor (see the module docstring), stopping after ``max_tokens`` tokens."""
    if tensor.dim() == 1:
        n_blocks = math.ceil(tensor.numel() / block_size)
        blocks = torch.zeros((n_blocks, block_size), dtype=torch.long)
        mask = torch.zeros((n_blocks, block_size), dtype=torch.long)
        blocks.view(-1)[: tensor.numel()] = tensor
        mask.view(-1)[: tensor.numel()] = 1
    else:
        blocks, mask = tensor, torch.ones_like(tensor)
    seen = 0
    for start in range(0, blocks.shape[0], batch_size):
        if max_tokens is not None and seen >= max_tokens:
            break
        ids, m = blocks[start : start + batch_size], mask[start : start + batch_size]
        if max_tokens is not None:  # keep whole blocks up to the budget
            per_block = m.sum(1).cumsum(0)
            keep = int((per_block + seen - m.sum(1) < max_tokens).sum())
            ids, m = ids[:keep], m[:keep]
        seen += int(m.sum())
        yield {"input_ids": ids, "attention_mask": m}


def token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token losses, number of scored tokens) of one batch; accumulated in fp32 (fp64 for fp64 models)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    labels = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    loss = F.cross_entropy(logits[valid].to(acc), labels[valid], reduction="sum")
    return float(loss), int(valid.sum())


@torch.inference_mode()
def perplexity_metrics(
    model: torch.nn.Module,
    tokenizer,
    source: str,
    block_size: int = 112,
    batch_size: int = 32,
    max_tokens: int | None = 200_000,
    desc: str | None = "perplexity",
) -> dict:
    """Both perplexity conventions (see the module docstring) over a SOURCE or a ``.pt`` token tensor."""
    if block_size < 2:
        raise UserError(f"--ppl-block {block_size} is too short; use at least 2")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    if str(source).endswith(".pt"):
        batches = tensor_batches(load_token_tensor(source, vocab), block_size, batch_size, max_tokens)
    else:
        batches = token_batches(source, tokenizer, seq_len=block_size, batch_size=batch_size, max_tokens=max_tokens)
    total_loss, total_tokens, batch_ppls, n_blocks, width = 0.0, 0, [], 0, block_size
    with tqdm(total=max_tokens, desc=desc, unit="tok", unit_scale=True, disable=None if desc else True, leave=False) as bar:
        for batch in batches:
            loss, count = token_losses(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            n_blocks += batch["input_ids"].shape[0]
            width = batch["input_ids"].shape[1]
            if count == 0:
                continue
            total_loss += loss
            total_tokens += count
            batch_ppls.append(math.exp(loss / count))
            bar.update(int(batch["attention_mask"].sum()))
    if total_tokens == 0:
        raise UserError(f"perplexity data '{source}' gives no scored tokens; give more text or a longer block")
    return {
        "perplexity": math.exp(total_loss / total_tokens),
        "perplexity_batch_mean": sum(batch_ppls) / len(batch_ppls),
        "mean_loss": total_loss / total_tokens,
        "tokens": total_tokens,
        "blocks": n_blocks,
        "batches": len(batch_ppls),
        "block_size": width,
        "batch_size": batch_size,
    }
