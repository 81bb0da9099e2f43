"""The CUDA backend (numba.cuda): device arrays in, device arrays out.

Work in progress (issue 8): gradient accumulation, exact selection (radix
histograms of the keys on the device), CSR construction under a selection
rule, CSR products, and the mutual-information counts have CUDA kernels
(``sparsecore/_kernels/cuda_*.py``) with the CPU kernels' semantics: the same
masks and CSR structure for selection, MI and sums within float rounding.
Inputs are anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA
tensors, numba device arrays) or host arrays (copied over); nothing comes back
to the host except per-row counts and radix histograms (small arrays).
``csr_matmul`` and ``to_csr`` of the main API take ``device=`` and land here.
"""

from __future__ import annotations

import numpy as np

from . import _device
from ._kernels.keys import MODE_ABS, MODE_IDENTITY
from ._validate import check_fraction, check_threshold
from .selection import Rule, Source, _rule_for, threshold_rule

__all__ = ["DeviceAccumulator", "DeviceCSR", "GradientSums", "PairMICounts", "UnitMICounts", "csr_matmul",
           "pairwise_mi", "prune", "select_rule", "select_rules_global",
           "to_csr", "unit_label_counts"]


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


def _bits(d):
    """The device array viewed as its bit patterns (uint32 / uint64), flat."""
    flat = d.reshape(d.size) if d.ndim != 1 else d
    return flat.view(np.uint32 if flat.dtype == np.float32 else np.uint64)


def _float_device(a, name):
    d = _device.to_device(a)
    if d.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} on the device must be float32 or float64, got {d.dtype}")
    return d


def _radix(bits_list, absolute, wide, k):
    """``(T, below, ties)``: the k-th smallest key of all the bit arrays
    together, and per array the keys below it and equal to it. Radix
    histograms on the device, one 16-bit digit per level, picked on the host."""
    c = _device.cuda()
    from ._kernels import cuda_csr

    keybits = 64 if wide else 32
    prefix, shift = 0, keybits
    below = np.zeros(len(bits_list), np.int64)
    hist_d = c.device_array(1 << 16, np.int64)
    H = None
    while shift > 0:
        pshift = shift
        shift -= 16
        hists = []
        for bits in bits_list:
            hist_d[:] = 0
            nb, nt = _device.blocks(bits.size)
            if bits.size:
                cuda_csr.key_hist[nb, nt](bits, absolute, wide, np.uint64(prefix), pshift if pshift < keybits else 64,
                                          shift, 16, hist_d)
            hists.append(hist_d.copy_to_host())
        H = np.stack(hists)
        cum = np.cumsum(H.sum(axis=0))
        digit = int(np.searchsorted(cum, k - int(below.sum()), side="left"))
        below += H[:, :digit].sum(axis=1)
        prefix = (prefix << 16) | digit
    return prefix, below, H[:, prefix & 0xFFFF].astype(np.int64)


def select_rule(scores, k: int, *, absolute: bool = False):
    """The selection rule pruning the ``k`` lowest scores of a device array
    (ties: lower flat index first), found by radix histograms of its keys on
    the device (two 16-bit levels for float32, four for float64)."""
    d = _float_device(scores, "scores")
    wide = d.dtype == np.float64
    if k <= 0:
        return Rule(0, 0, wide)
    T, below, ties = _radix([_bits(d)], absolute, wide, k)
    return _rule_for(T, int(ties[0]), k - int(below[0]), wide)


def select_rules_global(scores: list, k: int, *, absolute: bool = False) -> list:
    """Rules pruning the ``k`` lowest scores of several device arrays together
    (one exact threshold; ties: earlier array, then lower index, first), as
    ``sparsecore.prune(scope="global")`` without caps. Same dtype for all."""
    ds = [_float_device(x, "scores") for x in scores]
    dtypes = {d.dtype for d in ds}
    if len(dtypes) > 1:
        raise TypeError(f"global selection on the device needs one dtype for all scores, got {sorted(map(str, dtypes))}")
    wide = ds[0].dtype == np.float64 if ds else False
    if k <= 0:
        return [Rule(0, 0, wide) for _ in ds]
    T, below, ties = _radix([_bits(d) for d in ds], absolute, wide, k)
    rest = k - int(below.sum())
    rules = []
    for t in range(len(ds)):
        extra = min(int(ties[t]), rest)
        rest -= extra
        rules.append(_rule_for(T, int(ties[t]), extra, wide))
    return rules


