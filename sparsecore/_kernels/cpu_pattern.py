"""Structured-pattern kernels: N:M groups, block pooling, unit reductions.

A tensor is seen as ``(A, L, B)``: ``L`` is the grouped (N:M) or unit axis,
``A`` the product of the axes before it and ``B`` of those after, so that
element ``(a, l, b)`` sits at flat index ``(a * L + l) * B + b`` of the
C-ordered array. Scores are transformed by ``mode`` (identity, abs, square;
see ``keys``) and compared as floats; ties go the selection's way: the
lower index is pruned first.
"""

import numpy as np
from numba import njit, prange

from . import run, threads_for
from .keys import score_value, specialize

POOL_MEAN = 0
POOL_MAX = 1
POOL_L2 = 2
POOL_L1 = 3


@specialize
def nm_keep(mode, wide, scaled):
    """Keep-mask of the ``n`` highest scores in each group of ``m``
    consecutive entries along the middle axis of ``(A, L, B)``."""

    @njit(parallel=True, cache=True)
    def kernel(s, A, L, B, n, m, keep, bad):
        ngroups = L // m
        for a in prange(A):
            vals = np.empty(m, np.float64)
            nbad = 0
            for g in range(ngroups):
                for b in range(B):
                    base = (a * L + g * m) * B + b
                    for i in range(m):
                        ok, v = score_value(s[np.uint64(base + i * B)], mode, 1.0, scaled, wide)
                        if not ok:
                            nbad += 1
                        vals[i] = v
                    for i in range(m):
                        vi = vals[i]
                        beats = 0  # entries ranked above i: higher score, or equal and later
                        for j in range(m):
                            vj = vals[j]
                            if vj > vi or (vj == vi and j > i):
                                beats += 1
                        keep[np.uint64(base + i * B)] = beats < n
            bad[a] = nbad

    return kernel


_NM_VARIANTS = {}
# Largest M whose contiguous kernel is unrolled (M * M compares per group).
NM_UNROLL_MAX = 16


def nm_keep_rows(mode, wide, n, m):
    """Keep-mask of ``n`` of every ``m`` consecutive entries of a flat array
    (groups contiguous: the grouped axis is the last one). ``n`` and ``m``
    are compile-time constants, so the rank loops unroll and the group
    stays in registers. Specialised on ``(mode, wide, n, m)``."""
    key = (int(mode), bool(wide), int(n), int(m))
    if key not in _NM_VARIANTS:
        _NM_VARIANTS[key] = _nm_rows_factory(*key)
    return _NM_VARIANTS[key]


def _nm_rows_factory(mode, wide, n, m):
    @njit(parallel=True, cache=True)
    def kernel(s, keep, bad):
        ngroups = s.size // m
        nchunks = bad.size
        for c in prange(nchunks):
            lo = c * ngroups // nchunks
            hi = (c + 1) * ngroups // nchunks
            nbad = 0
            for g in range(lo, hi):
                base = np.uint64(g * m)
                for i in range(m):
                    oki, vi = score_value(s[base + np.uint64(i)], mode, 1.0, False, wide)
                    nbad += not oki
                    beats = 0
                    for j in range(m):
                        okj, vj = score_value(s[base + np.uint64(j)], mode, 1.0, False, wide)
                        if j > i:
                            beats += vj >= vi
                        elif j < i:
                            beats += vj > vi
                    keep[base + np.uint64(i)] = beats < n
            bad[c] = nbad

    return kernel


@njit(parallel=True, cache=True)
def nm_group_counts(w, A, L, B, m, counts):
    """Number of non-zero entries in each N:M group; ``counts`` is
    ``(A, L // m, B)``."""
    ngroups = L // m
    for a in prange(A):
        for g in range(ngroups):
            for b in range(B):
                base = (a * L + g * m) * B + b
                c = 0
                for i in range(m):
                    if w[np.uint64(base + i * B)] != 0:
                        c += 1
                counts[a, g, b] = c


_POOL_VARIANTS = {}


@njit(inline="always", cache=True)
def _pool_term(v, pool):
    """A score's term in a pooled sum (or max), in float64."""
    d = np.float64(v)
    if pool == 2:
        return d * d
    if pool == 3:
        return abs(d)
    return d


def block_pool(mode, wide, pool, c):
    """Pool the scores of an ``(R, C)`` matrix over ``(r, c)`` blocks.

    Per block row, the ``r`` rows are first folded column by column into
    one row of per-column sums (or maxima), a contiguous loop that
    vectorises; each block then reduces its ``c`` columns of that row.
    Trailing partial blocks pool the entries present: the mean divides by
    their count, the max and the L2 norm use them alone. Specialised on
    ``(mode, wide, pool)`` and on block widths ``c <= 16`` (unrolled).
    """
    key = (int(mode), bool(wide), int(pool), int(c) if c <= 16 else 0)
    if key not in _POOL_VARIANTS:
        _POOL_VARIANTS[key] = _block_pool_factory(*key)
    return _POOL_VARIANTS[key]


