"""Hooks and accumulation: K-FAC factor sums of MLP projections, one batch at a time (:class:`FactorCollector`);
a whole collection (passes, checkpoints, ranks) is :func:`kfac_edit.factors.collect.collect_factors`.

Conventions (stated here once): a projection's weight ``W`` is ``(out, in)``;

* ``A = Σ a aᵀ`` over rows ``a`` of the layer input, shape ``(in, in)`` (``[a; 1]`` for a biased projection under
  ``bias="joint"``, :attr:`Projection.homogeneous`);
* ``G = Σ g gᵀ`` over rows ``g`` of the gradient of the **summed** token loss w.r.t. the layer output,
  shape ``(out, out)``; the Fisher block of ``W`` is ``G ⊗ A``;
* rows counted ("valid" positions): ``t`` with ``attention_mask[t] == 1`` and ``attention_mask[t + 1] == 1``, the
  positions that have a label. The loss is a sum over them, so the factors depend on neither batch size nor padding.

Labels: ``gold`` is the next token (empirical Fisher); ``sampled`` draws each label from the model's softmax (true
Fisher) by inverse CDF of a uniform seeded by ``(seed, window index, position)``: a window's labels do not depend on
batch size, padding, shard or resume point.

One step (:meth:`FactorCollector.accumulate`): a forward pass whose hooks add each projection's valid input rows to
``A`` (``gate`` and ``up`` of a block read one input: one activation key, :func:`activation_keys`, one ``A``) and
hook its output; the summed cross-entropy against the labels; ``torch.autograd.grad`` of it w.r.t. the outputs of
the lowest chosen block (no weight gradients, nothing below that block), during which each output's gradient hook
adds its valid rows to ``G``. Routed experts (:mod:`kfac_edit.experts`) have no module to hook: their experts
module runs tapped, and expert ``e``'s ``A``/``G`` take the labelled rows routed to it, counted per expert.

Sums are fp32 (fp64 for an fp64 model); bf16/fp16 rows enter fp32 products (on CUDA a GEMM with fp32 output, exact
for the products; elsewhere the rows are cast to fp32 first).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..fileio import utc_timestamp
from ..identity import model_fingerprint
from ..models import PROJECTIONS, Projection
from ..spec import LabelMode
from .store import Factors, ModuleFactors

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SAMPLE_CHUNK_ELEMENTS = 1 << 27  # rows x vocab handled at once when sampling labels (512 MiB in fp32)


@functools.cache
def _mixed_gemm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` works for ``dtype`` inputs on ``device`` (checked once)."""
    try:
        rows = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        total = torch.ones(48, 48, device=device)
        torch.addmm(total, rows.T, rows, out_dtype=torch.float32, out=total)
        exact = rows.double()  # bf16/fp16 products are exact in fp32; compare with an fp64 reference
        ok = bool(torch.allclose(total, (1 + exact.T @ exact).float(), rtol=1e-5, atol=1e-5))
    except (RuntimeError, TypeError):  # an older torch without out_dtype, or an unsupported backend
        ok = False
    log.debug("mixed-precision GEMM for %s on %s: %s", dtype, device, ok)
    return ok


GRAM_ROW_BLOCKS = 8  # a symmetric Gram update is done as this many row blocks, each from the diagonal rightwards


