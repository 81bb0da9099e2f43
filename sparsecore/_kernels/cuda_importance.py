"""CUDA kernels for the built-in gradient criteria (the CPU computes them
with NumPy in ``sparsecore/importance.py``).

The same float64 operations in the same order as the NumPy expressions, so
the scores, and the masks they select, equal the CPU's bit for bit.
"""

from numba import cuda, float64

from ._signatures import FLOATS, arr, combos, f64, i64

TAYLOR_G = 0  # |w * sum g|             (weights fixed while accumulating)
TAYLOR_SQUARED_G2 = 1  # w**2 * sum g**2
OBD = 2  # 0.5 * w**2 * sum g**2
WANDA = 3  # |w| * ||x_j||, x_j the input feature: index (i // B) % L
ABS = 4  # |a|                       (taylor from sum w*g)


# Twin of importance's NumPy criteria: the GPU must reproduce the CPU's bits.
@cuda.jit
def criterion_scores(w, a, L, B, out, kind):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        x = float64(w[i]) if w.size else 0.0
        if kind == TAYLOR_G:
            out[i] = abs(x * float64(a[i]))
        elif kind == TAYLOR_SQUARED_G2:
            out[i] = (x * x) * float64(a[i])
        elif kind == OBD:
            out[i] = (0.5 * (x * x)) * float64(a[i])
        elif kind == WANDA:
            out[i] = abs(x) * float64(a[(i // B) % L])
        else:
            out[i] = abs(float64(a[i]))


SIGNATURES = {
    "criterion_scores": combos(lambda w, a: (arr(w), arr(a), i64, i64, arr(f64), i64), FLOATS, FLOATS),
}
