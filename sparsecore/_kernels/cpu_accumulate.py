"""Fused accumulation of gradient statistics in one parallel pass."""

import numpy as np
from numba import njit, prange


@njit(inline="always", cache=True)
def _add_terms(gs, ws, g, g2, wg, wg2, dtype):
    """Add one row's terms, computed in ``dtype``, into the given sums
    (views of one block; a sum of size 0 is skipped)."""
    m = gs.size
    if g.size:
        for i in range(m):
            g[i] += dtype(gs[i])
    if g2.size:
        for i in range(m):
            v = dtype(gs[i])
            g2[i] += v * v
    if wg.size:
        for i in range(m):
            wg[i] += dtype(ws[i]) * dtype(gs[i])
    if wg2.size:
        for i in range(m):
            p = dtype(ws[i]) * dtype(gs[i])
            wg2[i] += p * p


@njit(inline="always", cache=True)
def _flush(total, partial):
    if total.size:
        for i in range(total.size):
            total[i] += partial[i]
            partial[i] = 0


@njit(parallel=True, cache=True)
def accumulate(g, w, block, pending, period, t_g, t_g2, t_wg, t_wg2, p_g, p_g2, p_wg, p_wg2):
    """Add a batch of gradient rows into the sums of g, g2, wg and wg2.

    ``g`` is (rows x n): one row per sample, or one batch gradient; ``w`` the
    flat weight (empty when no w*g statistic is asked for). ``t_*`` are the
    float64 totals (size 0 when the statistic is not kept). With
    ``period > 0`` the terms are computed in float32 and go into the float32
    partials ``p_*``, which are added into the totals and cleared after
    every ``period`` rows, counted on from the ``pending`` rows they already
    hold; with ``period == 0`` the terms are computed in float64 and go
    straight into the totals.

    Each thread owns whole blocks of ``block`` elements and loops over the
    rows inside a block, so the block's sums stay in cache across rows; the
    loops work on views indexed from 0, which LLVM vectorises.
    """
    nrows, n = g.shape
    nblocks = (n + block - 1) // block
    for b in prange(nblocks):
        lo = b * block
        hi = min(n, lo + block)
        ws = w[lo:hi] if w.size else w
        for s in range(nrows):
            gs = g[s, lo:hi]
            if period > 0:
                _add_terms(gs, ws, p_g[lo:hi], p_g2[lo:hi], p_wg[lo:hi], p_wg2[lo:hi], np.float32)
                if (pending + s + 1) % period == 0:
                    _flush(t_g[lo:hi], p_g[lo:hi])
                    _flush(t_g2[lo:hi], p_g2[lo:hi])
                    _flush(t_wg[lo:hi], p_wg[lo:hi])
                    _flush(t_wg2[lo:hi], p_wg2[lo:hi])
            else:
                _add_terms(gs, ws, t_g[lo:hi], t_g2[lo:hi], t_wg[lo:hi], t_wg2[lo:hi], np.float64)
