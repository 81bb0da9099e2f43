"""Structured sparsity patterns: N:M groups, blocks, whole units.

All three work on raw score arrays from any criterion, and plug into
:func:`sparsecore.prune` through its ``pattern=`` argument:

* :class:`NM` -- in every group of ``m`` consecutive entries along the input
  axis, keep the ``n`` most important. The grouped axis is axis 1 by default:
  the input axis of PyTorch ``Linear`` weights ``(out, in)`` and of
  convolution filters ``(out, in, kh, kw)``, which is the layout sparse
  tensor cores (cuSPARSELt, ``torch.sparse.to_sparse_semi_structured``)
  compress. For Keras ``(in, out)`` kernels pass ``axis=0``; for ``HWIO``
  convolution kernels ``axis=2``. The grouped axis must be a multiple of
  ``m``: anything else is an error (no entries are silently left dense).
* :class:`Blocks` -- blocks of ``(r, c)`` entries of the weight's 2-D CSR view
  ``(shape[0], prod(shape[1:]))`` are pruned or kept whole. Block scores pool
  the element scores by mean, max or L2 norm. When the shape is not a
  multiple of the block, the trailing blocks are partial: they pool the
  entries present (the mean divides by their count) and are pruned or kept
  whole like the others. A sparsity counts blocks.
* :class:`Units` -- whole output units (neurons, convolution filters): a unit's
  score reduces its slice of element scores (L1, L2, mean or max), or comes
  from a per-unit score such as per-unit mutual information. A sparsity
  counts units; at least ``min_keep`` units stay in each tensor.

Ties are broken as everywhere in sparsecore: the lower index is pruned first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from ._device import is_device_array
from ._kernels import cpu_pattern
from ._kernels.keys import MODE_IDENTITY, MODE_SQUARE
from ._source import Source
from ._validate import (
    as_float_array,
    check_fraction,
    check_threshold,
    flat,
    is_integer,
    nonfinite_error,
)
from .csr import index_dtype, matrix_shape
from .selection import mask_from, scores_source, select_one, threshold_rule

__all__ = ["NM", "Blocks", "NMCompact", "Units", "block_mask", "block_scores", "is_n_m", "nm_mask", "to_bsr",
           "unit_scores"]

_POOLS = {"mean": cpu_pattern.POOL_MEAN, "max": cpu_pattern.POOL_MAX, "l2": cpu_pattern.POOL_L2}
_REDUCE = {"mean": cpu_pattern.POOL_MEAN, "max": cpu_pattern.POOL_MAX, "l2": cpu_pattern.POOL_L2,
           "l1": cpu_pattern.POOL_L1}


def _int(value, what, lo=None):
    if not is_integer(value):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"{what} must be at least {lo}, got {v}")
    return v


def _check_nm(n, m):
    n = _int(n, "N of an N:M pattern")
    m = _int(m, "M of an N:M pattern")
    if not (1 <= n < m):
        raise ValueError(f"an N:M pattern needs 1 <= N < M, got {n}:{m}")
    return n, m


class _Pattern:
    """What :func:`sparsecore.prune` asks of every pattern, with the answers
    of unstructured selection (every entry on its own), which the patterns
    override: ``counted`` (what a sparsity counts, for messages),
    ``fixes_sparsity`` (N:M: no target to give), ``groups`` (blocks and
    units: their keep-mask is reported), ``clips_counts`` (local counts kept
    within the caps), and the methods below; N:M adds ``keep_mask``."""

    counted = "entries"
    fixes_sparsity = False
    groups = False
    clips_counts = False

    def takes_unit_scores(self, score_shape, weight_shape):
        """Whether scores of ``score_shape`` are one per unit of weights of ``weight_shape``."""
        return False

    def group_source(self, src):
        """The source selection ranks: the element scores themselves."""
        return src

    def expand(self, keep, shape):
        """The flat element keep-mask of a flat group keep-mask."""
        return keep

    def all_kept(self, mask, shape):
        """Per group (flat): whether the element ``mask`` keeps all of it."""
        return flat_mask(mask)

    def cap_counts(self, lo, hi, sizes):
        """The per-tensor caps ``lo``/``hi`` (in groups) for tensors of ``sizes`` groups."""
        return lo, hi


@dataclass(frozen=True)
class NM(_Pattern):
    """N:M semi-structured sparsity: keep ``n`` of every ``m`` consecutive
    entries along ``axis`` (default: axis 1, the input axis of ``(out, in)``
    and ``(out, in, kh, kw)`` weights; axis 0 for 1-D tensors).

    Examples
    --------
    >>> import sparsecore as sc
    >>> sc.NM(2, 4)
    NM(n=2, m=4, axis=None)
    >>> sc.NM.parse("4:8").m
    8
    """

    n: int
    m: int
    axis: int | None = None

    def __post_init__(self):
        _check_nm(self.n, self.m)
        if self.axis is not None:
            _int(self.axis, "axis of an N:M pattern")

    @classmethod
    def parse(cls, text: str, axis: int | None = None) -> NM:
        """``"2:4"`` -> ``NM(2, 4)``."""
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not found:
            raise ValueError(f"an N:M pattern is written like '2:4', got {text!r}")
        return cls(int(found[1]), int(found[2]), axis)

    @property
    def sparsity(self) -> float:
        """The fraction of entries pruned: ``1 - n / m``."""
        return 1.0 - self.n / self.m

    fixes_sparsity = True

    def keep_mask(self, src):
        """Flat keep-mask of the ``n`` highest scores of every group of ``m``."""
        return nm_source_mask(src, self.n, self.m, self.axis)


@dataclass(frozen=True)
class Blocks(_Pattern):
    """Block sparsity: ``(r, c)`` blocks of the 2-D view pruned or kept whole,
    scored by the ``pool`` ("mean", "max", "l2") of their element scores.

    Examples
    --------
    >>> import sparsecore as sc
    >>> sc.Blocks((4, 4), "max")
    Blocks(shape=(4, 4), pool='max')
    """

    shape: tuple
    pool: str = "mean"

    def __post_init__(self):
        shape = self.shape
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
            shape = (shape, shape)
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"a block shape is (rows, cols), got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(_int(s, "a block dimension", 1) for s in shape))
        if self.pool not in _POOLS:
            raise ValueError(f"block pool must be one of {list(_POOLS)}, got {self.pool!r}")

    counted = "blocks"
    groups = True

    def group_source(self, src):
        """The pooled block scores of a source, as a source of their own."""
        pooled = block_source_scores(src, self)
        return group_source(src.name, pooled, pooled.shape)

    def expand(self, keep, shape):
        """Flat element keep-mask of a flat block keep-mask."""
        R, C = matrix_shape(shape)
        r, c = self.shape
        return flat_mask(expand_blocks(keep.reshape(-(-R // r), -(-C // c)), shape, self.shape))

    def all_kept(self, mask, shape):
        """Per block (flat): whether the flat element ``mask`` keeps all of it."""
        R, C = matrix_shape(shape)
        r, c = self.shape
        if is_device_array(mask):
            from ._cuda import pattern as device_pattern

            return device_pattern.blocks_all_kept(mask, R, C, r, c)
        m = Source("mask", flat(mask).astype(np.float32), tuple(shape), MODE_IDENTITY, role="mask")
        return (_pool_source(m, (R, C), self.shape, "mean") == 1.0).reshape(-1)


@dataclass(frozen=True)
class Units(_Pattern):
    """Whole output units (neurons, filters) along ``axis``: 0 for
    ``(out, in)`` and ``OIHW`` weights, -1 for ``(in, out)`` and ``HWIO``.
    A unit's score is the ``reduce`` ("l1", "l2", "mean", "max") of its
    entries' scores; per-unit scores can be given directly instead. At least
    ``min_keep`` units of every tensor are kept.

    Examples
    --------
    >>> import sparsecore as sc
    >>> sc.Units(reduce="l1")
    Units(axis=0, reduce='l1', min_keep=1)
    """

    axis: int = 0
    reduce: str = "l2"
    min_keep: int = 1

    def __post_init__(self):
        _int(self.axis, "axis of a Units pattern")
        if self.reduce not in _REDUCE:
            raise ValueError(f"unit reduce must be one of {list(_REDUCE)}, got {self.reduce!r}")
        _int(self.min_keep, "min_keep of a Units pattern", 1)

    counted = "units"
    groups = True
    clips_counts = True  # local counts stay within the caps: min_keep units remain

    def takes_unit_scores(self, score_shape, weight_shape):
        """Whether scores of ``score_shape`` are one per unit of weights of ``weight_shape``."""
        nd = len(weight_shape)
        return (len(score_shape) == 1 and nd > 1 and -nd <= self.axis < nd
                and score_shape[0] == weight_shape[self.axis])

    def group_source(self, src):
        """Per-unit scores of a source (given per unit: used as they are)."""
        if src.per_unit:
            return group_source(src.name, src.data, src.shape, src.original)
        units = unit_source_scores(src, self)
        return group_source(src.name, units, units.shape)

    def expand(self, keep, shape):
        """Flat element keep-mask of a unit keep vector."""
        if is_device_array(keep):
            from ._cuda import pattern as device_pattern

            _, (_, L, B) = _axis(shape, self.axis, "mask", "Units pattern")
            return device_pattern.expand_units(keep, L, B, math.prod(shape))
        return unit_mask(keep, shape, self.axis).reshape(-1)

    def all_kept(self, mask, shape):
        """Per unit: whether the flat element ``mask`` keeps all of it."""
        _, (A, L, B) = _axis(shape, self.axis, "mask", "Units pattern")
        if is_device_array(mask):
            from ._cuda import pattern as device_pattern

            return device_pattern.units_all_kept(mask, A, L, B)
        m = Source("mask", flat(mask).astype(np.float32), tuple(shape), MODE_IDENTITY, role="mask")
        return unit_source_scores(m, Units(self.axis, "mean")) == 1.0

    def cap_counts(self, lo, hi, sizes):
        """At least ``min_keep`` units of each tensor stay."""
        hi = np.minimum(hi, np.maximum(sizes - self.min_keep, 0))
        return np.minimum(lo, hi), hi


class _Elements(_Pattern):
    """Unstructured selection as a pattern: every entry on its own."""


ELEMENTS = _Elements()


def as_pattern(pattern):
    """``None``, a pattern object, or a string ``"2:4"``."""
    if pattern is None or isinstance(pattern, (NM, Blocks, Units)):
        return pattern
    if isinstance(pattern, str):
        return NM.parse(pattern)
    raise TypeError(f"pattern must be None, 'N:M', NM, Blocks or Units; got {type(pattern).__name__}")


def pattern_of(pattern):
    """The pattern object that does the work: :func:`as_pattern`, with
    unstructured selection (``None``) as :data:`ELEMENTS`."""
    p = as_pattern(pattern)
    return ELEMENTS if p is None else p


def flat_mask(mask):
    """A flat view of a host or device keep-mask."""
    return mask.reshape(mask.size) if mask.ndim != 1 else mask


def _axis(shape, axis, name, what):
    nd = len(shape)
    if nd == 0:
        raise ValueError(f"{what} of {name!r}: a scalar has no axis to group")
    if axis is None:
        axis = 1 if nd >= 2 else 0
    if not -nd <= axis < nd:
        raise ValueError(f"{what} of {name!r}: axis {axis} is out of range for shape {tuple(shape)}")
    axis %= nd
    return axis, (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


def _nm_view(shape, n, m, axis, name):
    axis, (A, L, B) = _axis(shape, axis, name, f"{n}:{m} pattern")
    if L % m:
        raise ValueError(f"{n}:{m} pattern of {name!r}: axis {axis} has {L} entries, not a multiple of {m} "
                         f"(shape {tuple(shape)}); pad the tensor, pick another axis, or leave it out")
    return axis, A, L, B


def _raise_bad(src, count, first):
    raise nonfinite_error(src.name, src.role, src.errors_index(), int(count), int(first))


def nm_source_mask(src, n, m, axis):
    """Flat keep-mask of a :class:`Source` under ``n:m`` along ``axis``."""
    axis, A, L, B = _nm_view(src.shape, n, m, axis, src.name)
    if src.on_device:
        from ._cuda import pattern as device_pattern

        return device_pattern.nm_keep(src, n, m, A, L, B)
    keep = np.empty(src.size, np.bool_)
    if B == 1 and m <= cpu_pattern.NM_UNROLL_MAX:  # contiguous groups
        bad = np.zeros(max(1, min(4 * numba.get_num_threads(), src.size // (1 << 14))), np.int64)
        if src.size:
            cpu_pattern.nm_keep_rows(src.mode, src.needs_wide(), n, m)(src.data, keep, bad)
    else:
        bad = np.zeros(max(A, 1), np.int64)
        if src.size:
            cpu_pattern.nm_keep(src.mode, src.needs_wide(), False)(src.data, A, L, B, n, m, keep, bad)
    if bad.any():
        count, first = _first_bad(src)
        _raise_bad(src, count, first)
    return keep


def _first_bad(src):
    """``(count, first)`` of the non-finite scores of ``src`` (error path only)."""
    x = src.data.astype(np.float64)
    if src.mode == MODE_SQUARE:
        x = x * x
    bad = ~np.isfinite(x)
    return int(bad.sum()), int(np.argmax(bad))


def nm_mask(scores: ArrayLike, n: int, m: int, *, axis: int | None = None, absolute: bool = False,
            device: str = "auto") -> np.ndarray:
    """Keep-mask that keeps the ``n`` highest scores of every ``m`` consecutive
    entries along ``axis``.

    Parameters
    ----------
    scores : array_like of float
        Importance, shaped like the weight (at least 1-D).
    n, m : int
        ``1 <= n < m``: 2:4 and 4:8 are what sparse tensor cores run.
    axis : int, optional
        The grouped axis; default 1 (the input axis of ``(out, in)`` and
        ``(out, in, kh, kw)`` weights), 0 for 1-D scores.
    absolute : bool
        Rank ``|scores|`` (magnitude) without forming it.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores) ranks the groups on the
        GPU and returns a device mask (groups of at most 32).

    Returns
    -------
    numpy.ndarray of bool
        Exactly ``n`` True entries in every group.

    Raises
    ------
    ValueError
        ``n >= m`` or ``n < 1``; the axis length not a multiple of ``m``;
        NaN or Inf scores.

    Notes
    -----
    Among equal scores the entry with the lower index is pruned first.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.nm_mask(np.array([[1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 2.0, 1.0]]), 2, 4)
    array([[False, False,  True,  True],
           [ True, False,  True, False]])
    """
    n, m = _check_nm(n, m)
    src = scores_source(scores, absolute=absolute, device=device)
    return nm_source_mask(src, n, m, axis).reshape(src.shape)


def is_n_m(weights: ArrayLike, n: int, m: int, *, axis: int | None = None) -> bool:
    """Whether every group of ``m`` consecutive entries along ``axis`` holds at
    most ``n`` non-zeros.

    A tensor whose grouped axis is not a multiple of ``m`` cannot hold the
    pattern and gives False; an empty tensor gives True.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.is_n_m(np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), 2, 4)
    True
    >>> sc.is_n_m(np.array([[1.0, 2.0, 0.0, 4.0]]), 2, 4)
    False
    """
    n, m = _check_nm(n, m)
    w = np.asarray(weights)
    if w.size == 0:
        return True
    try:
        axis, A, L, B = _nm_view(w.shape, n, m, axis, "weights")
    except ValueError:
        if w.ndim == 0:
            raise
        return False
    counts = np.empty((A, L // m, B), np.int64)
    cpu_pattern.nm_group_counts(flat(w), A, L, B, m, counts)
    return bool(counts.max() <= n)


@dataclass(frozen=True)
class NMCompact:
    """An N:M-sparse tensor stored as its kept values and their positions.

    ``values`` and ``positions`` have the weight's shape with the grouped axis
    moved last and shrunk from ``L`` to ``L // m * n``: the ``n`` entries of
    each group in order, and each one's index ``0 .. m-1`` within its group
    (uint8). This is the compressed layout of sparse tensor cores, with the
    metadata kept as plain indices.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = np.array([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 2.0]])
    >>> c = sc.NMCompact.from_dense(w, 2, 4)
    >>> c.values, c.positions
    (array([[5., 7., 1., 2.]]), array([[1, 3, 0, 3]], dtype=uint8))
    >>> np.array_equal(c.dense(), w)
    True
    """

    values: np.ndarray
    positions: np.ndarray
    n: int
    m: int
    axis: int
    shape: tuple

    @classmethod
    def from_dense(cls, weights: ArrayLike, n: int, m: int, *, mask: ArrayLike | None = None,
                   axis: int | None = None, name: str = "weights") -> NMCompact:
        """Compress ``weights`` (where ``mask`` is True, or its non-zeros).

        Each group must keep at most ``n`` entries; groups with fewer are
        padded with zeros at the first unused positions.
        """
        n, m = _check_nm(n, m)
        w = as_float_array(weights, name)
        axis, _, L, _ = _nm_view(w.shape, n, m, axis, name)
        if mask is None:
            keep = w != 0
        else:
            keep = np.asarray(mask)
            if keep.dtype != np.bool_ or keep.shape != w.shape:
                raise ValueError(f"mask for {name!r} must be bool of shape {w.shape}, got {keep.dtype} "
                                 f"{keep.shape}")
        rows = w.size // L if L else math.prod(w.shape[:axis] + w.shape[axis + 1:])
        wt = np.moveaxis(w, axis, -1).reshape(rows, L // m, m)
        kt = np.moveaxis(keep, axis, -1).reshape(rows, L // m, m)
        per = kt.sum(axis=2)
        if per.size and per.max() > n:
            g = np.unravel_index(int(np.argmax(per)), per.shape)
            raise ValueError(f"{name!r} is not {n}:{m} sparse along axis {axis}: a group holds "
                             f"{int(per.max())} kept entries (group {g[1]} of row {g[0]} of the "
                             f"axis-last view); prune it with nm_mask first")
        # kept positions first, in order; then the unused ones (zero padding)
        pos = np.argsort(~kt, axis=2, kind="stable")[:, :, :n]
        vals = np.take_along_axis(wt, pos, axis=2) * np.take_along_axis(kt, pos, axis=2)
        out_shape = np.moveaxis(np.empty(w.shape, np.bool_), axis, -1).shape[:-1] + (L // m * n,)
        return cls(vals.reshape(out_shape), pos.astype(np.uint8).reshape(out_shape), n, m, axis, tuple(w.shape))

    def dense(self) -> np.ndarray:
        """The full tensor, zeros where entries were pruned."""
        L = self.shape[self.axis]
        moved = np.moveaxis(np.empty(self.shape, np.bool_), self.axis, -1).shape
        out = np.zeros((math.prod(moved[:-1]), L // self.m, self.m), self.values.dtype)
        vals = self.values.reshape(out.shape[0], L // self.m, self.n)
        pos = self.positions.reshape(vals.shape).astype(np.intp)
        np.put_along_axis(out, pos, vals, axis=2)
        return np.moveaxis(out.reshape(moved), -1, self.axis).copy()

    @property
    def nbytes(self) -> int:
        """Bytes of the values and positions."""
        return int(self.values.nbytes + self.positions.nbytes)


def _pool_source(src, shape2, block, pool):
    """Pooled ``(ceil(R / r), ceil(C / c))`` float64 block scores of a source."""
    R, C = shape2
    r, c = block
    out = np.empty((-(-R // r), -(-C // c)), np.float64)
    bad = np.zeros(out.shape[0], np.int64)
    first = np.zeros(out.shape[0], np.int64)
    if out.size:
        cpu_pattern.block_pool(src.mode, src.needs_wide(), _POOLS[pool], c)(src.data, R, C, r, c, out, bad, first)
    if bad.any():
        _raise_bad(src, bad.sum(), first[bad > 0].min())
    return out


def check_block(shape, block, name):
    """The 2-D view of ``shape``, checked to hold at least one ``block``."""
    R, C = matrix_shape(shape)
    r, c = block
    if r > R or c > C:
        raise ValueError(f"block {block} is larger than tensor {name!r}, whose 2-D view is {(R, C)} "
                         f"(shape {tuple(shape)})")
    return R, C


def block_source_scores(src, block: Blocks):
    """Float64 pooled block scores of a source (host or device)."""
    R, C = check_block(src.shape, block.shape, src.name)
    if src.on_device:
        from ._cuda import pattern as device_pattern

        return device_pattern.block_scores(src, R, C, *block.shape, _POOLS[block.pool])
    return _pool_source(src, (R, C), block.shape, block.pool)


def block_scores(scores: ArrayLike, block=(4, 4), pool: str = "mean", *, absolute: bool = False,
                 device: str = "auto") -> np.ndarray:
    """Block scores of a weight's 2-D view, pooled from element scores.

    Parameters
    ----------
    scores : array_like of float
        Element importance, shaped like the weight.
    block : (int, int)
        Block rows and columns of the 2-D view ``(shape[0], prod(shape[1:]))``.
    pool : {"mean", "max", "l2"}
        How a block's element scores combine. Trailing partial blocks pool
        the entries present (the mean divides by their count).
    absolute : bool
        Pool ``|scores|``.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores) pools on the GPU (same
        sums in the same order) and returns a device array.

    Returns
    -------
    numpy.ndarray of float64, shape ``(ceil(R / r), ceil(C / c))``

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.block_scores(np.arange(12.0).reshape(3, 4), (2, 2), "max")
    array([[ 5.,  7.],
           [ 9., 11.]])
    """
    b = Blocks(block, pool)
    return block_source_scores(scores_source(scores, absolute=absolute, device=device), b)


def block_mask(scores: ArrayLike, block=(4, 4), pool: str = "mean", *, sparsity: float | None = None,
               threshold: float | None = None, absolute: bool = False, device: str = "auto") -> np.ndarray:
    """Keep-mask that prunes whole ``(r, c)`` blocks of the 2-D view.

    Exactly ``round(sparsity * nblocks)`` blocks with the lowest pooled
    scores are pruned (ties: lower block index, row-major, first), or the
    blocks whose pooled score is below ``threshold``. Give exactly one.

    Parameters
    ----------
    scores : array_like of float
        Element importance, shaped like the weight.
    block : (int, int)
        Block shape in the 2-D view ``(shape[0], prod(shape[1:]))``; trailing
        partial blocks pool the entries present and go whole like the rest.
    pool : {"mean", "max", "l2"}
    sparsity, threshold : float
    absolute : bool
        Pool ``|scores|``.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores): pooling, selection and
        the mask on the GPU; a device mask.

    Returns
    -------
    numpy.ndarray of bool, shaped like ``scores``.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> s = np.array([[1.0, 1.0, 5.0, 5.0], [1.0, 1.0, 5.0, 5.0]])
    >>> sc.block_mask(s, (2, 2), sparsity=0.5).astype(int)
    array([[0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("block_mask: give exactly one of sparsity= and threshold=")
    b = Blocks(block, pool)
    src = scores_source(scores, absolute=absolute, device=device)
    pooled = block_source_scores(src, b)
    gsrc = group_source(src.name, pooled, pooled.shape)
    if sparsity is not None:
        rule = select_one(gsrc, round(check_fraction(sparsity, "block scores") * gsrc.size))
    else:
        rule = threshold_rule(gsrc, check_threshold(threshold, "block scores"))
    return expand_blocks(mask_from(gsrc, rule), src.shape, b.shape)


def expand_blocks(keep_blocks, shape, block):
    """Element keep-mask (shaped ``shape``) of a block keep-mask."""
    R, C = matrix_shape(shape)
    if is_device_array(keep_blocks):
        from ._cuda import pattern as device_pattern

        return device_pattern.expand_blocks(flat_mask(keep_blocks), R, C, *block).reshape(shape)
    mask = np.empty(R * C, np.bool_)
    if mask.size:
        cpu_pattern.block_expand(np.ascontiguousarray(keep_blocks), R, C, block[0], block[1], mask)
    return mask.reshape(shape)


def to_bsr(weights: ArrayLike, block, *, mask: ArrayLike | None = None, name: str = "weights") -> sp.bsr_array:
    """``scipy.sparse.bsr_array`` of a block-sparse weight's 2-D view.

    A block is stored when any of its entries is kept (``mask``) or
    non-zero. SciPy's BSR needs the shape to be a multiple of the block: for
    a weight with partial trailing blocks use CSR (:func:`to_csr`), which
    holds any pattern.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = np.zeros((4, 4)); w[:2, 2:] = 1.0
    >>> b = sc.to_bsr(w, (2, 2))
    >>> b.blocksize, b.nnz
    ((2, 2), 4)
    """
    b = Blocks(block)
    w = as_float_array(weights, name)
    R, C = check_block(w.shape, b.shape, name)
    r, c = b.shape
    if R % r or C % c:
        raise ValueError(f"to_bsr of {name!r}: the 2-D view {(R, C)} is not a multiple of block {(r, c)}, "
                         f"which scipy's BSR requires; use to_csr for partial blocks")
    w2 = w.reshape(R, C)
    if mask is not None:
        keep = np.asarray(mask)
        if keep.dtype != np.bool_ or keep.shape != w.shape:
            raise ValueError(f"mask for {name!r} must be bool of shape {w.shape}, got {keep.dtype} {keep.shape}")
        w2 = np.where(keep.reshape(R, C), w2, 0)
    else:
        keep = w2 != 0
    tiles = np.ascontiguousarray(w2.reshape(R // r, r, C // c, c).transpose(0, 2, 1, 3))
    kept = np.asarray(keep).reshape(R // r, r, C // c, c).any(axis=(1, 3))
    nb = int(kept.sum())
    idt = index_dtype((R // r, C // c), nb)
    indptr = np.zeros(R // r + 1, idt)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    indices = np.nonzero(kept)[1].astype(idt)
    data = tiles[kept]
    a = sp.bsr_array((data, indices, indptr), shape=(R, C), blocksize=(r, c))
    return a


def unit_source_scores(src, units: Units):
    """Per-unit float64 scores of a source, reduced over all but ``units.axis``."""
    _, (A, L, B) = _axis(src.shape, units.axis, src.name, "Units pattern")
    if src.on_device:
        from ._cuda import pattern as device_pattern

        return device_pattern.unit_scores(src, A, L, B, _REDUCE[units.reduce])
    out = np.empty(L, np.float64)
    bad = np.zeros(L, np.int64)
    first = np.zeros(L, np.int64)
    if L:
        cpu_pattern.unit_reduce(src.mode, src.needs_wide(), False)(src.data, A, L, B, _REDUCE[units.reduce],
                                                                   out, bad, first)
    if bad.any():
        _raise_bad(src, bad.sum(), first[bad > 0].min())
    return out


def unit_scores(scores: ArrayLike, *, axis: int = 0, reduce: str = "l2", absolute: bool = False,
                device: str = "auto") -> np.ndarray:
    """Per-unit scores: each unit's slice along ``axis`` reduced to a number.

    Parameters
    ----------
    scores : array_like of float
        Element importance, shaped like the weight.
    axis : int
        The unit (output) axis: 0 for ``(out, in)`` and ``OIHW``, -1 for
        ``(in, out)`` and ``HWIO``.
    reduce : {"l1", "l2", "mean", "max"}
        How a unit's element scores combine (in float64).
    absolute : bool
        Reduce ``|scores|``.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores) reduces on the GPU and
        returns a device array.

    Returns
    -------
    numpy.ndarray of float64, one score per unit.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.unit_scores(np.array([[3.0, -4.0], [1.0, 0.0]]), reduce="l2")
    array([5., 1.])
    """
    u = Units(axis, reduce)
    return unit_source_scores(scores_source(scores, absolute=absolute, device=device), u)


def unit_mask(keep_units, shape, axis):
    """Element keep-mask of a unit keep vector along ``axis``."""
    axis %= len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(np.asarray(keep_units, np.bool_).reshape(view), shape).copy()


def group_source(name, scores, shape, original=None):
    """A :class:`Source` over pooled or per-unit float64 scores."""
    if is_device_array(scores):
        from ._cuda import select as device_select

        return device_select.group_source(name, scores, shape, original)
    data = np.ascontiguousarray(scores, np.float64).reshape(-1)
    return Source(name, data, tuple(shape), MODE_IDENTITY, role="group scores",
                  original=original if original is not None else data)
