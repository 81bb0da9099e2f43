"""The CUDA backend (numba.cuda): device arrays in, device arrays out.

What ``device="cuda"`` (or ``"auto"`` with GPU inputs) of the public API runs:
``prune`` (criteria, exact local/global selection with caps, thresholds,
normalisation, N:M, blocks, units, current masks), the gradient sums of
``GradientAccumulator(device="cuda")``, mutual information (bins, codes,
marginal and pair counts), CSR construction and products, and the selection
and pattern helpers. The kernels are ``sparsecore/_kernels/cuda_*.py``, twins
of the CPU kernels with their semantics: the same masks and CSR structure
for selection (keys formed with the CPU's float operations, no fused
multiply-add, norms summed in the CPU's blocks and order), sums and MI within
float64 rounding.

Inputs are anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA
tensors, numba device arrays) or host arrays (copied over). What comes back
to the host: per-row counts, radix histograms, per-unit ranges and the small
MI tables. Results are numba device arrays; :class:`DeviceCSR` converts to
CuPy, PyTorch and SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import _device
from ._kernels.keys import MODE_ABS, MODE_IDENTITY
from ._validate import no_positions_error, nonfinite_error
from .importance import GradientAccumulator
from .selection import Rule, Source, select_rules

__all__ = ["DeviceAccumulator", "DeviceCSR", "DeviceSource", "PairMICounts", "UnitMICounts", "activations",
           "bins_of", "csr_matmul", "csr_of_mask", "csr_of_rule", "feature_sq_into", "fit_bins", "pairwise_mi",
           "prune", "range_init", "range_into", "select_rule", "select_rules_global", "to_csr", "unit_label_counts",
           "unit_mi", "units"]


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
    """A flat device array viewed as the unsigned integers of its width (float bits, mask bytes)."""
    flat = d.reshape(d.size) if d.ndim != 1 else d
    if flat.dtype == np.float32:
        return flat.view(np.uint32)
    if flat.dtype == np.float64:
        return flat.view(np.uint64)
    return flat.view(np.uint8)


def to_device(a):
    """A numba device array of ``a`` (a view of a device array, a host array copied over)."""
    return _device.to_device(a)


def _float_device(a, name):
    d = _device.to_device(a)
    if d.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} on the device must be float32 or float64, got {d.dtype}; "
                        f"e.g. tensor.float() first")
    return d


def _flat(d):
    return d.reshape(d.size) if d.ndim != 1 else d


def _launch(n):
    return _device.blocks(max(int(n), 1))


def _raise_bad(name, role, original, count, first):
    host = original.copy_to_host() if hasattr(original, "copy_to_host") else np.asarray(original)
    raise nonfinite_error(name, role, host, int(count), int(first))


def _check_bad(bad_d, name, role, original):
    bad = bad_d.copy_to_host()
    if bad[0]:
        _raise_bad(name, role, original, bad[0], bad[1])


def _bad_counter(n):
    return _device.cuda().to_device(np.array([0, max(int(n), 1)], np.int64))


@dataclass
class DeviceSource(Source):
    """A :class:`~sparsecore.selection.Source` whose ``data`` is a flat
    device array, with the CPU's transform fields (``mode``, ``inv``,
    ``scaled``), so that ``select_rules``, ``threshold_rule`` and the
    normalisation run unchanged on it (their kernels dispatch here).

    ``keep``: a flat device keep-mask of current masks (entries it drops are
    lowered below every score, as ``prune``'s ``_materialise``); ``wide``:
    force wide keys (group scores are float64 on the CPU)."""

    keep: object = None
    wide: bool = False
    cache: dict = field(default_factory=dict, repr=False)
    on_device = True

    def needs_wide(self):
        return super().needs_wide() or self.keep is not None or self.wide

    def keys(self, wide):
        """``(bits, absolute)`` whose keys are this source's keys, wide or
        narrow: the data itself where a sign-bit drop is the whole transform,
        else the scores written out once with the CPU's arithmetic."""
        wide = bool(wide)
        if wide not in self.cache:
            d = self.data
            if (self.keep is None and not self.scaled and self.mode in (MODE_IDENTITY, MODE_ABS)
                    and (d.dtype == np.float64) == wide):
                self.cache[wide] = (_bits(d), self.mode == MODE_ABS)
            else:
                from ._kernels import cuda_select
                from .prune import _PRUNED

                c = _device.cuda()
                out = c.device_array(d.size, np.float64 if wide else np.float32)
                keep = self.keep if self.keep is not None else c.device_array(0, np.bool_)
                bad = _bad_counter(d.size)
                if d.size:
                    cuda_select.materialise[_launch(d.size)](d, float(self.inv), bool(self.scaled), keep, _PRUNED,
                                                             float(np.nextafter(_PRUNED, 0.0)), out, bad,
                                                             int(self.mode), wide)
                _check_bad(bad, self.name, self.role, self.original if self.original is not None else d)
                self.cache[wide] = (_bits(out), False)
        return self.cache[wide]


def device_source(name, arr, mode=MODE_IDENTITY, role="scores", original=None, wide=False):
    """A :class:`DeviceSource` over a device (or host, copied) float array."""
    d = _float_device(arr, f"{role} {name!r}")
    return DeviceSource(name, _flat(d), tuple(d.shape), mode, role=role,
                        original=original if original is not None else d, wide=wide)


def search(sources, lo, hi, target, wide):
    """Device twin of ``selection._search``: the smallest key T whose capped
    count reaches ``target``, by radix digit histograms on the device
    (12-bit digits: three passes for float32 keys, six for float64; the
    small histograms come back and ``cpu_select.pick_digit`` picks the
    digit, caps included). Returns ``(T, below, ties)``."""
    from ._kernels import cuda_select
    from ._kernels.cpu_select import pick_digit

    c = _device.cuda()
    keys = [src.keys(wide) for src in sources]
    below = np.zeros(len(sources), np.int64)
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    prefix, d, hist = 0, 0, None
    levels, shift = [], 64 if wide else 32
    while shift > 0:
        bits = min(cuda_select.HIST_BITS, shift)
        shift -= bits
        levels.append((shift, bits))
    for li, (shift, bits) in enumerate(levels):
        hist = np.zeros((len(sources), 1 << bits), np.int64)
        for t, (kb, absolute) in enumerate(keys):
            if not kb.size:
                continue
            h_d = c.to_device(hist[t])  # zeros
            bad = _bad_counter(kb.size)
            nb, nt = _launch(kb.size)  # each block zeroes and flushes a shared histogram: a few per SM
            cuda_select.key_hist[min(nb, _device.HIST_BLOCKS), nt](kb, absolute, wide, np.uint64(prefix),
                                                    64 if li == 0 else shift + bits, shift, bits, h_d, bad)
            if li == 0:
                src = sources[t]
                _check_bad(bad, src.name, src.role, src.original if src.original is not None else src.data)
            hist[t] = h_d.copy_to_host()
        d = int(pick_digit(hist, below, lo, hi, target))
        prefix = (prefix << bits) | d
    return prefix, below, hist[:, d].copy()


def score_norm(src, kind):
    """Device twin of ``cpu_select.score_norm``: per fixed block of
    ``NORM_BLOCK`` elements in index order, then the blocks in order on the
    host, so the norm (and the normalised scores) equal the CPU's."""
    from ._kernels import cuda_select

    n = src.data.size
    nblocks = max(-(-n // cuda_select.NORM_BLOCK), 1)
    parts_d = _device.cuda().to_device(np.zeros(nblocks))
    if n:
        cuda_select.norm_parts[_launch(nblocks)](src.data, kind, cuda_select.NORM_BLOCK, parts_d, int(src.mode))
    total = 0.0
    for p in parts_d.copy_to_host():
        if kind == 3:
            total = max(total, float(p))
        else:
            total += float(p)
    return math.sqrt(total) if kind == 2 else total


def select_rule(scores, k: int, *, absolute: bool = False):
    """The selection rule pruning the ``k`` lowest scores of a device array
    (ties: lower flat index first), found by radix histograms of its keys on
    the device (see :func:`search`)."""
    src = device_source("scores", scores, MODE_ABS if absolute else MODE_IDENTITY)
    return select_rules([src], counts=[k])[0]


def select_rules_global(scores: list, k: int, *, absolute: bool = False) -> list:
    """Rules pruning the ``k`` lowest scores of several device arrays together
    (one exact threshold; ties: earlier array, then lower index, first), as
    ``sparsecore.prune(scope="global")`` without caps."""
    srcs = [device_source(f"scores[{i}]", x, MODE_ABS if absolute else MODE_IDENTITY) for i, x in enumerate(scores)]
    sizes = np.array([s.size for s in srcs], np.int64)
    if not srcs:
        return []
    return select_rules(srcs, target=int(k), lo=np.zeros_like(sizes), hi=sizes)


def _count_rule(src, rule):
    """Entries of a source that ``rule`` prunes (keys below, and the quota of ties)."""
    from ._kernels import cuda_select

    kb, absolute = src.keys(rule.wide)
    out = _device.cuda().to_device(np.array([0, 0, 0, max(kb.size, 1)], np.int64))
    if kb.size:
        cuda_select.count_rule[_launch(kb.size)](kb, absolute, rule.wide, np.uint64(rule.key), out)
    got = out.copy_to_host()
    if got[2]:
        _raise_bad(src.name, src.role, src.original if src.original is not None else src.data, got[2], got[3])
    return int(got[0]) + min(int(got[1]), int(rule.quota))


def _pruned_ties(kb, rows, cols, T, absolute, wide, quota):
    """Per row, how many of its ties at ``T`` the rule's quota prunes (rows in flat order)."""
    from ._kernels import cuda_csr

    c = _device.cuda()
    pruned = np.zeros(rows, np.int64)
    if quota and rows:
        ties_d = c.device_array(rows, np.int64)
        cuda_csr.row_ties[_device.rows_grid(rows), _row_threads()](kb, cols, T, absolute, wide, ties_d)
        ties = ties_d.copy_to_host()
        start = np.concatenate([[0], np.cumsum(ties)[:-1]])
        pruned = np.clip(quota - start, 0, ties)
    return c.to_device(pruned)


def _row_threads():
    from ._kernels import cuda_csr

    return min(cuda_csr.MAX_THREADS, _device.ROW_THREADS)


def _rule_mask(kb, absolute, rule, rows, cols, pt=None):
    """Flat device keep-mask of keys ``kb`` (``rows x cols`` in flat order)
    under ``rule``; ``pt``: the per-row pruned ties, when known."""
    from ._kernels import cuda_csr

    c = _device.cuda()
    T = np.uint64(rule.key)
    if pt is None:
        pt = _pruned_ties(kb, rows, cols, T, absolute, rule.wide, rule.quota)
    mask = c.device_array(rows * cols, np.bool_)
    if rows and cols:
        cuda_csr.row_mask[_device.rows_grid(rows), _row_threads()](kb, cols, T, absolute, rule.wide, pt, mask)
    return mask


def mask_of(src, rule):
    """Device twin of ``selection._mask_from``: the keep-mask of a source
    under ``rule``, shaped like the source (non-finite scores refused)."""
    _count_rule(src, rule)
    kb, absolute = src.keys(rule.wide)
    return _rule_mask(kb, absolute, rule, *_rows(src)).reshape(src.shape)


def _rows(src):
    """``(rows, cols)`` a source's keys are laid out in: its 2-D view (one row when 1-D)."""
    rows = src.shape[0] if len(src.shape) >= 2 else 1
    return rows, src.size // max(rows, 1)


def _build(w, kb, absolute, rule, rows, cols, name="weights", original=None, want_mask=False):
    """:class:`DeviceCSR` of flat device weights ``w`` (``rows x cols``) kept
    where keys ``kb`` pass ``rule``: per-row ties (with a quota), kept
    non-zeros per row, offsets on the host, then the fill. ``want_mask``:
    returns ``(csr, flat keep-mask)``."""
    from ._kernels import cuda_csr
    from .csr import index_dtype

    c = _device.cuda()
    T = np.uint64(rule.key)
    nt = _row_threads()
    pt = _pruned_ties(kb, rows, cols, T, absolute, rule.wide, rule.quota)
    counts_d = c.device_array(rows, np.int64)
    bad_d = c.to_device(np.zeros(1, np.int64))
    if rows:
        cuda_csr.row_kept[_device.rows_grid(rows), nt](kb, w, cols, T, absolute, rule.wide, pt, counts_d, bad_d)
    nbad = int(bad_d.copy_to_host()[0])
    if nbad:
        host = w.copy_to_host()
        _raise_bad(name, "weights", original if original is not None else w, nbad,
                   int(np.argmax(~np.isfinite(host))))
    counts = counts_d.copy_to_host() if rows else np.zeros(0, np.int64)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    idt = index_dtype((rows, cols), nnz)
    indptr_d = c.to_device(indptr.astype(idt))
    data_d = c.device_array(nnz, w.dtype)
    indices_d = c.device_array(nnz, idt)
    if rows and nnz:
        cuda_csr.row_fill[_device.rows_grid(rows), nt](kb, w, cols, T, absolute, rule.wide, pt, indptr_d, data_d, indices_d)
    a = DeviceCSR(data_d, indices_d, indptr_d, (rows, cols))
    return (a, _rule_mask(kb, absolute, rule, rows, cols, pt)) if want_mask else a


_KEEP_RULE = Rule(0x80000001, 0, False)  # keeps the entries of a uint8 keep-mask that are 1


def _csr_of_mask(w, mask, rows, cols, name, original):
    return _build(w, _bits(mask), False, _KEEP_RULE, rows, cols, name, original)


def csr_of_rule(w, src, rule, mshape, name="weights"):
    """:class:`DeviceCSR` of device weights ``w`` (2-D view ``mshape``) kept
    where the source's keys pass ``rule``; non-finite scores are refused."""
    _count_rule(src, rule)
    kb, absolute = src.keys(rule.wide)
    return _build(_flat(w), kb, absolute, rule, *mshape, name, w)


def csr_of_mask(w, mask, mshape, name="weights"):
    """:class:`DeviceCSR` of device weights ``w`` (2-D view ``mshape``) kept where ``mask`` is True."""
    return _csr_of_mask(_flat(w), _flat(mask), *mshape, name, w)


def to_csr(weights, mask=None, *, scores=None, threshold: float | None = None, sparsity: float | None = None,
           name: str = "weights") -> DeviceCSR:
    """:func:`sparsecore.to_csr` on the device (any shape, a mask, a
    threshold or an exact sparsity; scores default to ``|weights|``): ties
    per row (with a quota), kept non-zeros per row, then the fill. The same
    structure as on the CPU."""
    from .csr import to_csr as to_csr_any

    return to_csr_any(weights, mask, scores=scores, threshold=threshold, sparsity=sparsity, name=name,
                      device="cuda")


# --- prune on the device ----------------------------------------------------

def criterion_source(crit, name, w, st):
    """The scores of a built-in criterion on the device, with the CPU's
    float64 arithmetic (see ``_kernels/cuda_importance.py``)."""
    from ._kernels import cuda_importance as ci
    from .importance import _need

    c = _device.cuda()
    cname = crit.name
    wf = _flat(w)
    if cname in ("fisher", "mutual_info") or (cname == "taylor_squared" and "wg2" in st):
        key = {"fisher": "g2", "mutual_info": "mi", "taylor_squared": "wg2"}[cname]
        if key not in st:
            _need(st, key, cname)
        a = _float_device(st[key], f"state[{key!r}] of {name!r}")
        if cname == "mutual_info" and a.ndim == 2 and a.shape != w.shape and a.shape[::-1] == w.shape:
            a = _transpose(a)  # a Keras (in, out) kernel
        if a.shape != w.shape:
            raise ValueError(f"criterion {cname!r}: state[{key!r}] of shape {a.shape} does not fit weights "
                             f"{name!r} of shape {w.shape}")
        return device_source(name, a, role=f"scores from criterion {cname!r} for")
    L, B = 1, 1
    if cname == "taylor":
        _need(st, "wg", cname, alt="g")
        kind, a = (ci.ABS, st["wg"]) if "wg" in st else (ci.TAYLOR_G, st["g"])
    elif cname == "taylor_squared":  # without wg2 (that case is above): weights fixed, w**2 * sum g**2
        _need(st, "wg2", cname, alt="g2")
        kind, a = ci.TAYLOR_SQUARED_G2, st["g2"]
    elif cname == "obd":
        kind, a = ci.OBD, _need(st, "g2", cname)
    else:  # wanda
        if "x_norm" not in st:
            raise ValueError("criterion 'wanda' needs state['x_norm'], the L2 norm over samples of each input "
                             "feature of the layer (the PyTorch adapter's collect_activations(feature_norms=True))")
        kind, a = ci.WANDA, st["x_norm"]
    a = _flat(_float_device(a, f"state of {name!r}"))
    if kind == ci.WANDA:
        if len(w.shape) >= 2 and a.size == w.shape[1]:
            L, B = w.shape[1], int(np.prod(w.shape[2:], dtype=np.int64))
        elif len(w.shape) == 2 and a.size == w.shape[0]:
            L, B = w.shape[0], w.shape[1]
        else:
            raise ValueError(f"state['x_norm'] of shape {(a.size,)} fits neither axis 1 nor (for a 2-D (in, out) "
                             f"kernel) axis 0 of weights of shape {w.shape}")
    elif a.size != wf.size:
        raise ValueError(f"criterion {cname!r}: statistics of {a.size} entries do not fit weights {name!r} of "
                         f"shape {w.shape}")
    out = c.device_array(wf.size, np.float64)
    if wf.size:
        ci.criterion_scores[_launch(wf.size)](wf, a, L, B, out, kind)
    return device_source(name, out.reshape(w.shape), role=f"scores from criterion {cname!r} for")


def _transpose(a):
    from ._kernels import cuda_pattern

    out = _device.cuda().device_array((a.shape[1], a.shape[0]), a.dtype)
    if a.size:
        cuda_pattern.transpose[_launch(a.size)](a, out)
    return out


_DEVICE_CRITERIA = ("fisher", "taylor", "taylor_squared", "obd", "wanda", "mutual_info")


def has_device_criterion(crit):
    """Whether ``crit`` is a registered built-in with a device implementation."""
    from .importance import _REGISTRY

    name = getattr(crit, "name", None)
    return name in _DEVICE_CRITERIA and _REGISTRY.get(name) is crit


def _count_kept(mask, other=None):
    """Kept entries of a flat device mask, after ``mask &= other`` when given."""
    from ._kernels import cuda_pattern

    c = _device.cuda()
    count = c.to_device(np.zeros(1, np.int64))
    if mask.size:
        cuda_pattern.and_count[_launch(mask.size)](mask, other if other is not None else c.device_array(0, np.bool_),
                                                   count)
    return int(count.copy_to_host()[0])


def block_scores(src, block):
    """Device twin of ``patterns.block_source_scores``: float64 ``(ceil(R / r), ceil(C / c))``."""
    from ._kernels import cuda_pattern
    from .patterns import _POOLS, check_block

    R, C = check_block(src.shape, block.shape, src.name)
    r, cc = block.shape
    out = _device.cuda().device_array((-(-R // r), -(-C // cc)), np.float64)
    bad = _bad_counter(src.size)
    if out.size:
        cuda_pattern.block_pool[_launch(out.size)](src.data, R, C, r, cc, out, bad, int(src.mode), _POOLS[block.pool])
    _check_bad(bad, src.name, src.role, src.original if src.original is not None else src.data)
    return out


def unit_scores(src, units):
    """Device twin of ``patterns.unit_source_scores``: float64, one per unit."""
    from ._kernels import cuda_pattern
    from .patterns import _REDUCE, _axis

    _, (A, L, B) = _axis(src.shape, units.axis, src.name, "Units pattern")
    out = _device.cuda().device_array(L, np.float64)
    bad = _bad_counter(src.size)
    if L:
        cuda_pattern.unit_reduce[_launch(L)](src.data, A, L, B, _REDUCE[units.reduce], out, bad, int(src.mode))
    _check_bad(bad, src.name, src.role, src.original if src.original is not None else src.data)
    return out


def group_source(name, scores, shape):
    """Device twin of ``patterns.group_source`` (float64 group scores)."""
    return DeviceSource(name, _flat(scores), tuple(shape), MODE_IDENTITY, role="group scores", original=scores)


def _group_source(src, w, pattern):
    """Device twin of ``prune._group_scores``: pooled block or unit scores (float64)."""
    from .patterns import Blocks

    if src.role == "unit scores":
        return src
    out = block_scores(src, pattern) if isinstance(pattern, Blocks) else unit_scores(src, pattern)
    return group_source(src.name, out, out.shape)


def _group_keep(mask, shape, pattern):
    """Per block or unit (flat): whether the element mask keeps all of it."""
    from ._kernels import cuda_pattern
    from .csr import matrix_shape
    from .patterns import Blocks, _axis

    c = _device.cuda()
    if pattern is None:
        return mask
    if isinstance(pattern, Blocks):
        R, C = matrix_shape(shape)
        r, cc = pattern.shape
        out = c.device_array((-(-R // r), -(-C // cc)), np.bool_)
        if out.size:
            cuda_pattern.block_all[_launch(out.size)](mask, R, C, r, cc, out)
        return _flat(out)
    _, (A, L, B) = _axis(shape, pattern.axis, "mask", "Units pattern")
    out = c.device_array(L, np.bool_)
    if L:
        cuda_pattern.unit_all[_launch(L)](mask, A, L, B, out)
    return out


def _expand(keep, shape, pattern):
    """Flat element keep-mask of a flat block or unit keep-mask."""
    from ._kernels import cuda_pattern
    from .csr import matrix_shape
    from .patterns import Blocks, _axis

    if pattern is None:
        return keep
    c = _device.cuda()
    n = int(np.prod(shape, dtype=np.int64))
    mask = c.device_array(n, np.bool_)
    if not n:
        return mask
    if isinstance(pattern, Blocks):
        R, C = matrix_shape(shape)
        r, cc = pattern.shape
        cuda_pattern.block_expand[_launch(n)](keep.reshape(-(-R // r), -(-C // cc)), R, C, r, cc, mask)
    else:
        _, (A, L, B) = _axis(shape, pattern.axis, "mask", "Units pattern")
        cuda_pattern.unit_expand[_launch(n)](keep, L, B, mask)
    return mask


def nm_mask(src, n, m, axis):
    """Device twin of ``patterns.nm_source_mask`` (flat keep-mask)."""
    from .patterns import NM

    return _nm_mask(src, NM(n, m, axis))


def _nm_mask(src, pattern):
    from ._kernels import cuda_pattern
    from .patterns import _nm_view

    if pattern.m > cuda_pattern.MAX_M:
        raise ValueError(f"{pattern.n}:{pattern.m} pattern of {src.name!r}: groups above {cuda_pattern.MAX_M} "
                         f"entries are not supported on the device; use device='cpu'")
    _, A, L, B = _nm_view(src.shape, pattern.n, pattern.m, pattern.axis, src.name)
    c = _device.cuda()
    keep = c.device_array(src.size, np.bool_)
    bad = _bad_counter(src.size)
    ngroups = A * (L // pattern.m) * B
    if ngroups:
        cuda_pattern.nm_keep[_launch(ngroups)](src.data, A, L, B, pattern.n, pattern.m, keep, bad, int(src.mode))
    _check_bad(bad, src.name, src.role, src.original if src.original is not None else src.data)
    return keep


def prune(weights, scores=None, *, sparsity=None, threshold=None, scope: str = "local", state=None,
          min_sparsity=0.0, max_sparsity=1.0, normalize: str = "none", ignore=(), pattern=None, masks=None):
    """:func:`sparsecore.prune` on the device: the same arguments and rules,
    the same masks and CSR structure, with device arrays in and out.

    ``weights``: mapping name -> device (or host, copied over) float array.
    ``scores``: None (magnitude), a built-in criterion name (magnitude,
    magnitude_squared, fisher, taylor, taylor_squared, obd, wanda,
    mutual_info; its ``state`` from a :class:`DeviceAccumulator`, a
    :class:`~sparsecore.GradientAccumulator` or a mapping of device or host
    arrays), a callable ``(weights, state) -> scores`` that works on device
    arrays, or a mapping of device scores. Returns a
    :class:`~sparsecore.PruneResult` whose ``csr`` are :class:`DeviceCSR`,
    whose ``masks`` and ``groups`` are numba device arrays (``copy_to_host``,
    or ``torch.as_tensor(m, device='cuda')`` / ``cupy.asarray(m)`` without a
    copy). N:M groups of at most 32 entries."""
    from .csr import matrix_shape
    from .patterns import NM, Blocks, Units
    from .prune import PruneResult, TensorSummary, _check_masks, _normalise, _sources, check_call, select_all

    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    pattern, ignore, names = check_call(weights, sparsity, threshold, scope, normalize, ignore, pattern)
    unit_axis = pattern.axis if isinstance(pattern, Units) else None
    warrs, srcs = _sources(weights, names, scores, state, normalize,
                           sparsity is not None and pattern is None and masks is None, unit_axis, device=True)
    old = _check_masks(masks, weights, names, device=True)
    if isinstance(pattern, (Blocks, Units)):
        srcs = [_group_source(src, warrs[src.name], pattern) for src in srcs]
    if not isinstance(pattern, NM):
        _normalise(srcs, normalize)
    done = None
    if old is not None and not isinstance(pattern, NM):
        done = []
        for src in srcs:
            if src.name in old:
                src.keep = _group_keep(old[src.name], warrs[src.name].shape, pattern)
                done.append(src.size - _count_kept(src.keep))
            else:  # all kept: scores written out in float64 all the same, as on the CPU
                src.keep = _device.cuda().to_device(np.ones(src.size, np.bool_))
                done.append(0)
        done = np.array(done, np.int64)
    lo_c, hi_c, rules = select_all(srcs, names, sparsity, threshold, scope, min_sparsity, max_sparsity, pattern,
                                   done)

    csr, out_masks, shapes, summary, groups = {}, {}, {}, [], {}
    for src, rule, lo_t, hi_t in zip(srcs, rules, lo_c, hi_c):
        n = src.name
        w = warrs[n]
        rows, cols = matrix_shape(w.shape)
        wf = _flat(w)
        if isinstance(pattern, NM):
            mask = _nm_mask(src, pattern)
        else:
            pruned = _count_rule(src, rule)  # also refuses non-finite scores, whatever the rule
            if threshold is not None and not (lo_t <= pruned <= hi_t):
                # a cap binds: prune exactly the capped count of this tensor's lowest scores
                pruned = min(max(pruned, lo_t), hi_t)
                (rule,) = select_rules([src], counts=[pruned])
            kb, absolute = src.keys(rule.wide)
            if pattern is None and old is None:
                a, mask = _build(wf, kb, absolute, rule, rows, cols, n, w, want_mask=True)
                kept = int(w.size) - pruned  # the rule prunes exactly the entries it counted
            else:
                mask = _rule_mask(kb, absolute, rule, *_rows(src))
                if pattern is not None:
                    groups[n] = mask.reshape(src.shape)
                mask = _expand(mask, w.shape, pattern)
        if pattern is not None or old is not None:
            kept = _count_kept(mask, old.get(n) if old is not None else None)
            a = _csr_of_mask(wf, mask, rows, cols, n, w)
        csr[n] = a
        out_masks[n] = mask.reshape(w.shape)
        shapes[n] = tuple(w.shape)
        summary.append(TensorSummary(n, tuple(w.shape), int(w.size), int(w.size) - kept, a.nnz,
                                     int(w.size * w.dtype.itemsize),
                                     int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)))
    return PruneResult(csr, out_masks, shapes, summary, ignore, groups)


def _vector_threads():
    """Threads per block of the thread-group SpMV: at most its shared array."""
    from ._kernels import cuda_csr

    return min(_device.THREADS, cuda_csr.MAX_THREADS)


def _vector_width(mean_nnz):
    """Threads per row for SpMV: a power of two near the mean row length, at
    most a warp (and the block); 1 (a thread per row) for rows under 4 entries."""
    if mean_nnz < 4:
        return 1
    vec = 2
    while vec < 32 and vec * 2 <= mean_nnz and vec * 2 <= _vector_threads():
        vec *= 2
    return vec


def csr_matmul(a, x, out=None):
    """``a @ x`` on the device for a :class:`DeviceCSR` (or host CSR, copied
    over) and a device (or host) vector or matrix; returns a device array."""
    c = _device.cuda()
    from ._kernels import cuda_csr

    if not isinstance(a, DeviceCSR):
        from .csr import check_csr

        check_csr(a)
        if a.data.dtype.kind != "f" or a.data.dtype.itemsize > 8:
            raise TypeError(f"a has dtype {a.data.dtype}; pass float32 or float64 CSR data")
        idt = np.result_type(a.indices.dtype, a.indptr.dtype)  # one index dtype for both
        a = DeviceCSR(c.to_device(a.data.astype(np.float64 if a.data.dtype.itemsize > 4 else np.float32)),
                      c.to_device(a.indices.astype(idt)), c.to_device(a.indptr.astype(idt)), a.shape)
    xd = _float_device(x, "x")
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
        vec = _vector_width(a.nnz / rows)
        if vec > 1:  # rows long enough for a group of threads each: coalesced reads of the row
            nt = _vector_threads()
            nb, _ = _device.blocks(rows * vec, nt)
            cuda_csr.csr_matvec_vector[nb, nt](a.data, a.indices, a.indptr, xd, out, vec)
        else:
            nb, nt = _device.blocks(rows)
            cuda_csr.csr_matvec[nb, nt](a.data, a.indices, a.indptr, xd, out)
    else:
        grid, threads = _device.blocks_2d(xd.shape[1], rows)
        cuda_csr.csr_matmat[grid, threads](a.data, a.indices, a.indptr, xd, out)
    return out


# --- gradient statistics (the device mode of sparsecore.GradientAccumulator) ---

def float_array(a, name, role):
    """A C-contiguous float32/float64 device array of ``a`` (a view of a
    device array; a host array is copied over)."""
    d = _float_device(a, f"{role} {name!r}")
    if d.size and not d.is_c_contiguous():
        raise ValueError(f"{role} {name!r} are not contiguous on the device; pass a contiguous array "
                         f"(e.g. tensor.contiguous())")
    return d


def empty():
    return _device.cuda().device_array(0, np.float64)


def zeros(n):
    return _device.cuda().to_device(np.zeros(n, np.float64))


def copy(a):
    out = _device.cuda().device_array_like(a)
    out.copy_to_device(a)
    return out


def accumulate(prepared, totals, spares):
    """One update of an accumulator on the GPU, all or nothing: for each
    ``(name, shape, n, g2d, w, g_original, w_original)`` of ``prepared``,
    ``spares[name][stat] = totals[name][stat] + terms`` in one fused pass that
    also checks the gradients and weights; raises the CPU's ``ValueError``
    for the first tensor with NaN/Inf (the caller then keeps ``totals``)."""
    from ._kernels import cuda_accumulate

    from .importance import STATS

    e = empty()
    init = np.zeros((len(prepared), 4), np.int64)  # one counter block for the update: one copy each way
    init[:, 1] = [max(p[3].size, 1) for p in prepared]
    init[:, 3] = [max(p[2], 1) for p in prepared]
    bad = _device.cuda().to_device(init)
    for t, (name, _, n, g2d, w, _, _) in enumerate(prepared):
        if n and g2d.shape[0]:
            tot, new = totals[name], spares[name]
            cuda_accumulate.accumulate[_launch(n)](g2d, w, *(tot.get(s, e) for s in STATS),
                                                   *(new.get(s, e) for s in STATS), bad[t])
        else:
            for s in totals[name]:
                spares[name][s].copy_to_device(totals[name][s])
    got = bad.copy_to_host() if prepared else init
    for t, (name, *_, ga, wa) in enumerate(prepared):
        label = name or "grads"
        if got[t, 2]:
            _raise_bad(label, "weights", wa, got[t, 2], got[t, 3])
        if got[t, 0]:
            _raise_bad(label, "gradients", ga, got[t, 0], got[t, 1])


def add_into(dst, src):
    """``dst += src`` for flat float64 device arrays."""
    from ._kernels import cuda_accumulate

    if dst.size:
        cuda_accumulate.add_into[_launch(dst.size)](dst, _device.to_device(src))


class DeviceAccumulator(GradientAccumulator):
    """``GradientAccumulator(stats, device="cuda")``: the sums kept on the GPU
    (what the PyTorch adapter feeds with CUDA gradients)."""

    def __init__(self, stats=("g2",)):
        super().__init__(stats, precision="float64", device="cuda")


def _codes(acts, bins, c, name="activations"):
    """Equal-width codes (units, samples) on the device for fitted ``bins``
    (activations checked as the CPU's ``Bins.codes`` checks them)."""
    from ._kernels import cuda_mi

    a = activations(acts, name)
    if a.shape[1] != bins.units:
        raise ValueError(f"activations {name!r} have {a.shape[1]} units, the bins were fitted on {bins.units}")
    if bins.nbins > 256:
        raise ValueError(f"{bins.nbins} bins: the device codes hold at most 256 bins; use device='cpu'")
    lo = np.ascontiguousarray(bins.edges[:, 0])
    width = (bins.edges[:, -1] - lo) / bins.nbins
    inv = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    out = c.device_array((a.shape[1], a.shape[0]), np.uint8)
    if out.size:
        cuda_mi.uniform_codes[_launch(out.size)](a, c.to_device(lo), c.to_device(inv), float(bins.nbins - 1), out)
    return out


def unit_label_counts(acts, labels, bins, n_classes):
    """Joint counts (units, bins, classes) of device activations against labels."""
    c = _device.cuda()
    from ._kernels import cuda_mi

    codes = _codes(acts, bins, c)
    y = _device.to_device(labels)
    counts = c.to_device(np.zeros((codes.shape[0], bins.nbins, n_classes), np.int64))
    if codes.size:
        cuda_mi.unit_label_counts[_launch(codes.size)](codes, y, counts)
    return counts


def activations(acts, name="activations", reduce=None):
    """Device (samples, units) float activations, checked as on the CPU
    (1-D: one unit; (samples, channels, H, W) maps reduced per channel on the
    device by ``reduce="mean"`` or ``"max"``; at least 2 samples)."""
    a = float_array(acts, name, "activations")
    if a.ndim == 4:
        if reduce not in ("mean", "max"):
            raise ValueError(f"activations {name!r} have shape {tuple(a.shape)} (samples, channels, H, W); "
                             f"pass reduce='mean' or reduce='max' to get one value per channel")
        a = _channel_reduce(a, False, 0 if reduce == "mean" else 1, name)
    elif a.ndim == 1:
        a = a.reshape(a.shape[0], 1)
    elif a.ndim != 2:
        raise ValueError(f"activations {name!r} must be (samples, units) or (samples, channels, H, W), "
                         f"got shape {tuple(a.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"activations {name!r} hold {a.shape[0]} sample(s); MI needs at least 2")
    return a


def _channel_reduce(d, channels_last, op, name="activations"):
    """(N, C) per-channel means (``op`` 0) or maxima (1) of a device activation map."""
    from ._kernels import cuda_mi

    n, ch, sp = _map_view(d, channels_last)
    if sp == 0 and n * ch:
        raise no_positions_error(name, d.shape)
    out = _device.cuda().device_array((n, ch), d.dtype)
    if out.size:
        cuda_mi.channel_reduce[_launch(out.size)](d.reshape(d.size), ch, sp, channels_last, op, out)
    return out


def fit_bins(a, bins=16, strategy="uniform", name="activations"):
    """Equal-width :class:`~sparsecore.Bins` of device activations: the
    per-unit minimum and maximum on the device, the edges on the host
    (the CPU's arithmetic)."""
    from .mutual_info import _nbins

    if strategy != "uniform":
        raise ValueError(f"strategy {strategy!r}: the device takes equal-width bins ('uniform'); "
                         f"use device='cpu' for quantile bins")
    if bins == "fd":
        raise ValueError("the 'fd' bins rule needs quantiles; on the device give an integer, 'sturges' or 'sqrt'")
    k = _nbins(bins, a, name)
    lo, hi = range_init(a.shape[1])
    range_into(lo, hi, a, name)
    return bins_of(lo.copy_to_host(), hi.copy_to_host(), k)


def bins_of(lo, hi, k):
    """Equal-width :class:`~sparsecore.Bins` between host ``lo`` and ``hi`` (the CPU's arithmetic)."""
    from .mutual_info import Bins

    edges = lo[:, None] + (hi - lo)[:, None] * (np.arange(k + 1) / k)[None, :]
    edges[:, -1] = hi
    return Bins(np.ascontiguousarray(edges), k, "uniform")


def range_init(units):
    """Device ``(lo, hi)`` at ``(+inf, -inf)`` for :func:`range_into`."""
    c = _device.cuda()
    return c.to_device(np.full(units, np.inf)), c.to_device(np.full(units, -np.inf))


def range_into(lo, hi, a, name="activations"):
    """Fold the per-unit range of device (samples, units) ``a`` into ``lo``/``hi``."""
    from ._kernels import cuda_mi

    bad = _bad_counter(a.size)
    if a.shape[1]:
        cuda_mi.column_min_max[_launch(a.shape[1])](a, lo, hi, bad)
    got = bad.copy_to_host()
    if got[0]:
        su = divmod(int(got[1]), a.shape[1])
        raise ValueError(f"activations {name!r} hold {int(got[0])} NaN or Inf value(s) "
                         f"(first at sample {su[0]}, unit {su[1]})")


def _map_view(d, channels_last):
    """``(N, C, S)`` of an activation map (C last with ``channels_last``)."""
    n = d.shape[0]
    ch = d.shape[d.ndim - 1] if channels_last else d.shape[1]  # (the simulator's shapes take no negative index)
    return n, ch, d.size // max(n * ch, 1)


def units(a, channels_last=False, name="activations"):
    """A device (samples, units) array of an activation: maps ``(N, C, ...)``
    (or ``(N, ..., C)``) reduced on the device to one mean per channel."""
    d = float_array(a, name, "activations")
    if d.ndim == 1:
        return d.reshape(d.shape[0], 1)
    if d.ndim == 2:
        return d
    return _channel_reduce(d, channels_last, 0, name)


def feature_sq_into(out, a, channels_last, name="inputs"):
    """``out += Σ x²`` per input feature (last axis with ``channels_last``, else axis 1) of device ``a``."""
    from ._kernels import cuda_mi

    d = float_array(a, name, "activations")
    n, ch, sp = _map_view(d, channels_last) if d.ndim > 1 else (d.shape[0], 1, 1)
    if out is None:
        out = zeros(ch)
    if ch:
        cuda_mi.feature_sq[_launch(ch)](d.reshape(d.size), n, ch, sp, channels_last, out)
    return out


def _marginal_counts(codes, nbins):
    from ._kernels import cuda_mi

    counts = _device.cuda().to_device(np.zeros((codes.shape[0], nbins), np.int64))
    if codes.size:
        cuda_mi.unit_bin_counts[_launch(codes.size)](codes, counts)
    return counts.copy_to_host()


def pairwise_mi(acts_in, acts_out, bins_in, bins_out, *, base="e", correction=None, normalized=False):
    """The (out, in) pairwise MI matrix (host float64, like
    :func:`sparsecore.pairwise_mi`) of device activations for fitted
    equal-width bins: codes, marginal counts and a thread per pair counting
    and finishing its table, all on the device; the marginal terms and the
    corrections on the host from the small tables."""
    from ._kernels import cuda_mi
    from .mutual_info import _check_opts, _finish, marginal_terms, xlogx_table

    _check_opts(base, correction)
    if bins_in.nbins * bins_out.nbins > cuda_mi.MAX_CELLS:
        raise ValueError(f"{bins_out.nbins} x {bins_in.nbins} bins exceed the {cuda_mi.MAX_CELLS} cells a thread "
                         f"holds on the device; use fewer bins or device='cpu'")
    c = _device.cuda()
    ci = _codes(acts_in, bins_in, c, "inputs")
    co = _codes(acts_out, bins_out, c, "outputs")
    n = ci.shape[1]
    if co.shape[1] != n:
        raise ValueError(f"inputs hold {n} samples but outputs {co.shape[1]}")
    table = xlogx_table(n)
    sx_i, h_i, m_i = marginal_terms(_marginal_counts(ci, bins_in.nbins), table, n)
    sx_o, h_o, m_o = marginal_terms(_marginal_counts(co, bins_out.nbins), table, n)
    mi = c.device_array((co.shape[0], ci.shape[0]), np.float64)
    mxy = c.device_array((co.shape[0], ci.shape[0]), np.int64)
    if mi.size:
        cuda_mi.pair_mi[_device.blocks_2d(ci.shape[0], co.shape[0])](co, ci, bins_out.nbins, bins_in.nbins, c.to_device(table), c.to_device(sx_o),
                                        c.to_device(sx_i), n, mi, mxy)
    return _finish(mi.copy_to_host(), h_o[:, None], h_i[None, :], m_o[:, None], m_i[None, :], mxy.copy_to_host(), n,
                   base, correction, normalized)


def unit_mi(acts, labels, bins=16, strategy="uniform", *, target="discrete", base="e", correction=None,
            normalized=False, reduce=None):
    """:func:`sparsecore.unit_mi` of device activations: bins fitted, codes
    and the (units, bins, classes) counts formed on the device; the labels
    are checked on a host copy (one integer per sample)."""
    from .mutual_info import UnitMIAccumulator, _labels

    a = activations(acts, "activations", reduce)
    b = fit_bins(a, bins, strategy, "activations")
    c = _device.cuda()
    if target == "continuous":
        t = activations(labels, "target")
        if t.shape[1] != 1:
            raise ValueError(f"a continuous target is one value per sample, got shape {t.shape}")
        if t.shape[0] != a.shape[0]:
            raise ValueError(f"target holds {t.shape[0]} values but the activations {a.shape[0]} samples")
        tb = fit_bins(t, bins, strategy, "target")
        y, k = _codes(t, tb, c)[0], tb.nbins
    elif target == "discrete":
        host = _device.to_device(labels).copy_to_host() if _device.is_device_array(labels) else labels
        yh = _labels(host, a.shape[0], "activations")
        y, k = c.to_device(yh), int(yh.max()) + 1 if yh.size else 1
    else:
        raise ValueError(f"target must be 'discrete' or 'continuous', got {target!r}")
    acc = UnitMIAccumulator(b, k)
    acc.counts[...] = unit_label_counts(a, y, b, k).copy_to_host()
    return acc.mi(base, correction, normalized)


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

        from .mutual_info import class_labels

        c = _device.cuda()
        codes = _codes(acts, self.bins, c)
        y = c.to_device(class_labels(labels, codes.shape[1], self.n_classes))
        if codes.size:
            cuda_mi.unit_label_counts[_launch(codes.size)](codes, y, self.counts)
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
        ci = _codes(acts_in, self.bins_in, c, "inputs")
        co = _codes(acts_out, self.bins_out, c, "outputs")
        if ci.shape[1] != co.shape[1]:
            raise ValueError(f"inputs hold {ci.shape[1]} samples but outputs {co.shape[1]}")
        if ci.shape[1] and self.counts.size:
            cuda_mi.pair_counts[_device.blocks_2d(ci.shape[0], co.shape[0])](co, ci, self.bins_in.nbins,
                                                                             self.counts)
        self.n += ci.shape[1]
        return self

    def mi(self, **options):
        from .mutual_info import PairwiseMIAccumulator

        acc = PairwiseMIAccumulator(self.bins_in, self.bins_out, memory_limit=1 << 62)
        acc.counts[...] = self.counts.copy_to_host()
        acc.n = self.n
        return acc.mi(**options)

