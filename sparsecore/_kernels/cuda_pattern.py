"""CUDA twins of ``cpu_pattern``: N:M groups, block pooling, unit
reductions, and the expansions of group masks to element masks.

Same ``(A, L, B)`` view and the same float arithmetic in the same order as
the CPU kernels (sums added row by row, then column by column; the same
scale or division for a mean), so pooled scores and masks are identical.
Argument order: the CPU kernel's arguments, then what the CPU binds as
compile-time constants (``mode``, ``wide``, ``pool``). Scores are compared in
float64 (float32 converts exactly and in order). Non-finite scores are
counted into ``bad[0]`` with the first flat index in ``bad[1]``.
"""

import math

from numba import cuda, float64, int64

from ._signatures import FLOATS, arr, b1, combos, f64, i64
from .keys import MODE_ABS, MODE_SQUARE

MAX_M = 32  # largest N:M group on the device (a thread holds its group)


# Twin of cpu_pattern's score transform: the GPU must reproduce the CPU's bits.
@cuda.jit(device=True, inline=True)
def _value(v, mode):
    d = float64(v)
    if mode == MODE_ABS:
        d = abs(d)
    elif mode == MODE_SQUARE:
        d = d * d
    return d


@cuda.jit(device=True, inline=True)
def _flag_bad(d, i, bad):
    if not math.isfinite(d):
        cuda.atomic.add(bad, 0, 1)
        cuda.atomic.min(bad, 1, i)


# Twin of cpu_pattern._pool_term: the GPU must reproduce the CPU's bits.
@cuda.jit(device=True, inline=True)
def _pool_term(d, pool):
    if pool == 2:
        return d * d
    if pool == 3:
        return abs(d)
    return d


