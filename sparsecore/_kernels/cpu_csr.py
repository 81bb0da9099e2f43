"""Rule application and CSR kernels: count, prefix sum (in the wrapper), fill;
CSR products.

A pruning rule is ``(T, quota)`` on score keys: an element is pruned when its
key is below ``T``, or equal to ``T`` and fewer than ``quota`` elements with
key ``T`` come before it in flat (row-major) order. These kernels compare the
scores themselves against the floats that the keys stand for
(``keys.cut_value``): the same order, fewer instructions. The flat array is cut into
``nseg`` segments ``[r*n//nseg, (r+1)*n//nseg)``: for a CSR build these are the
rows; for a mask they are any balanced cut.

Hot loops index with unsigned integers so that Numba emits no negative-index
wraparound and LLVM can vectorise them.
"""

import math

import numpy as np
from numba import njit, prange

from . import run, threads_for
from .keys import cttz, popcount, score_value, specialize


@specialize
def _count_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, cut, tie, count_ties, nseg, bitmap, kept_nz, tie_total, tie_nz, bad_w, bad_s,
               write_mask, mask):
        n = w.size
        zero = np.uint64(0)
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            words = bitmap[r]
            a = zero
            t = 0
            tz = 0
            bw = 0
            bs = 0
            for b in range((hi - lo + 63) // 64):
                # Loops of 64 elements, each free of branches so that LLVM
                # vectorises it; the later ones read from L1.
                b0 = lo + 64 * b
                m = min(64, hi - b0)
                bits = zero
                for j in range(m):
                    i = np.uint64(b0 + j)
                    v = w[i]
                    ok, x = score_value(s[i], mode, inv, scaled, wide)
                    bw += not math.isfinite(v)
                    bs += not ok
                    bits |= np.uint64(ok & (x >= cut) & (v != 0)) << np.uint64(j)
                words[b] = bits
                a += popcount(bits)
                if write_mask:
                    for j in range(m):
                        i = np.uint64(b0 + j)
                        ok, x = score_value(s[i], mode, inv, scaled, wide)
                        mask[i] = ok & (x >= cut)
                if count_ties:
                    for j in range(m):
                        i = np.uint64(b0 + j)
                        ok, x = score_value(s[i], mode, inv, scaled, wide)
                        eq = ok & (x == tie)
                        t += eq
                        tz += eq & (w[i] != 0)
            kept_nz[r] = a
            tie_total[r] = t
            tie_nz[r] = tz
            bad_w[r] = bw
            bad_s[r] = bs

    return kernel


def seg_count(w, s, mode, inv, scaled, wide, cut, tie, count_ties, nseg, bitmap, kept_nz, tie_total, tie_nz,
              bad_w, bad_s, write_mask, mask):
    """One pass over weights and scores, per segment: the bit set of the
    entries kept with a non-zero weight (score >= ``cut``) into ``bitmap`` (one
    row of 64-bit words per segment), their count, the ties (score == ``tie``)
    (all, and with non-zero weight) when ``count_ties``, the non-finite
    weights and scores; and the keep-mask (score >= ``cut``) when ``write_mask``."""
    nthreads = min(max(nseg, 1), threads_for(w.size))
    run(nthreads, _count_kernel(mode, wide, scaled), w, s, inv, cut, tie, count_ties, nseg, bitmap, kept_nz,
        tie_total, tie_nz, bad_w, bad_s, write_mask, mask)


@specialize
def _ties_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(w, s, inv, tie, quota, tie_start, r, nseg):
        n = w.size
        lo = r * n // nseg
        hi = (r + 1) * n // nseg
        rank = tie_start
        kept = 0
        for i in range(lo, hi):
            ok, x = score_value(s[np.uint64(i)], mode, inv, scaled, wide)
            if ok and x == tie:
                if rank >= quota and w[np.uint64(i)] != 0:
                    kept += 1
                rank += 1
        return kept

    return kernel


def seg_kept_ties_nz(w, s, mode, inv, scaled, wide, tie, quota, tie_start, r, nseg):
    """Non-zero ties kept in segment ``r`` (the one segment a quota splits)."""
    return _ties_kernel(mode, wide, scaled)(w, s, inv, tie, quota, tie_start, r, nseg)


@specialize
def _fill_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(w, s, inv, tie, quota, tie_start, tie_total, nseg, bitmap, row_start, write_csr, data,
               indices, write_mask, mask):
        n = w.size
        one = np.uint64(1)
        for r in prange(nseg):
            lo = r * n // nseg
            hi = (r + 1) * n // nseg
            rank = tie_start[r]
            pos = np.uint64(row_start[r])
            if quota == 0 or tie_total[r] == 0 or rank + tie_total[r] <= quota:
                # The count pass's bits are the answer: write the set ones,
                # reading the weights only there.
                if write_csr:
                    words = bitmap[r]
                    for b in range(words.size):
                        bits = words[b]
                        base = np.uint64(lo + 64 * b)
                        col = np.uint64(64 * b)
                        while bits:
                            j = cttz(bits)
                            data[pos] = w[base + j]
                            indices[pos] = col + j
                            pos += one
                            bits &= bits - one
                continue
            # Ties at T kept in this row (all, or from the quota on): rescan it.
            for i in range(lo, hi):
                ok, x = score_value(s[np.uint64(i)], mode, inv, scaled, wide)
                keep = ok and x > tie
                if ok and x == tie:
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


def seg_fill(w, s, mode, inv, scaled, wide, tie, quota, tie_start, tie_total, nseg, bitmap, row_start,
             write_csr, data, indices, write_mask, mask):
    """Write the CSR entries of each segment from ``row_start``: the count
    pass's bit set, or a rescan of the rows whose ties at ``T`` are kept
    under a quota (those rows' mask entries are rewritten too)."""
    nthreads = min(max(nseg, 1), threads_for(w.size))
    run(nthreads, _fill_kernel(mode, wide, scaled), w, s, inv, tie, quota, tie_start, tie_total, nseg, bitmap,
        row_start, write_csr, data, indices, write_mask, mask)


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
    equal nnz. Each row is accumulated in float64, in four partial sums so
    that the additions do not wait on one another."""
    bounds = row_bounds(indptr, nchunks)
    one = np.uint64(1)
    for c in prange(nchunks):
        for r in range(bounds[c], bounds[c + 1]):
            a0 = indptr[r]
            a1 = indptr[r + 1]
            d = data[a0:a1]
            ix = indices[a0:a1]
            m = np.uint64(d.size)
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            p = np.uint64(0)
            while p + np.uint64(4) <= m:
                s0 += d[p] * x[np.uint64(ix[p])]
                s1 += d[p + one] * x[np.uint64(ix[p + one])]
                s2 += d[p + np.uint64(2)] * x[np.uint64(ix[p + np.uint64(2)])]
                s3 += d[p + np.uint64(3)] * x[np.uint64(ix[p + np.uint64(3)])]
                p += np.uint64(4)
            while p < m:
                s0 += d[p] * x[np.uint64(ix[p])]
                p += one
            out[r] = (s0 + s1) + (s2 + s3)


@njit(parallel=True, cache=True, fastmath={"contract"})
def csr_matmat(data, indices, indptr, x, out, nchunks):
    """``out = A @ X`` for CSR ``A`` and C-ordered dense ``X`` (cols x k).

    Eight stored entries at a time update the output row once, so the row is
    loaded and stored an eighth as often as entry by entry, and LLVM's
    run-time overlap checks run once per eight entries. ``contract`` lets
    LLVM fuse multiply-adds (no NaN/Inf assumptions)."""
    k = x.shape[1]
    one = np.uint64(1)
    eight = np.uint64(8)
    bounds = row_bounds(indptr, nchunks)
    for c in prange(nchunks):
        for r in range(bounds[c], bounds[c + 1]):
            o = out[r]
            o[:] = 0
            p = np.uint64(indptr[r])
            end = np.uint64(indptr[r + 1])
            while p + eight <= end:
                v0, v1, v2, v3 = data[p], data[p + one], data[p + np.uint64(2)], data[p + np.uint64(3)]
                v4, v5, v6, v7 = (data[p + np.uint64(4)], data[p + np.uint64(5)], data[p + np.uint64(6)],
                                  data[p + np.uint64(7)])
                r0 = x[np.uint64(indices[p])]
                r1 = x[np.uint64(indices[p + one])]
                r2 = x[np.uint64(indices[p + np.uint64(2)])]
                r3 = x[np.uint64(indices[p + np.uint64(3)])]
                r4 = x[np.uint64(indices[p + np.uint64(4)])]
                r5 = x[np.uint64(indices[p + np.uint64(5)])]
                r6 = x[np.uint64(indices[p + np.uint64(6)])]
                r7 = x[np.uint64(indices[p + np.uint64(7)])]
                for j in range(k):
                    o[j] += ((v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j])
                             + (v4 * r4[j] + v5 * r5[j] + v6 * r6[j] + v7 * r7[j]))
                p += eight
            while p < end:
                v = data[p]
                row = x[np.uint64(indices[p])]
                for j in range(k):
                    o[j] += v * row[j]
                p += one
