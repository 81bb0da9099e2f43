"""Radix selection on score keys: histograms per level, then the digit pick.

The k-th smallest score of one or many tensors is found without sorting and
without concatenating them: each level histograms one digit of the keys of
the elements that share the prefix found so far, so the extra memory is one
histogram per tensor and thread whatever the tensors' sizes.
"""

import math

import numpy as np
from numba import njit, prange

from .keys import MODE_ABS, MODE_SQUARE, score_key, specialize

# Elements per block of the deterministic reductions: partial results are
# formed per fixed block, never per thread, so the answer does not depend on
# the thread count.
REDUCE_BLOCK = 1 << 16


@specialize
def _hist_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(x, inv, first, prefix, pshift, shift, bits, hist):
        n = x.size
        nchunks = hist.shape[0]
        digit_mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
        ushift = np.uint64(shift)
        upshift = np.uint64(pshift)
        bad = np.zeros(nchunks, np.int64)
        first_bad = np.full(nchunks, n, np.int64)
        for c in prange(nchunks):
            lo = c * n // nchunks
            hi = (c + 1) * n // nchunks
            h = hist[c]
            nbad = 0
            fbad = n
            if first:
                for i in range(lo, hi):
                    ok, k = score_key(x[i], mode, inv, scaled, wide)
                    if ok:
                        h[(k >> ushift) & digit_mask] += 1
                    else:
                        nbad += 1
                        if fbad == n:
                            fbad = i
            else:
                for i in range(lo, hi):
                    ok, k = score_key(x[i], mode, inv, scaled, wide)
                    if ok and (k >> upshift) == prefix:
                        h[(k >> ushift) & digit_mask] += 1
            bad[c] = nbad
            first_bad[c] = fbad
        return bad.sum(), first_bad.min()

    return kernel


def hist_level(x, mode, inv, scaled, wide, first, prefix, pshift, shift, bits, hist):
    """Add the digit histogram of one level into ``hist`` (chunks x 2**bits).

    On the first level every element counts and non-finite scores are
    counted; later levels count only elements whose ``key >> pshift`` equals
    ``prefix`` (a uint64). Returns ``(n_nonfinite, first_nonfinite_index)``.
    """
    return _hist_kernel(mode, wide, scaled)(x, inv, first, prefix, pshift, shift, bits, hist)


@njit(cache=True)
def pick_digit(hist, below, lo, hi, target):
    """Pick the digit bucket where the capped count first reaches ``target``.

    ``hist`` is (tensors x buckets), ``below[t]`` the count of tensor t's
    keys under the current bucket range. The capped count at the end of
    bucket d is ``sum_t clip(below[t] + cum_t(d), lo[t], hi[t])``. Returns
    the smallest d where it reaches ``target`` and advances ``below`` to the
    counts strictly under bucket d.
    """
    ntens, nbuckets = hist.shape
    run = below.copy()
    for d in range(nbuckets):
        total = 0
        for t in range(ntens):
            c = run[t] + hist[t, d]
            if c < lo[t]:
                c = lo[t]
            elif c > hi[t]:
                c = hi[t]
            total += c
        if total >= target:
            for t in range(ntens):
                below[t] = run[t]
            return d
        for t in range(ntens):
            run[t] += hist[t, d]
    for t in range(ntens):
        below[t] = run[t]
    return nbuckets - 1


@njit(parallel=True, cache=True)
def score_norm(x, mode, kind):
    """Norm of a tensor's scores: kind 1 = l1, 2 = l2, 3 = max of |score|.

    Partial sums are per fixed block and added in block order, so the result
    is the same on any thread count.
    """
    n = x.size
    nblocks = (n + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    part = np.zeros(max(nblocks, 1), np.float64)
    for b in prange(nblocks):
        lo = b * REDUCE_BLOCK
        hi = min(n, lo + REDUCE_BLOCK)
        acc = 0.0
        for i in range(lo, hi):
            d = np.float64(x[i])
            if mode == MODE_SQUARE:
                d = d * d
            elif mode == MODE_ABS:
                d = abs(d)
            d = abs(d)
            if kind == 1:
                acc += d
            elif kind == 2:
                acc += d * d
            elif d > acc:
                acc = d
        part[b] = acc
    total = 0.0
    for b in range(nblocks):
        if kind == 3:
            if part[b] > total:
                total = part[b]
        else:
            total += part[b]
    if kind == 2:
        total = math.sqrt(total)
    return total


@njit(parallel=True, cache=True)
def first_nonfinite(x):
    """Return ``(count, first_index)`` of the NaN and Inf values in flat ``x``."""
    n = x.size
    nblocks = (n + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    count = np.zeros(max(nblocks, 1), np.int64)
    first = np.full(max(nblocks, 1), n, np.int64)
    for b in prange(nblocks):
        lo = b * REDUCE_BLOCK
        hi = min(n, lo + REDUCE_BLOCK)
        c = 0
        f = n
        for i in range(lo, hi):
            if not math.isfinite(x[i]):
                c += 1
                if f == n:
                    f = i
        count[b] = c
        first[b] = f
    return count.sum(), first.min()
