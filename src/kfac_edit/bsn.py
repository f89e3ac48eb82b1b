"""BalancedSubnet (``--method bsn``): the supervised unlearning baseline of Sakarvadia et al., "Mitigating
Memorization in Language Models" (ICLR 2025), written for any model :mod:`kfac_edit.models` can edit.

The method, as that paper describes it:

* every chosen weight ``W`` (a projection of :func:`~kfac_edit.models.find_projections`; any layout) is frozen and
  gets a score ``s`` of its shape, uniform in ``±1/sqrt(fan_in)`` (PyTorch's Kaiming-uniform with ``a = √5``);
* the mask ``M`` zeroes the ``ratio`` share of the entries with the smallest ``|s|``; the forward pass uses
  ``W ⊙ M``; the gradient reaches ``s`` straight through the top-k (``∂M/∂|s| := 1``);
* the scores are learned by SGD with momentum on ``−(1 − α)·L_forget + α·L_clean``, ``L`` the mean next-token
  cross-entropy of each sequence averaged over a batch's sequences; forget sequences are the memorized records to
  remove (prefix + suffix), clean ones ordinary text, shuffled together (one epoch = one pass over both);
* the final edit is ``W' = W ⊙ M`` (the pruned entries are exactly zero).

For ``bsn`` the per-projection value of the layers JSON (``keep_mass``) is the share of entries kept:
``ratio = 1 − keep_mass``, so a sweep grids over it like over keep_mass (``--keep-mass bsn=0.9,0.95,0.99``); the
paper's ratios below 1e-4 are ``keep_mass >= 0.9999``, which edits nothing here. :class:`BsnConfig` defaults are the
reference implementation's (``do_random_greedy`` of msakarvadia/memorization).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import UserError
from .experts import fused_rows

log = logging.getLogger(__name__)


@dataclass
class BsnConfig:
    """Hyper-parameters of BalancedSubnet (defaults: the reference implementation's)."""

    epochs: int = field(default=5, metadata={"help": "passes over the forget + clean sequences"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the scores"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay of the scores"})
    batch_size: int = field(default=64, metadata={"help": "sequences per step (forget and clean shuffled together)"})
    loss_weight: float = field(
        default=0.05, metadata={"help": "α of the loss −(1−α)·L_forget + α·L_clean (weight of the clean loss)"}
    )
    clean_seq_len: int = field(default=128, metadata={"help": "tokens per window of the clean text"})
    max_clean_tokens: int | None = field(
        default=None, metadata={"help": "read at most this many tokens of clean text (default: all of it)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the score initialization and the batch order"})

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--bsn-epochs {self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"--bsn-batch-size {self.batch_size} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--bsn-lr {self.lr} must be a positive number, e.g. 0.1")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"--bsn-momentum {self.momentum} is outside [0, 1)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserError(f"--bsn-weight-decay {self.weight_decay} must be at least 0")
        if not 0.0 <= self.loss_weight <= 1.0:
            raise UserError(f"--bsn-loss-weight {self.loss_weight} is outside [0, 1]; e.g. 0.05")
        if self.clean_seq_len < 2:
            raise UserError(f"--bsn-clean-seq-len {self.clean_seq_len} is too short; use at least 2")
        if self.max_clean_tokens is not None and self.max_clean_tokens < 2:
            raise UserError(f"--bsn-max-clean-tokens {self.max_clean_tokens} is too small; use at least 2")


@dataclass
class BsnData:
    """The sequences BalancedSubnet learns from: token ids (lists, any length >= 2) of each forget record
    (``prefix_ids + suffix_ids``) and of each clean window."""

    forget: list[list[int]]
    clean: list[list[int]]

    def __post_init__(self) -> None:
        if not self.forget:
            raise UserError("method bsn needs forget records: give --forget FILE (memorized records to remove)")
        if not self.clean:
            raise UserError("method bsn needs clean text: give --clean-data SOURCE (text whose loss to keep)")
        for name, seqs in (("forget", self.forget), ("clean", self.clean)):
            if any(len(s) < 2 for s in seqs):
                raise UserError(f"a {name} sequence has fewer than 2 tokens; BalancedSubnet needs next-token pairs")


@dataclass
class BsnInputs:
    """What ``apply_edit`` needs for the ``bsn`` method besides the spec: the data and the hyper-parameters."""

    data: BsnData
    config: BsnConfig = field(default_factory=BsnConfig)


def record_key(record) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What identifies a memorized record: its (prefix_ids, suffix_ids) (a :class:`MemRecord` or a JSON dict)."""
    get = record.get if isinstance(record, dict) else lambda k: getattr(record, k)
    return tuple(get("prefix_ids")), tuple(get("suffix_ids"))


def check_disjoint(forget: Iterable, heldout: Iterable, where: str = "--forget") -> None:
    """:class:`UserError` when a forget record is also a held-out record (the held-out part would not be held out)."""
    held = {record_key(r) for r in heldout}
    overlap = sum(1 for r in forget if record_key(r) in held)
    if overlap:
        raise UserError(f"{where} shares {overlap} record(s) with the held-out records; BSN may only see the selection "
                        "part: drop them from the forget set")


def load_bsn_data(forget: str | Sequence, clean: str | Iterable[str], tokenizer, config: BsnConfig,
                  vocab_size: int | None = None, context: int | None = None) -> BsnData:
    """:class:`BsnData` from a forget set (a records file, or records: :class:`MemRecord` s or JSON dicts with
    token ids) and a clean-text SOURCE (or an iterable of documents), packed in ``config.clean_seq_len`` windows.
    ``context``: the model's context length (:func:`~kfac_edit.models.model_limits`); longer sequences are refused."""
    from .data import token_batches
    from .evaluate.records import load_records

    if context is not None and config.clean_seq_len > context:
        raise UserError(f"--bsn-clean-seq-len {config.clean_seq_len} exceeds the model's context of {context} "
                        f"positions; use at most {context}")

    if isinstance(forget, (str, bytes)) or hasattr(forget, "__fspath__"):
        records = load_records(forget, tokenizer=tokenizer, vocab_size=vocab_size)
    else:
        records = list(forget)
    forget_ids = [list(p) + list(s) for p, s in map(record_key, records)]
    longest = max(map(len, forget_ids), default=0)
    if context is not None and longest > context:
        raise UserError(f"a forget record of {longest} tokens (prefix + suffix) exceeds the model's context of "
                        f"{context} positions; use shorter records")
    clean_ids: list[list[int]] = []
    for batch in token_batches(clean, tokenizer, config.clean_seq_len, 256, max_tokens=config.max_clean_tokens):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            if n >= 2:
                clean_ids.append(ids[:n].tolist())
    return BsnData(forget_ids, clean_ids)


class _TopKMask(torch.autograd.Function):
    """Forward: 0 for the ``n_drop`` smallest scores, 1 elsewhere. Backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, n_drop: int) -> torch.Tensor:
        mask = torch.ones_like(scores)
        if n_drop > 0:
            idx = torch.argsort(scores.flatten(), stable=True)[:n_drop]
            mask.view(-1)[idx] = 0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def mask_of(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The mask of ``scores`` keeping the ``keep`` share of entries with the largest ``|s|`` (differentiable, STE).

    ``int((1 − keep)·numel)`` entries are dropped, as in the reference (a share too small to drop one entry drops
    none)."""
    n_drop = int((1.0 - keep) * scores.numel() + 1e-9)
    return _TopKMask.apply(scores.abs(), n_drop)


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the mean next-token cross-entropy over its real tokens: (B,) from logits (B, T, V)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    weight = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return (nll * weight).sum(1) / weight.sum(1).clamp_min(1)


def learn_masks(model: nn.Module, targets: Sequence[tuple], data: BsnData, config: BsnConfig,
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Learn the BalancedSubnet masks of ``targets`` (``(Projection, keep)`` pairs, ``keep`` = share of entries kept)
    jointly on ``data``; returns ``{module name: mask}`` (0/1, in the layout of the module's own ``weight``).

    The model is not changed (the masked weights enter the forward pass through ``torch.func.functional_call``);
    its parameters' ``requires_grad`` and train/eval mode are put back on return.
    """
    from torch.func import functional_call

    from .data import pad_right
    from .progress import progress_bar as tqdm

    config.validate()
    if not targets:
        return {}
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(config.seed))
    weights, scores, keeps = {}, {}, {}
    for proj, keep in targets:
        w = weights[proj.name] = proj.module.weight.detach()  # an expert's: its (out, in) view of the fused tensor
        bound = 1.0 / math.sqrt(proj.shape[1])  # fan_in: W is (out, in)
        s = (torch.rand(w.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        scores[proj.name] = s.to(device).requires_grad_(True)
        keeps[proj.name] = float(keep)
    # functional_call(strict=False) would ignore a name that is not a parameter
    unknown = {_parameter_name(p) for p, _ in targets} - {n for n, _ in model.named_parameters()}
    if unknown:
        raise RuntimeError(f"bsn: no model parameter named {sorted(unknown)[0]}")
    optimizer = torch.optim.SGD(list(scores.values()), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    examples = [(s, True) for s in data.forget] + [(s, False) for s in data.clean]
    n_steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    alpha = config.loss_weight
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the masks, not noise, should change the loss
    bar = tqdm(total=n_steps, desc="bsn masks", unit="step", disable=None if progress is None else not progress)
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for start in range(0, len(order), config.batch_size):
                chunk = [examples[i] for i in order[start : start + config.batch_size]]
                ids, mask = (t.to(device) for t in pad_right([s for s, _ in chunk]))  # padding: masked out
                is_forget = torch.tensor([f for _, f in chunk], device=device)
                masked = _masked_parameters(targets, weights, scores, keeps)
                logits = functional_call(model, masked, args=(), kwargs={"input_ids": ids, "attention_mask": mask},
                                         strict=False).logits
                losses = sequence_losses(logits, ids, mask)
                loss = losses.new_zeros(())
                if is_forget.any():
                    loss = loss - (1 - alpha) * losses[is_forget].mean()
                if (~is_forget).any():
                    loss = loss + alpha * losses[~is_forget].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix_str(f"epoch {epoch + 1} loss {loss.item():.3f}")
    finally:
        bar.close()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        return {name: mask_of(scores[name], keeps[name]).to(torch.bool) for name in scores}


def _parameter_name(proj) -> str:
    """The parameter holding ``proj``'s matrix: its own ``weight``, or a routed expert's fused tensor."""
    if proj.expert is None:
        return f"{proj.name}.weight"
    return f"{proj.name.rsplit('.', 2)[0]}.{fused_rows(proj.module.experts, proj.kind)[0]}"


def _masked_parameters(targets, weights: dict, scores: dict, keeps: dict) -> dict[str, torch.Tensor]:
    """``{parameter name: W ⊙ M}`` for ``torch.func.functional_call``. A routed expert's matrix is a slice of its
    block's fused ``gate_up_proj`` / ``down_proj``: that parameter enters whole, masked where its targets are."""
    masked: dict[str, torch.Tensor] = {}
    for proj, _ in targets:
        pruned = weights[proj.name] * mask_of(scores[proj.name], keeps[proj.name]).to(weights[proj.name].dtype)
        key = _parameter_name(proj)
        if proj.expert is None:
            masked[key] = pruned
            continue
        fused, rows = fused_rows(proj.module.experts, proj.kind)
        if key not in masked:
            masked[key] = getattr(proj.module.experts, fused).detach().clone()
        masked[key][proj.expert, rows] = pruned  # autograd reaches the scores through the slice
    return masked


def masked_weight(proj, mask: torch.Tensor) -> torch.Tensor:
    """``W ⊙ M`` as ``(out, in)`` (``mask`` in the module's own layout, as :func:`learn_masks` returns it)."""
    w = proj.module.weight.detach() * mask.to(proj.module.weight.dtype)
    return w.T if proj.transposed else w
