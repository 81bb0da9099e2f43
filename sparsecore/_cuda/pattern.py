"""Device patterns: N:M keep-masks, block and unit pooling, and the group
masks (all kept, expansion to elements). The views (``(A, L, B)``, the 2-D
shape, the block) are worked out by ``sparsecore.patterns`` and come in as
numbers."""

from __future__ import annotations

import numpy as np

from .. import _device
from .._kernels import cuda_pattern
from .arrays import bad_counter, check_bad, flat, launch

MAX_M = cuda_pattern.MAX_M


def nm_keep(src, n, m, A, L, B):
    """Flat keep-mask of the ``n`` highest scores of every ``m`` along ``L`` of ``(A, L, B)``."""
    if m > MAX_M:
        raise ValueError(f"{n}:{m} pattern of {src.name!r}: groups above {MAX_M} entries are not supported on "
                         f"the device; use device='cpu'")
    keep = _device.cuda().device_array(src.size, np.bool_)
    bad = bad_counter(src.size)
    ngroups = A * (L // m) * B
    if ngroups:
        cuda_pattern.nm_keep[launch(ngroups)](src.data, A, L, B, n, m, keep, bad, int(src.mode))
    check_bad(bad, src.name, src.role, src.errors_index())
    return keep


def block_scores(src, R, C, r, c, pool):
    """Float64 ``(ceil(R / r), ceil(C / c))`` pooled block scores of a source's ``(R, C)`` view."""
    out = _device.cuda().device_array((-(-R // r), -(-C // c)), np.float64)
    bad = bad_counter(src.size)
    if out.size:
        cuda_pattern.block_pool[launch(out.size)](src.data, R, C, r, c, out, bad, int(src.mode), pool)
    check_bad(bad, src.name, src.role, src.errors_index())
    return out


def unit_scores(src, A, L, B, reduce):
    """Float64 per-unit scores of a source's ``(A, L, B)`` view, reduced over ``A`` and ``B``."""
    out = _device.cuda().device_array(L, np.float64)
    bad = bad_counter(src.size)
    if L:
        cuda_pattern.unit_reduce[launch(L)](src.data, A, L, B, reduce, out, bad, int(src.mode))
    check_bad(bad, src.name, src.role, src.errors_index())
    return out


def blocks_all_kept(mask, R, C, r, c):
    """Per block (flat): whether the flat element ``mask`` keeps all of it."""
    out = _device.cuda().device_array((-(-R // r), -(-C // c)), np.bool_)
    if out.size:
        cuda_pattern.block_all[launch(out.size)](flat(mask), R, C, r, c, out)
    return flat(out)


def units_all_kept(mask, A, L, B):
    """Per unit: whether the flat element ``mask`` keeps all of it."""
    out = _device.cuda().device_array(L, np.bool_)
    if L:
        cuda_pattern.unit_all[launch(L)](flat(mask), A, L, B, out)
    return out


def expand_blocks(keep, R, C, r, c):
    """Flat element keep-mask of a block keep-mask of the ``(R, C)`` view."""
    mask = _device.cuda().device_array(R * C, np.bool_)
    if mask.size:
        cuda_pattern.block_expand[launch(mask.size)](keep.reshape(-(-R // r), -(-C // c)), R, C, r, c, mask)
    return mask


def expand_units(keep, L, B, n):
    """Flat element keep-mask (``n`` entries) of a unit keep vector along ``L`` of ``(A, L, B)``."""
    mask = _device.cuda().device_array(n, np.bool_)
    if n:
        cuda_pattern.unit_expand[launch(n)](keep, L, B, mask)
    return mask


def transpose(a):
    """``a.T`` of a 2-D device array, as a new contiguous array."""
    out = _device.cuda().device_array((a.shape[1], a.shape[0]), a.dtype)
    if a.size:
        cuda_pattern.transpose[launch(a.size)](a, out)
    return out
