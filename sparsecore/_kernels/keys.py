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
(per-tensor normalisation). Everything a kernel needs comes in as arguments,
or as the compile-time constants of a specialised kernel (``specialize``).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import variants

MODE_IDENTITY = 0
MODE_ABS = 1
MODE_SQUARE = 2

# Per-tensor score norms (normalisation): what the norm kernels compute.
NORM_NONE = 0
NORM_L1 = 1  # sum of |score|
NORM_L2 = 2  # sqrt of the sum of score²
NORM_MAX = 3  # max of |score|

_SIGN32 = np.uint64(0x80000000)
_MASK32 = np.uint64(0xFFFFFFFF)
_SIGN64 = np.uint64(1) << np.uint64(63)


@intrinsic
def _bits(typingctx, x):
    """The IEEE-754 bit pattern of a float32 (as uint32) or float64 (as uint64)."""
    if x == types.float32:
        sig, width = types.uint32(types.float32), 32
    elif x == types.float64:
        sig, width = types.uint64(types.float64), 64
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return sig, codegen


def _u64_bit_intrinsic(llvm_name, zero_undef_flag, doc):
    """A Numba intrinsic calling the LLVM bit-counting intrinsic on a uint64."""

    def impl(typingctx, x):
        if x != types.uint64:
            return None

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            extra = [ir.IntType(1)] if zero_undef_flag else []
            fnty = ir.FunctionType(i64, [i64] + extra)
            fn = builder.module.declare_intrinsic(llvm_name, [i64], fnty)
            flag = [ir.Constant(ir.IntType(1), 0)] if zero_undef_flag else []
            return builder.call(fn, [args[0]] + flag)

        return types.uint64(types.uint64), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


cttz = _u64_bit_intrinsic("llvm.cttz", True, "Count of trailing zero bits of a non-zero uint64.")
popcount = _u64_bit_intrinsic("llvm.ctpop", False, "Number of set bits of a uint64.")


@njit(inline="always", cache=True)
def key32_bits(b):
    """Key of float32 bits ``b`` (uint64 below 2**32); ``-0.0`` as ``+0.0``."""
    if b == _SIGN32:
        b = np.uint64(0)
    if b & _SIGN32:
        return (~b) & _MASK32
    return b | _SIGN32


@njit(inline="always", cache=True)
def key64_bits(b):
    """Key of float64 bits ``b``; ``-0.0`` as ``+0.0``."""
    if b == _SIGN64:
        b = np.uint64(0)
    if b & _SIGN64:
        return ~b
    return b | _SIGN64


@njit(inline="always", cache=True)
def score_value(v, mode, inv, scaled, wide):
    """Return ``(finite, score)``: the transformed value itself, float64 when
    ``wide`` else float32. For finite scores, comparing these values orders
    exactly as comparing their keys (``-0.0 == 0.0`` on both sides), and a
    float compare is cheaper than forming the key."""
    if wide:
        d = np.float64(v)
        if mode == MODE_ABS:
            d = abs(d)
        elif mode == MODE_SQUARE:
            d = d * d
        if scaled:
            d = d * inv
        return math.isfinite(d), d
    f = np.float32(v)
    if mode == MODE_ABS:
        f = abs(f)
    elif mode == MODE_SQUARE:
        f = f * f
    return math.isfinite(f), f


@njit(inline="always", cache=True)
def score_key(v, mode, inv, scaled, wide):
    """Return ``(finite, key)`` of the score of a stored value ``v``.

    Kernels call this with ``mode``, ``scaled`` and ``wide`` bound as
    compile-time constants (see ``specialize``), so the branches fold away.
    """
    ok, x = score_value(v, mode, inv, scaled, wide)
    if wide:
        return ok, key64_bits(_bits(x))
    return ok, key32_bits(np.uint64(_bits(x)))


def cut_value(key, wide):
    """The float that splits scores as ``key`` splits keys: a finite score
    ``v`` has ``key(v) >= key`` exactly when ``v >= cut_value(key)`` (keys
    below that of -inf give -inf, keys above that of +inf give +inf)."""
    if key <= _KEY_OF_INF[wide][0]:
        v = -np.inf
    elif key >= _KEY_OF_INF[wide][1]:
        v = np.inf
    else:
        v = value_of(key, wide)
    return np.float64(v) if wide else np.float32(v)


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


# The keys of -inf and +inf, narrow and wide (``cut_value`` runs once per tensor and rule).
_KEY_OF_INF = {w: (key_of(-np.inf, w), key_of(np.inf, w)) for w in (False, True)}


def specialize(factory):
    """Memoise a kernel factory ``factory(mode, wide, scaled)`` (``variants``).

    The factory defines its ``@njit`` kernel inside, so ``mode``, ``wide`` and
    ``scaled`` are closure constants: Numba folds the transform's branches
    away, and its on-disk cache keys each variant by those constants. Only
    the variants that a run uses are compiled.
    """
    return variants(factory, lambda mode, wide, scaled: (int(mode), bool(wide), bool(scaled)))
