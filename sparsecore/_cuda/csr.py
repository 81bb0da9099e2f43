"""Device CSR: :class:`DeviceCSR`, its construction under a selection rule
or a keep-mask (a block per row: ties, kept non-zeros, the fill), and the
sparse products."""

from __future__ import annotations

import numpy as np

from .. import _device
from .._kernels import cuda_csr
from .._source import Rule
from .arrays import bits, flat, float_device, raise_bad
from .select import count_rule, pruned_ties, row_threads, rule_mask


class DeviceCSR:
    """A CSR matrix whose ``data``, ``indices`` and ``indptr`` live on the GPU."""

    def __init__(self, data, indices, indptr, shape):
        self.data, self.indices, self.indptr, self.shape = data, indices, indptr, tuple(int(s) for s in shape)

    @property
    def nnz(self):
        return int(self.data.size)

    def to_scipy(self):
        """A ``scipy.sparse.csr_array`` on the host (copies)."""
        import scipy.sparse as sp

        return sp.csr_array((self.data.copy_to_host(), self.indices.copy_to_host(), self.indptr.copy_to_host()),
                            shape=self.shape)

    def to_cupy(self):
        """``cupyx.scipy.sparse.csr_matrix`` sharing the device arrays."""
        import cupy
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix((cupy.asarray(self.data), cupy.asarray(self.indices), cupy.asarray(self.indptr)),
                              shape=self.shape)

    def to_torch(self):
        """``torch.sparse_csr_tensor`` on the GPU, sharing the device arrays."""
        import torch

        dev = torch.device("cuda", _device.cuda().get_current_device().id)
        t = (torch.as_tensor(self.indptr, device=dev), torch.as_tensor(self.indices, device=dev),
             torch.as_tensor(self.data, device=dev))
        return torch.sparse_csr_tensor(*t, size=self.shape, check_invariants=False)


def build(w, kb, absolute, rule, rows, cols, index_dtype, name="weights", original=None, want_mask=False):
    """:class:`DeviceCSR` of flat device weights ``w`` (``rows x cols``) kept
    where keys ``kb`` pass ``rule``: per-row ties (with a quota), kept
    non-zeros per row, offsets on the host, then the fill. ``index_dtype(nnz)``
    picks the index dtype. ``want_mask``: returns ``(csr, flat keep-mask)``."""
    c = _device.cuda()
    T = np.uint64(rule.key)
    nt = row_threads()
    pt = pruned_ties(kb, rows, cols, T, absolute, rule.wide, rule.quota)
    counts_d = c.device_array(rows, np.int64)
    bad_d = c.to_device(np.zeros(1, np.int64))
    if rows:
        cuda_csr.row_kept[_device.rows_grid(rows), nt](kb, w, cols, T, absolute, rule.wide, pt, counts_d, bad_d)
    nbad = int(bad_d.copy_to_host()[0])
    if nbad:
        host = w.copy_to_host()
        raise_bad(name, "weights", original if original is not None else w, nbad, int(np.argmax(~np.isfinite(host))))
    counts = counts_d.copy_to_host() if rows else np.zeros(0, np.int64)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    idt = index_dtype(nnz)
    indptr_d = c.to_device(indptr.astype(idt))
    data_d = c.device_array(nnz, w.dtype)
    indices_d = c.device_array(nnz, idt)
    if rows and nnz:
        cuda_csr.row_fill[_device.rows_grid(rows), nt](kb, w, cols, T, absolute, rule.wide, pt, indptr_d, data_d,
                                                       indices_d)
    a = DeviceCSR(data_d, indices_d, indptr_d, (rows, cols))
    return (a, rule_mask(kb, absolute, rule, rows, cols, pt)) if want_mask else a


# Keeps the entries of a uint8 keep-mask that are 1: the mask's bytes are read
# as key bits, and key_of_bits(1) = 0x80000001 is the smallest kept key.
MASK_KEPT_RULE_BITS = 0x80000001