def _block_pool_factory(mode, wide, pool, cc):
    @njit(parallel=True, cache=True)
    def kernel(s, R, C, r, c_arg, out, bad, first_bad):
        c = cc if cc > 0 else c_arg
        nbr, nbc = out.shape
        for br in prange(nbr):
            acc = np.full(C, -np.inf if pool == 1 else 0.0)
            r0 = br * r
            r1 = min(r0 + r, R)
            nbad = 0
            fb = R * C
            for i in range(r0, r1):
                row = s[i * C:(i + 1) * C]
                nrow = 0
                if pool == 1:
                    for j in range(C):
                        ok, v = score_value(row[np.uint64(j)], mode, 1.0, False, wide)
                        nrow += not ok
                        acc[np.uint64(j)] = max(acc[np.uint64(j)], np.float64(v))
                else:
                    for j in range(C):
                        ok, v = score_value(row[np.uint64(j)], mode, 1.0, False, wide)
                        nrow += not ok
                        acc[np.uint64(j)] += _pool_term(v, pool)
                if nrow and not nbad:
                    for j in range(C):
                        ok, v = score_value(row[np.uint64(j)], mode, 1.0, False, wide)
                        if not ok:
                            fb = i * C + j
                            break
                nbad += nrow
            full = C // c  # blocks of c columns; then at most one partial block
            scale = 1.0 / ((r1 - r0) * c)
            for bc in range(full):
                c0 = np.uint64(bc * c)
                t = acc[c0]
                for j in range(1, c):
                    if pool == 1:
                        t = max(t, acc[c0 + np.uint64(j)])
                    else:
                        t += acc[c0 + np.uint64(j)]
                if pool == 0:
                    t *= scale
                elif pool == 2:
                    t = np.sqrt(t)
                out[br, bc] = t
            if full < nbc:
                c0 = full * c
                t = acc[c0]
                for j in range(c0 + 1, C):
                    if pool == 1:
                        t = max(t, acc[j])
                    else:
                        t += acc[j]
                if pool == 0:
                    t /= (r1 - r0) * (C - c0)
                elif pool == 2:
                    t = np.sqrt(t)
                out[br, full] = t
            bad[br] = nbad
            first_bad[br] = fb

    return kernel


@njit(parallel=True, cache=True)
def block_expand(keep_blocks, R, C, r, c, mask):
    """Element keep-mask (flat, ``R * C``) of a block keep-mask: one row per
    block row is spelled out, then copied into the block row's ``r`` rows."""
    nbr = keep_blocks.shape[0]
    for br in prange(nbr):
        kb = keep_blocks[br]
        r0 = br * r
        first = mask[r0 * C:(r0 + 1) * C]
        for bc in range(kb.size):
            v = kb[bc]
            for j in range(bc * c, min(bc * c + c, C)):
                first[np.uint64(j)] = v
        for i in range(r0 + 1, min(r0 + r, R)):
            row = mask[i * C:(i + 1) * C]
            for j in range(C):
                row[np.uint64(j)] = first[np.uint64(j)]


@specialize
def unit_reduce(mode, wide, scaled):
    """Reduce the scores of each unit ``l`` of ``(A, L, B)`` over ``a`` and
    ``b``: the mean, max, L2 norm or L1 norm of its entries."""

    @njit(parallel=True, cache=True)
    def kernel(s, A, L, B, pool, out, bad, first_bad):
        for u in prange(L):
            t = -np.inf if pool == 1 else 0.0
            nbad = 0
            fb = A * L * B
            for a in range(A):
                base = (a * L + u) * B
                for b in range(B):
                    ok, v = score_value(s[np.uint64(base + b)], mode, 1.0, scaled, wide)
                    if not ok:
                        if nbad == 0:
                            fb = base + b
                        nbad += 1
                    d = _pool_term(v, pool)
                    if pool == 1:
                        t = max(t, d)
                    else:
                        t += d
            if pool == 0:
                t /= max(A * B, 1)
            elif pool == 2:
                t = np.sqrt(t)
            out[u] = t
            bad[u] = nbad
            first_bad[u] = fb

    return kernel


def keep_raw(raw, mask, values):
    """Zero the entries of ``raw`` (unsigned integers of the elements' width:
    their bit patterns) that ``mask`` drops, and count the kept non-zero
    ``values``. Zero bits are +0.0 in every float format."""
    return run(threads_for(raw.size), _keep_raw, raw, mask, values)


@njit(parallel=True, cache=True)
def _keep_raw(raw, mask, values):
    n = raw.size
    nchunks = max(1, min(64, n >> 16))
    counts = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        lo = c * n // nchunks
        hi = (c + 1) * n // nchunks
        nz = 0
        for i in range(lo, hi):
            k = mask[np.uint64(i)]
            nz += k & (values[np.uint64(i)] != 0)
            if not k:  # a plain store: ``x if k else 0`` would unify uint64 with int64 as float64
                raw[np.uint64(i)] = 0
        counts[c] = nz
    return counts.sum()
