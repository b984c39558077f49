"""Masks on a model: the parametrization, the producers (magnitude, random, calibrated, learned), the verbs."""

from .batchnorm import recalibrate_bn
from .coverage import LayerReport, Report, count_macs, report
from .parametrization import Mask, SparseParametrization, SparseWeight, is_sparsified, sparse_weights, structured_mask
from .verbs import check, finalize, masks, parametrization_of, sparsify

__all__ = [
    "Mask",
    "SparseParametrization",
    "SparseWeight",
    "sparse_weights",
    "is_sparsified",
    "LayerReport",
    "Report",
    "count_macs",
    "report",
    "check",
    "finalize",
    "masks",
    "parametrization_of",
    "sparsify",
    "recalibrate_bn",
    "structured_mask",
]
