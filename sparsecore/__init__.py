"""sparsecore: a framework-agnostic neural-network pruning engine.

Importance (magnitude, gradient statistics, mutual information, OBS
saliency, user criteria) -> selection (threshold, exact sparsity, per row,
per tensor or global with caps; unstructured, N:M, blocks or whole units;
gradual schedules) -> repair (the OBS sweep of SparseGPT and the exact refit
from Hessians of layer inputs) -> canonical CSR weights, the kernels that run
them, and smaller dense layers, on raw NumPy arrays.
"""

from . import _cache  # noqa: F401  (first: where Numba may cache, before any kernel is defined)
from ._version import __version__
from .allocation import outlier_allocation
from .csr import check_csr, csr_matmul, index_dtype, matrix_shape, to_csr, to_dense
from .groups import Group, group_scores, kept_entries
from .importance import (
    Accumulator,
    Criterion,
    GradientAccumulator,
    get_criterion,
    list_criteria,
    magnitude,
    register_criterion,
)
from .mutual_info import Bins, PairwiseMIAccumulator, UnitMIAccumulator, fit_bins, pairwise_mi, unit_mi
from .packed import PackedMatrix, check_packed, pack, packed_matmul
from .patterns import NM, Blocks, NMCompact, Units, block_mask, block_scores, is_n_m, nm_mask, to_bsr, unit_scores
from .prune import PruneResult, TensorSummary, prune
from .reconstruct import (
    HessianAccumulator,
    LayerProblem,
    RepairMethod,
    get_repair,
    list_repairs,
    obs_saliency,
    prune_layer,
    reconstruct,
    register_repair,
    sparsegpt,
    unfold_patches,
)
from .schedule import ConstantSparsity, GradualPruner, PolynomialDecay, PruningHistory, PruningStep
from .selection import select_threshold, sparsity_mask, threshold_mask
from .sequential import Feed, SequentialHooks, StopForward, prune_sequential
from .shrink import Layer, refit_inputs, shrink

__all__ = [
    "Accumulator",
    "Bins",
    "Blocks",
    "ConstantSparsity",
    "Criterion",
    "Feed",
    "GradientAccumulator",
    "GradualPruner",
    "Group",
    "HessianAccumulator",
    "Layer",
    "LayerProblem",
    "NM",
    "NMCompact",
    "PackedMatrix",
    "PairwiseMIAccumulator",
    "PolynomialDecay",
    "PruneResult",
    "PruningHistory",
    "PruningStep",
    "RepairMethod",
    "SequentialHooks",
    "StopForward",
    "TensorSummary",
    "UnitMIAccumulator",
    "Units",
    "__version__",
    "block_mask",
    "block_scores",
    "check_csr",
    "check_packed",
    "csr_matmul",
    "fit_bins",
    "get_criterion",
    "get_repair",
    "group_scores",
    "index_dtype",
    "is_n_m",
    "kept_entries",
    "list_criteria",
    "list_repairs",
    "magnitude",
    "matrix_shape",
    "nm_mask",
    "obs_saliency",
    "outlier_allocation",
    "pack",
    "packed_matmul",
    "pairwise_mi",
    "prune",
    "prune_layer",
    "prune_sequential",
    "reconstruct",
    "refit_inputs",
    "register_criterion",
    "register_repair",
    "select_threshold",
    "shrink",
    "sparsegpt",
    "sparsity_mask",
    "threshold_mask",
    "to_bsr",
    "to_csr",
    "to_dense",
    "unfold_patches",
    "unit_mi",
    "unit_scores",
]
