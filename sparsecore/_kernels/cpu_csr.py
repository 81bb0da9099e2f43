"""Rule application and CSR kernels: count, prefix sum (in the wrapper), fill;
CSR products.

A pruning rule is ``(T, quota)`` on score keys: an element is pruned when its
key is below ``T``, or equal to ``T`` and fewer than ``quota`` elements with
key ``T`` come before it in flat (row-major) order. The flat array is cut into
``nseg`` segments ``[r*n//nseg, (r+1)*n//nseg)``: for a CSR build these are the
rows; for a mask they are any balanced cut.

Hot loops index with unsigned integers so that Numba emits no negative-index
wraparound and LLVM can vectorise them.
"""

import math

import numpy as np
from numba import njit, prange

from .keys import cttz, score_key, specialize


@specialize
def _count_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, T, nseg, above_nz, tie_total, tie_nz, bad_w, bad_s):
        n = w.size
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            a = 0
            t = 0
            tz = 0
            bw = 0
            bs = 0
            for i in range(lo, hi):
                v = w[np.uint64(i)]
                ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
                nz = v != 0
                bw += not math.isfinite(v)
                bs += not ok
                a += ok & (k > T) & nz
                eq = ok & (k == T)
                t += eq
                tz += eq & nz
            above_nz[r] = a
            tie_total[r] = t
            tie_nz[r] = tz
            bad_w[r] = bw
            bad_s[r] = bs

    return kernel


def seg_count(w, s, mode, inv, scaled, wide, T, nseg, above_nz, tie_total, tie_nz, bad_w, bad_s):
    """Per segment: kept non-zeros above ``T``, ties at ``T``, non-zero ties,
    and the numbers of non-finite weights and scores."""
    _count_kernel(mode, wide, scaled)(w, s, inv, T, nseg, above_nz, tie_total, tie_nz, bad_w, bad_s)


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
            ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
            if ok and k == T:
                if rank >= quota and w[np.uint64(i)] != 0:
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
    def kernel(w, s, inv, T, quota, tie_start, tie_total, nseg, write_csr, row_start, data, indices,
               write_mask, mask):
        n = w.size
        T1 = T + np.uint64(1)
        zero = np.uint64(0)
        one = np.uint64(1)
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            rank = tie_start[r]
            # The row's ties are all kept, all pruned, or split (rare: one row).
            if not (rank < quota and rank + tie_total[r] > quota):
                cut = T if rank >= quota else T1  # keep where key >= cut
                if write_mask:
                    for i in range(lo, hi):
                        ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
                        mask[np.uint64(i)] = k >= cut
                if write_csr:
                    # Kept non-zeros of each 64-element block as a bit set (a
                    # vectorised loop), then written bit by bit: no branch
                    # per element to mispredict.
                    pos = np.uint64(row_start[r])
                    for b0 in range(lo, hi, 64):
                        m = min(64, hi - b0)
                        bits = zero
                        for j in range(m):
                            i = np.uint64(b0 + j)
                            ok, k = score_key(s[i], mode, inv, scaled, wide)
                            bits |= np.uint64((k >= cut) & (w[i] != 0)) << np.uint64(j)
                        col = np.uint64(b0 - lo)
                        while bits:
                            j = cttz(bits)
                            data[pos] = w[np.uint64(b0) + j]
                            indices[pos] = col + j
                            pos += one
                            bits &= bits - one
                continue
            pos = np.uint64(row_start[r])
            for i in range(lo, hi):
                ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
                keep = k > T
                if k == T:
                    keep = rank >= quota
                    rank += 1
                if write_mask:
                    mask[np.uint64(i)] = keep
                if write_csr and keep:
                    v = w[np.uint64(i)]
                    if v != 0:
                        data[pos] = v
                        indices[pos] = i - lo
                        pos += one

    return kernel


def seg_fill(w, s, mode, inv, scaled, wide, T, quota, tie_start, tie_total, nseg,
             write_csr, row_start, data, indices, write_mask, mask):
    """Write the kept elements: CSR ``data``/``indices`` from ``row_start``
    per segment (zeros never stored), and/or the keep ``mask``."""
    _fill_kernel(mode, wide, scaled)(w, s, inv, T, quota, tie_start, tie_total, nseg, write_csr,
                                     row_start, data, indices, write_mask, mask)


@njit(parallel=True, cache=True)
def csr_matvec(data, indices, indptr, x, out, bounds):
    """``out = A @ x`` for CSR ``A``; row ranges in ``bounds`` hold equal nnz.

    Each row is accumulated in float64."""
    for c in prange(bounds.size - 1):
        for r in range(bounds[c], bounds[c + 1]):
            acc = 0.0
            for p in range(indptr[r], indptr[r + 1]):
                acc += data[np.uint64(p)] * x[np.uint64(indices[np.uint64(p)])]
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
                v = data[np.uint64(p)]
                row = x[np.uint64(indices[np.uint64(p)])]
                for j in range(k):
                    acc[j] += v * row[j]
            out[r, :] = acc
