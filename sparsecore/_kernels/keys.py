"""Order-preserving integer keys for floating-point scores.

Selection works on unsigned integer keys instead of floats: the key of a
finite float is its IEEE-754 bit pattern with the sign bit flipped for
positive values and all bits flipped for negative ones, so that comparing keys
as unsigned integers compares the floats. ``-0.0`` maps to the key of
``+0.0`` so that equal scores have equal keys.

Narrow keys (32 significant bits) serve float32 scores; wide keys (64 bits)
serve float64 scores and any mix of dtypes (float32 converts to float64
exactly and in order). Both are returned as ``uint64``.

A score is the stored value after a transform: ``MODE_IDENTITY``,
``MODE_ABS`` or ``MODE_SQUARE``, then multiplied by ``inv`` when ``scaled``
(per-tensor normalisation). Everything a kernel needs comes in as arguments.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

MODE_IDENTITY = 0
MODE_ABS = 1
MODE_SQUARE = 2

_SIGN32 = np.uint64(0x80000000)
_MASK32 = np.uint64(0xFFFFFFFF)
_SIGN64 = np.uint64(1) << np.uint64(63)


@intrinsic
def _f32_bits(typingctx, x):
    if x != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f64_bits(typingctx, x):
    if x != types.float64:
        return None
    sig = types.uint64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@njit(inline="always", cache=True)
def key32(f):
    """Key of a finite float32 (as uint64 below 2**32)."""
    if f == 0:
        return _SIGN32
    b = np.uint64(_f32_bits(f))
    if b & _SIGN32:
        return (~b) & _MASK32
    return b | _SIGN32


@njit(inline="always", cache=True)
def key64(d):
    """Key of a finite float64."""
    if d == 0:
        return _SIGN64
    b = _f64_bits(d)
    if b & _SIGN64:
        return ~b
    return b | _SIGN64


@njit(inline="always", cache=True)
def score_key(v, mode, inv, scaled, wide):
    """Return ``(finite, key)`` of the score of a stored value ``v``."""
    if wide:
        d = np.float64(v)
        if mode == MODE_ABS:
            d = abs(d)
        elif mode == MODE_SQUARE:
            d = d * d
        if scaled:
            d = d * inv
        if not math.isfinite(d):
            return False, np.uint64(0)
        return True, key64(d)
    f = np.float32(v)
    if mode == MODE_ABS:
        f = abs(f)
    elif mode == MODE_SQUARE:
        f = f * f
    if not math.isfinite(f):
        return False, np.uint64(0)
    return True, key32(f)


def key_of(value, wide):
    """Host-side key of one float (for thresholds and tests)."""
    if wide:
        d = np.float64(value)
        if d == 0:
            return int(_SIGN64)
        b = int(np.array(d).view(np.uint64))
        return (~b) & 0xFFFFFFFFFFFFFFFF if b >> 63 else b | (1 << 63)
    f = np.float32(value)
    if f == 0:
        return int(_SIGN32)
    b = int(np.array(f).view(np.uint32))
    return (~b) & 0xFFFFFFFF if b >> 31 else b | (1 << 31)


def value_of(key, wide):
    """Host-side inverse of :func:`key_of`."""
    if wide:
        b = key ^ (1 << 63) if key >> 63 else (~key) & 0xFFFFFFFFFFFFFFFF
        return float(np.array(b, dtype=np.uint64).view(np.float64))
    b = key ^ (1 << 31) if key >> 31 else (~key) & 0xFFFFFFFF
    return float(np.array(b, dtype=np.uint32).view(np.float32))
