"""CUDA twin of ``cpu_accumulate``: the fused gradient statistics.

Same argument order as ``cpu_accumulate.accumulate`` for what both take:
``(g, w, t_g, t_g2, t_wg, t_wg2)``; the device version adds each row's terms
in float64 straight into the float64 totals (no float32 partials: a GPU has
the bandwidth to spare). Grid-stride over elements; each thread loops over
the rows of its elements, so no two threads write the same total.
"""

from numba import cuda


@cuda.jit
def accumulate(g, w, t_g, t_g2, t_wg, t_wg2):
    nrows = g.shape[0]
    n = g.shape[1]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        sg = 0.0
        sg2 = 0.0
        swg = 0.0
        swg2 = 0.0
        wi = 0.0
        if w.size:
            wi = float(w[i])
        for s in range(nrows):
            v = float(g[s, i])
            sg += v
            sg2 += v * v
            p = wi * v
            swg += p
            swg2 += p * p
        if t_g.size:
            t_g[i] += sg
        if t_g2.size:
            t_g2[i] += sg2
        if t_wg.size:
            t_wg[i] += swg
        if t_wg2.size:
            t_wg2[i] += swg2