def csr_of_rule(w, src, rule, mshape, index_dtype, name="weights", want_mask=False):
    """``(DeviceCSR, flat keep-mask or None, entries pruned)`` of device
    weights ``w`` (2-D view ``mshape``) kept where the source's keys pass
    ``rule``; non-finite scores are refused by the pass that counts."""
    pruned = count_rule(src, rule)
    kb, absolute = src.keys(rule.wide)
    got = build(flat(w), kb, absolute, rule, *mshape, index_dtype, name, w, want_mask)
    return (*got, pruned) if want_mask else (got, None, pruned)


def csr_of_mask(w, mask, mshape, index_dtype, name="weights"):
    """:class:`DeviceCSR` of device weights ``w`` (2-D view ``mshape``) kept where ``mask`` is True."""
    rule = Rule(MASK_KEPT_RULE_BITS, 0, False)
    return build(flat(w), bits(flat(mask)), False, rule, *mshape, index_dtype, name, w)


def vector_threads():
    """Threads per block of the thread-group SpMV: at most its shared array."""
    return min(_device.THREADS, cuda_csr.MAX_THREADS)


def vector_width(mean_nnz):
    """Threads per row for SpMV: a power of two near the mean row length, at
    most a warp (and the block); 1 (a thread per row) for rows under 4 entries."""
    if mean_nnz < 4:
        return 1
    vec = 2
    while vec < 32 and vec * 2 <= mean_nnz and vec * 2 <= vector_threads():
        vec *= 2
    return vec


def to_device_csr(a):
    """A :class:`DeviceCSR` of a checked host CSR (float32/float64 data, one index dtype)."""
    c = _device.cuda()
    if a.data.dtype.kind != "f" or a.data.dtype.itemsize > 8:
        raise TypeError(f"a has dtype {a.data.dtype}; pass float32 or float64 CSR data")
    idt = np.result_type(a.indices.dtype, a.indptr.dtype)  # one index dtype for both
    return DeviceCSR(c.to_device(a.data.astype(np.float64 if a.data.dtype.itemsize > 4 else np.float32)),
                     c.to_device(a.indices.astype(idt)), c.to_device(a.indptr.astype(idt)), a.shape)


def matmul(a, x, out=None):
    """``a @ x`` on the device for a :class:`DeviceCSR` and a device (or
    host) vector or matrix; returns a device array."""
    c = _device.cuda()
    xd = float_device(x, "x")
    rows, cols = a.shape
    if xd.shape[0] != cols or xd.ndim not in (1, 2):
        raise ValueError(f"x has shape {xd.shape}; a of shape {a.shape} needs ({cols},) or ({cols}, k)")
    if xd.size and not xd.is_c_contiguous():
        raise ValueError("x is not contiguous on the device; pass a contiguous array (e.g. tensor.contiguous())")
    dt = np.result_type(a.data.dtype, xd.dtype)
    shape = (rows,) if xd.ndim == 1 else (rows, xd.shape[1])
    if out is None:
        out = c.device_array(shape, dt)
    elif tuple(out.shape) != shape or out.dtype != dt or not out.is_c_contiguous():
        raise ValueError(f"out must be a contiguous {dt} device array of shape {shape}")
    if out.size == 0:  # no rows, or X of no columns: nothing to launch
        return out
    if xd.ndim == 1:
        vec = vector_width(a.nnz / rows)
        if vec > 1:  # rows long enough for a group of threads each: coalesced reads of the row
            nt = vector_threads()
            nb, _ = _device.blocks(rows * vec, nt)
            cuda_csr.csr_matvec_vector[nb, nt](a.data, a.indices, a.indptr, xd, out, vec)
        else:
            nb, nt = _device.blocks(rows)
            cuda_csr.csr_matvec[nb, nt](a.data, a.indices, a.indptr, xd, out)
    else:
        grid, threads = _device.blocks_2d(xd.shape[1], rows)
        cuda_csr.csr_matmat[grid, threads](a.data, a.indices, a.indptr, xd, out)
    return out
