"""Device packed matrices: :class:`DevicePacked` (a ``PackedMatrix``'s
arrays on the GPU) and its products with a vector or a matrix."""

from __future__ import annotations

import numpy as np

from .. import _device
from .._kernels import cuda_packed
from .arrays import float_device

FORMATS = ("delta8", "bitmask", "nm")
# The dtype a PackedMatrix stores each value dtype's values as.
_STORED = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.uint16),
           "bfloat16": np.dtype(np.uint16)}
# The arrays each format's products read.
_NEEDS = {"delta8": ("ptr", "deltas"), "bitmask": ("ptr", "words"), "nm": ("words",)}


class DevicePacked:
    """A packed matrix whose arrays live on the GPU (made by :func:`to_device`).

    The fields of ``sparsecore.PackedMatrix``, with ``vals``, ``ptr``,
    ``deltas`` and ``words`` numba device arrays (``None`` where the format
    has none); IEEE half values are viewed as float16 (the kernels tell the
    value kinds apart by dtype), bfloat16 values stay uint16 bits.
    ``entries``: stored entries, fillers and padding included.
    """

    def __init__(self, format, shape, dtype, vals, ptr, deltas, words, n, m, entries):
        self.format, self.shape, self.dtype = format, tuple(int(s) for s in shape), dtype
        self.vals, self.ptr, self.deltas, self.words = vals, ptr, deltas, words
        self.n, self.m, self.entries = int(n), int(m), int(entries)

    def toarray(self, out=None):
        """The dense matrix on the device (float32, float64 for float64
        values), written straight from the packed arrays; ``out``: a
        contiguous device array of that shape and dtype, written in place."""
        c = _device.cuda()
        rows, cols = self.shape
        dt = np.dtype(np.float64 if self.dtype == "float64" else np.float32)
        if out is None:
            out = c.device_array((rows, cols), dt)
        else:
            o = _device.to_device(out) if _device.is_device_array(out) else None
            if o is None or tuple(o.shape) != (rows, cols) or o.dtype != dt or (o.size and not o.is_c_contiguous()):
                raise ValueError(f"out must be a contiguous {dt} device array of shape {(rows, cols)}")
            out = o
        if out.size == 0:
            return out
        nb, nt = _device.blocks(rows)
        K = cuda_packed
        if self.format == "delta8":
            K.delta8_dense[nb, nt](self.ptr, self.deltas, self.vals, out)
        elif self.format == "bitmask":
            K.bitmask_dense[nb, nt](self.ptr, self.words, self.vals, out)
        else:
            bits, gpw, groups = self.nm_layout()
            K.nm_dense[nb, nt](self.words, self.vals, out, groups, cols, self.n, self.m, bits, gpw)
        return out

    def nm_layout(self):
        """``(bits, groups per word, groups per row)`` of the nm format (``PackedMatrix``'s layout)."""
        bits = max(1, (self.m - 1).bit_length())  # ceil(log2 m)
        return bits, 64 // (self.n * bits), -(-self.shape[1] // self.m)

    def __repr__(self):
        nm = f" {self.n}:{self.m}" if self.format == "nm" else ""
        return f"DevicePacked({self.format}{nm}, shape={self.shape}, dtype={self.dtype})"


