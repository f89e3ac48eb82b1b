"""kfac-edit: remove rote memorization from causal LMs by editing MLP weights along K-FAC loss curvature.

Pipeline, one module per arrow: text (:mod:`kfac_edit.data`) -> factors (:func:`collect_factors`, :class:`Factors`)
-> eigenbases (:mod:`kfac_edit.eigen`) -> edited weights (:class:`EditSpec`, :func:`apply_edit`) -> metrics
(:func:`evaluate_model`) -> report (:mod:`kfac_edit.report`). Conventions (shapes, Kronecker order, pair mass) are
stated once, in :mod:`kfac_edit.curvature`. The public names below load lazily: ``import kfac_edit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULE_EXPORTS = {  # module -> the public names it defines
    "factors": "collect_factors CollectConfig FactorCollector Factors ModuleFactors",
    "factors.ekfac": "collect_ekfac Ekfac",
    "curvature": "Eigen eigendecompose select_pairs select_pairs_mask select_mass pairs_mask edit_weight "
    "project_weight",
    "spec": "EditSpec Method LabelMode",
    "edit": "EditReport apply_edit restore save_edited Protection",
    "eigen": "EigenCache",
    "predict": "predict_cost",
    "evaluate": "EvalConfig find_memorized",
    "models": "load_model find_projections",
    "data": "token_batches",
    "errors": "UserError",
    "testbed": "TestbedConfig build_testbed rule_accuracy",
    "demo": "DemoConfig run_demo",
}
_EXPORTS = {name: (module, name) for module, names in _MODULE_EXPORTS.items() for name in names.split()}
_EXPORTS["evaluate_model"] = ("evaluate", "evaluate")  # `kfac_edit.evaluate` itself is the subpackage

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'kfac_edit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