# Twin of cpu_pattern.nm_keep: the GPU must reproduce the CPU's bits.
@cuda.jit
def nm_keep(s, A, L, B, n, m, keep, bad, mode):
    """Keep the ``n`` highest scores of each group of ``m`` along ``L``; a
    thread per group (ties: the later entry ranks higher, as on the CPU)."""
    ngroups = L // m
    vals = cuda.local.array(MAX_M, float64)
    for gid in range(cuda.grid(1), A * ngroups * B, cuda.gridsize(1)):
        b = gid % B
        g = (gid // B) % ngroups
        a = gid // (B * ngroups)
        base = (a * L + g * m) * B + b
        for i in range(m):
            d = _value(s[base + i * B], mode)
            _flag_bad(d, base + i * B, bad)
            vals[i] = d
        for i in range(m):
            vi = vals[i]
            beats = 0
            for j in range(m):
                vj = vals[j]
                if vj > vi or (vj == vi and j > i):
                    beats += 1
            keep[base + i * B] = beats < n


# Twin of cpu_pattern.block_pool: the GPU must reproduce the CPU's bits.
@cuda.jit
def block_pool(s, R, C, r, c, out, bad, mode, pool):
    """Pool ``(r, c)`` blocks of the ``(R, C)`` scores (pool 0 mean, 1 max,
    2 L2, 3 L1); a thread per block. Each column's ``r`` rows are folded
    first, then the block's columns, as the CPU folds a block row."""
    nbr, nbc = out.shape
    for gid in range(cuda.grid(1), nbr * nbc, cuda.gridsize(1)):
        br = gid // nbc
        bc = gid % nbc
        r0 = br * r
        r1 = min(r0 + r, R)
        c0 = bc * c
        c1 = min(c0 + c, C)
        t = 0.0
        for j in range(c0, c1):
            col = -math.inf if pool == 1 else 0.0
            for i in range(r0, r1):
                d = _value(s[i * C + j], mode)
                _flag_bad(d, i * C + j, bad)
                if pool == 1:
                    col = max(col, d)
                else:
                    col += _pool_term(d, pool)
            if j == c0:
                t = col
            elif pool == 1:
                t = max(t, col)
            else:
                t += col
        if pool == 0:
            if c1 - c0 == c:
                t *= 1.0 / ((r1 - r0) * c)
            else:
                t /= (r1 - r0) * (c1 - c0)
        elif pool == 2:
            t = math.sqrt(t)
        out[br, bc] = t


@cuda.jit
def block_expand(keep_blocks, R, C, r, c, mask):
    """Element keep-mask (flat ``R * C``) of a block keep-mask."""
    for i in range(cuda.grid(1), R * C, cuda.gridsize(1)):
        mask[i] = keep_blocks[(i // C) // r, (i % C) // c]


# Twin of cpu_pattern.unit_reduce: the GPU must reproduce the CPU's bits.
@cuda.jit
def unit_reduce(s, A, L, B, pool, out, bad, mode):
    """Reduce each unit ``l`` of ``(A, L, B)`` over ``a`` then ``b`` (pool 0
    mean, 1 max, 2 L2, 3 L1); a thread per unit."""
    for u in range(cuda.grid(1), L, cuda.gridsize(1)):
        t = -math.inf if pool == 1 else 0.0
        for a in range(A):
            base = (a * L + u) * B
            for b in range(B):
                d = _value(s[base + b], mode)
                _flag_bad(d, base + b, bad)
                if pool == 1:
                    t = max(t, d)
                else:
                    t += _pool_term(d, pool)
        if pool == 0:
            t /= max(A * B, 1)
        elif pool == 2:
            t = math.sqrt(t)
        out[u] = t


@cuda.jit
def unit_expand(keep_units, L, B, mask):
    """Element keep-mask (flat) of a unit keep vector along the middle axis of ``(A, L, B)``."""
    for i in range(cuda.grid(1), mask.size, cuda.gridsize(1)):
        mask[i] = keep_units[(i // B) % L]


@cuda.jit
def block_all(mask, R, C, r, c, out):
    """Per block: whether ``mask`` keeps all of it."""
    nbr, nbc = out.shape
    for gid in range(cuda.grid(1), nbr * nbc, cuda.gridsize(1)):
        br = gid // nbc
        bc = gid % nbc
        ok = True
        for i in range(br * r, min(br * r + r, R)):
            for j in range(bc * c, min(bc * c + c, C)):
                if not mask[i * C + j]:
                    ok = False
        out[br, bc] = ok


@cuda.jit
def unit_all(mask, A, L, B, out):
    """Per unit: whether ``mask`` keeps all of it."""
    for u in range(cuda.grid(1), L, cuda.gridsize(1)):
        ok = True
        for a in range(A):
            for b in range(B):
                if not mask[(a * L + u) * B + b]:
                    ok = False
        out[u] = ok


@cuda.jit
def and_count(mask, other, count):
    """``mask &= other`` where ``other`` has entries; ``count[0]`` += kept entries."""
    kept = int64(0)
    for i in range(cuda.grid(1), mask.size, cuda.gridsize(1)):
        k = mask[i]
        if other.size and not other[i]:
            k = False
            mask[i] = False
        if k:
            kept += 1
    if kept:
        cuda.atomic.add(count, 0, kept)


@cuda.jit
def transpose(a, out):
    """``out = a.T`` for 2-D ``a``."""
    rows, cols = a.shape
    for i in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        out[i % cols, i // cols] = a[i // cols, i % cols]


SIGNATURES = {
    "nm_keep": combos(lambda s: (arr(s), i64, i64, i64, i64, i64, arr(b1), arr(i64), i64), FLOATS),
    "block_pool": combos(lambda s: (arr(s), i64, i64, i64, i64, arr(f64, 2), arr(i64), i64, i64), FLOATS),
    "block_expand": [(arr(b1, 2), i64, i64, i64, i64, arr(b1))],
    "unit_reduce": combos(lambda s: (arr(s), i64, i64, i64, i64, arr(f64), arr(i64), i64), FLOATS),
    "unit_expand": [(arr(b1), i64, i64, arr(b1))],
    "block_all": [(arr(b1), i64, i64, i64, i64, arr(b1, 2))],
    "unit_all": [(arr(b1), i64, i64, i64, arr(b1))],
    "and_count": [(arr(b1), arr(b1), arr(i64))],
    "transpose": combos(lambda a: (arr(a, 2), arr(a, 2)), FLOATS),
}
