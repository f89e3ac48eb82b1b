"""kfac-edit: remove rote memorization from causal LMs by editing MLP weights along K-FAC loss curvature.

Pipeline: text -> factors (:func:`collect_factors`) -> eigenbases and edit (:func:`apply_edit`) -> metrics
(:mod:`kfac_edit.evaluate`) -> report. Conventions (shapes, Kronecker order) are stated in :mod:`kfac_edit.curvature`.
"""

__version__ = "0.1.0"
