"""Selection kernels: radix histograms, the sampled bracket, reductions.

The k-th smallest score of one or many tensors is found without sorting and
without concatenating them. Two ways, both exact:

* radix select: each level histograms one digit of the keys of the elements
  that share the prefix found so far (two levels for float32, four for
  float64); the extra memory is one histogram per tensor and thread;
* sampled bracket (one tensor): the k-th key is bracketed between two
  quantiles of an evenly strided sample; one pass counts the keys below the
  bracket and copies the few inside it. The caller falls back to radix when
  the bracket misses.

Hot loops index with unsigned integers: Numba then emits no negative-index
wraparound, and LLVM can vectorise the loop.
"""

import math

import numpy as np
from numba import njit, prange

from . import run, threads_for
from .keys import MODE_SQUARE, NORM_L1, NORM_L2, NORM_MAX, cttz, score_key, specialize

# Elements per block of the deterministic reductions: partial results are
# formed per fixed block, never per thread, so the answer does not depend on
# the thread count.
REDUCE_BLOCK = 1 << 16
# Elements per block of the norm of normalised selection: small enough that
# the GPU twin (a thread per block, the same order, so the same bits) has
# thousands of threads to run.
NORM_BLOCK = 1 << 12
# Elements tested together before a rare slow path is taken.
_SKIP_BLOCK = 16


@njit(inline="always", cache=True)
def _first_bad(x, lo, hi, mode, inv, scaled, wide):
    """Index of the first non-finite score in ``x[lo:hi]`` (``hi`` if none)."""
    for i in range(lo, hi):
        ok, k = score_key(x[np.uint64(i)], mode, inv, scaled, wide)
        if not ok:
            return i
    return hi


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
            if first:
                for i in range(lo, hi):
                    ok, k = score_key(x[np.uint64(i)], mode, inv, scaled, wide)
                    if ok:
                        h[(k >> ushift) & digit_mask] += 1
                    else:
                        nbad += 1
                if nbad:
                    first_bad[c] = _first_bad(x, lo, hi, mode, inv, scaled, wide)
            else:
                for b0 in range(lo, hi, _SKIP_BLOCK):
                    b1 = min(hi, b0 + _SKIP_BLOCK)
                    hit = 0
                    for i in range(b0, b1):
                        ok, k = score_key(x[np.uint64(i)], mode, inv, scaled, wide)
                        hit += ok & ((k >> upshift) == prefix)
                    if hit:
                        for i in range(b0, b1):
                            ok, k = score_key(x[np.uint64(i)], mode, inv, scaled, wide)
                            if ok and (k >> upshift) == prefix:
                                h[(k >> ushift) & digit_mask] += 1
            bad[c] = nbad
        return bad.sum(), first_bad.min()

    return kernel


def hist_level(x, mode, inv, scaled, wide, first, prefix, pshift, shift, bits, hist):
    """Add the digit histogram of one level into ``hist`` (chunks x 2**bits).

    On the first level every element counts and non-finite scores are
    counted; later levels count only elements whose ``key >> pshift`` equals
    ``prefix`` (a uint64). Returns ``(n_nonfinite, first_nonfinite_index)``.
    """
    nthreads = min(hist.shape[0], threads_for(x.size))
    return run(nthreads, _hist_kernel(mode, wide, scaled), x, inv, first, prefix, pshift, shift, bits, hist)