def add_gram(total: torch.Tensor, rows: torch.Tensor, upper: bool = False) -> None:
    """``total += rowsᵀ rows`` in place (``rows`` ``(n, d)``, ``total`` ``(d, d)``), products and sums in ``total``'s
    dtype (never in low precision). ``upper``: only the blocks on and above the diagonal of a ``GRAM_ROW_BLOCKS``
    square block partition (9/16 of the products, one GEMM per row block); :func:`mirror_upper_` fills the rest."""
    low = rows.dtype in (torch.bfloat16, torch.float16)
    if low and rows.is_cuda and total.dtype == torch.float32 and _mixed_gemm_ok(rows.device, rows.dtype):
        torch.addmm(total, rows.T, rows, out_dtype=torch.float32, out=total)  # bf16/fp16 in, fp32 out: the full Gram
        return
    rows = rows.to(total.dtype)
    if not upper:
        total.addmm_(rows.T, rows)
        return
    step = -(-total.shape[0] // GRAM_ROW_BLOCKS)
    for a in range(0, total.shape[0], step):
        total[a : a + step, a:].addmm_(rows[:, a : a + step].T, rows[:, a:])


def mirror_upper_(total: torch.Tensor) -> None:
    """Copy the block upper triangle left by ``add_gram(..., upper=True)`` below the diagonal (idempotent)."""
    step = -(-total.shape[0] // GRAM_ROW_BLOCKS)
    for a in range(step, total.shape[0], step):
        total[a : a + step, :a].copy_(total[:a, a : a + step].T)


def accumulate_dtype_for(module: nn.Module) -> torch.dtype:
    """fp64 sums for an fp64 module, fp32 otherwise."""
    return torch.float64 if module.weight.dtype == torch.float64 else torch.float32


def valid_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions with a label (mask 1 here and at the next position; the last position never)."""
    mask = attention_mask.bool()
    return torch.cat([mask[:, :-1] & mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def window_uniforms(seed: int, window_index: Sequence[int], seq_len: int) -> torch.Tensor:
    """``(B, T)`` float64 uniforms in [0, 1): row ``b`` depends only on ``(seed, window_index[b])``."""
    gens = (torch.Generator().manual_seed(_splitmix64((int(seed) << 32) ^ int(i)) >> 1) for i in window_index)
    return torch.stack([torch.rand(seq_len, generator=gen, dtype=torch.float64) for gen in gens])


@torch.no_grad()
def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One label per row of ``logits`` ``(n, V)`` (or per row index in ``rows``), drawn from its softmax by inverse
    CDF of ``uniforms`` ``(n,)``; fp32 (fp64 for fp64 logits), in chunks of rows. A zero-probability token is never
    drawn."""
    n, vocab = (logits.shape[0] if rows is None else rows.numel()), logits.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    chunk = max(1, _SAMPLE_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        part = logits[start : start + chunk] if rows is None else logits.index_select(0, rows[start : start + chunk])
        cdf = torch.softmax(part.to(dtype), dim=-1).cumsum_(dim=-1)
        u = uniforms[start : start + chunk].to(device=logits.device, dtype=dtype).unsqueeze(1) * cdf[:, -1:]
        out[start : start + chunk] = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(vocab - 1)
    return out


def activation_keys(projections: Sequence[Projection]) -> dict[str, str]:
    """``{module name: activation key}``: ``up`` reads the same input as its block's ``gate``, so when both are
    chosen ``up``'s key is ``gate``'s name (one shared activation sum); every other module's key is its own name."""
    gates = {(p.block, p.expert): p for p in projections if p.kind == "gate"}  # an expert's gate and up share too

    def key(p: Projection) -> str:
        gate = gates.get((p.block, p.expert))
        return gate.name if p.kind == "up" and gate is not None and gate.homogeneous == p.homogeneous else p.name

    return {p.name: key(p) for p in projections}


def describe_projections(projections: Sequence[Projection]) -> dict[str, list]:
    """The manifest's ``layers`` (block indices) and ``projections`` (kinds, in :data:`PROJECTIONS` order)."""
    kinds = {p.kind for p in projections}
    return {"layers": sorted({p.block for p in projections}), "projections": [k for k in PROJECTIONS if k in kinds]}


def take_tokens(batches: Iterable[dict[str, torch.Tensor]], max_tokens: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` up to (not including) the first that would start after ``max_tokens`` real tokens (mask 1)."""
    tokens = 0
    for batch in batches:
        if max_tokens is not None and tokens >= max_tokens:
            return
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        yield batch


def _on_device(per_device: dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensor held in ``per_device`` (one step's valid positions), on ``device``: copied there the first time."""
    if device not in per_device:
        per_device[device] = next(iter(per_device.values())).to(device)
    return per_device[device]


# ---------------------------------------------------------------------------------------------------- collector
class FactorCollector:
    """Accumulates K-FAC factor sums for a set of projections, one batch at a time.

    Use as a context manager (hooks are installed on enter and removed on exit; parameters are frozen meanwhile)::

        with FactorCollector(model, projections, labels="sampled", seed=0) as collector:
            for batch in batches:
                collector.accumulate(batch)
        factors = collector.finish()

    The running sums are ``collector.factors``, whole after :meth:`symmetrize`; ``tokens``, ``labelled_tokens``,
    ``windows`` and ``steps`` count what was consumed. Subclasses override :meth:`_add_input` and :meth:`_add_grad`.
    """

    def __init__(
        self,
        model: nn.Module,
        projections: Sequence[Projection],
        labels: str = "sampled",
        seed: int = 0,
        factors: Factors | None = None,
        start_window: int = 0,
    ):
        LabelMode.parse(labels, "label mode")
        if not projections:
            raise UserError("no projection chosen to collect factors for; pick --layers and --projections")
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projections listed twice: {names}")
        self.model = model
        self.projections = list(projections)
        self.labels = labels
        self.seed = int(seed)
        self.factors = factors if factors is not None else Factors()
        self.lowest_block = min(p.block for p in self.projections)
        self.tokens = 0  # real tokens (attention mask 1) consumed
        self.labelled_tokens = 0  # rows counted in the factors
        self.windows = int(start_window)  # windows consumed, also the index the next window gets
        self.steps = 0
        self.seq_len: int | None = None
        self._mirrored = True  # False while the sums hold only their upper block triangle (see symmetrize)
        self._allocate()
        self._undo: contextlib.ExitStack | None = None  # restores the model on exit (None: not entered)
        self._phase: str | None = None  # "forward" while the model runs forward, "backward" during backward
        self._start_step()

    def _start_step(self, valid: torch.Tensor | None = None, idx: torch.Tensor | None = None) -> None:
        """Reset the per-step state: the ``(B·T,)`` bool mask ``valid`` of the positions with a label and their flat
        indices ``idx`` (each per device: :func:`_on_device`), and what the hooks saw."""
        self._valid_masks = {} if valid is None else {valid.device: valid}  # the experts see flat tokens
        self._valid_index = {} if idx is None else {idx.device: idx}
        self._forward_hits = [0] * len(self.projections)
        self._grad_hits = [0] * len(self.projections)
        self._shared_input: dict[str, tuple] = {}  # activation key -> input already added this step
        self._targets: list[torch.Tensor] = []

    # -------------------------------------------------------------------------------------------- setup
    def _allocate(self) -> None:
        keys = activation_keys(self.projections)
        for p in self.projections:
            if p.name in self.factors.modules:
                have = self.factors.modules[p.name].shape
                if have != p.factor_shape:
                    raise UserError(f"existing factors of {p.name} have shape {have}, the model's weight {p.factor_shape}")
                continue
            weight, dtype = p.module.weight, accumulate_dtype_for(p.module)
            n_out, n_in = p.factor_shape  # in + 1 for a homogeneous projection: A over [a; 1]
            activation_sum = self.factors.activation_sums().get(keys[p.name])
            if activation_sum is None:
                activation_sum = torch.zeros(n_in, n_in, dtype=dtype, device=weight.device)
            grad_sum = torch.zeros(n_out, n_out, dtype=dtype, device=weight.device)
            self.factors.modules[p.name] = ModuleFactors(activation_sum, grad_sum, activation_key=keys[p.name])

    def __enter__(self) -> "FactorCollector":
        with contextlib.ExitStack() as undo:  # on an error, what was done is undone at once
            for param in self.model.parameters():
                undo.callback(param.requires_grad_, param.requires_grad)
                param.requires_grad_(False)
            # HF gradient checkpointing only runs in training mode; switch on training for the checkpointing wrappers
            # alone (their children, dropout included, stay in eval mode).
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True and not module.training:
                    undo.callback(setattr, module, "training", False)
                    module.training = True
            undo.callback(self.model.get_input_embeddings().register_forward_hook(self._embedding_hook).remove)
            taps: dict[int, list[int]] = {}  # experts module -> indices of its projections
            for index, p in enumerate(self.projections):
                if p.expert is not None:
                    taps.setdefault(id(p.module.experts), []).append(index)
                else:
                    undo.callback(p.module.register_forward_hook(self._forward_hook(index), with_kwargs=True).remove)
            for indices in taps.values():
                undo.callback(self._tap_experts(indices).remove)
            self._undo = undo.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._undo.close()
        self._undo, self._phase, self._targets = None, None, []

    # -------------------------------------------------------------------------------------------- hooks
    def _embedding_hook(self, module: nn.Module, args, output: torch.Tensor):
        """Make the embedding output a leaf that requires grad: the root of the (weight-free) backward graph."""
        if self._phase != "forward" or not torch.is_grad_enabled():
            return None
        return output.detach().requires_grad_(True)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The valid rows of a ``(B, T, d)`` tensor as ``(n_valid, d)``."""
        return tensor.reshape(-1, tensor.shape[-1]).index_select(0, _on_device(self._valid_index, tensor.device))

    def _forward_hook(self, index: int):
        projection = self.projections[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if self._phase is None:
                return None
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{projection.name} returned {type(output).__name__}, not a tensor")
            if self._phase == "forward":
                self._forward_hits[index] += 1
                with torch.no_grad():
                    self._add_input(index, (args[0] if args else next(iter(kwargs.values()))).detach())
            if output.requires_grad and torch.is_grad_enabled():
                # Non-reentrant checkpointing re-runs forward hooks during backward: the hook on the recomputed
                # output then never fires (gradients flow to the original output); reentrant checkpointing is the
                # other way round. The hit count in _step() checks that exactly one fired.
                output.register_hook(self._grad_hook(index))
                if self._phase == "forward" and projection.block == self.lowest_block:
                    self._targets.append(output)
            return None

        return hook

    def _grad_hook(self, index: int):
        def hook(grad: torch.Tensor) -> None:
            self._grad_hits[index] += 1
            with torch.no_grad():
                self._add_grad(index, self._rows(grad))

        return hook

    def _add_input(self, index: int, x: torch.Tensor) -> None:
        """Add the valid rows of projection ``index``'s input ``x`` ``(B, T, in)`` to ``A`` (once per activation key)."""
        projection = self.projections[index]
        mf = self.factors.modules[projection.name]
        signature = (x.data_ptr(), tuple(x.shape), x.dtype)
        if mf.activation_key in self._shared_input:  # gate/up: the partner already added this input
            if self._shared_input[mf.activation_key] != signature:
                raise RuntimeError(
                    f"{projection.name} shares its activation factor with its block's gate/up partner, "
                    "but the two read different inputs in this architecture"
                )
            return
        self._shared_input[mf.activation_key] = signature
        rows = self._rows(x)
        if projection.homogeneous:  # [a; 1]: the bias's input coordinate
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        add_gram(mf.activation_sum, rows, upper=True)

    def _add_grad(self, index: int, rows: torch.Tensor) -> None:
        """Add the valid rows ``(n_valid, out)`` of projection ``index``'s output gradient to ``G``."""
        add_gram(self.factors.modules[self.projections[index].name].grad_sum, rows, upper=True)

    def _add_expert_input(self, indices: list[int], rows: torch.Tensor) -> None:
        """Add the rows ``(n_routed, in)`` routed to one expert to ``A`` of its projections ``indices`` (gate and up
        share one)."""
        add_gram(self.factors.modules[self.projections[indices[0]].name].activation_sum, rows, upper=True)

    def _tap_experts(self, indices: list[int]):
        """Per-expert factors of one experts module (:func:`kfac_edit.experts.tap_experts`): expert ``e``'s ``A``
        over the labelled rows routed to it, ``G`` over the gradients of its outputs at those rows."""
        from ..experts import fused_rows, tap_experts

        chosen = {(self.projections[i].expert, self.projections[i].kind): i for i in indices}
        experts = self.projections[indices[0]].module.experts
        block = self.projections[indices[0]].block
        cols = {kind: fused_rows(experts, kind)[1] for kind in ("gate", "up", "down")}  # columns of x W_guᵀ / h W_dᵀ

        factors_of = {i: self.factors.modules[self.projections[i].name] for i in indices}  # i -> ModuleFactors
        def gram_hook(members: list[tuple[str, int]], keep: torch.Tensor):
            def hook(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    rows = grad.index_select(0, keep)
                    for kind, i in members:
                        self._add_grad(i, rows[:, cols[kind]])

            return hook

        def on_expert(e, x, gate_up_out, h, down_out, token_positions) -> None:
            keep = _on_device(self._valid_masks, x.device)[token_positions].nonzero().squeeze(1)  # rows with a label
            split = [(k, chosen[e, k]) for k in ("gate", "up") if (e, k) in chosen]
            down = [("down", chosen[e, "down"])] if (e, "down") in chosen else []
            if self._phase != "forward" or not (split or down):
                return
            for _, i in split + down:  # per-expert row counts
                factors_of[i].activation_tokens += int(keep.numel())
                factors_of[i].grad_tokens += int(keep.numel())
            with torch.no_grad():  # gate and up read x; down reads h
                for members, inputs in ((split, x), (down, h)):
                    if members:
                        self._add_expert_input([i for _, i in members], inputs.detach().index_select(0, keep))
            for outputs, members in ((gate_up_out, split), (down_out, down)):
                if members and outputs.requires_grad:
                    outputs.register_hook(gram_hook(members, keep))
                    if block == self.lowest_block:
                        self._targets.append(outputs)

        return tap_experts(experts, lambda: self._phase is not None, on_expert)

    # -------------------------------------------------------------------------------------------- one step
    def accumulate(self, batch: dict[str, torch.Tensor]) -> int:
        """Add one batch ``{"input_ids": (B, T), "attention_mask": (B, T)[, "window_index": (B,)]}`` (windows
        numbered on from the previous batch without ``window_index``); returns the valid positions added."""
        if self._undo is None:
            raise RuntimeError("use FactorCollector as a context manager: `with FactorCollector(...) as c:`")
        device = self.model.get_input_embeddings().weight.device
        input_ids = batch["input_ids"].to(device)
        n_windows, seq_len = input_ids.shape
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        window_index = batch.get("window_index")
        if window_index is None:
            window_index = torch.arange(self.windows, self.windows + n_windows)
        valid = valid_positions(mask).reshape(-1)
        n_valid = int(valid.sum())
        if n_valid:
            self._step(input_ids, mask, valid, window_index)
        # counters move only after a step succeeded, so they always describe the sums
        self.tokens += int(mask.sum())
        if n_windows:
            self.windows = max(self.windows, int(window_index.max()) + 1)
        self.seq_len = seq_len
        self.steps += 1
        self.labelled_tokens += n_valid
        return n_valid

    def _labels(self, flat_logits: torch.Tensor, input_ids: torch.Tensor, idx: torch.Tensor, uniforms) -> torch.Tensor:
        """``(B·T,)`` labels: the gold next token or a sampled one at the valid positions ``idx``, ignored elsewhere."""
        labels = torch.full((flat_logits.shape[0],), IGNORE_INDEX, dtype=torch.long, device=flat_logits.device)
        idx = idx.to(flat_logits.device)
        if self.labels == "gold":
            labels[idx] = torch.roll(input_ids, shifts=-1, dims=1).reshape(-1).to(flat_logits.device)[idx]
        else:
            labels[idx] = sample_labels(flat_logits.detach(), uniforms, rows=idx)
        return labels

    def _step(self, input_ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, window_index: torch.Tensor):
        """Forward, labels, backward for one batch with at least one ``valid`` (``(B·T,)`` bool) position."""
        idx = valid.nonzero().squeeze(1)
        uniforms = None
        if self.labels == "sampled":
            uniforms = window_uniforms(self.seed, window_index.tolist(), input_ids.shape[1]).reshape(-1)[idx.cpu()]
        self._start_step(valid, idx)
        self._mirrored = False
        try:
            self._phase = "forward"
            with torch.enable_grad():
                position_ids = (mask.long().cumsum(-1) - 1).clamp_min_(0)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False).logits  # fmt: skip
                flat_logits = logits.reshape(-1, logits.shape[-1])
                del logits
                loss_dtype = torch.float64 if flat_logits.dtype == torch.float64 else torch.float32
                labels = self._labels(flat_logits, input_ids, idx, uniforms)
                loss = F.cross_entropy(flat_logits.to(loss_dtype), labels, ignore_index=IGNORE_INDEX, reduction="sum")
                del flat_logits
                if not loss.requires_grad:
                    raise RuntimeError("the loss does not depend on the chosen projections; no gradient can flow")
                self._phase = "backward"
                targets, self._targets = self._targets, []
                if targets:
                    torch.autograd.grad(loss, targets, allow_unused=True)
                else:  # reentrant checkpointing: outputs were made under no_grad; it only supports .backward()
                    loss.backward()
                del loss, targets
        finally:
            self._phase, self._targets, self._valid_index = None, [], {}
        for p, f_hits, g_hits in zip(self.projections, self._forward_hits, self._grad_hits):
            if p.expert is not None:
                continue  # an expert counts its routed rows itself
            if f_hits != 1 or g_hits != 1:
                raise RuntimeError(
                    f"{p.name}: forward ran {f_hits}x and its output gradient arrived {g_hits}x in one step "
                    "(expected once each); is the module shared or skipped in this architecture?"
                )
            self.factors.modules[p.name].activation_tokens += int(idx.numel())
            self.factors.modules[p.name].grad_tokens += int(idx.numel())

    # -------------------------------------------------------------------------------------------- result
    def manifest(self) -> dict[str, Any]:
        """What produced these factors (merged into ``factors.manifest``)."""
        import transformers

        from .. import __version__

        cfg = getattr(self.model, "config", None)
        prior = self.factors.manifest
        return {
            "model": getattr(cfg, "_name_or_path", None) or getattr(self.model, "name_or_path", None),
            "model_type": getattr(cfg, "model_type", type(self.model).__name__),
            "model_fingerprint": model_fingerprint(self.model),
            "dtype": str(self.projections[0].module.weight.dtype).removeprefix("torch."),
            "accumulate_dtype": str(self.factors.modules[self.projections[0].name].grad_sum.dtype).removeprefix("torch."),
            "labels": self.labels,
            "label_sampler": "inverse CDF of uniforms seeded by (seed, window index)" if self.labels == "sampled" else None,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens": int(prior.get("tokens", 0)) + self.tokens,
            "labelled_tokens": int(prior.get("labelled_tokens", 0)) + self.labelled_tokens,
            "windows": self.windows,
            **describe_projections(self.projections),
            "kfac_edit_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "created": utc_timestamp(),
        }

    def symmetrize(self) -> Factors:
        """The sums, whole: each Gram update adds only the upper block triangle (:func:`add_gram`), the lower one is
        copied from it here. Call before reading ``factors`` (``finish`` and :func:`collect_factors` do)."""
        if not self._mirrored:
            for tensor in self.factors.tensors():
                mirror_upper_(tensor)
            self._mirrored = True
        return self.factors

    def finish(self) -> Factors:
        """The collected factors with their manifest; raises :class:`UserError` naming a module with NaN/Inf."""
        self.symmetrize()
        if self.labelled_tokens == 0 and not any(mf.grad_tokens for mf in self.factors.modules.values()):
            raise UserError("no token with a label was seen (every window was padding); give the run more text")
        self.factors.manifest.update(self.manifest())
        self.factors.check_finite()
        return self.factors
