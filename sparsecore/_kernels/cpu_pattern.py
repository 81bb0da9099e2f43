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


@specialize
def block_pool(mode, wide, scaled):
    """Pool the scores of an ``(R, C)`` matrix over ``(r, c)`` blocks.

    Trailing partial blocks pool the entries present: the mean divides by
    their count, the max and the L2 norm use them alone.
    """

    @njit(parallel=True, cache=True)
    def kernel(s, R, C, r, c, pool, out, bad, first_bad):
        nbr, nbc = out.shape
        for br in prange(nbr):
            acc = np.zeros(nbc, np.float64)
            if pool == 1:
                acc[:] = -np.inf
            r0 = br * r
            r1 = min(r0 + r, R)
            nbad = 0
            fb = R * C
            for i in range(r0, r1):
                row = i * C
                for bc in range(nbc):
                    c0 = bc * c
                    c1 = min(c0 + c, C)
                    t = acc[bc]
                    for j in range(c0, c1):
                        ok, v = score_value(s[np.uint64(row + j)], mode, 1.0, scaled, wide)
                        if not ok:
                            if nbad == 0:
                                fb = row + j
                            nbad += 1
                        d = np.float64(v)
                        if pool == 1:
                            t = max(t, d)
                        elif pool == 2:
                            t += d * d
                        elif pool == 3:
                            t += abs(d)
                        else:
                            t += d
                    acc[bc] = t
            rows = r1 - r0
            for bc in range(nbc):
                t = acc[bc]
                if pool == 0:
                    t /= rows * (min(bc * c + c, C) - bc * c)
                elif pool == 2:
                    t = np.sqrt(t)
                out[br, bc] = t
            bad[br] = nbad
            first_bad[br] = fb

    return kernel


@njit(parallel=True, cache=True)
def block_expand(keep_blocks, R, C, r, c, mask):
    """Element keep-mask (flat, ``R * C``) of a block keep-mask."""
    for i in prange(R):
        kb = keep_blocks[i // r]
        row = i * C
        for j in range(C):
            mask[np.uint64(row + j)] = kb[j // c]


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
                    d = np.float64(v)
                    if pool == 1:
                        t = max(t, d)
                    elif pool == 2:
                        t += d * d
                    elif pool == 3:
                        t += abs(d)
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
