"""What to edit: the edit methods, the label modes of collection, and :class:`EditSpec` (the layers JSON).

An :class:`EditSpec` says which projections of which blocks to edit and how much curvature mass to keep
(``keep_mass``, the ρ of :mod:`kfac_edit.curvature`, whose docstring states every convention). The layers JSON a
user writes and keeps is ``{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}``: block index -> projection
kind -> keep_mass; a projection left out, or with keep_mass at or above :data:`NO_EDIT_AT`, is not edited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import read_text
from .models import PROJECTIONS

NO_EDIT_AT = 0.9999  # keep_mass at or above this: the projection is left as it is (reference convention)
LAYERS_EXAMPLE = '{"23": {"gate": 0.6, "up": 0.6}, "24": {"gate": 0.6}}'


class _Choice(str, Enum):
    """A string enum whose :meth:`parse` turns a user's string into a member or a one-line :class:`UserError`."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: "str | _Choice", what: str = "value") -> "_Choice":
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"unknown {what} '{value}'; use one of {', '.join(cls.values())}") from None


class Method(_Choice):
    """Edit methods; :data:`METHOD_HELP` says what each keeps (it is also the CLI's help)."""

    KFAC = "kfac"
    KFAC_INDEPENDENT = "kfac-independent"
    SVD = "svd"
    RANDOM = "random"
    EKFAC = "ekfac"
    BSN = "bsn"

    @property
    def needs_factors(self) -> bool:
        """Every method but ``svd`` and ``bsn`` reads the K-FAC factors (``random`` sizes its edit by ``kfac``'s)."""
        return self not in (Method.SVD, Method.BSN)

    @property
    def needs_data(self) -> bool:
        """``bsn`` learns from forget records and clean text (:class:`~kfac_edit.bsn.BsnInputs`)."""
        return self is Method.BSN


class LabelMode(_Choice):
    """Labels of the backward pass in collection: ``sampled`` from the model (true Fisher) or ``gold`` (empirical)."""

    SAMPLED = "sampled"
    GOLD = "gold"


METHODS = Method.values()
METHOD_HELP = {
    Method.KFAC: "top pairs of G ⊗ A: the smallest set of eigen-pairs holding keep_mass of the curvature mass",
    Method.KFAC_INDEPENDENT: "top eigenvectors of G and of A separately, each holding keep_mass of its trace",
    Method.SVD: "top singular directions of W holding keep_mass of Σσ² (data-free baseline)",
    Method.RANDOM: "as many coefficients as kfac, random positions in a random orthogonal basis pair (control)",
    Method.EKFAC: "as kfac in the same eigenbasis, pairs ranked by their EK-FAC second moments "
    "E[(u_G[i]ᵀ g aᵀ u_A[j])²] instead of λ_i·μ_j (needs `collect --ekfac`)",
    Method.BSN: "BalancedSubnet (Sakarvadia et al.), a learned mask keeping keep_mass of the entries of W, trained to "
    "raise the loss on forget records and keep it on clean text (needs --forget and --clean-data)",
}
LABEL_MODES = LabelMode.values()


EXPERTS_KEY = "experts"  # layers JSON, per expert: {"12": {"gate": 0.6, "experts": {"3": {"gate": 0.5}}}}


def _check_entry(block: int, kind: str, value: float) -> None:
    if not isinstance(block, int) or block < 0:
        raise UserError(f"block '{block}' is not a block index (blocks count from 0); use keys like \"23\"")
    if kind not in PROJECTIONS:
        raise UserError(f"unknown projection '{kind}' for block {block}; use gate, up or down")
    if not 0.0 <= value <= 1.0:
        raise UserError(f"keep_mass {value} for block {block} {kind} is outside [0, 1]; give the fraction of curvature "
                        "mass to keep, e.g. 0.6")


def _keep_masses(block: int, kinds: Any, where: str) -> dict[str, float]:
    """The checked ``{projection: keep_mass}`` of one layers-JSON entry; ``where`` names it ("block 3 expert 1")."""
    if not isinstance(kinds, dict):
        raise UserError(f"layers JSON {where} must map projections to keep_mass, e.g. {{\"gate\": 0.6}}; "
                        f"got {json.dumps(kinds)}")
    for kind, value in kinds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"keep_mass for {where} {kind} must be a number in [0, 1], got {json.dumps(value)}")
        _check_entry(block, kind, float(value))
    return {kind: float(value) for kind, value in kinds.items()}


def _index(key: Any, error: str) -> int:
    """A layers-JSON key as a block or expert index, else a :class:`UserError` saying ``error``."""
    try:
        return int(key)
    except (TypeError, ValueError):
        raise UserError(error) from None


