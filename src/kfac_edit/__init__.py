"""kfac-edit: remove rote memorization from causal LMs by editing MLP weights along K-FAC loss curvature.

Pipeline, one module per arrow: text (:mod:`kfac_edit.data`) -> factors (:func:`collect_factors`, :class:`Factors`)
-> eigenbases (:mod:`kfac_edit.eigen`) -> edited weights (:class:`EditSpec`, :func:`apply_edit`) -> metrics (:func:`evaluate_model`) -> report
(:mod:`kfac_edit.report`). Conventions (shapes, Kronecker order, pair mass) are stated once, in
:mod:`kfac_edit.curvature`.

The public names below are imported lazily, so ``import kfac_edit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str | tuple[str, str]] = {
    "collect_factors": "kfac_edit.factors",
    "CollectConfig": "kfac_edit.factors",
    "FactorCollector": "kfac_edit.factors",
    "Factors": "kfac_edit.factors",
    "ModuleFactors": "kfac_edit.factors",
    "collect_ekfac": "kfac_edit.factors.ekfac",
    "Ekfac": "kfac_edit.factors.ekfac",
    "Eigen": "kfac_edit.curvature",
    "eigendecompose": "kfac_edit.curvature",
    "select_pairs": "kfac_edit.curvature",
    "select_pairs_mask": "kfac_edit.curvature",
    "select_mass": "kfac_edit.curvature",
    "pairs_mask": "kfac_edit.curvature",
    "edit_weight": "kfac_edit.curvature",
    "project_weight": "kfac_edit.curvature",
    "EditSpec": "kfac_edit.spec",
    "Method": "kfac_edit.spec",
    "LabelMode": "kfac_edit.spec",
    "EditReport": "kfac_edit.edit",
    "EigenCache": "kfac_edit.eigen",
    "apply_edit": "kfac_edit.edit",
    "restore": "kfac_edit.edit",
    "save_edited": "kfac_edit.edit",
    "Protection": "kfac_edit.edit",
    "predict_cost": "kfac_edit.predict",
    "EvalConfig": "kfac_edit.evaluate",
    "evaluate_model": ("kfac_edit.evaluate", "evaluate"),  # `kfac_edit.evaluate` itself is the subpackage
    "find_memorized": "kfac_edit.evaluate",
    "load_model": "kfac_edit.models",
    "find_projections": "kfac_edit.models",
    "token_batches": "kfac_edit.data",
    "UserError": "kfac_edit.errors",
    "TestbedConfig": "kfac_edit.testbed",
    "build_testbed": "kfac_edit.testbed",
    "rule_accuracy": "kfac_edit.testbed",
    "DemoConfig": "kfac_edit.demo",
    "run_demo": "kfac_edit.demo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kfac_edit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
