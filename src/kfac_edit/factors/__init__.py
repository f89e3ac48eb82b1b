"""K-FAC factors: one collection (:mod:`.collect`), its hooks (:mod:`.collector`) and storage (:mod:`.store`)."""

from .collect import CollectConfig, collect_factors
from .collector import FactorCollector
from .store import Factors, ModuleFactors

__all__ = ["CollectConfig", "Factors", "ModuleFactors", "FactorCollector", "collect_factors"]