def _parse_experts(block: int, per_expert: Any) -> dict[tuple[int, int, str], float]:
    """The per-expert part of a block's entry, ``{"3": {"gate": 0.5}}`` -> ``{(block, 3, "gate"): 0.5}``."""
    if not isinstance(per_expert, dict):
        raise UserError(f'layers JSON block {block} "experts" must map expert indices to {{projection: keep_mass}}')
    out: dict[tuple[int, int, str], float] = {}
    for key, kinds in per_expert.items():
        expert = _index(key, f"layers JSON block {block} expert key '{key}' is not an expert index")
        for kind, value in _keep_masses(block, kinds, f"block {block} expert {key}").items():
            out[(block, expert, kind)] = value
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice (``{"0": ..., "0": ...}``: the last won, silently) is refused."""
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise UserError(f"the layers JSON gives '{twice}' twice in one object; give each block and projection once")
    return dict(pairs)


@dataclass
class EditSpec:
    """Which projections to edit and the keep_mass of each: ``keep_mass`` maps ``(block, kind)`` to a value in
    ``[0, 1]`` (parsing drops those at or above :data:`NO_EDIT_AT`, as the reference does). ``method``: a
    :class:`Method` or its string; ``seed`` feeds the random bases of the ``random`` control."""

    keep_mass: dict[tuple[int, str], float] = field(default_factory=dict)
    method: Method = Method.KFAC
    seed: int = 0
    bias: str = "joint"  # biased layers: joint = [W b] projected when the factors are over [a; 1]; keep = W alone
    # Mixture of experts, per expert: (block, expert, kind) -> keep_mass, winning over the block's (block, kind) for
    # that expert; a value >= NO_EDIT_AT leaves that expert's projection unedited.
    expert_keep_mass: dict[tuple[int, int, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = Method.parse(self.method, "edit method")
        if self.bias not in ("joint", "keep"):
            raise UserError(f"unknown --bias '{self.bias}'; use joint or keep")
        for (block, kind), value in self.keep_mass.items():
            _check_entry(block, kind, value)
        for (block, expert, kind), value in self.expert_keep_mass.items():
            _check_entry(block, kind, value)
            if not isinstance(expert, int) or expert < 0:
                raise UserError(f"expert '{expert}' of block {block} is not an expert index (experts count from 0)")

    @property
    def needs_factors(self) -> bool:
        return self.method.needs_factors

    @property
    def blocks(self) -> list[int]:
        return sorted({block for block, _ in self.keep_mass} | {block for block, _, _ in self.expert_keep_mass})

    @property
    def edits_something(self) -> bool:
        return bool(self.keep_mass) or any(v < NO_EDIT_AT for v in self.expert_keep_mass.values())

    @classmethod
    def from_json(cls, source: str | dict, method: str | None = None, seed: int | None = None,
                  bias: str | None = None) -> "EditSpec":
        """Parse the reference layers JSON (see the module docstring), or the dict :meth:`to_dict` writes
        (``{"method", "seed", "layers"}``), whose method, seed and bias the arguments override (defaults: ``kfac``,
        0, ``joint``)."""
        data = source
        if isinstance(source, str):
            try:
                data = json.loads(source, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                raise UserError(f"the layers JSON is malformed at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                                f"write e.g. {LAYERS_EXAMPLE}") from None
        if not isinstance(data, dict):
            raise UserError(f"the layers JSON must be an object of blocks, e.g. {LAYERS_EXAMPLE}")
        if "layers" in data and isinstance(data["layers"], dict):
            method = method if method is not None else data.get("method")
            seed = seed if seed is not None else data.get("seed")
            bias = bias if bias is not None else data.get("bias")
            data = data["layers"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UserError(f"the layers JSON's seed must be an integer, got {json.dumps(seed)}")
        keep_mass: dict[tuple[int, str], float] = {}
        expert_keep_mass: dict[tuple[int, int, str], float] = {}
        blocks: set[int] = set()
        for key, kinds in data.items():
            block = _index(key, f"layers JSON key '{key}' is not a block index; write e.g. {LAYERS_EXAMPLE}")
            if block in blocks:  # "0" and "00"
                raise UserError(f"the layers JSON gives block {block} twice; give each block once")
            blocks.add(block)
            if isinstance(kinds, dict):
                kinds = dict(kinds)
                per_expert = kinds.pop(EXPERTS_KEY, None)
                if per_expert is not None:
                    expert_keep_mass.update(_parse_experts(block, per_expert))
            for kind, value in _keep_masses(block, kinds, f"block {key}").items():
                if value < NO_EDIT_AT:
                    keep_mass[(block, kind)] = value
        return cls(keep_mass, method=method or Method.KFAC, seed=int(seed or 0), bias=bias or "joint",
                   expert_keep_mass=expert_keep_mass)  # fmt: skip

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "EditSpec":
        """:meth:`from_json` of a layers file; ``overrides``: its method, seed, bias."""
        path = Path(path)
        text = read_text(path, "the layers file", "a layers JSON file")
        try:
            return cls.from_json(text, **overrides)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def layers(self) -> dict[str, dict[str, float]]:
        """The reference layers mapping (block index as a string -> {kind: keep_mass})."""
        out: dict[str, dict[str, float]] = {}
        for (block, kind) in sorted(self.keep_mass, key=lambda bk: (bk[0], PROJECTIONS.index(bk[1]))):
            out.setdefault(str(block), {})[kind] = self.keep_mass[(block, kind)]
        for block, expert, kind in sorted(self.expert_keep_mass, key=lambda b: (b[0], b[1], PROJECTIONS.index(b[2]))):
            experts = out.setdefault(str(block), {}).setdefault(EXPERTS_KEY, {})
            experts.setdefault(str(expert), {})[kind] = self.expert_keep_mass[(block, expert, kind)]
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def to_json(self) -> str:
        """The reference layers JSON (method and seed are not part of it: see :meth:`to_dict`)."""
        return json.dumps(self.layers())

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "seed", "layers"}`` (plus ``"bias": "keep"`` when biases are kept)."""
        out: dict[str, Any] = {"method": self.method.value, "seed": self.seed, "layers": self.layers()}
        if self.bias != "joint":
            out["bias"] = self.bias
        return out