def _src(d, absolute):
    return Source("scores", np.empty(0, d.dtype), (d.size,), MODE_ABS if absolute else MODE_IDENTITY)


def to_csr(weights, *, scores=None, threshold: float | None = None, sparsity: float | None = None,
           absolute: bool | None = None) -> DeviceCSR:
    """Canonical CSR of a 2-D device weight pruned by a threshold or an exact
    sparsity (scores default to ``|weights|``), built on the device: ties
    per row (with a quota), kept non-zeros per row, then the fill. The same
    structure as :func:`sparsecore.to_csr` on the CPU."""
    w = _float_device(weights, "weights")
    if w.ndim != 2:
        raise ValueError(f"device to_csr takes a 2-D weight, got shape {w.shape}")
    s = w if scores is None else _float_device(scores, "scores")
    if s.shape != w.shape:
        raise ValueError(f"scores have shape {s.shape}, weights {w.shape}")
    if absolute is None:
        absolute = scores is None
    if (threshold is None) == (sparsity is None):
        raise ValueError("give exactly one of threshold and sparsity")
    if threshold is not None:
        rule = threshold_rule(_src(s, absolute), check_threshold(threshold, "weights"))
    else:
        rule = select_rule(s, round(check_fraction(sparsity, "weights") * s.size), absolute=absolute)
    return _build(w, s, rule, absolute)[0]


def _build(w, s, rule, absolute, want_mask=False):
    """``(DeviceCSR, mask or None)`` of 2-D device ``w`` under ``rule`` on scores ``s``."""
    c = _device.cuda()
    from ._kernels import cuda_csr

    rows, cols = w.shape
    wide = s.dtype == np.float64
    sbits = _bits(s)
    wflat = w.reshape(w.size)
    nt = min(cuda_csr.MAX_THREADS, max(32, _device.THREADS))
    T = np.uint64(rule.key)
    pruned_ties = np.zeros(rows, np.int64)
    if rule.quota:
        ties_d = c.device_array(rows, np.int64)
        cuda_csr.row_ties[rows, nt](sbits, cols, T, absolute, wide, ties_d)
        ties = ties_d.copy_to_host()
        start = np.concatenate([[0], np.cumsum(ties)[:-1]])
        pruned_ties = np.clip(rule.quota - start, 0, ties)
    pt_d = c.to_device(pruned_ties)
    counts_d = c.device_array(rows, np.int64)
    bad_d = c.to_device(np.zeros(1, np.int64))
    if rows:
        cuda_csr.row_kept[rows, nt](sbits, wflat, cols, T, absolute, wide, pt_d, counts_d, bad_d)
    if int(bad_d.copy_to_host()[0]):
        raise ValueError(f"weights hold {int(bad_d.copy_to_host()[0])} NaN or Inf values")
    counts = counts_d.copy_to_host()
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    idt = np.int32 if max(rows, cols, nnz) <= np.iinfo(np.int32).max else np.int64
    indptr_d = c.to_device(indptr.astype(idt))
    data_d = c.device_array(nnz, w.dtype)
    indices_d = c.device_array(nnz, idt)
    if rows and nnz:
        cuda_csr.row_fill[rows, nt](sbits, wflat, cols, T, absolute, wide, pt_d, indptr_d, data_d, indices_d)
    mask = None
    if want_mask:
        mask = c.device_array(rows * cols, np.bool_)
        if rows:
            cuda_csr.row_mask[rows, nt](sbits, cols, T, absolute, wide, pt_d, mask)
        mask = mask.reshape(rows, cols)
    return DeviceCSR(data_d, indices_d, indptr_d, (rows, cols)), mask


