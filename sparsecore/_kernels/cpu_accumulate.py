"""Fused accumulation of gradient statistics in one parallel pass."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def accumulate(g, w, block, acc_g, acc_g2, acc_wg, acc_wg2):
    """Add one batch into the float64 accumulators.

    ``g`` is (samples x n): one row per sample, or a single row for a batch
    gradient. ``w`` is the flat weight (empty when no w*g statistic is
    asked for). An accumulator of size 0 is skipped. Each thread owns whole
    blocks of ``block`` elements and loops over the samples inside a block,
    so the block's accumulators stay in cache across samples; the loops work
    on views indexed from 0, which LLVM vectorises.
    """
    nsamp, n = g.shape
    do_g = acc_g.size > 0
    do_g2 = acc_g2.size > 0
    do_wg = acc_wg.size > 0
    do_wg2 = acc_wg2.size > 0
    nblocks = (n + block - 1) // block
    for b in prange(nblocks):
        lo = b * block
        hi = min(n, lo + block)
        m = hi - lo
        for s in range(nsamp):
            gs = g[s, lo:hi]
            if do_g:
                a = acc_g[lo:hi]
                for i in range(m):
                    a[i] += np.float64(gs[i])
            if do_g2:
                a = acc_g2[lo:hi]
                for i in range(m):
                    gv = np.float64(gs[i])
                    a[i] += gv * gv
            if do_wg or do_wg2:
                ws = w[lo:hi]
                if do_wg:
                    a = acc_wg[lo:hi]
                    for i in range(m):
                        a[i] += np.float64(ws[i]) * np.float64(gs[i])
                if do_wg2:
                    a = acc_wg2[lo:hi]
                    for i in range(m):
                        p = np.float64(ws[i]) * np.float64(gs[i])
                        a[i] += p * p
