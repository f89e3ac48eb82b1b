"""Load a causal LM and find the MLP projections of its blocks.

Conventions used everywhere in the package:

* A projection's weight is handled as ``W`` of shape ``(out, in)``, the ``nn.Linear`` layout. GPT-2's ``Conv1D``
  stores ``(in, out)``; :class:`Projection` hides that (``weight()`` / ``set_weight()`` always speak ``(out, in)``).
* Projection kinds are ``gate``, ``up`` and ``down``. GPT-NeoX ``dense_h_to_4h`` and GPT-2 ``c_fc`` are ``up``;
  ``dense_4h_to_h`` and ``c_proj`` are ``down``; those architectures have no ``gate``.
* A module is named by its full path in ``model.named_modules()``, e.g. ``model.layers.23.mlp.up_proj``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .constants import MANIFEST_FILE, TENSORS_FILE
from .errors import UserError, first_line

log = logging.getLogger(__name__)

PROJECTIONS = ("gate", "up", "down")
# --bias: "joint" = K-FAC of the affine map (A over [a; 1], the bias edited with the weight); "keep" = biases untouched
BIAS_MODES = ("joint", "keep")

# model_type -> (path of the ModuleList of blocks, {kind: path of the projection inside a block}).
# Every entry was checked on a tiny random model of the installed transformers (tests/test_architectures.py).
_LLAMA = {k: f"mlp.{k}_proj" for k in PROJECTIONS}
_NEOX = {"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}
_C_FC = {"up": "mlp.c_fc", "down": "mlp.c_proj"}  # GPT-2 Conv1D, weight stored (in, out)
_FC = {"up": "fc1", "down": "fc2"}
# One nn.Linear computing [gate; up] (out = 2 * intermediate): handled as ONE projection of kind ``up`` -- the K-FAC
# of that linear layer (A over its input, G over all its outputs), edited as a whole; there is no separate ``gate``.
FUSED_GATE_UP = frozenset(("phi3", "glm", "glm4"))
_FUSED_UP = "mlp.gate_up_proj"
_FUSED_NOTE = f"; its gate and up are one fused linear layer, {_FUSED_UP}, edited as kind 'up'"
_LLAMA_TYPES = (
    "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "olmo3",
    "stablelm", "cohere", "cohere2", "granite", "helium", "smollm3", "exaone4", "seed_oss", "diffllama", "ernie4_5",
    "internlm3",
)
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {
    **dict.fromkeys(_LLAMA_TYPES, ("model.layers", _LLAMA)),
    # no gate (ReLU² / xIELU MLPs)
    **dict.fromkeys(("nemotron", "arcee", "apertus"), ("model.layers", {"up": "mlp.up_proj", "down": "mlp.down_proj"})),
    **dict.fromkeys(FUSED_GATE_UP, ("model.layers", {"up": _FUSED_UP, "down": "mlp.down_proj"})),
    "gpt_neox": ("gpt_neox.layers", _NEOX),
    **dict.fromkeys(("falcon", "bloom"), ("transformer.h", _NEOX)),
    "persimmon": ("model.layers", _NEOX),
    **dict.fromkeys(("gpt2", "gpt_bigcode", "gpt_neo"), ("transformer.h", _C_FC)),
    "starcoder2": ("model.layers", _C_FC),
    **dict.fromkeys(("gptj", "codegen"), ("transformer.h", {"up": "mlp.fc_in", "down": "mlp.fc_out"})),
    "phi": ("model.layers", {"up": "mlp.fc1", "down": "mlp.fc2"}),
    "opt": ("model.decoder.layers", _FC),
    "xglm": ("model.layers", _FC),
    "biogpt": ("biogpt.layers", _FC),
    "mpt": ("transformer.blocks", {"up": "ffn.up_proj", "down": "ffn.down_proj"}),
    "lfm2": ("model.layers", {"gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}),
    # Gemma 3 with its vision tower (AutoModelForCausalLM gives Gemma3ForConditionalGeneration): the text blocks
    "gemma3": ("model.language_model.layers", _LLAMA),
}
# Mixture of experts: model_type -> (blocks path, experts module inside a block, {kind: path of a dense MLP's
# projection inside a block}). Every routed expert's gate, up and down is a projection (kfac_edit.experts); the dense
# paths are taken in the blocks that have them: Qwen2-MoE's shared expert, Qwen3-MoE's dense blocks (mlp_only_layers).
_SHARED_EXPERT = {k: f"mlp.shared_expert.{k}_proj" for k in PROJECTIONS}
MOE_ARCHITECTURES: dict[str, tuple[str, str, dict[str, str]]] = {
    **dict.fromkeys(("olmoe", "mixtral", "phimoe"), ("model.layers", "mlp.experts", {})),
    **dict.fromkeys(("qwen2_moe", "qwen3_next"), ("model.layers", "mlp.experts", _SHARED_EXPERT)),
    "qwen3_moe": ("model.layers", "mlp.experts", _LLAMA),
    "granitemoe": ("model.layers", "block_sparse_moe.experts", {}),
}
# Config fields that give a mixture-of-experts model away (any value > 1 means routed experts).
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_CHOICES = ("auto", *DTYPES)  # what every command's --dtype accepts

# The layout declared by :func:`use_modules` (``--modules``, or the paths a factor manifest recorded) is kept on the
# model as this plain attribute: every function here reads it before the table.
LAYOUT_ATTR = "_kfac_edit_layout"
LAYOUT_KEY = "module_paths"  # the factor manifest's record of the layout: {"blocks": path, kind: path in a block}


def _has_bias(module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


@dataclass
class Projection:
    """One MLP linear layer of one block, seen as ``W`` of shape ``(out, in)``."""

    name: str  # full module path, e.g. "model.layers.23.mlp.up_proj"
    block: int
    kind: str  # "gate" | "up" | "down"
    module: nn.Module
    # Factors over the homogeneous input [a; 1] (a biased layer under ``--bias joint``, the default): A is
    # (in + 1, in + 1) and the edit projects the affine weight [W b]; False: the bias is left as it is.
    homogeneous: bool = False
    expert: int | None = None  # a routed expert's matrix (module is an ExpertWeight view; see kfac_edit.experts)

    @property
    def has_bias(self) -> bool:
        return _has_bias(self.module)

    @property
    def factor_shape(self) -> tuple[int, int]:
        """``(out, in + 1)`` if homogeneous (``[W b]``), else ``(out, in)``."""
        out, inp = self.shape
        return (out, inp + int(self.homogeneous))

    def fits(self, factor_shape: Sequence[int]) -> bool:
        """Whether factors of ``factor_shape`` ``(out, in[+1])`` belong to this layer; a biased layer becomes
        :attr:`homogeneous` exactly when they are over ``[a; 1]`` (collected with ``--bias joint``)."""
        self.homogeneous = self.has_bias and tuple(factor_shape) == (self.shape[0], self.shape[1] + 1)
        return tuple(factor_shape) == self.factor_shape

    def affine_weight(self) -> torch.Tensor:
        """``[W b]`` ``(out, in + 1)`` for a homogeneous projection (a copy), else :meth:`weight`."""
        if not self.homogeneous:
            return self.weight()
        return torch.cat([self.weight(), self.module.bias.detach().unsqueeze(1).to(self.module.weight.dtype)], dim=1)

    @torch.no_grad()
    def set_affine_weight(self, new_weight: torch.Tensor) -> None:
        """Overwrite ``[W b]`` (homogeneous) or ``W`` from a tensor of :attr:`factor_shape`."""
        if not self.homogeneous:
            return self.set_weight(new_weight)
        self.set_weight(new_weight[:, :-1])
        self.module.bias.copy_(new_weight[:, -1])  # copy_ casts to the bias's dtype and device

    @property
    def transposed(self) -> bool:
        """True for GPT-2 ``Conv1D``, which stores its weight as ``(in, out)``."""
        return self.expert is None and not isinstance(self.module, nn.Linear)

    @property
    def shape(self) -> tuple[int, int]:  # (out, in)
        return tuple(self.weight().shape)

    def weight(self) -> torch.Tensor:
        """The weight as ``(out, in)`` (a view, not a copy)."""
        w = self.module.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def set_weight(self, new_weight: torch.Tensor) -> None:
        """Overwrite the weight in place from an ``(out, in)`` tensor (cast to the weight's dtype and device)."""
        if tuple(new_weight.shape) != self.shape:
            raise ValueError(f"{self.name}: new weight has shape {tuple(new_weight.shape)}, expected {self.shape}")
        self.weight().copy_(new_weight.to(dtype=self.module.weight.dtype, device=self.module.weight.device))


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def num_blocks(model: nn.Module) -> int:
    return len(model.get_submodule(_architecture(model)[0]))


def use_modules(model: nn.Module, modules: dict[str, str] | None, blocks_path: str | None = None) -> None:
    """Declare the MLP layout of ``model``: ``modules`` ``{kind: path inside a block}`` (``None``: forget it), in
    ``blocks_path`` (default: the table's, else the longest ModuleList); a :class:`UserError` names the first module
    some block lacks or that is not a linear layer."""
    model.__dict__.pop(LAYOUT_ATTR, None)
    if not modules:
        return
    if blocks_path is None:
        try:
            blocks_path = _architecture(model)[0]
        except UserError:
            lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
            if not lists:
                raise UserError("cannot find the model's list of blocks; this architecture is not supported") from None
            blocks_path = max(lists, key=lambda item: len(item[1]))[0]
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError:
        raise UserError(f"the model has no module '{blocks_path}' holding its blocks; check --modules") from None
    for i in range(len(blocks)):
        for kind, sub in modules.items():
            _linear_at(blocks, blocks_path, i, kind, sub)
    model.__dict__[LAYOUT_ATTR] = (blocks_path, dict(modules))


def _linear_at(blocks, blocks_path: str, i: int, kind: str, sub: str) -> nn.Module:
    """Block ``i``'s module ``sub`` (of ``kind``); a :class:`UserError` when it is missing or not a linear layer."""
    try:
        module = blocks[i].get_submodule(sub)
    except AttributeError:
        raise UserError(
            f"block {i} has no module '{sub}' (--modules {kind}={sub}, blocks in {blocks_path}); name a module every "
            "block has"
        ) from None
    if not _is_linear(module):
        raise UserError(
            f"--modules {kind}={sub}: {blocks_path}.{i}.{sub} is a {type(module).__name__}, not a linear layer (a "
            "module with a 2-D weight); name the linear layers of the MLP"
        )
    return module


def _find(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def module_paths(model: nn.Module) -> dict[str, str]:
    """The layout in use, as a factor manifest records it: ``{"blocks": path, kind: path inside a block, ...}``."""
    blocks_path, kinds = _architecture(model)
    return {"blocks": blocks_path, **{k: kinds[k] for k in PROJECTIONS if k in kinds}}


def _architecture(model: nn.Module) -> tuple[str, dict[str, str]]:
    """``(blocks path, {kind: path inside a block})``: the layout declared by :func:`use_modules`, the table, else
    a known layout found by structure; a :class:`UserError` for an unreadable mixture of experts or an unknown MLP."""
    declared = model.__dict__.get(LAYOUT_ATTR)
    if declared is not None:
        return declared
    mtype = model_type(model)
    if mtype in ARCHITECTURES:
        return ARCHITECTURES[mtype]
    if mtype in MOE_ARCHITECTURES:
        blocks_path, experts_path, _ = MOE_ARCHITECTURES[mtype]
        return blocks_path, dict.fromkeys(PROJECTIONS, experts_path)
    moe = _mixture_of_experts(model)
    if moe:
        raise UserError(
            f"mixture-of-experts model '{mtype}' is not supported yet: {moe}; kfac-edit reads the experts of "
            f"{', '.join(sorted(MOE_ARCHITECTURES))} only, and --modules cannot reach experts"
        )
    for layout in ARCHITECTURES.values():  # an unknown model type with a known layout
        if _has_layout(model, layout):
            return layout
    linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
    shown = ", ".join(linear_names[:12]) + (" ..." if len(linear_names) > 12 else "")
    raise UserError(
        f"unknown architecture '{mtype}': cannot find its MLP projections; its linear modules are: {shown}; "
        "name them with --modules (e.g. --modules up=mlp.fc_in,down=mlp.fc_out)"
    )


def _has_layout(model: nn.Module, layout: tuple[str, dict[str, str]]) -> bool:
    blocks_path, kinds = layout
    try:
        first = model.get_submodule(blocks_path)[0]
        return all(_is_linear(first.get_submodule(sub)) for sub in kinds.values())
    except (AttributeError, IndexError, TypeError, KeyError):
        return False


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or GPT-2's ``Conv1D`` with a 2-D weight (not an MoE router returning a tuple)."""
    weight = getattr(module, "weight", None)
    kind_ok = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return kind_ok and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _mixture_of_experts(model: nn.Module) -> str | None:
    """How a model's expert layer shows (a module with 3-D parameters or a class named ``*Experts``, else the
    config's expert count), or ``None`` for a dense model."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if "expert" not in cls.lower() and "expert" not in name.rsplit(".", 1)[-1].lower():
            continue  # 3-D weights elsewhere (e.g. a Mamba block's Conv1d) are no experts
        fused = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        where = f"{cls} at {name}" if name else cls
        if fused:
            shapes = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in fused)
            return (f"its experts ({where}) keep every expert's weights in fused 3-D parameters ({shapes}), "
                    "not linear layers")
        if cls.lower().endswith("experts"):
            return f"its experts ({where}) are one module holding all experts"
    cfg = getattr(model, "config", None)
    for field in _EXPERT_COUNT_FIELDS:
        count = getattr(cfg, field, None)
        if isinstance(count, int) and count > 1:
            return f"its config has {field}={count} (routed experts, not one linear layer per projection)"
    return None


def parse_modules_option(text: str) -> dict[str, str]:
    """Parse ``--modules up=mlp.fc_in,down=mlp.fc_out`` into ``{"up": "mlp.fc_in", ...}`` (paths inside a block)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UserError(f"--modules entry '{part}' is not KIND=PATH; write e.g. up=mlp.fc_in,down=mlp.fc_out")
        kind, path = (s.strip() for s in part.split("=", 1))
        if kind not in PROJECTIONS:
            raise UserError(f"--modules kind '{kind}' is unknown; use one of {', '.join(PROJECTIONS)}")
        if kind in out or path in out.values():  # the later one silently won: a layer collected as another kind
            what = f"kind '{kind}'" if kind in out else f"path '{path}'"
            raise UserError(f"--modules names {what} twice; give each kind one path, e.g. up=mlp.fc_in,down=mlp.fc_out")
        out[kind] = path
    return out


def find_projections(model: nn.Module, layers: Iterable[int] | str | None = None,
                     projections: Sequence[str] = PROJECTIONS, bias: str = "joint") -> list[Projection]:  # fmt: skip
    """The MLP projections of ``layers`` (block indices; ``"all"`` or ``None``: every block) in block order, then
    ``gate, up, down`` order; a kind in ``projections`` the architecture lacks is an error. ``bias``: ``joint``
    (biased layers are :attr:`Projection.homogeneous`) or ``keep``."""
    if bias not in BIAS_MODES:
        raise UserError(f"unknown --bias '{bias}'; use one of {', '.join(BIAS_MODES)}")
    blocks_path, kinds = _architecture(model)
    blocks = model.get_submodule(blocks_path)
    n = len(blocks)
    layer_list = list(range(n)) if layers is None or layers == "all" else sorted({int(i) for i in layers})
    for i in layer_list:
        if not 0 <= i < n:
            raise UserError(f"layer {i} does not exist: the model has blocks 0..{n - 1}; pick --layers in that range")
    _check_kinds(projections)
    for kind in projections:
        if kind not in kinds:
            raise UserError(
                f"projection '{kind}' does not exist in a {model_type(model)} model (it has {', '.join(kinds)}"
                f"{_FUSED_NOTE if kind == 'gate' and kinds.get('up') == _FUSED_UP else ''}); "
                f"pass --projections {','.join(k for k in PROJECTIONS if k in kinds)}"
            )
    wanted = [k for k in PROJECTIONS if k in projections]
    joint = bias == "joint"
    if LAYOUT_ATTR not in model.__dict__ and model_type(model) in MOE_ARCHITECTURES:
        return _expert_projections(model, blocks, layer_list, wanted, joint)
    out = []
    for i in layer_list:
        for kind in wanted:
            module = _linear_at(blocks, blocks_path, i, kind, kinds[kind])
            name = f"{blocks_path}.{i}.{kinds[kind]}"
            if not module.weight.is_floating_point():
                raise UserError(
                    f"module {name} holds quantized weights ({dtype_name(module.weight.dtype)}); "
                    "kfac-edit edits float weights: load the model without quantization"
                )
            out.append(Projection(name, i, kind, module, homogeneous=joint and _has_bias(module)))
    return out


def _expert_projections(model: nn.Module, blocks, layer_list: list[int], kinds: list[str], joint: bool):
    """A mixture-of-experts model's projections: per block, each expert's kinds (expert order), then the dense ones."""
    from .experts import ExpertWeight, check_experts

    blocks_path, experts_path, dense = MOE_ARCHITECTURES[model_type(model)]
    out = []
    for i in layer_list:
        prefix = f"{blocks_path}.{i}"
        experts = _find(blocks[i], experts_path)  # None in a dense block
        for e in range(check_experts(experts, f"{prefix}.{experts_path}") if experts is not None else 0):
            for kind in kinds:
                weight = ExpertWeight(experts, e, kind)
                out.append(Projection(f"{prefix}.{experts_path}.{e}.{kind}", i, kind, weight, expert=e))  # type: ignore
        for kind in kinds:
            module = _find(blocks[i], dense[kind]) if kind in dense else None  # None: no such dense MLP here
            if _is_linear(module):
                homogeneous = joint and _has_bias(module)
                out.append(Projection(f"{prefix}.{dense[kind]}", i, kind, module, homogeneous=homogeneous))
    return out


def _check_kinds(kinds: Iterable[str]) -> None:
    for kind in kinds:
        if kind not in PROJECTIONS:
            raise UserError(f"unknown projection '{kind}'; use a subset of gate,up,down")


def parse_layers(text: str | None) -> list[int] | None:
    """Parse ``"23,24,25"``, ``"20-27"`` or ``"all"`` (-> None, meaning every block)."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(s) for s in part.split("-", 1))
                if hi < lo:
                    raise UserError(f"layers range '{part}' names no block (it runs backwards); write {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"cannot read layers '{text}': write e.g. 23,24,25 or 20-27 or all") from None
    return sorted(set(out))


def parse_projections(text: str) -> list[str]:
    kinds = [p.strip() for p in text.split(",") if p.strip()]
    _check_kinds(kinds)
    if not kinds:
        raise UserError("no projection given; use a subset of gate,up,down")
    return kinds


def projection_kinds(model: nn.Module) -> list[str]:
    """The projection kinds this model has, in ``gate, up, down`` order."""
    return [k for k in PROJECTIONS if k in _architecture(model)[1]]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device '{device}'; use cpu, cuda, cuda:N or auto")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this machine has no MPS device; use --device cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; use "
                            f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of --dtype, manifests and lm-eval's ``dtype=``)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The one meaning of ``--dtype``: a name from :data:`DTYPES`, or ``auto``: the ``dtype`` (or older
    ``torch_dtype``) the model's ``config.json`` records, float32 when it records none (transformers' old default)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPE_CHOICES)}")
        return DTYPES[dtype]
    config = model_config(name_or_path)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored.removeprefix("torch."))
    return stored if stored in DTYPES.values() else torch.float32


def _from_pretrained(load: Callable, name_or_path: str | os.PathLike, what: str, hint: str = "", **kwargs):
    """``load(name_or_path, **kwargs)``; a missing or unreadable model is one line, ``cannot load {what}: ...``."""
    from safetensors import SafetensorError

    def holds(name: str) -> bool:
        return os.path.isfile(os.path.join(name_or_path, name))

    if holds(TENSORS_FILE) and holds(MANIFEST_FILE) and not holds("config.json"):
        raise UserError(f"cannot load {what}: {name_or_path} is a factor directory (what `kfac-edit collect` writes), "
                        "not a model; give it as --factors and a model directory or hub id as the model")
    try:
        return load(os.fspath(name_or_path), **kwargs)
    except SafetensorError as exc:  # a truncated or damaged model.safetensors
        raise UserError(f"cannot load {what}: a weights file is damaged ({first_line(exc)}); save or download the "
                        "model again") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {what}: {str(exc).splitlines()[0]}{hint}") from None


def model_config(name_or_path: str | os.PathLike):
    """The model's transformers config (``config.json`` only: no weights are read); one line when there is none."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, name_or_path, f"model '{name_or_path}'")


def check_causal_lm(name_or_path: str | os.PathLike, flag: str = "--model"):
    """Refuse, from the config alone, a model that is not a causal LM (``GPT2Model``, ``BertForMaskedLM`` would get
    a random LM head); return its config. Accepted: an architecture ``...ForCausalLM`` / ``...LMHeadModel``, the
    class ``AutoModelForCausalLM`` builds for the model type, or none recorded."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model_config(name_or_path)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    fits = any(a.endswith(("ForCausalLM", "LMHeadModel")) or a == causal for a in archs) if archs else True
    if causal is None or not fits:
        what = archs[0] if archs else f"model type {getattr(config, 'model_type', '?')}"
        raise UserError(
            f"{flag} '{name_or_path}' is not a causal language model ({what}); give a model with its "
            "language-modelling head, saved as ...ForCausalLM"
        )
    return config


def model_limits(config) -> tuple[int | None, int | None]:
    """``(embedding rows, context positions)`` from a model config; ``None`` if unknown. Token ids are checked
    against the rows (``vocab_size``: OLMo-2 has 100,352 for 100,278 tokenizer entries), not ``len(tokenizer)``."""
    text = config.get_text_config()
    rows = getattr(text, "vocab_size", None)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return (int(rows) if rows else None), (int(positions) if positions else None)


def load_model(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | None = None,
               device_map: str | None = None):  # fmt: skip
    """``(model in eval mode, :func:`load_tokenizer`)`` from a hub id or a local directory; ``dtype`` as
    :func:`resolve_dtype` reads it."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(name_or_path)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_path, f"model '{name_or_path}'",
        "; give a local model directory or a hub id that is reachable",
        dtype=resolve_dtype(name_or_path, dtype), device_map=device_map or None,
    )  # fmt: skip
    if not device_map:
        model.to(resolve_device(device))
    if model.dtype == torch.float64 and getattr(model.config, "_experts_implementation", "eager") != "eager":
        model.set_experts_implementation("eager")  # transformers' grouped_mm experts have no fp64 kernel
    return model.eval(), load_tokenizer(name_or_path)


def load_tokenizer_as_saved(name_or_path: str):
    """The model's tokenizer exactly as stored (no pad token or padding side added), to save beside an edit;
    ``None``, with a warning, when the model has no loadable tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        log.warning("the model has no loadable tokenizer (%s); the edited directory will hold none", exc)
        return None


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, padding on the left (what batched generation needs; the factor and perplexity code
    passes attention masks), with a pad token: EOS, else UNK, else BOS stands in (padding is always masked out)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, f"a tokenizer from '{name_or_path}'")
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if stand_in is None:
            raise UserError("the tokenizer has no pad, eos, unk or bos token to pad with; add a pad token to it")
        tokenizer.pad_token = stand_in
    tokenizer.padding_side = "left"
    return tokenizer