def prune(weights, scores=None, *, sparsity: float | None = None, threshold: float | None = None,
          scope: str = "local") -> tuple[dict, dict]:
    """Prune device tensors on the device: ``(csr, masks)`` by name.

    ``weights``: mapping name -> device (or host) array of any shape (CSR of
    its 2-D view ``(shape[0], prod(shape[1:]))``); ``scores``: mapping of
    scores shaped like them, or None for ``|w|``. Exact local or global
    sparsity (no caps yet), or a threshold; the masks and CSR structure equal
    :func:`sparsecore.prune`'s."""
    from .csr import matrix_shape

    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity= and threshold=")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    names = list(weights)
    ws, ss = {}, {}
    for n in names:
        w = _float_device(weights[n], f"weights {n!r}")
        ws[n] = w.reshape(matrix_shape(w.shape))
        if scores is None:
            ss[n] = ws[n]
        else:
            sd = _float_device(scores[n], f"scores {n!r}")
            if sd.shape != w.shape:
                raise ValueError(f"scores {n!r} have shape {sd.shape} but weights {n!r} have {w.shape}")
            ss[n] = sd.reshape(matrix_shape(sd.shape))
    absolute = scores is None
    if threshold is not None:
        rules = {n: threshold_rule(_src(ss[n], absolute), check_threshold(threshold, n)) for n in names}
    elif scope == "global":
        total = sum(ss[n].size for n in names)
        got = select_rules_global([ss[n] for n in names], round(check_fraction(sparsity, "all tensors") * total),
                                  absolute=absolute)
        rules = dict(zip(names, got))
    else:
        rules = {n: select_rule(ss[n], round(check_fraction(sparsity, n) * ss[n].size), absolute=absolute)
                 for n in names}
    csr, masks = {}, {}
    for n in names:
        csr[n], m = _build(ws[n], ss[n], rules[n], absolute, want_mask=True)
        masks[n] = m.reshape(_float_device(weights[n], n).shape)
    return csr, masks


