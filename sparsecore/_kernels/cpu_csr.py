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
    def kernel(s, inv, T, nseg, above, tie_total, bad_s):
        n = s.size
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            a = 0
            t = 0
            bs = 0
            for i in range(lo, hi):
                ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
                bs += not ok
                a += ok & (k > T)
                t += ok & (k == T)
            above[r] = a
            tie_total[r] = t
            bad_s[r] = bs

    return kernel


def seg_count(s, mode, inv, scaled, wide, T, nseg, above, tie_total, bad_s):
    """Per segment: scores with key above ``T``, at ``T``, and non-finite.

    Only the scores are read: the fill pass drops zero weights and checks
    the weights' finiteness.
    """
    _count_kernel(mode, wide, scaled)(s, inv, T, nseg, above, tie_total, bad_s)


@specialize
def _fill_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, T, quota, tie_start, tie_total, nseg, write_csr, row_start, data, indices,
               row_nnz, bad_w, write_mask, mask):
        n = w.size
        T1 = T + np.uint64(1)
        zero = np.uint64(0)
        one = np.uint64(1)
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            rank = tie_start[r]
            start = np.uint64(row_start[r])
            pos = start
            nb = 0
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
                    for b0 in range(lo, hi, 64):
                        m = min(64, hi - b0)
                        bits = zero
                        for j in range(m):
                            i = np.uint64(b0 + j)
                            ok, k = score_key(s[i], mode, inv, scaled, wide)
                            v = w[i]
                            nb += not math.isfinite(v)
                            bits |= np.uint64((k >= cut) & (v != 0)) << np.uint64(j)
                        col = np.uint64(b0 - lo)
                        while bits:
                            j = cttz(bits)
                            data[pos] = w[np.uint64(b0) + j]
                            indices[pos] = col + j
                            pos += one
                            bits &= bits - one
            else:
                for i in range(lo, hi):
                    ok, k = score_key(s[np.uint64(i)], mode, inv, scaled, wide)
                    keep = k > T
                    if k == T:
                        keep = rank >= quota
                        rank += 1
                    if write_mask:
                        mask[np.uint64(i)] = keep
                    if write_csr:
                        v = w[np.uint64(i)]
                        nb += not math.isfinite(v)
                        if keep and v != 0:
                            data[pos] = v
                            indices[pos] = i - lo
                            pos += one
            row_nnz[r] = pos - start
            bad_w[r] = nb

    return kernel


def seg_fill(w, s, mode, inv, scaled, wide, T, quota, tie_start, tie_total, nseg,
             write_csr, row_start, data, indices, row_nnz, bad_w, write_mask, mask):
    """Write the kept elements: CSR ``data``/``indices`` from ``row_start``
    per segment (zeros never stored; ``row_nnz`` gets the count written, and
    ``bad_w`` the non-finite weights met), and/or the keep ``mask``."""
    _fill_kernel(mode, wide, scaled)(w, s, inv, T, quota, tie_start, tie_total, nseg, write_csr,
                                     row_start, data, indices, row_nnz, bad_w, write_mask, mask)


@njit(cache=True)
def compact_rows(data, indices, row_start, row_nnz, indptr):
    """Close the gaps that dropped zero weights left: move each row's
    ``row_nnz`` entries from ``row_start`` down to ``indptr`` (in row order,
    so a move never overwrites entries not yet moved)."""
    for r in range(row_nnz.size):
        src = row_start[r]
        dst = indptr[r]
        if src != dst:
            for q in range(row_nnz[r]):
                data[dst + q] = data[src + q]
                indices[dst + q] = indices[src + q]


@njit(cache=True)
def row_bounds(indptr, nchunks):
    """Row ranges holding about equal nnz: ``nchunks + 1`` non-decreasing bounds."""
    rows = indptr.size - 1
    nnz = indptr[rows]
    b = np.empty(nchunks + 1, np.int64)
    b[0] = 0
    for c in range(1, nchunks):
        b[c] = np.searchsorted(indptr, c * nnz // nchunks)
        if b[c] < b[c - 1]:
            b[c] = b[c - 1]
        if b[c] > rows:
            b[c] = rows
    b[nchunks] = rows
    return b


@njit(parallel=True, cache=True)
def csr_matvec(data, indices, indptr, x, out, nchunks):
    """``out = A @ x`` for CSR ``A``, rows split into ``nchunks`` ranges of
    equal nnz. Each row is accumulated in float64."""
    bounds = row_bounds(indptr, nchunks)
    for c in prange(nchunks):
        for r in range(bounds[c], bounds[c + 1]):
            a0 = indptr[r]
            a1 = indptr[r + 1]
            d = data[a0:a1]
            ix = indices[a0:a1]
            acc = 0.0
            for p in range(d.size):
                acc += d[p] * x[np.uint64(ix[p])]
            out[r] = acc


@njit(parallel=True, cache=True)
def csr_matmat(data, indices, indptr, x, out, nchunks):
    """``out = A @ X`` for CSR ``A`` and C-ordered dense ``X`` (cols x k).

    Four stored entries at a time update the output row once, so the row is
    loaded and stored a quarter as often as entry by entry."""
    k = x.shape[1]
    one = np.uint64(1)
    bounds = row_bounds(indptr, nchunks)
    for c in prange(nchunks):
        for r in range(bounds[c], bounds[c + 1]):
            o = out[r]
            o[:] = 0
            p = np.uint64(indptr[r])
            end = np.uint64(indptr[r + 1])
            while p + np.uint64(4) <= end:
                v0 = data[p]
                v1 = data[p + one]
                v2 = data[p + np.uint64(2)]
                v3 = data[p + np.uint64(3)]
                r0 = x[np.uint64(indices[p])]
                r1 = x[np.uint64(indices[p + one])]
                r2 = x[np.uint64(indices[p + np.uint64(2)])]
                r3 = x[np.uint64(indices[p + np.uint64(3)])]
                for j in range(k):
                    o[j] += v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j]
                p += np.uint64(4)
            while p < end:
                v = data[p]
                row = x[np.uint64(indices[p])]
                for j in range(k):
                    o[j] += v * row[j]
                p += one
