"""Rule application and CSR kernels: count, prefix sum (in the wrapper), fill;
CSR products.

A pruning rule is ``(T, quota)`` on score keys: an element is pruned when its
key is below ``T``, or equal to ``T`` and fewer than ``quota`` elements with
key ``T`` come before it in flat (row-major) order. The flat array is cut into
``nseg`` segments ``[r*n//nseg, (r+1)*n//nseg)``: for a CSR build these are the
rows; for a mask they are any balanced cut.
"""

import math

import numpy as np
from numba import njit, prange

from .keys import score_key, specialize


@specialize
def _count_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, T, nseg, above_nz, tie_total, tie_nz):
        n = w.size
        m = max(nseg, 1)
        bad_w = np.zeros(m, np.int64)
        first_w = np.full(m, n, np.int64)
        bad_s = np.zeros(m, np.int64)
        first_s = np.full(m, n, np.int64)
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            a = 0
            t = 0
            tz = 0
            bw = 0
            fw = n
            bs = 0
            fs = n
            for i in range(lo, hi):
                v = w[i]
                if not math.isfinite(v):
                    bw += 1
                    if fw == n:
                        fw = i
                ok, k = score_key(s[i], mode, inv, scaled, wide)
                if not ok:
                    bs += 1
                    if fs == n:
                        fs = i
                elif k > T:
                    if v != 0:
                        a += 1
                elif k == T:
                    t += 1
                    if v != 0:
                        tz += 1
            above_nz[r] = a
            tie_total[r] = t
            tie_nz[r] = tz
            bad_w[r] = bw
            first_w[r] = fw
            bad_s[r] = bs
            first_s[r] = fs
        return bad_w.sum(), first_w.min(), bad_s.sum(), first_s.min()

    return kernel


def seg_count(w, s, mode, inv, scaled, wide, T, nseg, above_nz, tie_total, tie_nz):
    """Per segment: kept non-zeros above ``T``, ties at ``T``, non-zero ties.

    Returns ``(n_bad_w, first_bad_w, n_bad_s, first_bad_s)`` for the
    non-finite weights and scores met.
    """
    return _count_kernel(mode, wide, scaled)(w, s, inv, T, nseg, above_nz, tie_total, tie_nz)


@specialize
def _ties_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(w, s, inv, T, quota, tie_start, r, nseg):
        n = w.size
        lo = r * n // nseg
        hi = (r + 1) * n // nseg
        rank = tie_start
        kept = 0
        for i in range(lo, hi):
            ok, k = score_key(s[i], mode, inv, scaled, wide)
            if ok and k == T:
                if rank >= quota and w[i] != 0:
                    kept += 1
                rank += 1
        return kept

    return kernel


def seg_kept_ties_nz(w, s, mode, inv, scaled, wide, T, quota, tie_start, r, nseg):
    """Non-zero ties kept in segment ``r`` (the one segment a quota splits)."""
    return _ties_kernel(mode, wide, scaled)(w, s, inv, T, quota, tie_start, r, nseg)


@specialize
def _fill_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, T, quota, tie_start, nseg, write_csr, row_start, data, indices, write_mask, mask):
        n = w.size
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            rank = tie_start[r]
            pos = row_start[r]
            for i in range(lo, hi):
                ok, k = score_key(s[i], mode, inv, scaled, wide)
                keep = k > T
                if k == T:
                    keep = rank >= quota
                    rank += 1
                if write_mask:
                    mask[i] = keep
                if write_csr and keep:
                    v = w[i]
                    if v != 0:
                        data[pos] = v
                        indices[pos] = i - lo
                        pos += 1

    return kernel


def seg_fill(w, s, mode, inv, scaled, wide, T, quota, tie_start, nseg,
             write_csr, row_start, data, indices, write_mask, mask):
    """Write the kept elements: CSR ``data``/``indices`` from ``row_start``
    per segment (zeros never stored), and/or the keep ``mask``."""
    _fill_kernel(mode, wide, scaled)(w, s, inv, T, quota, tie_start, nseg, write_csr, row_start,
                                     data, indices, write_mask, mask)


@njit(parallel=True, cache=True)
def csr_matvec(data, indices, indptr, x, out, bounds):
    """``out = A @ x`` for CSR ``A``; row ranges in ``bounds`` hold equal nnz."""
    for c in prange(bounds.size - 1):
        for r in range(bounds[c], bounds[c + 1]):
            acc = 0.0
            for p in range(indptr[r], indptr[r + 1]):
                acc += data[p] * x[indices[p]]
            out[r] = acc


@njit(parallel=True, cache=True)
def csr_matmat(data, indices, indptr, x, out, bounds):
    """``out = A @ X`` for CSR ``A`` and C-ordered dense ``X`` (cols x k)."""
    k = x.shape[1]
    for c in prange(bounds.size - 1):
        acc = np.empty(k, out.dtype)
        for r in range(bounds[c], bounds[c + 1]):
            acc[:] = 0
            for p in range(indptr[r], indptr[r + 1]):
                v = data[p]
                row = x[indices[p]]
                for j in range(k):
                    acc[j] += v * row[j]
            out[r, :] = acc
