"""K-FAC factors: collection (:mod:`.collect`) and storage (:mod:`.store`)."""

from .collect import FactorCollector, collect_factors
from .store import Factors, ModuleFactors

__all__ = ["Factors", "ModuleFactors", "FactorCollector", "collect_factors"]
