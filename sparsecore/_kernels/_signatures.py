"""Argument types of the CUDA kernels, declared beside them as ``SIGNATURES``.

Numba compiles a CUDA kernel lazily, for the types of each launch, so a type
combination that does not compile would fail on a user's GPU at its first
launch. Each ``cuda_<topic>.py`` therefore declares, per kernel, every
combination of argument types its host code can pass (device arrays are
C-contiguous: the host code makes them so). ``tests/test_cuda_compile.py``
compiles each to PTX for real GPUs and assembles it with ``ptxas`` on the
CPU; the simulator tests check that every launch they make is declared.

Only ``numba.types`` is imported here, never ``numba.cuda``.
"""

from itertools import product

from numba import types

b1 = types.boolean
i64 = types.int64
u64 = types.uint64
f64 = types.float64

FLOATS = (types.float32, types.float64)  # weights, scores, activations, gradients
KEYS = (types.uint32, types.uint64, types.uint8)  # float32 / float64 bits, uint8 keep-masks
INDEX = (types.int32, types.int64)  # CSR indices and indptr (one dtype for both)


def arr(dtype, ndim=1):
    """A C-contiguous device array type."""
    return types.Array(dtype, ndim, "C")


def combos(build, *axes):
    """``build(*choice)`` for every choice of one entry per axis, as a list of argument-type tuples."""
    return [tuple(build(*choice)) for choice in product(*axes)]


def wider(a, b):
    """The float type of a product of ``a`` and ``b`` (NumPy's result type)."""
    return types.float64 if types.float64 in (a, b) else types.float32
