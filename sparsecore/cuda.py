"""The CUDA backend (numba.cuda): device arrays in, device arrays out.

What ``device="cuda"`` (or ``"auto"`` with GPU inputs) of the public API runs:
``prune`` (criteria, exact local/global selection with caps, thresholds,
normalisation, N:M, blocks, units, current masks), the gradient sums of
``GradientAccumulator(device="cuda")``, mutual information (bins, codes,
marginal and pair counts), CSR construction and products, and the selection
and pattern helpers. The public functions keep their ``device=`` and
dispatch to the host code of ``sparsecore/_cuda/`` (one module per topic),
which launches the kernels of ``sparsecore/_kernels/cuda_*.py``, twins of
the CPU kernels with their semantics: the same masks and CSR structure for
selection (keys formed with the CPU's float operations, no fused
multiply-add, norms summed in the CPU's blocks and order), sums and MI within
float64 rounding.

Inputs are anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA
tensors, numba device arrays) or host arrays (copied over). What comes back
to the host: per-row counts, radix histograms, per-unit ranges and the small
MI tables. Results are numba device arrays; :class:`DeviceCSR` converts to
CuPy, PyTorch and SciPy.

This module is the public face: importing it imports no ``numba.cuda``
until a device class or function is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _device, importance

if TYPE_CHECKING:  # imported on first use by __getattr__ below
    from ._cuda.csr import DeviceCSR
    from ._cuda.mi import (
        PairMICounts,
        UnitMICounts,
        fit_bins,
        pairwise_mi,
        unit_mi,
        units,
    )
    from ._cuda.packed import DevicePacked
    from ._cuda.select import DeviceSource

__all__ = ["DeviceAccumulator", "DeviceCSR", "DevicePacked", "DeviceSource", "PairMICounts", "UnitMICounts",
           "csr_matmul", "fit_bins", "is_device_array", "packed_matmul", "pairwise_mi", "prune",
           "set_block_threads", "to_csr", "to_device", "to_device_packed", "unit_mi", "units"]

is_device_array = _device.is_device_array


def set_block_threads(threads: int | None = None, row_threads: int | None = None) -> tuple:
    """Set the threads per block of the 1-D kernels (256 by default) and of
    the block that builds one CSR row (128, at most 256); returns the
    previous pair. Lower them on the CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``), where every thread is a Python thread."""
    before = (_device.THREADS, _device.ROW_THREADS)
    for name, v, most in (("threads", threads, 1024), ("row_threads", row_threads, 256)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most):
            raise ValueError(f"{name} must be an int from 1 to {most}, got {v!r}")
    if threads is not None:
        _device.THREADS = threads
    if row_threads is not None:
        _device.ROW_THREADS = row_threads
    return before


def __getattr__(name):
    """The device classes and MI functions, imported on first use (they import numba.cuda)."""
    if name == "DeviceCSR":
        from ._cuda.csr import DeviceCSR

        return DeviceCSR
    if name == "DevicePacked":
        from ._cuda.packed import DevicePacked

        return DevicePacked
    if name == "DeviceSource":
        from ._cuda.select import DeviceSource

        return DeviceSource
    if name in ("PairMICounts", "UnitMICounts", "fit_bins", "pairwise_mi", "unit_mi", "units"):
        from ._cuda import mi

        return getattr(mi, name)
    raise AttributeError(f"module 'sparsecore.cuda' has no attribute {name!r}")


class DeviceAccumulator(importance.GradientAccumulator):
    """``GradientAccumulator(stats, device="cuda")``: the sums kept on the GPU
    (what the PyTorch adapter feeds with CUDA gradients)."""

    def __init__(self, stats=("g2",)):
        super().__init__(stats, precision="float64", device="cuda")


def to_device(a):
    """A numba device array of ``a`` (a view of a device array, a host array copied over)."""
    return _device.to_device(a)


def prune(weights, scores=None, **options):
    """:func:`sparsecore.prune` on the device: the same arguments and rules,
    the same masks and CSR structure, with device arrays in and out
    (``csr`` holds :class:`DeviceCSR`, ``masks`` and ``groups`` numba device
    arrays: ``copy_to_host``, or ``torch.as_tensor(m, device='cuda')`` /
    ``cupy.asarray(m)`` without a copy). N:M groups of at most 32 entries."""
    from .prune import prune as prune_any

    return prune_any(weights, scores, device="cuda", **options)


def to_csr(weights, mask=None, *, scores=None, threshold: float | None = None, sparsity: float | None = None,
           name: str = "weights"):
    """:func:`sparsecore.to_csr` on the device: a :class:`DeviceCSR` with the
    structure the CPU gives."""
    from .csr import to_csr as to_csr_any

    return to_csr_any(weights, mask, scores=scores, threshold=threshold, sparsity=sparsity, name=name,
                      device="cuda")


def csr_matmul(a, x, out=None):
    """``a @ x`` on the device for a :class:`DeviceCSR` (or host CSR, copied
    over) and a device (or host) vector or matrix; returns a device array."""
    from .csr import csr_matmul as csr_matmul_any

    return csr_matmul_any(a, x, out, device="cuda")


def to_device_packed(p):
    """A :class:`DevicePacked` of a :class:`sparsecore.PackedMatrix`: its arrays
    copied to the GPU once, for products that reuse them."""
    from ._cuda.packed import to_device as to_device_packed_any

    return to_device_packed_any(p)


def packed_matmul(p, x, out=None):
    """``p @ x`` on the device for a :class:`DevicePacked` (or a host
    :class:`sparsecore.PackedMatrix`, copied over) and a device (or host)
    vector or matrix; returns a device array."""
    from .packed import packed_matmul as packed_matmul_any

    return packed_matmul_any(p, x, out, device="cuda")
