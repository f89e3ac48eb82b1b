"""K-FAC factors: collection (:mod:`.collect`) and storage (:mod:`.store`)."""

from .store import Factors, ModuleFactors

__all__ = ["Factors", "ModuleFactors"]