def to_device(p):
    """A :class:`DevicePacked` of a ``sparsecore.PackedMatrix`` (its arrays
    copied to the GPU once); a :class:`DevicePacked` as it is."""
    if isinstance(p, DevicePacked):
        return p
    fmt = getattr(p, "format", None)
    if fmt not in FORMATS or getattr(p, "dtype", None) not in _STORED:
        raise TypeError(f"expected a PackedMatrix, got {type(p).__name__}")
    for name in ("vals", *_NEEDS[fmt]):
        if getattr(p, name, None) is None:
            raise ValueError(f"packed matrix of format {fmt!r} has no {name!r} array")
    vals = np.ascontiguousarray(p.vals)
    if vals.dtype != _STORED[p.dtype]:
        raise TypeError(f"packed values of dtype {p.dtype!r} must be stored as {_STORED[p.dtype]}, got {vals.dtype}")
    if p.dtype == "float16":
        vals = vals.view(np.float16)
    c = _device.cuda()

    def put(a, dt):
        return None if a is None else c.to_device(np.ascontiguousarray(a, dt))

    rows, cols = (int(s) for s in p.shape)
    if fmt == "nm":
        entries = rows * -(-cols // p.m) * p.n
    else:
        entries = int(p.ptr[-1]) if len(p.ptr) else 0
    return DevicePacked(fmt, (rows, cols), p.dtype, c.to_device(vals), put(p.ptr, np.int64),
                        put(p.deltas, np.uint8), put(p.words, np.uint64), p.n, p.m, entries)


def block_threads():
    """Threads per block of the vector products: at most their shared arrays."""
    return min(_device.THREADS, cuda_packed.MAX_THREADS)


def row_width(mean_entries):
    """Threads per row of a vector product: a power of two near the mean
    stored entries of a row, at most a warp and the block; 1 (a thread per
    row) below 4 entries."""
    if mean_entries < 4 or block_threads() < 2:
        return 1
    vec = 2
    while vec < 32 and vec * 2 <= mean_entries and vec * 2 <= block_threads():
        vec *= 2
    return vec


def matmul(p, x, out=None):
    """``p @ x`` on the device for a ``PackedMatrix`` (copied over) or a
    :class:`DevicePacked`, and a host or device vector or matrix ``x``;
    returns a numba device array (float32, float64 for float64 values).

    ``out``, if given, is a contiguous device array of the result's shape
    and dtype, written in place (and returned as a numba view). A host ``x``
    is converted to the result dtype before it is copied over; a device
    ``x`` must be float32 or float64, and a float64 ``x`` makes float32
    values accumulate in float64.
    """
    d = to_device(p)
    c = _device.cuda()
    rows, cols = d.shape
    dt = np.dtype(np.float64 if d.dtype == "float64" else np.float32)
    if _device.is_device_array(x):
        xd = float_device(x, "x")
        xshape = tuple(xd.shape)
    else:
        xa = np.asarray(x)
        xshape = xa.shape
        if xa.dtype.kind not in "fiu":
            raise TypeError(f"x has dtype {xa.dtype}; pass a float array")
    if len(xshape) not in (1, 2) or xshape[0] != cols:
        raise ValueError(f"x has shape {xshape}; a packed matrix of shape {d.shape} needs ({cols},) or ({cols}, k)")
    if _device.is_device_array(x):
        if xd.size and not xd.is_c_contiguous():
            raise ValueError("x is not contiguous on the device; pass a contiguous array (e.g. tensor.contiguous())")
    else:
        xd = c.to_device(np.ascontiguousarray(xa, dt))
    shape = (rows,) if len(xshape) == 1 else (rows, xshape[1])
    if out is None:
        out = c.device_array(shape, dt)
    else:
        o = _device.to_device(out) if _device.is_device_array(out) else None
        if o is None or tuple(o.shape) != shape or o.dtype != dt or (o.size and not o.is_c_contiguous()):
            raise ValueError(f"out must be a contiguous {dt} device array of shape {shape}")
        out = o
    if out.size == 0:  # no rows, or x of no columns: nothing to launch
        return out
    if cols == 0:
        out.copy_to_device(np.zeros(shape, dt))
        return out
    K = cuda_packed
    if xd.ndim == 1:
        vec = row_width(d.entries / rows)
        nt = block_threads() // vec * vec  # whole rows to a block
        nb, _ = _device.blocks(rows * vec, nt)
        if d.format == "delta8":
            K.delta8_matvec[nb, nt](d.ptr, d.deltas, d.vals, xd, out, vec)
        elif d.format == "bitmask":
            K.bitmask_matvec[nb, nt](d.ptr, d.words, d.vals, xd, out, vec)
        else:
            bits, gpw, groups = d.nm_layout()
            K.nm_matvec[nb, nt](d.words, d.vals, xd, out, groups, cols, d.n, d.m, bits, gpw, vec)
    else:
        grid, threads = _device.blocks_2d(xshape[1], rows)
        if d.format == "delta8":
            K.delta8_matmat[grid, threads](d.ptr, d.deltas, d.vals, xd, out)
        elif d.format == "bitmask":
            K.bitmask_matmat[grid, threads](d.ptr, d.words, d.vals, xd, out)
        else:
            bits, gpw, groups = d.nm_layout()
            K.nm_matmat[grid, threads](d.words, d.vals, xd, out, groups, cols, d.n, d.m, bits, gpw)
    return out
