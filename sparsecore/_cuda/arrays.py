"""Device arrays in and out of the CUDA kernels, launch sizes, error counters."""

from __future__ import annotations

import numpy as np

from .. import _device
from .._validate import nonfinite_error


def float_device(a, name):
    """A float32/float64 device array of ``a`` (``TypeError`` naming ``name`` otherwise)."""
    d = _device.to_device(a)
    if d.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} on the device must be float32 or float64, got {d.dtype}; "
                        f"e.g. tensor.float() first")
    return d


def float_array(a, name, role):
    """A C-contiguous float32/float64 device array of ``a`` (a view of a
    device array; a host array is copied over)."""
    d = float_device(a, f"{role} {name!r}")
    if d.size and not d.is_c_contiguous():
        raise ValueError(f"{role} {name!r} are not contiguous on the device; pass a contiguous array "
                         f"(e.g. tensor.contiguous())")
    return d


def flat(d):
    """A 1-D view of a contiguous device array."""
    return d.reshape(d.size) if d.ndim != 1 else d


def bits(d):
    """A flat device array viewed as the unsigned integers of its width (float bits, mask bytes)."""
    f = flat(d)
    if f.dtype == np.float32:
        return f.view(np.uint32)
    if f.dtype == np.float64:
        return f.view(np.uint64)
    return f.view(np.uint8)


def launch(n):
    """``(blocks, threads)`` of a 1-D grid-stride launch over ``n`` items."""
    return _device.blocks(max(int(n), 1))


def zeros(n, dtype=np.float64):
    return _device.cuda().to_device(np.zeros(n, dtype))


def empty(dtype=np.float64):
    """An empty device array: what a kernel gets for an argument it does not use."""
    return _device.cuda().device_array(0, dtype)


def copy(a):
    out = _device.cuda().device_array_like(a)
    out.copy_to_device(a)
    return out


def bad_counter(n):
    """A device ``[count, first index]`` for the kernels' non-finite checks (first starts past the end)."""
    return _device.cuda().to_device(np.array([0, max(int(n), 1)], np.int64))


def raise_bad(name, role, original, count, first):
    """The CPU's ``ValueError`` for ``count`` non-finite values, the first at flat ``first``."""
    host = original.copy_to_host() if hasattr(original, "copy_to_host") else np.asarray(original)
    raise nonfinite_error(name, role, host, int(count), int(first))


def check_bad(counter, name, role, original):
    """Raise :func:`raise_bad` when a :func:`bad_counter` counted anything."""
    got = counter.copy_to_host()
    if got[0]:
        raise_bad(name, role, original, got[0], got[1])