def csr_matmul(a, x, out=None):
    """``a @ x`` on the device for a :class:`DeviceCSR` (or host CSR, copied
    over) and a device (or host) vector or matrix; returns a device array."""
    c = _device.cuda()
    from ._kernels import cuda_csr

    if not isinstance(a, DeviceCSR):
        a = DeviceCSR(c.to_device(a.data), c.to_device(a.indices), c.to_device(a.indptr), a.shape)
    xd = _float_device(x, "x")
    rows, cols = a.shape
    if xd.shape[0] != cols or xd.ndim not in (1, 2):
        raise ValueError(f"x has shape {xd.shape}; a of shape {a.shape} needs ({cols},) or ({cols}, k)")
    dt = np.result_type(a.data.dtype, xd.dtype)
    shape = (rows,) if xd.ndim == 1 else (rows, xd.shape[1])
    if out is None:
        out = c.device_array(shape, dt)
    if rows == 0:
        return out
    if xd.ndim == 1:
        nb, nt = _device.blocks(rows)
        cuda_csr.csr_matvec[nb, nt](a.data, a.indices, a.indptr, xd, out)
    else:
        tx, ty = _device.THREADS_2D
        grid = ((xd.shape[1] + tx - 1) // tx, (rows + ty - 1) // ty)
        cuda_csr.csr_matmat[grid, (tx, ty)](a.data, a.indices, a.indptr, xd, out)
    return out


class GradientSums:
    """Σg, Σg², Σw·g, Σ(w·g)² of one tensor kept on the device, float64.

    ``update(g, w=None, per_sample=False)`` with device (or host) arrays;
    ``state()`` returns the sums as device arrays (``copy_to_host`` for NumPy).
    """

    def __init__(self, shape, stats=("g2",)):
        c = _device.cuda()
        self.shape = tuple(shape)
        n = int(np.prod(self.shape, dtype=np.int64))
        self.stats = tuple(stats)
        self.sums = {k: (c.to_device(np.zeros(n)) if k in self.stats else c.device_array(0, np.float64))
                     for k in ("g", "g2", "wg", "wg2")}
        self.count = 0

    def update(self, g, w=None, *, per_sample=False):
        from ._kernels import cuda_accumulate

        c = _device.cuda()
        gd = _float_device(g, "gradients")
        n = int(np.prod(self.shape, dtype=np.int64))
        rows = gd.shape[0] if per_sample else 1
        if gd.size != rows * n:
            raise ValueError(f"gradients of shape {gd.shape} do not fit {self.shape}"
                             f"{' with a leading sample axis' if per_sample else ''}")
        g2d = gd.reshape(rows, n)
        if ("wg" in self.stats or "wg2" in self.stats) and w is None:
            raise ValueError("statistics wg/wg2 need the weights: pass w=")
        wd = _float_device(w, "weights").reshape(n) if w is not None else c.device_array(0, np.float32)
        nb, nt = _device.blocks(n)
        cuda_accumulate.accumulate[nb, nt](g2d, wd, self.sums["g"], self.sums["g2"], self.sums["wg"],
                                           self.sums["wg2"])
        self.count += rows
        return self

    def state(self):
        return {k: self.sums[k].reshape(self.shape) for k in self.stats}


class DeviceAccumulator:
    """Gradient statistics of named tensors kept on the device: the GPU
    counterpart of :class:`sparsecore.GradientAccumulator` (``update``,
    ``state``, ``count``); one :class:`GradientSums` per tensor, created at the
    first update."""

    def __init__(self, stats=("g2",)):
        self.stats = tuple(stats)
        self.sums = {}
        self.count = 0

    def update(self, grads, weights=None, *, per_sample=False):
        rows = None
        for name, g in grads.items():
            gd = _float_device(g, f"gradients {name!r}")
            shape = tuple(gd.shape[1:]) if per_sample else tuple(gd.shape)
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = GradientSums(shape, self.stats)
            elif acc.shape != shape:
                raise ValueError(f"gradients {name!r} have shape {shape}, earlier {acc.shape}")
            acc.update(gd, None if weights is None else weights[name], per_sample=per_sample)
            rows = gd.shape[0] if per_sample else 1
        self.count += rows or 0
        return self

    def state(self, name):
        return self.sums[name].state()


def _codes(acts, bins, c):
    """Equal-width codes (units, samples) on the device for fitted ``bins``."""
    from ._kernels import cuda_mi

    a = _float_device(acts, "activations")
    lo = np.ascontiguousarray(bins.edges[:, 0])
    width = (bins.edges[:, -1] - lo) / bins.nbins
    inv = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    out = c.device_array((a.shape[1], a.shape[0]), np.uint8)
    tx, ty = _device.THREADS_2D
    grid = ((a.shape[1] + tx - 1) // tx, (a.shape[0] + ty - 1) // ty)
    cuda_mi.uniform_codes[grid, (tx, ty)](a, c.to_device(lo), c.to_device(inv), float(bins.nbins - 1), out)
    return out


def unit_label_counts(acts, labels, bins, n_classes):
    """Joint counts (units, bins, classes) of device activations against labels."""
    c = _device.cuda()
    from ._kernels import cuda_mi

    codes = _codes(acts, bins, c)
    y = _device.to_device(labels)
    counts = c.to_device(np.zeros((codes.shape[0], bins.nbins, n_classes), np.int64))
    tx, ty = _device.THREADS_2D
    grid = ((codes.shape[0] + tx - 1) // tx, (codes.shape[1] + ty - 1) // ty)
    cuda_mi.unit_label_counts[grid, (tx, ty)](codes, y, counts)
    return counts


def pairwise_mi(acts_in, acts_out, bins_in, bins_out):
    """The (out, in) pairwise MI matrix (nats) on the device, for fitted
    equal-width bins; a thread per pair counts and finishes its table."""
    c = _device.cuda()
    from ._kernels import cuda_mi
    from .mutual_info import xlogx_table

    if bins_in.nbins * bins_out.nbins > cuda_mi.MAX_CELLS:
        raise ValueError(f"{bins_out.nbins} x {bins_in.nbins} bins exceed the {cuda_mi.MAX_CELLS} cells a thread holds")
    if max(bins_in.nbins, bins_out.nbins) > cuda_mi.MAX_BINS:
        raise ValueError(f"at most {cuda_mi.MAX_BINS} bins per unit on the device")
    ci = _codes(acts_in, bins_in, c)
    co = _codes(acts_out, bins_out, c)
    n = ci.shape[1]
    table = c.to_device(xlogx_table(n))
    sx = []
    for codes, nb in ((co, bins_out.nbins), (ci, bins_in.nbins)):  # marginal terms, on the device
        out = c.device_array(codes.shape[0], np.float64)
        nblk, nt = _device.blocks(codes.shape[0])
        if codes.shape[0]:
            cuda_mi.unit_xlogx[nblk, nt](codes, nb, table, out)
        sx.append(out)
    mi = c.device_array((co.shape[0], ci.shape[0]), np.float64)
    mxy = c.device_array((co.shape[0], ci.shape[0]), np.int64)
    tx, ty = _device.THREADS_2D
    grid = ((ci.shape[0] + tx - 1) // tx, (co.shape[0] + ty - 1) // ty)
    cuda_mi.pair_mi[grid, (tx, ty)](co, ci, bins_out.nbins, bins_in.nbins, table, sx[0], sx[1], n, mi, mxy)
    return mi


class UnitMICounts:
    """Streaming per-unit joint counts against labels on the device, for
    equal-width ``bins``; :meth:`mi` finishes on the host from the small
    (units, bins, classes) table (same numbers as :class:`sparsecore.UnitMIAccumulator`)."""

    def __init__(self, bins, n_classes):
        if bins.strategy != "uniform":
            raise ValueError("the device counts take equal-width bins (strategy='uniform')")
        self.bins, self.n_classes = bins, int(n_classes)
        self.counts = _device.cuda().to_device(np.zeros((bins.units, bins.nbins, self.n_classes), np.int64))

    def update(self, acts, labels):
        from ._kernels import cuda_mi

        c = _device.cuda()
        codes = _codes(acts, self.bins, c)
        y = _device.to_device(labels)
        tx, ty = _device.THREADS_2D
        grid = ((codes.shape[0] + tx - 1) // tx, (codes.shape[1] + ty - 1) // ty)
        cuda_mi.unit_label_counts[grid, (tx, ty)](codes, y, self.counts)
        return self

    def mi(self, **options):
        from .mutual_info import UnitMIAccumulator

        acc = UnitMIAccumulator(self.bins, self.n_classes)
        acc.counts[...] = self.counts.copy_to_host()
        return acc.mi(**options)


class PairMICounts:
    """Streaming joint counts of every (out, in) unit pair on the device
    (int32, ``out * in * bins_out * bins_in`` of them), for the
    ``mutual_info`` criterion; :meth:`mi` returns the host (out, in) matrix."""

    def __init__(self, bins_in, bins_out, memory_limit=8 << 30):
        need = bins_out.units * bins_in.units * bins_out.nbins * bins_in.nbins * 4
        if need > memory_limit:
            raise ValueError(f"pair counts need {need / 2**30:.1f} GiB, over memory_limit; use pairwise_mi")
        self.bins_in, self.bins_out = bins_in, bins_out
        self.counts = _device.cuda().to_device(
            np.zeros((bins_out.units, bins_in.units, bins_out.nbins, bins_in.nbins), np.int32))
        self.n = 0

    def update(self, acts_in, acts_out):
        from ._kernels import cuda_mi

        c = _device.cuda()
        ci = _codes(acts_in, self.bins_in, c)
        co = _codes(acts_out, self.bins_out, c)
        tx, ty = _device.THREADS_2D
        grid = ((ci.shape[0] + tx - 1) // tx, (co.shape[0] + ty - 1) // ty)
        cuda_mi.pair_counts[grid, (tx, ty)](co, ci, self.bins_in.nbins, self.counts)
        self.n += ci.shape[1]
        return self

    def mi(self, **options):
        from .mutual_info import PairwiseMIAccumulator

        acc = PairwiseMIAccumulator(self.bins_in, self.bins_out, memory_limit=1 << 62)
        acc.counts[...] = self.counts.copy_to_host()
        acc.n = self.n
        return acc.mi(**options)

