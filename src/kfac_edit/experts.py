"""Mixture-of-experts MLPs: each routed expert's ``gate``, ``up`` and ``down`` as a projection of its own.

In the installed transformers (5.x) the experts of a block are one module (``OlmoeExperts``, ``MixtralExperts``,
``Qwen2MoeExperts``, ``Qwen3MoeExperts``, at ``mlp.experts``) holding fused 3-D parameters: ``gate_up_proj``
``(E, 2I, d)`` (expert ``e``'s gate is rows ``[0, I)`` of ``gate_up_proj[e]``, its up rows ``[I, 2I)``: the
``is_concatenated`` layout, ``(out, in)`` as ``nn.Linear`` stores them) and ``down_proj`` ``(E, d, I)``. The module
is called as ``experts(hidden (N, d), top_k_index (N, k), top_k_weights (N, k))``: every token goes through its ``k``
experts, ``act(gate)·up`` (the module's ``_apply_gate``), down, times its routing weight, summed.

:class:`ExpertWeight` is a view of one expert's matrix (what :class:`~kfac_edit.models.Projection` edits in place).
:func:`tap_experts` replaces, while factors are collected, the module's forward by the same computation done expert
by expert with ``F.linear`` on the expert's views (the gating is the module's own ``_apply_gate``), so that each
expert's input rows and output gradients can be read. Expert projections are named ``<experts module>.<e>.<kind>``,
e.g. ``model.layers.3.mlp.experts.5.gate`` (not modules: :func:`expert_weight` resolves them). The router
(``mlp.gate``) is never edited; a shared expert (Qwen2-MoE ``mlp.shared_expert``) is an ordinary MLP of the block.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


def fused_rows(experts: nn.Module, kind: str) -> tuple[str, slice]:
    """``(fused parameter name, rows of expert e's matrix in it)`` for ``kind``: gate ``[0, I)`` and up ``[I, 2I)``
    of ``gate_up_proj[e]`` (also the columns of ``x W_guᵀ``), down all of ``down_proj[e]``."""
    if kind == "down":
        return "down_proj", slice(None)
    inter = experts.gate_up_proj.shape[1] // 2
    return "gate_up_proj", slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)


class ExpertWeight:
    """One expert's ``gate``, ``up`` or ``down`` matrix as ``weight`` ``(out, in)``: a view into the fused parameter."""

    bias = None

    def __init__(self, experts: nn.Module, expert: int, kind: str):
        self.experts, self.expert, self.kind = experts, int(expert), kind

    @property
    def weight(self) -> torch.Tensor:
        fused, rows = fused_rows(self.experts, self.kind)
        return getattr(self.experts, fused)[self.expert, rows]


def check_experts(experts: nn.Module, where: str) -> int:
    """The number of experts of a supported experts module; :class:`UserError` naming what is not supported."""
    cls = type(experts).__name__
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise UserError(
            f"{cls} at {where} does not hold fused 3-D gate_up_proj and down_proj parameters; kfac-edit reads "
            "experts in that layout only"
        )
    for flag, wanted in (("has_gate", True), ("is_concatenated", True), ("is_transposed", False),
                         ("has_bias", False), ("has_post_expert_norm", False)):  # fmt: skip
        if getattr(experts, flag, wanted) != wanted:
            raise UserError(
                f"{cls} at {where} has {flag}={not wanted}; kfac-edit's per-expert factors support the [gate; up] "
                "(out, in) layout without bias or post-expert norm only"
            )
    if not callable(getattr(experts, "_apply_gate", None)):
        raise UserError(f"{cls} at {where} has no _apply_gate (act(gate)·up); this transformers version is not supported")
    if not gate_up.is_floating_point():
        raise UserError(f"{cls} at {where} holds quantized weights; kfac-edit edits float weights")
    return int(gate_up.shape[0])


def expert_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``(out, in)`` view of the expert projection ``name`` (``<experts module>.<e>.<kind>``)."""
    path, expert, kind = name.rsplit(".", 2)
    return ExpertWeight(model.get_submodule(path), int(expert), kind).weight


def tap_experts(experts: nn.Module, active: Callable[[], bool], on_expert: Callable) -> SimpleNamespace:
    """Run ``experts`` expert by expert and call ``on_expert(e, x, gate_up_out, h, down_out, token_positions)``
    for every expert with routed tokens, while ``active()``; otherwise its own forward runs unchanged. The returned
    handle's ``remove()`` puts the class's forward back.

    ``x`` are the rows of the tokens routed to ``e`` (``hidden[token_positions]``), ``gate_up_out = x W_guᵀ``,
    ``h = _apply_gate(gate_up_out)`` (the input of down) and ``down_out = h W_downᵀ``, before the routing weight
    multiplies it (so the gradient w.r.t. ``down_out`` carries the routing weight, as the model computes it).
    """
    own_forward = type(experts).forward

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if not active():
            return own_forward(experts, hidden, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        for e in range(experts.gate_up_proj.shape[0]):
            token_positions, slot = torch.where(top_k_index == e)
            if token_positions.numel() == 0:
                continue
            x = hidden[token_positions]
            gate_up_out = F.linear(x, experts.gate_up_proj[e])
            h = experts._apply_gate(gate_up_out)
            down_out = F.linear(h, experts.down_proj[e])
            on_expert(e, x, gate_up_out, h, down_out, token_positions)
            weighted = down_out * top_k_weights[token_positions, slot, None]
            out.index_add_(0, token_positions, weighted.to(out.dtype))
        return out

    experts.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    return SimpleNamespace(remove=lambda: experts.__dict__.pop("forward", None))
