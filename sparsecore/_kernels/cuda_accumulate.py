"""CUDA twin of ``cpu_accumulate``: the fused gradient statistics.

Same argument order as ``cpu_accumulate.accumulate`` for what both take:
``(g, w, t_g, t_g2, t_wg, t_wg2)``, then the new totals and the error
counter. The device version adds each row's terms in float64 (no float32
partials: a GPU has the bandwidth to spare) and writes ``old + terms`` into a
second set of totals, checking every gradient and weight on the way: the
caller swaps the two sets only when no NaN/Inf was seen, so a bad batch adds
nothing, in one pass over the gradients. Grid-stride over elements; each
thread loops over the rows of its elements, so no two threads write the same
total.
"""

import math

from numba import cuda, int64

from ._signatures import FLOATS, arr, combos, f64, i64


@cuda.jit
def accumulate(g, w, t_g, t_g2, t_wg, t_wg2, n_g, n_g2, n_wg, n_wg2, bad):
    """``n_x = t_x + Σ_rows term_x`` for each kept statistic (an empty array:
    not kept); ``bad[0]``/``bad[1]``: NaN/Inf gradients and the first flat
    index into ``g``; ``bad[2]``/``bad[3]``: the same for ``w``."""
    nrows = g.shape[0]
    n = g.shape[1]
    nbad = int64(0)
    first = int64(-1)
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        sg = 0.0
        sg2 = 0.0
        swg = 0.0
        swg2 = 0.0
        wi = 0.0
        if w.size:
            wi = float(w[i])
            if not math.isfinite(wi):
                cuda.atomic.add(bad, 2, 1)
                cuda.atomic.min(bad, 3, i)
        for s in range(nrows):
            v = float(g[s, i])
            if not math.isfinite(v):
                nbad += 1
                if first < 0 or s * n + i < first:
                    first = s * n + i
            sg += v
            sg2 += v * v
            p = wi * v
            swg += p
            swg2 += p * p
        if n_g.size:
            n_g[i] = t_g[i] + sg
        if n_g2.size:
            n_g2[i] = t_g2[i] + sg2
        if n_wg.size:
            n_wg[i] = t_wg[i] + swg
        if n_wg2.size:
            n_wg2[i] = t_wg2[i] + swg2
    if nbad:
        cuda.atomic.add(bad, 0, nbad)
        cuda.atomic.min(bad, 1, first)


@cuda.jit
def add_into(dst, src):
    """``dst += src`` (merging two accumulators' sums)."""
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        dst[i] += src[i]


SIGNATURES = {
    # gradients, weights (an empty float64 array when the statistics need none), 4 + 4 totals, errors
    "accumulate": combos(lambda g, w: (arr(g, 2), arr(w)) + (arr(f64),) * 8 + (arr(i64),), FLOATS, FLOATS),
    "add_into": [(arr(f64), arr(f64))],
}
