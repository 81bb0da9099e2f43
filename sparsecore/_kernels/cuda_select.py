"""CUDA twins of ``cpu_select``: radix digit histograms, the deterministic
norm, and the per-element passes that device selection needs.

Keys: scores are read as their IEEE bit patterns (the float array viewed as
uint32 or uint64 on the host side) and turned into the order-preserving keys
of ``keys.py`` by :func:`key_of_bits`; ``absolute`` drops the sign bit first
(magnitude without a copy). Any other transform (squares, per-tensor
scaling, entries lowered under current masks) is first written out by
:func:`materialise`, with the CPU's ``score_value`` arithmetic, so that the
keys are the CPU's keys bit for bit.

Argument order: the CPU kernel's arguments, then what the CPU binds as
compile-time constants (``mode``, ``wide``). Numba compiles CUDA kernels
without fast-math, so no multiply-add is contracted into an FMA and every
float operation rounds as on the CPU.
"""

import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint64

from ._signatures import FLOATS, KEYS, arr, b1, combos, f64, i64, u64
from .cpu_select import NORM_BLOCK
from .keys import MODE_ABS, MODE_SQUARE, NORM_L1, NORM_L2

SIGN32 = np.uint64(0x80000000)
MASK32 = np.uint64(0xFFFFFFFF)
SIGN64 = np.uint64(0x8000000000000000)
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

__all__ = ["HIST_BITS", "NORM_BLOCK", "count_rule", "key_hist", "key_of_bits", "materialise", "norm_parts"]


# Twin of keys.key_of: the GPU must reproduce the CPU's bits.
@cuda.jit(device=True, inline=True)
def key_of_bits(b, absolute, wide):
    """Order-preserving key of float bits (uint32 or uint64 value as uint64)."""
    b = uint64(b)
    if wide:
        if absolute:
            b = b & ~SIGN64
        if b == SIGN64:
            b = uint64(0)
        return (b ^ SIGN64) if (b & SIGN64) == 0 else (~b & MASK64)
    if absolute:
        b = b & ~SIGN32
    if b == SIGN32:
        b = uint64(0)
    return (b ^ SIGN32) if (b & SIGN32) == 0 else (~b & MASK32)


@cuda.jit(device=True, inline=True)
def finite_bits(b, wide):
    """Whether float bits ``b`` hold a finite value (exponent not all ones)."""
    b = uint64(b)
    if wide:
        return (b & uint64(0x7FF0000000000000)) != uint64(0x7FF0000000000000)
    return (b & uint64(0x7F800000)) != uint64(0x7F800000)


HIST_BITS = 12  # digit width of the device radix select: 4096 counters fit in shared memory
HIST_SIZE = 4096  # 1 << HIST_BITS, written out: a shared size must be a literal or a bare global name


@cuda.jit
def key_hist(sbits, absolute, wide, prefix, pshift, shift, bits, hist, bad):
    """Histogram of one radix digit (``bits <= HIST_BITS``) of the keys that
    share ``prefix`` above ``pshift`` (``pshift >= 64``: every key, the first
    level, which also counts non-finite scores into ``bad[0]`` and their
    first index into ``bad[1]``). Each block counts into its own histogram in
    shared memory (the few buckets that float keys crowd into would
    serialise global atomics) and adds it into ``hist`` at the end."""
    sh = cuda.shared.array(HIST_SIZE, int32)
    nbins = 1 << bits
    for j in range(cuda.threadIdx.x, nbins, cuda.blockDim.x):
        sh[j] = 0
    cuda.syncthreads()
    mask = (uint64(1) << uint64(bits)) - uint64(1)
    for i in range(cuda.grid(1), sbits.size, cuda.gridsize(1)):
        b = sbits[i]
        if pshift >= 64:
            if not finite_bits(b, wide):
                cuda.atomic.add(bad, 0, 1)
                cuda.atomic.min(bad, 1, i)
                continue
        k = key_of_bits(b, absolute, wide)
        if pshift >= 64 or (k >> uint64(pshift)) == prefix:
            cuda.atomic.add(sh, int64((k >> uint64(shift)) & mask), 1)
    cuda.syncthreads()
    for j in range(cuda.threadIdx.x, nbins, cuda.blockDim.x):
        v = sh[j]
        if v:
            cuda.atomic.add(hist, j, int64(v))


@cuda.jit
def count_rule(sbits, absolute, wide, T, out):
    """``out[0]``: keys below ``T``; ``out[1]``: keys equal to it;
    ``out[2]``, ``out[3]``: non-finite scores and the first one's index."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    below = int64(0)
    ties = int64(0)
    for i in range(start, sbits.size, stride):
        b = sbits[i]
        if not finite_bits(b, wide):
            cuda.atomic.add(out, 2, 1)
            cuda.atomic.min(out, 3, i)
            continue
        k = key_of_bits(b, absolute, wide)
        if k < T:
            below += 1
        elif k == T:
            ties += 1
    if below:
        cuda.atomic.add(out, 0, below)
    if ties:
        cuda.atomic.add(out, 1, ties)


# Twin of cpu_select.score_norm: the GPU must reproduce the CPU's bits.
@cuda.jit
def norm_parts(x, kind, block, part, mode):
    """Twin of ``cpu_select.score_norm``'s first stage: one thread per fixed
    block of ``block`` elements (grid-stride over blocks), added in index
    order (``kind``: NORM_L1, NORM_L2, NORM_MAX of |score|), so the parts, and the
    total the host adds up in block order, equal the CPU's bit for bit."""
    for b in range(cuda.grid(1), part.size, cuda.gridsize(1)):
        lo = b * block
        hi = min(x.size, lo + block)
        acc = 0.0
        for i in range(lo, hi):
            d = float64(x[i])
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


# Twin of cpu_select's score_value: the GPU must reproduce the CPU's bits.
@cuda.jit
def materialise(x, inv, scaled, keep, low, floor, out, bad, mode, wide):
    """``out`` = the CPU's ``score_value`` of ``x`` (``wide``: float64 ``out``,
    scaled by ``inv`` when ``scaled``; else float32 ``out``). With
    ``keep.size``, entries it drops become ``low`` and the others are raised
    to at least ``floor`` (``prune``'s current masks). Non-finite
    scores are counted into ``bad[0]``, the first index into ``bad[1]``."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.size, stride):
        if keep.size and not keep[i]:
            out[i] = low
            continue
        if wide:
            d = float64(x[i])
            if mode == MODE_ABS:
                d = abs(d)
            elif mode == MODE_SQUARE:
                d = d * d
            if scaled:
                d = d * inv
            if keep.size and d < floor:
                d = floor
            ok = math.isfinite(d)
            out[i] = d
        else:
            f = float32(x[i])
            if mode == MODE_ABS:
                f = abs(f)
            elif mode == MODE_SQUARE:
                f = f * f
            ok = math.isfinite(f)
            out[i] = f
        if not ok:
            cuda.atomic.add(bad, 0, 1)
            cuda.atomic.min(bad, 1, i)


SIGNATURES = {
    "key_hist": combos(lambda k: (arr(k), b1, b1, u64, i64, i64, i64, arr(i64), arr(i64)), KEYS[:2]),
    "count_rule": combos(lambda k: (arr(k), b1, b1, u64, arr(i64)), KEYS[:2]),
    "norm_parts": combos(lambda x: (arr(x), i64, i64, arr(f64), i64), FLOATS),
    "materialise": combos(lambda x, o: (arr(x), f64, b1, arr(b1), f64, f64, arr(o), arr(i64), i64, b1),
                          FLOATS, FLOATS),
}
