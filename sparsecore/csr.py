"""CSR sparse weights: construction fused with selection, checks, products.

Results are canonical ``scipy.sparse.csr_array``: sorted column indices, no
duplicates, no stored zeros; ``indices`` and ``indptr`` share one dtype,
int32 unless the shape or nnz needs int64. A weight of N dimensions is stored
as ``(shape[0], prod(shape[1:]))`` (a 1-D weight as one row, a scalar as 1x1);
:func:`to_dense` restores the original shape.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from ._device import is_device_array, resolve, to_device
from ._kernels import cpu_csr
from ._kernels.keys import MODE_ABS, MODE_IDENTITY, key_of
from ._source import Rule, Source
from ._validate import check_fraction, check_threshold, flat, out_array
from .selection import (
    apply_rule,
    scores_source,
    select_one,
    threshold_rule,
    weights_array,
    weights_source,
)

__all__ = ["check_csr", "csr_matmul", "index_dtype", "matrix_shape", "to_csr", "to_dense"]

# Largest value that int32 CSR indices may hold. Read at every call (tests
# lower it to force the int64 path on tiny inputs), never inside a kernel.
INT32_LIMIT = int(np.iinfo(np.int32).max)
_PAR_NNZ = 1 << 15  # products with fewer stored entries run on one thread


def index_dtype(shape: tuple, nnz: int) -> np.dtype:
    """int32 when ``max(shape, nnz)`` fits, else int64 (scipy's rule).

    Examples
    --------
    >>> import sparsecore as sc
    >>> sc.index_dtype((4096, 4096), 1_000_000)
    dtype('int32')
    >>> sc.index_dtype((3_000_000_000, 2), 5)
    dtype('int64')
    """
    big = max(max(shape) if len(shape) else 0, nnz)
    return np.dtype(np.int32) if big <= INT32_LIMIT else np.dtype(np.int64)


def matrix_shape(shape: tuple) -> tuple:
    """The 2-D CSR shape of a weight: ``(shape[0], prod(shape[1:]))``.

    A 1-D weight becomes one row ``(1, n)``, a scalar ``(1, 1)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def is_device_csr(a) -> bool:
    """Whether ``a`` is a CSR whose arrays live on a GPU (a ``sparsecore.cuda.DeviceCSR``)."""
    return is_device_array(getattr(a, "indptr", None))


def build_csr(w, src, rule, *, want_mask=False, want_csr=True, name="weights"):
    """``(csr, flat keep-mask, entries pruned)`` of weights ``w`` (any shape,
    host or device like ``src``) kept where ``src`` passes ``rule``, in one
    fused pass: ``None`` for what is not wanted (the device always builds the
    CSR; the host counts what the rule prunes only from the mask)."""
    mshape = matrix_shape(tuple(w.shape))
    if src.on_device:
        from ._cuda import csr as device_csr

        return device_csr.csr_of_rule(w, src, rule, mshape, lambda nnz: index_dtype(mshape, nnz), name, want_mask)
    mask, parts = apply_rule(flat(w), src, rule, mshape[0], want_mask=want_mask, want_csr=want_csr,
                             index_dtype=lambda nnz: index_dtype(mshape, nnz), weights_name=name,
                             weights_original=w)
    pruned = int(mask.size - np.count_nonzero(mask)) if want_mask else None
    if not want_csr:
        return None, mask, pruned
    a = sp.csr_array(parts, shape=mshape, copy=False)
    a.has_sorted_indices = True
    a.has_canonical_format = True
    return a, mask, pruned


# Keeps the entries of a host keep-mask that are True: the mask's bytes are
# read as the numbers 0 and 1, and 1 is above the cut at 0.5.
_MASK_KEPT_RULE = Rule(key_of(0.5, False), 0, False)


def csr_of_mask(w, mask, *, name="weights"):
    """Canonical CSR of weights ``w`` kept where the bool ``mask`` (shaped
    like ``w``, or flat) is True; on the device for device arrays."""
    if is_device_array(mask):
        from ._cuda import csr as device_csr

        mshape = matrix_shape(tuple(w.shape))
        return device_csr.csr_of_mask(w, mask, mshape, lambda nnz: index_dtype(mshape, nnz), name)
    src = Source(name, flat(mask).view(np.uint8), tuple(w.shape), MODE_IDENTITY, role="mask", original=mask)
    a, _, _ = build_csr(w, src, _MASK_KEPT_RULE, name=name)
    return a


def to_csr(weights: ArrayLike, mask: ArrayLike | None = None, *, scores: ArrayLike | None = None,
           threshold: float | None = None, sparsity: float | None = None,
           name: str = "weights", device: str = "auto") -> sp.csr_array:
    """Canonical CSR of a weight, pruned on the fly.

    With only ``weights``, the non-zeros are stored. With ``mask``, entries
    where it is False are dropped. With ``threshold``, entries whose score is
    below it are dropped; with ``sparsity``, exactly ``round(sparsity * n)``
    lowest-scoring entries (ties: lower flat index first). Scores default to
    ``|weights|``. Selection and compression are fused: one parallel count
    pass, a prefix sum and one parallel fill, with no dense masked temporary.

    Parameters
    ----------
    weights : array_like of float
        Any shape; N-D weights become ``(shape[0], prod(shape[1:]))``.
    mask : array_like of bool, optional
        Keep-mask shaped like ``weights``.
    scores : array_like of float, optional
        Importance shaped like ``weights``; ``|weights|`` when omitted.
    threshold, sparsity : float, optional
        At most one of them, and not with ``mask``.
    name : str
        Names the tensor in error messages.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with a GPU array, anything with
        ``__cuda_array_interface__``) builds the CSR on the GPU, with the
        same options and the same structure, and returns a
        :class:`sparsecore.cuda.DeviceCSR` (see :mod:`sparsecore.cuda`).

    Returns
    -------
    scipy.sparse.csr_array
        float32 data for float16/float32 weights, float64 for float64.
        Kept entries that are exactly zero are not stored.

    Raises
    ------
    TypeError, ValueError
        Non-float weights or scores, NaN/Inf, mismatched shapes, bad options.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = np.array([[0.5, -0.1], [0.0, 2.0]], np.float32)
    >>> a = sc.to_csr(w, threshold=0.2)
    >>> a.toarray()
    array([[0.5, 0. ],
           [0. , 2. ]], dtype=float32)
    >>> a.indices.dtype
    dtype('int32')
    """
    on_gpu = resolve(device, weights, scores, mask) == "cuda"
    w = weights_array(weights, name, on_gpu)  # on the GPU: the same rules; keys, counts and fill there
    given = [x for x in (mask, threshold, sparsity) if x is not None]
    if len(given) > 1:
        raise ValueError(f"to_csr for {name!r}: give at most one of mask, threshold, sparsity")
    if mask is not None:
        if scores is not None:
            raise ValueError(f"to_csr for {name!r}: scores have no use with a mask")
        m = to_device(mask) if on_gpu else np.asarray(mask)
        if m.dtype != np.bool_:
            raise TypeError(f"mask for {name!r} has dtype {m.dtype}; pass a bool array")
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, weights have shape {tuple(w.shape)}")
        return csr_of_mask(w, m, name=name)
    if scores is None:
        src = weights_source(w, name, MODE_ABS)
    else:
        src = scores_source(scores, name, device="cuda" if on_gpu else "cpu")
        if tuple(src.shape) != tuple(w.shape):
            raise ValueError(f"scores for {name!r} have shape {src.shape}, weights have shape {tuple(w.shape)}")
    if threshold is not None:
        rule = threshold_rule(src, check_threshold(threshold, name))
    elif sparsity is not None:
        rule = select_one(src, round(check_fraction(sparsity, name) * src.size))
    else:  # keep everything: the CSR drops exact zeros only
        rule = Rule(0, 0, src.needs_wide())
    a, _, _ = build_csr(w, src, rule, name=name)
    return a


def to_dense(a: sp.csr_array, shape: tuple | None = None) -> np.ndarray:
    """Dense array of a CSR weight, reshaped to ``shape`` (the weight's own).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> bool((sc.to_dense(sc.to_csr(w), w.shape) == w).all())
    True
    """
    check_csr(a)
    d = a.toarray()
    if shape is None:
        return d
    shape = tuple(shape)
    if matrix_shape(shape) != d.shape:
        raise ValueError(f"CSR of shape {d.shape} cannot take the weight shape {shape}: "
                         f"that shape is stored as {matrix_shape(shape)}")
    return d.reshape(shape)


def _fail(rule, detail):
    raise ValueError(f"invalid CSR: {rule} ({detail})")


def check_csr(a: sp.csr_array, full: bool = False) -> None:
    """Check that ``a`` is a well-formed, and with ``full``, canonical CSR.

    O(1) checks always (type, shape, array lengths and dtypes, ``indptr``
    ends); with ``full=True`` an O(nnz) scan: ``indptr`` non-decreasing,
    column indices in range, strictly increasing within each row (sorted, no
    duplicates), no stored zeros. Modelled on scipy's ``check_format``.

    Raises
    ------
    TypeError
        ``a`` is not a scipy CSR array or matrix.
    ValueError
        Naming the rule broken and the offending value.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, sparsecore as sc
    >>> sc.check_csr(sp.csr_array(np.eye(3)), full=True)
    >>> bad = sp.csr_array((np.ones(2), np.array([1, 0]), np.array([0, 2])), shape=(1, 2))
    >>> sc.check_csr(bad, full=True)
    Traceback (most recent call last):
    ...
    ValueError: invalid CSR: column indices must be strictly increasing within a row (row 0: column 0 follows column 1)
    """
    if not (sp.issparse(a) and a.format == "csr"):
        raise TypeError(f"expected a scipy.sparse CSR array or matrix, got {type(a).__name__}")
    if len(a.shape) != 2:
        _fail("CSR must be 2-D", f"shape {a.shape}")
    rows, cols = a.shape
    data, indices, indptr = a.data, a.indices, a.indptr
    if indptr.ndim != 1 or indptr.size != rows + 1:
        _fail("indptr must hold rows + 1 entries", f"{indptr.size} for {rows} rows")
    if indices.dtype != indptr.dtype:
        _fail("indices and indptr must share one dtype", f"{indices.dtype} and {indptr.dtype}")
    if indices.dtype.kind != "i":
        _fail("index arrays must be signed integers", f"dtype {indices.dtype}")
    if indices.size != data.size:
        _fail("indices and data must have the same length", f"{indices.size} and {data.size}")
    if indptr[0] != 0:
        _fail("indptr[0] must be 0", f"got {indptr[0]}")
    if indptr[-1] != indices.size:
        _fail("indptr[-1] must equal nnz", f"{indptr[-1]} against {indices.size} stored entries")
    if not full:
        return
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        r = int(np.argmax(steps < 0))
        _fail("indptr must be non-decreasing", f"indptr[{r}]={indptr[r]} > indptr[{r + 1}]={indptr[r + 1]}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= cols:
            bad = lo if lo < 0 else hi
            _fail("column indices must lie in [0, columns)", f"index {bad} with {cols} columns")
        row_of = np.repeat(np.arange(rows), steps)
        same_row = row_of[1:] == row_of[:-1]
        wrong = same_row & (indices[1:] <= indices[:-1])
        if wrong.any():
            p = int(np.argmax(wrong))
            _fail("column indices must be strictly increasing within a row",
                  f"row {row_of[p]}: column {indices[p + 1]} follows column {indices[p]}")
        zeros = data == 0
        if zeros.any():
            p = int(np.argmax(zeros))
            _fail("no explicit zeros may be stored", f"row {row_of[p]}, column {indices[p]}")


def csr_matmul(a: sp.csr_array, x: ArrayLike, out: np.ndarray | None = None, *, device: str = "auto") -> np.ndarray:
    """``a @ x`` for a CSR ``a`` and a dense vector or matrix ``x``.

    Parallel over rows, the rows split into ranges of equal nnz. Vector
    products accumulate each row in float64; matrix products in the output
    dtype, ``result_type(a.dtype, x.dtype)`` (float16 computes in float32).

    Parameters
    ----------
    a : scipy.sparse CSR array or matrix
    x : array_like, shape (a.shape[1],) or (a.shape[1], k)
    out : numpy.ndarray, optional
        Preallocated C-contiguous result of the right shape and dtype.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with a GPU operand or a ``DeviceCSR``)
        multiplies on the GPU and returns a device array.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, sparsecore as sc
    >>> a = sp.csr_array(np.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> sc.csr_matmul(a, np.array([3.0, 4.0]))
    array([3., 8.])
    """
    if is_device_csr(a) or resolve(device, x) == "cuda":
        from ._cuda import csr as device_csr

        if not is_device_csr(a):
            check_csr(a)
            a = device_csr.to_device_csr(a)
        return device_csr.matmul(a, x, out)
    check_csr(a)
    xa = np.asarray(x)
    rows, cols = a.shape
    if xa.ndim not in (1, 2) or xa.shape[0] != cols:
        raise ValueError(f"x has shape {xa.shape}; a of shape {a.shape} needs ({cols},) or ({cols}, k)")
    dt = np.result_type(a.dtype, xa.dtype)
    if dt.kind != "f" or dt.itemsize > 8:
        raise TypeError(f"a @ x would have dtype {dt}; pass float32 or float64 operands")
    if dt.itemsize < 4:  # float16 computes in float32
        dt = np.dtype(np.float32)
    data = a.data if a.data.dtype == dt else a.data.astype(dt)
    xc = np.ascontiguousarray(xa, dtype=dt)
    shape = (rows,) if xa.ndim == 1 else (rows, xa.shape[1])
    out = out_array(out, shape, dt)
    if rows == 0:
        return out
    # A few ranges per thread, each of about equal nnz; small products run on one.
    nchunks = min(rows, 4 * numba.get_num_threads()) if a.nnz >= _PAR_NNZ else 1
    if xa.ndim == 1:
        cpu_csr.csr_matvec(data, a.indices, a.indptr, xc, out, nchunks)
    else:
        cpu_csr.csr_matmat(data, a.indices, a.indptr, xc, out, nchunks)
    return out
