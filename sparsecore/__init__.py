"""sparsecore: a framework-agnostic neural-network pruning engine.

Importance (magnitude, gradient statistics, user criteria) -> selection
(threshold, exact sparsity, local or global with caps) -> canonical CSR
weights and the kernels that run them, on raw NumPy arrays.
"""

from ._version import __version__
from .csr import check_csr, csr_matmul, index_dtype, matrix_shape, to_csr, to_dense
from .importance import (
    Criterion,
    GradientAccumulator,
    get_criterion,
    list_criteria,
    magnitude,
    register_criterion,
)
from .mutual_info import Bins, PairwiseMIAccumulator, UnitMIAccumulator, fit_bins, pairwise_mi, unit_mi
from .prune import PruneResult, TensorSummary, prune
from .selection import select_threshold, sparsity_mask, threshold_mask

__all__ = [
    "Bins",
    "Criterion",
    "GradientAccumulator",
    "PairwiseMIAccumulator",
    "PruneResult",
    "TensorSummary",
    "UnitMIAccumulator",
    "__version__",
    "check_csr",
    "csr_matmul",
    "fit_bins",
    "get_criterion",
    "index_dtype",
    "list_criteria",
    "magnitude",
    "matrix_shape",
    "pairwise_mi",
    "prune",
    "register_criterion",
    "select_threshold",
    "sparsity_mask",
    "threshold_mask",
    "to_csr",
    "to_dense",
    "unit_mi",
]
