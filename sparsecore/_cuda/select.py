"""Device selection: :class:`DeviceSource`, the radix histograms of the
exact k-th key, the deterministic norm, rule counts and keep-masks.

The rules themselves (targets, caps, tie quotas, normalisation) are the
CPU's, in ``sparsecore.selection``: a :class:`DeviceSource` carries the
CPU's transform fields, so that code runs unchanged on it and only its
kernels dispatch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _device
from .._kernels import cuda_csr, cuda_pattern, cuda_select
from .._kernels.cpu_select import pick_digit
from .._kernels.keys import MODE_ABS, MODE_IDENTITY
from .._source import NORM_L2, NORM_MAX, PRUNED_SCORE, Source
from .arrays import bad_counter, bits, check_bad, flat, float_device, launch, raise_bad


@dataclass
class DeviceSource(Source):
    """A :class:`~sparsecore._source.Source` whose ``data`` is a flat device
    array, with the CPU's transform fields (``mode``, ``inv``, ``scaled``).

    ``keep``: a flat device keep-mask of current masks (entries it drops are
    lowered below every score, as the CPU's ``Source.with_pruned``);
    ``wide``: force wide keys (group scores are float64 on the CPU)."""

    keep: object = None
    wide: bool = False
    cache: dict = field(default_factory=dict, repr=False)
    on_device = True

    def needs_wide(self):
        return super().needs_wide() or self.keep is not None or self.wide

    def with_pruned(self, keep):
        """Device twin of ``Source.with_pruned``: ``(self, count)``, the
        entries ``keep`` drops lowered when the keys are formed."""
        self.keep = keep
        self.cache.clear()
        return self, self.size - count_kept(keep)

    def keys(self, wide):
        """``(bits, absolute)`` whose keys are this source's keys, wide or
        narrow: the data itself where a sign-bit drop is the whole transform,
        else the scores written out once with the CPU's arithmetic."""
        wide = bool(wide)
        if wide not in self.cache:
            d = self.data
            if (self.keep is None and not self.scaled and self.mode in (MODE_IDENTITY, MODE_ABS)
                    and (d.dtype == np.float64) == wide):
                self.cache[wide] = (bits(d), self.mode == MODE_ABS)
            else:
                c = _device.cuda()
                out = c.device_array(d.size, np.float64 if wide else np.float32)
                keep = self.keep if self.keep is not None else c.device_array(0, np.bool_)
                bad = bad_counter(d.size)
                if d.size:
                    cuda_select.materialise[launch(d.size)](d, float(self.inv), bool(self.scaled), keep,
                                                            PRUNED_SCORE, float(np.nextafter(PRUNED_SCORE, 0.0)),
                                                            out, bad, int(self.mode), wide)
                check_bad(bad, self.name, self.role, self.errors_index())
                self.cache[wide] = (bits(out), False)
        return self.cache[wide]


def device_source(name, arr, mode=MODE_IDENTITY, role="scores", original=None, wide=False, per_unit=False):
    """A :class:`DeviceSource` over a device (or host, copied) float array."""
    d = float_device(arr, f"{role} {name!r}")
    return DeviceSource(name, flat(d), tuple(d.shape), mode, role=role,
                        original=original if original is not None else d, per_unit=per_unit, wide=wide)


def group_source(name, scores, shape, original=None):
    """A source over block or unit scores on the device (wide keys: the CPU
    takes group scores as float64)."""
    return DeviceSource(name, flat(scores), tuple(shape), MODE_IDENTITY, role="group scores",
                        original=original if original is not None else scores, wide=True)


def search(sources, lo, hi, target, wide):
    """Device twin of ``selection._search``: the smallest key T whose capped
    count reaches ``target``, by radix digit histograms on the device
    (12-bit digits: three passes for float32 keys, six for float64; the
    small histograms come back and ``cpu_select.pick_digit`` picks the
    digit, caps included). Returns ``(T, below, ties)``."""
    c = _device.cuda()
    keys = [src.keys(wide) for src in sources]
    below = np.zeros(len(sources), np.int64)
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    prefix, d, hist = 0, 0, None
    levels, shift = [], 64 if wide else 32
    while shift > 0:
        nbits = min(cuda_select.HIST_BITS, shift)
        shift -= nbits
        levels.append((shift, nbits))
    for li, (shift, nbits) in enumerate(levels):
        hist = np.zeros((len(sources), 1 << nbits), np.int64)
        for t, (kb, absolute) in enumerate(keys):
            if not kb.size:
                continue
            h_d = c.to_device(hist[t])  # zeros
            bad = bad_counter(kb.size)
            nb, nt = launch(kb.size)  # each block zeroes and flushes a shared histogram: a few per SM
            cuda_select.key_hist[min(nb, _device.HIST_BLOCKS), nt](kb, absolute, wide, np.uint64(prefix),
                                                                   64 if li == 0 else shift + nbits, shift, nbits,
                                                                   h_d, bad)
            if li == 0:
                check_bad(bad, sources[t].name, sources[t].role, sources[t].errors_index())
            hist[t] = h_d.copy_to_host()
        d = int(pick_digit(hist, below, lo, hi, target))
        prefix = (prefix << nbits) | d
    return prefix, below, hist[:, d].copy()


def score_norm(src, kind):
    """Device twin of ``cpu_select.score_norm``: per fixed block of
    ``NORM_BLOCK`` elements in index order, then the blocks in order on the
    host, so the norm (and the normalised scores) equal the CPU's."""
    n = src.data.size
    nblocks = max(-(-n // cuda_select.NORM_BLOCK), 1)
    parts_d = _device.cuda().to_device(np.zeros(nblocks))
    if n:
        cuda_select.norm_parts[launch(nblocks)](src.data, kind, cuda_select.NORM_BLOCK, parts_d, int(src.mode))
    total = 0.0
    for p in parts_d.copy_to_host():
        total = max(total, float(p)) if kind == NORM_MAX else total + float(p)
    return math.sqrt(total) if kind == NORM_L2 else total


def count_rule(src, rule):
    """Entries of a source that ``rule`` prunes (keys below, and the quota of
    ties); non-finite scores are refused."""
    kb, absolute = src.keys(rule.wide)
    out = _device.cuda().to_device(np.array([0, 0, 0, max(kb.size, 1)], np.int64))
    if kb.size:
        cuda_select.count_rule[launch(kb.size)](kb, absolute, rule.wide, np.uint64(rule.key), out)
    got = out.copy_to_host()
    if got[2]:
        raise_bad(src.name, src.role, src.errors_index(), got[2], got[3])
    return int(got[0]) + min(int(got[1]), int(rule.quota))


def count_kept(mask, other=None):
    """Kept entries of a flat device mask, after ``mask &= other`` when given."""
    c = _device.cuda()
    count = c.to_device(np.zeros(1, np.int64))
    if mask.size:
        cuda_pattern.and_count[launch(mask.size)](mask, other if other is not None else c.device_array(0, np.bool_),
                                                  count)
    return int(count.copy_to_host()[0])


def row_threads():
    """Threads of the block that builds one row: at most the row kernels' shared arrays."""
    return min(cuda_csr.MAX_THREADS, _device.ROW_THREADS)


def pruned_ties(kb, rows, cols, T, absolute, wide, quota):
    """Per row, how many of its ties at ``T`` the rule's quota prunes (rows in flat order)."""
    c = _device.cuda()
    pruned = np.zeros(rows, np.int64)
    if quota and rows:
        ties_d = c.device_array(rows, np.int64)
        cuda_csr.row_ties[_device.rows_grid(rows), row_threads()](kb, cols, T, absolute, wide, ties_d)
        ties = ties_d.copy_to_host()
        start = np.concatenate([[0], np.cumsum(ties)[:-1]])
        pruned = np.clip(quota - start, 0, ties)
    return c.to_device(pruned)


def rule_mask(kb, absolute, rule, rows, cols, pt=None):
    """Flat device keep-mask of keys ``kb`` (``rows x cols`` in flat order)
    under ``rule``; ``pt``: the per-row pruned ties, when known."""
    c = _device.cuda()
    T = np.uint64(rule.key)
    if pt is None:
        pt = pruned_ties(kb, rows, cols, T, absolute, rule.wide, rule.quota)
    mask = c.device_array(rows * cols, np.bool_)
    if rows and cols:
        cuda_csr.row_mask[_device.rows_grid(rows), row_threads()](kb, cols, T, absolute, rule.wide, pt, mask)
    return mask


def rows_of(shape):
    """``(rows, cols)`` a source's keys are laid out in: its 2-D view (one row when 1-D)."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, int(np.prod(shape, dtype=np.int64)) // max(rows, 1)


def mask_of(src, rule):
    """Device twin of ``selection.mask_from``: ``(keep-mask shaped like the
    source, entries the rule prunes)`` (non-finite scores refused); the count
    comes from the pass that checks the scores, so no second pass counts the mask."""
    pruned = count_rule(src, rule)
    kb, absolute = src.keys(rule.wide)
    return rule_mask(kb, absolute, rule, *rows_of(src.shape)).reshape(src.shape), pruned