@specialize
def _sample_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(x, inv, out):
        n = x.size
        m = out.size
        for j in range(m):
            ok, k = score_key(x[np.uint64(j * n // m)], mode, inv, scaled, wide)
            out[j] = k  # a non-finite sample is caught by the full pass
        return m

    return kernel


def sample_keys(x, mode, inv, scaled, wide, out):
    """Keys of ``out.size`` elements of ``x`` at evenly strided positions."""
    return _sample_kernel(mode, wide, scaled)(x, inv, out)


@specialize
def _keys_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(x, inv, out):
        n = x.size
        nbad = 0
        for i in range(n):
            ok, k = score_key(x[np.uint64(i)], mode, inv, scaled, wide)
            out[np.uint64(i)] = k
            nbad += not ok
        return nbad, _first_bad(x, 0, n, mode, inv, scaled, wide) if nbad else n

    return kernel


def all_keys(x, mode, inv, scaled, wide, out):
    """The key of every element of ``x`` into ``out`` (one thread: for small
    tensors). Returns ``(n_nonfinite, first_nonfinite_index)``."""
    return _keys_kernel(mode, wide, scaled)(x, inv, out)


@specialize
def _range_kernel(mode, wide, scaled):
    @njit(parallel=True, cache=True)
    def kernel(x, inv, lo_key, hi_key, nchunks, cap, buf, n_less, n_cand):
        n = x.size
        one = np.uint64(1)
        bad = np.zeros(nchunks, np.int64)
        first_bad = np.full(nchunks, n, np.int64)
        for c in prange(nchunks):
            lo = c * n // nchunks
            hi = (c + 1) * n // nchunks
            out = buf[c * cap:(c + 1) * cap]
            less = 0
            p = 0
            nbad = 0
            for b0 in range(lo, hi, 64):
                # One vectorised loop per 64 elements: counts, and the bracket's
                # members as a bit set, copied out bit by bit.
                m = min(64, hi - b0)
                bits = np.uint64(0)
                for j in range(m):
                    ok, k = score_key(x[np.uint64(b0 + j)], mode, inv, scaled, wide)
                    nbad += not ok
                    less += ok & (k < lo_key)
                    bits |= np.uint64(ok & (k >= lo_key) & (k <= hi_key)) << np.uint64(j)
                while bits:
                    j = cttz(bits)
                    if p < cap:
                        ok, k = score_key(x[np.uint64(b0) + j], mode, inv, scaled, wide)
                        out[np.uint64(p)] = k
                    p += 1
                    bits &= bits - one
            if nbad:
                first_bad[c] = _first_bad(x, lo, hi, mode, inv, scaled, wide)
            n_less[c] = less
            n_cand[c] = p
            bad[c] = nbad
        return bad.sum(), first_bad.min()

    return kernel


def range_pass(x, mode, inv, scaled, wide, lo_key, hi_key, nchunks, cap, buf, n_less, n_cand):
    """One pass: per chunk, count keys below ``lo_key`` and copy the keys in
    ``[lo_key, hi_key]`` into ``buf[c*cap:(c+1)*cap]`` (counting past ``cap``
    without writing). Returns ``(n_nonfinite, first_nonfinite_index)``."""
    nthreads = min(nchunks, threads_for(x.size))
    return run(nthreads, _range_kernel(mode, wide, scaled), x, inv, lo_key, hi_key, nchunks, cap, buf, n_less, n_cand)


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


def score_norm(x, mode, kind):
    """Norm of a tensor's scores: ``kind`` NORM_L1, NORM_L2 or NORM_MAX (of |score|).

    Partial sums are per fixed block and added in block order, so the result
    is the same on any thread count.
    """
    return run(threads_for(x.size), _score_norm, x, mode, kind)


@njit(parallel=True, cache=True)
def _score_norm(x, mode, kind):
    n = x.size
    nblocks = (n + NORM_BLOCK - 1) // NORM_BLOCK
    part = np.zeros(max(nblocks, 1), np.float64)
    for b in prange(nblocks):
        lo = b * NORM_BLOCK
        hi = min(n, lo + NORM_BLOCK)
        acc = 0.0
        for i in range(lo, hi):
            d = np.float64(x[np.uint64(i)])
            if mode == MODE_SQUARE:
                d = d * d
            d = abs(d)
            if kind == NORM_L1:
                acc += d
            elif kind == NORM_L2:
                acc += d * d
            elif d > acc:
                acc = d
        part[b] = acc
    total = 0.0
    for b in range(nblocks):
        if kind == NORM_MAX:
            if part[b] > total:
                total = part[b]
        else:
            total += part[b]
    if kind == NORM_L2:
        total = math.sqrt(total)
    return total


def first_nonfinite(x):
    """Return ``(count, first_index)`` of the NaN and Inf values in flat ``x``."""
    return run(threads_for(x.size), _first_nonfinite, x)


@njit(parallel=True, cache=True)
def _first_nonfinite(x):
    n = x.size
    nblocks = (n + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    count = np.zeros(max(nblocks, 1), np.int64)
    first = np.full(max(nblocks, 1), n, np.int64)
    for b in prange(nblocks):
        lo = b * REDUCE_BLOCK
        hi = min(n, lo + REDUCE_BLOCK)
        c = 0
        for i in range(lo, hi):
            c += not math.isfinite(x[np.uint64(i)])
        if c:
            for i in range(lo, hi):
                if not math.isfinite(x[np.uint64(i)]):
                    first[b] = i
                    break
        count[b] = c
    return count.sum(), first.min()


@specialize
def _batch_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(w, s, offs, inv, rule_key, quota, count, lo, hi, capped, raw, kept, nnz, bad):
        for t in range(offs.size - 1):
            a = offs[t]
            n = offs[t + 1] - a
            keys = np.empty(n, np.uint64)
            ok_all = True
            for j in range(n):
                ok, k = score_key(s[a + j], mode, inv[t], scaled, wide)
                keys[j] = k
                ok_all &= ok & np.isfinite(w[a + j])
            if not ok_all:
                bad[t] = 1
                continue
            keep = np.ones(n, np.bool_)
            k = count[t]
            if k < 0:  # a rule: keys below it, and the first ``quota`` ties at it by index
                left = quota[t]
                p = 0
                for j in range(n):
                    if keys[j] < rule_key[t]:
                        keep[j] = False
                        p += 1
                    elif keys[j] == rule_key[t] and left > 0:
                        keep[j] = False
                        p += 1
                        left -= 1
                if capped and (p < lo[t] or p > hi[t]):  # the tensor's own lowest, as many as its cap
                    k = min(max(p, lo[t]), hi[t])
                    keep[:] = True
            if k >= 0:  # the ``k`` lowest keys, ties by index (a stable sort)
                order = np.argsort(keys, kind="mergesort")
                for j in range(k):
                    keep[order[j]] = False
            nz = 0
            held = 0
            for j in range(n):
                if keep[j]:
                    held += 1
                    nz += w[a + j] != 0
                else:
                    raw[a + j] = 0
            kept[t] = held
            nnz[t] = nz

    return kernel


def batch_keep(w, s, offs, mode, inv, scaled, wide, rule_key, quota, count, lo, hi, capped, raw, kept, nnz, bad):
    """Select many small tensors laid end to end (tensor ``t`` is
    ``[offs[t], offs[t+1])`` of the weights ``w``, scores ``s`` and stored bit
    patterns ``raw``), one thread, one pass each. Tensor ``t`` prunes its
    ``count[t]`` lowest score keys (ties: lower index first) or, where
    ``count[t] < 0``, the keys below ``rule_key[t]`` and the first
    ``quota[t]`` ties at it; with ``capped``, a rule whose count leaves
    ``[lo[t], hi[t]]`` gives way to that many lowest keys. Pruned entries of
    ``raw`` are zeroed in place; ``kept[t]`` and ``nnz[t]`` (kept non-zero
    weights) are written; ``bad[t]`` is set, and ``t`` left alone, when a
    weight or score of ``t`` is not finite."""
    _batch_kernel(mode, wide, scaled)(w, s, offs, inv, rule_key, quota, count, lo, hi, capped, raw, kept, nnz,
                                      bad)


@specialize
def _sorted_keys_kernel(mode, wide, scaled):
    @njit(cache=True)
    def kernel(x, offs, inv, keys):
        for t in range(offs.size - 1):
            a, b = offs[t], offs[t + 1]
            for i in range(a, b):
                ok, k = score_key(x[i], mode, inv[t], scaled, wide)
                if not ok:
                    return t
                keys[i] = k
            keys[a:b].sort()
        return -1

    return kernel


def sorted_keys_runs(x, offs, mode, inv, scaled, wide, keys):
    """The keys of many small tensors laid end to end (tensor ``t`` is
    ``[offs[t], offs[t+1])`` of ``x``, scaled by ``inv[t]``), each tensor's
    sorted in place in ``keys``, one thread. Returns the first tensor with a
    non-finite score (its keys are left unwritten), or -1."""
    return int(_sorted_keys_kernel(mode, wide, scaled)(x, offs, inv, keys))


@njit(cache=True)
def counts_in_runs(keys, offs, key, below, ties):
    """Per run ``t`` of sorted ``keys`` (``[offs[t], offs[t+1])``): how many
    are below ``key`` and how many equal it, into ``below`` and ``ties``."""
    for t in range(offs.size - 1):
        run = keys[offs[t]:offs[t + 1]]
        lo = np.searchsorted(run, key, "left")
        below[t] = lo
        ties[t] = np.searchsorted(run, key, "right") - lo
