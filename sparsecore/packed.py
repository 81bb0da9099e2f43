"""Packed sparse matrices: fewer bytes than CSR, and products that read them.

A product of a sparse matrix with a vector (the decode step of a language
model: each weight read once per token) is bound by the bytes it reads. CSR
with int32 indices reads 8 bytes per kept float32 weight: at 50% sparsity as
many as the dense matrix. The encodings here read less:

======== ================================================= =============================
format   stores                                            bytes per kept fp32 weight
======== ================================================= =============================
delta8   each kept column's step from the previous one as   5 (+ a filler entry per
         a uint8 (steps over 255 take filler entries)       255 columns of gap)
bitmask  one bit per column, the kept values packed         4 + 1/8 per column
nm       N values in every group of M columns and their     4 (+ padding) + n*b/8 per group
         positions, ``b = ceil(log2 M)`` bits each (2:4:    of m columns
         2 bits)
======== ================================================= =============================

Values keep the dtype they came in (float32, float64, float16, bfloat16;
the half types as their uint16 bits). ``format="auto"`` takes the encoding
with the fewest bytes (:attr:`PackedMatrix.nbytes`, what a product reads),
counting formats within 20% of the fewest as ties that the faster kernel
wins (measured: nm, then delta8, then bitmask).
Every encoding converts back to the canonical CSR exactly.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from ._kernels import cpu_packed as K
from ._kernels import run, threads_for
from ._validate import as_float_array, out_array
from .csr import check_csr, csr_of_mask, index_dtype, matrix_shape
from .patterns import NM, NMCompact

__all__ = ["FORMATS", "PackedMatrix", "check_packed", "pack", "packed_matmul"]

FORMATS = ("delta8", "bitmask", "nm")
# Value dtypes: the stored array's dtype and the kernels' kind.
_KINDS = {"float32": (np.dtype(np.float32), K.KIND_F32), "float64": (np.dtype(np.float64), K.KIND_F64),
          "float16": (np.dtype(np.uint16), K.KIND_F16), "bfloat16": (np.dtype(np.uint16), K.KIND_BF16)}
_ITEM = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
# Stored entries a thread must have before a product is shared between threads:
# about 30 us of work, far above the wake-up of a passively waiting thread.
_PAR_ENTRIES = 1 << 15
# ``auto``: formats within this fraction of the fewest bytes tie, and the tie
# goes to the fastest kernel, in this order. Measured with bench/decode.py and
# bench/kernels.py on 2-core AMD EPYC (Zen 3, AVX2): all three batch-1 kernels
# are bound by instructions there (0.55-1.06 kept weights a cycle on one core);
# delta8 ran faster than the bitmask at 50-90% though it reads up to 18% more,
# and nm beat both at 2:4.
_TIE = 0.2
_SPEED_ORDER = ("nm", "delta8", "bitmask")
# Values stored past a bitmask's last one (zeros): the AVX2 product loads eight at a time.
_PAD = 8


def _avx2():
    """Whether the vector products may use their AVX2 kernels: an x86-64 CPU
    with AVX2 and FMA, compiled for the host (no ``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` asking for a portable target)."""
    global _AVX2
    if _AVX2 is None:
        import os
        import platform

        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        _AVX2 = (platform.machine().lower() in ("x86_64", "amd64") and bool(features.get("avx2"))
                 and bool(features.get("fma")) and not os.environ.get("NUMBA_CPU_NAME")
                 and not os.environ.get("NUMBA_CPU_FEATURES"))
    return _AVX2


_AVX2 = None
_PERM = []  # the AVX2 bitmask product's table, built on first use


def _perm():
    if not _PERM:
        _PERM.append(K.permutation_table())
    return _PERM[0]


_POS24 = []  # the AVX2 2:4 product's table, built on first use


def _pos24():
    if not _POS24:
        _POS24.append(K.position_table_24())
    return _POS24[0]


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """A sparse matrix in one of :data:`FORMATS` (build it with :func:`pack`).

    Attributes
    ----------
    format : str
    shape : tuple of int
        ``(rows, cols)``; N-D weights are packed as ``matrix_shape(shape)``.
    dtype : str
        ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``.
    vals : numpy.ndarray
        The packed values (uint16 bits for the half types).
    ptr : numpy.ndarray or None
        int64, ``rows + 1``: each row's first entry (delta8, bitmask).
    deltas : numpy.ndarray or None
        uint8 column steps (delta8).
    words : numpy.ndarray or None
        uint64, one row per matrix row: bits (bitmask) or positions (nm).
    n, m : int
        The N:M pattern (nm), else 0.
    """

    format: str
    shape: tuple
    dtype: str
    vals: np.ndarray
    ptr: np.ndarray | None = None
    deltas: np.ndarray | None = None
    words: np.ndarray | None = None
    n: int = 0
    m: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: values, indices and row offsets (not ``x``)."""
        return sum(a.nbytes for a in (self.vals, self.ptr, self.deltas, self.words) if a is not None)

    @property
    def nnz(self) -> int:
        """Stored non-zero values (fillers and padding excluded)."""
        return int(np.count_nonzero(self.vals))

    @property
    def _nm_layout(self):
        bits = max(1, math.ceil(math.log2(self.m)))
        gpw = 64 // (self.n * bits)
        groups = -(-self.shape[1] // self.m)
        return bits, gpw, groups

    def to_csr(self) -> sp.csr_array:
        """The canonical CSR (float32 data for float32 and the half types, float64 for float64)."""
        rows, cols = self.shape
        if self.format == "nm":
            bits, gpw, groups = self._nm_layout
            per = groups * self.n
            lo = np.arange(rows, dtype=np.int64) * per
            counts = np.empty(rows, np.int64)
            K.kept_counts(lo, lo + per, self.vals, counts)
        else:
            counts = np.empty(rows, np.int64)
            K.kept_counts(self.ptr[:-1], self.ptr[1:], self.vals, counts)
        indptr64 = np.zeros(rows + 1, np.int64)
        np.cumsum(counts, out=indptr64[1:])
        nnz = int(indptr64[-1])
        it = index_dtype(self.shape, nnz)
        indptr = indptr64.astype(it)
        indices = np.empty(nnz, it)
        data = np.empty(nnz, self.vals.dtype)
        if self.format == "delta8":
            K.delta8_to_csr(self.ptr, self.deltas, self.vals, indptr, indices, data)
        elif self.format == "bitmask":
            K.bitmask_to_csr(self.ptr, self.words, self.vals, indptr, indices, data)
        else:
            bits, gpw, groups = self._nm_layout
            K.nm_to_csr(self.words, self.vals, self.n, self.m, bits, gpw, groups, indptr, indices, data)
        a = sp.csr_array((_widen(data, self.dtype), indices, indptr), shape=self.shape, copy=False)
        a.has_sorted_indices = True
        a.has_canonical_format = True
        return a

    def kernel(self, vector: bool = True, threads: int | None = None) -> tuple:
        """The compiled kernel a product runs, for inspection and benchmarks:
        ``(kernel, head, tail, width, threads)``. The Numba dispatcher is
        called as ``kernel(*head, x, out, *tail)`` (on ``threads`` threads:
        :func:`sparsecore.parallel` ``run``), with ``x`` padded with zeros to
        ``width`` entries (the AVX2 bitmask kernel reads whole 64-column
        words). ``threads`` by stored entries unless given; 1 picks the serial
        kernel. Matrices without rows or columns have none (``kernel`` None)."""
        rows, cols = self.shape
        kind = _KINDS[self.dtype][1]
        nthreads = threads_for(self.vals.size, _PAR_ENTRIES) if threads is None else max(1, int(threads))
        par = nthreads > 1
        avx2 = vector and kind != K.KIND_F64 and _avx2()
        if rows == 0 or cols == 0:
            return None, (), (), cols, 1
        if self.format == "delta8":
            kern = (K.delta8_matvec_avx2 if avx2 else K.delta8_matvec if vector else K.delta8_matmat)(kind, par)
            return kern, (self.ptr, self.deltas, self.vals), (nthreads,), cols, nthreads
        if self.format == "bitmask":
            if avx2 and self.vals.size >= self.ptr[-1] + _PAD - 1:
                return (K.bitmask_matvec_avx2(kind, par), (self.ptr, self.words, self.vals), (nthreads, _perm()),
                        self.words.shape[1] * 64, nthreads)
            kern = (K.bitmask_matvec if vector else K.bitmask_matmat)(kind, par)
            return kern, (self.ptr, self.words, self.vals), (nthreads,), cols, nthreads
        bits, gpw, groups = self._nm_layout
        if avx2 and (self.n, self.m) == (2, 4):
            return (K.nm24_matvec_avx2(kind, par), (self.words, self.vals), (groups, cols, nthreads, _pos24()), cols,
                    nthreads)
        if avx2 and gpw * self.n % 8 == 0:
            kern = K.nm_matvec_avx2(kind, self.n, self.m, bits, gpw, par)
        else:
            kern = (K.nm_matvec if vector else K.nm_matmat)(kind, self.n, self.m, bits, gpw, par)
        return kern, (self.words, self.vals), (groups, cols, nthreads), cols, nthreads

    def product(self, vector: bool = True):
        """The product as a callable ``f(x, out) -> out`` that checks nothing:
        for hot loops (a layer called once per token), where
        :func:`packed_matmul`'s checks would cost as much as a small product.

        ``x`` must be C-contiguous in the accumulation dtype (float32, or
        float64 for float64 values), shaped ``(cols,)`` when ``vector`` else
        ``(cols, k)`` with ``k >= 1``; ``out`` C-contiguous, same dtype,
        ``(rows,)`` or ``(rows, k)``. The threads are chosen when it is made.
        """
        kern, head, tail, width, nthreads = self.kernel(vector)
        cols = self.shape[1]
        if kern is None:
            def nothing(x, out):
                out[...] = 0
                return out

            return nothing
        if width > cols:
            def padded(x, out):
                xp = np.zeros(width, np.float32)  # whole words of x: the kernel reads them
                xp[:cols] = x
                if nthreads > 1:
                    run(nthreads, kern, *head, xp, out, *tail)
                else:
                    kern(*head, xp, out, *tail)
                return out

            return padded
        if nthreads == 1:
            def serial(x, out):
                kern(*head, x, out, *tail)
                return out

            return serial

        def call(x, out):
            run(nthreads, kern, *head, x, out, *tail)
            return out

        return call

    def toarray(self, out: np.ndarray | None = None) -> np.ndarray:
        """The dense matrix (float32, or float64 for float64 values), written
        straight from the packed arrays (into ``out`` when given: C-contiguous,
        that dtype and shape)."""
        rows, cols = self.shape
        dt = np.dtype(np.float64 if self.dtype == "float64" else np.float32)
        out = out_array(out, (rows, cols), dt)
        if rows == 0 or cols == 0:
            return out
        kind = _KINDS[self.dtype][1]
        nthreads = threads_for(rows * cols)
        if self.format == "delta8":
            run(nthreads, K.delta8_dense, self.ptr, self.deltas, self.vals, kind, out, nthreads)
        elif self.format == "bitmask":
            run(nthreads, K.bitmask_dense, self.ptr, self.words, self.vals, kind, out, nthreads)
        else:
            bits, gpw, groups = self._nm_layout
            run(nthreads, K.nm_dense, self.words, self.vals, kind, self.n, self.m, bits, gpw, groups, cols, out,
                nthreads)
        return out

    def __matmul__(self, x):
        return packed_matmul(self, x)

    def __repr__(self):
        nm = f" {self.n}:{self.m}" if self.format == "nm" else ""
        return (f"PackedMatrix({self.format}{nm}, shape={self.shape}, dtype={self.dtype}, nnz={self.nnz}, "
                f"nbytes={self.nbytes})")


def _widen(v, dtype):
    """float32 of uint16 half/bfloat16 bits (exact); other values as they are."""
    if dtype == "float16":
        return v.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (v.astype(np.uint32) << 16).view(np.float32)
    return v


def _narrow(data, dtype):
    """``data`` (float32/float64) as the stored values of ``dtype``; half
    types round to nearest even (exact for values that came from them)."""
    if dtype == "float16":
        return data.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        b = np.ascontiguousarray(data, np.float32).view(np.uint32)
        rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = np.isnan(data)
        out = rounded.astype(np.uint16)
        out[nan] = (b[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x40)  # stays a NaN
        return out
    return np.asarray(data, _KINDS[dtype][0])


def _dtype_name(dt, name):
    name_of = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
    if isinstance(dt, str) and dt in _KINDS:
        return dt
    try:
        d = np.dtype(dt)
    except TypeError:
        d = None
    if d is not None and d in name_of:
        return name_of[d]
    if d is not None and d.name == "bfloat16" and d.itemsize == 2:  # ml_dtypes / JAX bfloat16
        return "bfloat16"
    raise TypeError(f"packed values of {name!r} cannot have dtype {dt!r}; choose one of {sorted(_KINDS)}")


def _as_csr(a, mask, name):
    """``(canonical CSR with float32/float64 data, dtype name of the input, matrix shape)``."""
    if sp.issparse(a):
        if mask is not None:
            raise ValueError(f"pack for {name!r}: a mask has no use with a sparse matrix")
        if a.format != "csr":
            raise TypeError(f"pack for {name!r}: expected a CSR matrix, got {a.format.upper()}; "
                            f"convert it with .tocsr()")
        check_csr(a, full=True)
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"pack for {name!r}: CSR data must be float32 or float64, got {a.dtype}")
        return a, _dtype_name(a.dtype, name), a.shape
    arr = np.asarray(a)
    if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:
        dense = (np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        kind = "bfloat16"
    else:
        dense = as_float_array(arr, name)
        kind = _dtype_name(arr.dtype, name)
    shape = matrix_shape(dense.shape)
    if mask is None:
        m = dense != 0
    else:
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != dense.shape:
            raise ValueError(f"mask for {name!r} must be bool of shape {dense.shape}, got {m.dtype} {m.shape}")
    return csr_of_mask(dense, m, name=name), kind, shape


def _nm_bytes(shape, n, m, item):
    rows, cols = shape
    bits = max(1, math.ceil(math.log2(m)))
    gpw = 64 // (n * bits)
    groups = -(-cols // m)
    return rows * groups * n * item + rows * (-(-groups // gpw)) * 8


def pack(a, format: str = "auto", *, mask: ArrayLike | None = None, dtype=None, n: int | None = None,
         m: int | None = None, name: str = "weights") -> PackedMatrix:
    """Pack a sparse matrix for fast products.

    Parameters
    ----------
    a : scipy.sparse CSR, :class:`sparsecore.NMCompact` or array_like
        A canonical CSR; an N:M-compressed weight (grouped along its last
        axis); or a dense weight (float16/32/64, or a ``bfloat16`` array of
        ml_dtypes) whose non-zeros, or ``mask``, are kept. N-D weights are
        packed as ``(shape[0], prod(shape[1:]))``.
    format : {"auto", "smallest", "delta8", "bitmask", "nm"}
        ``"auto"`` takes the fewest bytes among delta8, bitmask and, where the
        kept entries fit it, N:M (``n:m`` if given, else 2:4); formats
        within 20% of the fewest tie, and nm, then delta8, then bitmask
        win ties (the faster kernels first). ``"smallest"``: the fewest
        bytes, no ties (for files).
    mask : array_like of bool, optional
        Keep-mask of a dense ``a``.
    dtype : {"float32", "float64", "float16", "bfloat16"}, optional
        The stored values' dtype; the input's by default (a CSR's data
        dtype). A narrower one rounds to nearest even.
    n, m : int, optional
        The N:M pattern of ``format="nm"`` (groups of ``m`` consecutive
        columns along each row); 2:4 by default.
    name : str
        Names the matrix in error messages.

    Returns
    -------
    PackedMatrix

    Raises
    ------
    TypeError, ValueError
        A non-canonical CSR, a mask of the wrong shape, an unknown format or
        dtype, or rows that do not fit the N:M pattern asked for.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = np.array([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    >>> p = sc.pack(w, "delta8")
    >>> p.deltas, p.vals
    (array([1, 2, 0], dtype=uint8), array([ 1.5, -2. ,  3. ], dtype=float32))
    >>> p @ np.ones(4, np.float32)
    array([-0.5,  3. ], dtype=float32)
    >>> bool((p.toarray() == w).all())
    True
    """
    if format not in ("auto", "smallest") and format not in FORMATS:
        raise ValueError(f"pack for {name!r}: unknown format {format!r}; choose 'auto', 'smallest' or one of "
                         f"{FORMATS}")
    if isinstance(a, NMCompact):
        if mask is not None:
            raise ValueError(f"pack for {name!r}: a mask has no use with an NMCompact")
        if (n is not None and n != a.n) or (m is not None and m != a.m):
            raise ValueError(f"pack for {name!r}: the NMCompact is {a.n}:{a.m}, not {n}:{m}")
        if a.axis != len(a.shape) - 1:
            raise ValueError(f"pack for {name!r}: the NMCompact groups axis {a.axis} of a {len(a.shape)}-D "
                             f"weight; the nm format groups the last (the columns of each row)")
        n, m = a.n, a.m
        a = a.dense()
    if (n is None) != (m is None):
        raise ValueError(f"pack for {name!r}: give both n and m, or neither")
    csr, kind, shape = _as_csr(a, mask, name)
    kind = kind if dtype is None else _dtype_name(dtype, name)
    item = _ITEM[kind]
    rows, cols = shape
    indptr = csr.indptr.astype(np.int64, copy=False)
    indices = csr.indices.astype(np.int64, copy=False)
    pattern = NM(2, 4) if n is None else NM(n, m)  # checks 1 <= n < m
    nm = (pattern.n, pattern.m)
    choose = format in ("auto", "smallest")
    if format == "nm" or choose:
        bad = K.nm_first_overfull(indptr, indices, nm[0], nm[1])
        if bad[0] >= 0 and format == "nm":
            raise ValueError(f"pack for {name!r}: row {bad[0]} holds {bad[2]} entries in its group {bad[1]} of "
                             f"{nm[1]} columns; the {nm[0]}:{nm[1]} format keeps at most {nm[0]}")
        fits_nm = bad[0] < 0 and nm[0] * max(1, math.ceil(math.log2(nm[1]))) <= 64  # positions fit a word
    nw = -(-cols // 64)
    counts = None
    if choose:
        counts = np.empty(rows, np.int64)
        K.delta8_counts(indptr, indices, counts)
        offsets = 8 * (rows + 1)  # delta8 and bitmask; nm finds its rows by arithmetic
        sizes = {"delta8": int(counts.sum()) * (item + 1) + offsets,
                 "bitmask": csr.nnz * item + rows * nw * 8 + offsets}
        if fits_nm:
            sizes["nm"] = _nm_bytes(shape, nm[0], nm[1], item)
        fewest = min(sizes.values())
        tie = _TIE if format == "auto" else 0.0
        format = min((f for f in sizes if sizes[f] <= (1 + tie) * fewest), key=_SPEED_ORDER.index)
    data = _narrow(csr.data, kind)
    if format == "delta8":
        if counts is None:
            counts = np.empty(rows, np.int64)
            K.delta8_counts(indptr, indices, counts)
        ptr = np.zeros(rows + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        deltas = np.empty(int(ptr[-1]), np.uint8)
        vals = np.empty(int(ptr[-1]), data.dtype)
        K.delta8_fill(indptr, indices, data, ptr, deltas, vals)
        return PackedMatrix("delta8", shape, kind, vals, ptr=ptr, deltas=deltas)
    if format == "bitmask":
        words = np.zeros((rows, nw), np.uint64)
        K.bitmask_fill(indptr, indices, words)
        vals = np.zeros(data.size + _PAD, data.dtype)  # zeros past the end: see _PAD
        vals[:data.size] = data
        return PackedMatrix("bitmask", shape, kind, vals, ptr=indptr.copy(), words=words)
    n_, m_ = nm
    bits = max(1, math.ceil(math.log2(m_)))
    if n_ * bits > 64:
        raise ValueError(f"pack for {name!r}: an {n_}:{m_} group's positions need {n_ * bits} bits; "
                         f"the nm format holds at most 64")
    gpw = 64 // (n_ * bits)
    groups = -(-cols // m_)
    words = np.zeros((rows, -(-groups // gpw)), np.uint64)
    vals = np.zeros(rows * groups * n_, data.dtype)
    K.nm_fill(indptr, indices, data, n_, m_, bits, gpw, groups, words, vals)
    return PackedMatrix("nm", shape, kind, vals, words=words, n=n_, m=m_)


def check_packed(p: PackedMatrix, name: str = "packed matrix") -> PackedMatrix:
    """Check that ``p`` is a well-formed packed matrix (every array, O(size)).

    Everything a product or a conversion reads is checked before it reads
    it: array dtypes and lengths, row offsets from 0 without going back,
    columns inside the matrix and rising within each row, bitmask rows whose
    set bits match their offsets, N:M positions inside their group and
    distinct. A matrix from :func:`pack` passes; one built from a file's
    arrays must pass before it is used.

    Returns
    -------
    PackedMatrix
        ``p`` itself.

    Raises
    ------
    TypeError, ValueError
        Naming ``name``, the rule broken and the offending value.
    """
    def bad(rule, detail):
        raise ValueError(f"{name}: {rule} ({detail})")

    if not isinstance(p, PackedMatrix):
        raise TypeError(f"{name}: expected a PackedMatrix, got {type(p).__name__}")
    if p.format not in FORMATS:
        bad("unknown format", repr(p.format))
    if p.dtype not in _KINDS:
        bad("unknown value dtype", repr(p.dtype))
    if len(p.shape) != 2 or any(not isinstance(v, (int, np.integer)) or v < 0 for v in p.shape):
        bad("the shape must be two non-negative integers", repr(p.shape))
    rows, cols = (int(v) for v in p.shape)
    want = _KINDS[p.dtype][0]
    if not isinstance(p.vals, np.ndarray) or p.vals.dtype != want or p.vals.ndim != 1:
        bad(f"values must be a 1-D {want} array", f"got {getattr(p.vals, 'dtype', type(p.vals))} "
            f"{getattr(p.vals, 'shape', '')}")
    if p.format in ("delta8", "bitmask"):
        ptr = p.ptr
        if not isinstance(ptr, np.ndarray) or ptr.dtype != np.int64 or ptr.shape != (rows + 1,):
            bad("row offsets must be int64 of rows + 1 entries", f"got {getattr(ptr, 'dtype', type(ptr))} "
                f"{getattr(ptr, 'shape', '')} for {rows} rows")
        steps = np.diff(ptr)
        if ptr[0] != 0 or (steps.size and steps.min() < 0):
            bad("row offsets must run from 0 without going back", f"first {ptr[0]}, smallest step "
                f"{steps.min() if steps.size else 0}")
    if p.format == "delta8":
        d = p.deltas
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != p.vals.shape or ptr[-1] != d.size:
            bad("delta8 steps must be uint8, one per value, as many as the row offsets end at",
                f"{getattr(d, 'dtype', type(d))} {getattr(d, 'shape', '')}, {p.vals.size} values, end {ptr[-1]}")
        if d.size:
            first = np.zeros(d.size, bool)
            first[ptr[:-1][steps > 0]] = True
            if np.any(d[~first] == 0):
                at = int(np.flatnonzero(~first & (d == 0))[0])
                bad("columns must rise within a row", f"a step of 0 at entry {at}")
            cs = np.cumsum(d, dtype=np.int64)
            full = steps > 0
            last = cs[ptr[1:][full] - 1] - np.where(ptr[:-1][full] > 0, cs[ptr[:-1][full] - 1], 0)
            if last.size and last.max() >= cols:
                bad("columns must lie in [0, columns)", f"column {int(last.max())} with {cols} columns")
    elif p.format == "bitmask":
        w = p.words
        nw = -(-cols // 64)
        if not isinstance(w, np.ndarray) or w.dtype != np.uint64 or w.shape != (rows, nw):
            bad("bitmask words must be uint64 of shape (rows, ceil(cols / 64))",
                f"{getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')} for {(rows, cols)}")
        if ptr[-1] > p.vals.size:
            bad("the row offsets end past the values", f"{ptr[-1]} > {p.vals.size}")
        counts = np.bitwise_count(w).sum(axis=1, dtype=np.int64) if w.size else np.zeros(rows, np.int64)
        if np.any(counts != steps):
            r = int(np.argmax(counts != steps))
            bad("each row's set bits must match its offsets", f"row {r}: {counts[r]} bits, {steps[r]} values")
        if cols % 64 and rows and np.any(w[:, -1] >> np.uint64(cols % 64)):
            bad("no bit may be set past the last column", f"{cols} columns")
    else:
        if not (isinstance(p.n, (int, np.integer)) and isinstance(p.m, (int, np.integer)) and 1 <= p.n < p.m):
            bad("an N:M format needs 1 <= n < m", f"{p.n}:{p.m}")
        bits, gpw, groups = p._nm_layout
        if p.n * bits > 64:
            bad("an N:M group's positions must fit in 64 bits", f"{p.n}:{p.m} needs {p.n * bits}")
        w = p.words
        if not isinstance(w, np.ndarray) or w.dtype != np.uint64 or w.shape != (rows, -(-groups // gpw)):
            bad("N:M words must be uint64 of shape (rows, ceil(groups / groups per word))",
                f"{getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
        if p.vals.size != rows * groups * p.n:
            bad("an N:M matrix stores n values per group", f"{p.vals.size} values for {rows} x {groups} groups")
        r, g = K.nm_positions_distinct(w, p.vals, int(p.n), int(p.m), bits, gpw, groups, cols)
        if r >= 0:
            bad("N:M positions must lie inside their group and differ", f"row {r}, group {g}")
    return p


def packed_matmul(p: PackedMatrix, x: ArrayLike, out: np.ndarray | None = None, *,
                  device: str = "auto") -> np.ndarray:
    """``p @ x`` for a packed matrix and a dense vector or matrix.

    Accumulates in float32 (float64 for float64 values), four partial sums
    per row for vectors; ``x`` is converted to that dtype. Rows are split
    between threads by stored entries (one thread below ``2**16`` of them).

    Parameters
    ----------
    p : PackedMatrix
    x : array_like, shape (cols,) or (cols, k)
    out : numpy.ndarray, optional
        Preallocated C-contiguous result: float32 (float64 for float64
        values), shape ``(rows,)`` or ``(rows, k)``.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with a GPU ``x`` or a packed matrix already
        on the GPU, ``sparsecore._cuda.packed.to_device``) multiplies on the
        GPU and returns a numba device array (``out`` then a device array).

    Returns
    -------
    numpy.ndarray
        Equal to the masked dense product within the rounding of the
        accumulation dtype. Stored fillers and padding are zeros: a NaN or
        Inf in ``x`` reaches a row only where the dense product's would.
    """
    from ._device import is_device_array, resolve

    if is_device_array(getattr(p, "vals", None)) or resolve(device, x) == "cuda":
        from ._cuda import packed as device_packed

        return device_packed.matmul(p, x, out)
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"expected a PackedMatrix, got {type(p).__name__}")
    rows, cols = p.shape
    xa = np.asarray(x)
    if xa.ndim not in (1, 2) or xa.shape[0] != cols:
        raise ValueError(f"x has shape {xa.shape}; a packed matrix of shape {p.shape} needs ({cols},) or "
                         f"({cols}, k)")
    if xa.dtype.kind not in "fiu":
        raise TypeError(f"x has dtype {xa.dtype}; pass a float array")
    dt = np.dtype(np.float64 if p.dtype == "float64" else np.float32)
    xc = np.ascontiguousarray(xa, dtype=dt)
    shape = (rows,) if xa.ndim == 1 else (rows, xa.shape[1])
    out = out_array(out, shape, dt)
    if rows == 0:
        return out
    if cols == 0 or (xa.ndim == 2 and xa.shape[1] == 0):
        out[...] = 0
        return out
    return _product(p, xa.ndim == 1)(xc, out)


# Each matrix's product callables, made once per (vector, threads) and kept while the matrix lives: making one
# looks up the kernel and builds closures, several microseconds that a small layer's product (10-40 us) felt.
_PRODUCTS = weakref.WeakKeyDictionary()


def _product(p, vector):
    key = (vector, threads_for(p.vals.size, _PAR_ENTRIES))
    made = _PRODUCTS.setdefault(p, {})
    fn = made.get(key)
    if fn is None:
        fn = made[key] = p.product(vector)
    return fn
