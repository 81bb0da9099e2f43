"""CUDA twins of ``cpu_mi``: equal-width binning, label counts, pairwise MI.

Same argument order as the CPU kernels. ``pair_mi`` gives every (out, in)
pair a thread that counts its joint histogram in local memory (at most
``MAX_CELLS`` cells) and finishes the MI itself, so the counts of all pairs
never exist at once.
"""

import math

from numba import cuda, float64, int32, int64, uint8

from ._signatures import FLOATS, INDEX, KEYS, arr, b1, combos, f64, i64

MAX_CELLS = 1024  # nb_out * nb_in per pair (32 x 32 bins)


# Twin of cpu_mi.uniform_codes: the GPU must reproduce the CPU's bits.
@cuda.jit
def uniform_codes(x, lo, inv, topf, out):
    """``out[u, s]`` = equal-width bin of ``x[s, u]`` (floor, clipped to the
    end bins); grid-stride over the flat (sample, unit) index, so that
    consecutive threads read consecutive units."""
    units = x.shape[1]
    for i in range(cuda.grid(1), x.shape[0] * units, cuda.gridsize(1)):
        s = i // units
        u = i % units
        v = (float64(x[s, u]) - lo[u]) * inv[u]
        out[u, s] = uint8(min(max(v, 0.0), topf))


@cuda.jit
def unit_label_counts(codes, labels, counts):
    """``counts[u, code, label] += 1`` over samples (atomics); grid-stride
    over the flat (unit, sample) index."""
    n = codes.shape[1]
    for i in range(cuda.grid(1), codes.shape[0] * n, cuda.gridsize(1)):
        u = i // n
        s = i % n
        cuda.atomic.add(counts, (u, int64(codes[u, s]), int64(labels[s])), 1)


# Twin of cpu_mi._xlogx: the GPU must reproduce the CPU's arithmetic.
@cuda.jit(device=True, inline=True)
def _xlogx(v, table):
    if v < table.size:
        return table[v]
    return float64(v) * math.log(float64(v))


# Twin of cpu_mi.pair_mi: the GPU must reproduce the CPU's counts (the MI within float64 rounding).
@cuda.jit
def pair_mi(codes_out, codes_in, nb_out, nb_in, table, sx_out, sx_in, n, mi, mxy):
    """MI in nats of every pair: log n + (Σ N_ab log N_ab - sx_out[o] - sx_in[i]) / n
    (a thread per pair, grid-stride in both axes)."""
    h = cuda.local.array(MAX_CELLS, int32)
    ncell = nb_out * nb_in
    nsamp = codes_out.shape[1]
    i0, o0 = cuda.grid(2)
    si, so = cuda.gridsize(2)
    for o in range(o0, codes_out.shape[0], so):
        for i in range(i0, codes_in.shape[0], si):
            for c in range(ncell):
                h[c] = 0
            for s in range(nsamp):
                h[int32(codes_out[o, s]) * nb_in + int32(codes_in[i, s])] += 1
            acc = 0.0
            m = 0
            for c in range(ncell):
                v = h[c]
                if v:
                    acc += _xlogx(v, table)
                    m += 1
            val = math.log(float64(n)) + (acc - sx_out[o] - sx_in[i]) / n
            mi[o, i] = val if val > 0 else 0.0
            mxy[o, i] = m


@cuda.jit
def column_min_max(x, lo, hi, bad):
    """Fold the per-column minimum and maximum of (samples, units) ``x`` into
    float64 ``lo``/``hi`` (start them at +inf/-inf; a thread per unit, so
    batches fold in one after another); non-finite values are counted into
    ``bad[0]``, the first flat index into ``bad[1]``."""
    for u in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        a = lo[u]
        b = hi[u]
        for s in range(x.shape[0]):
            v = float64(x[s, u])
            if not math.isfinite(v):
                cuda.atomic.add(bad, 0, 1)
                cuda.atomic.min(bad, 1, s * x.shape[1] + u)
            a = min(a, v)
            b = max(b, v)
        lo[u] = a
        hi[u] = b


@cuda.jit
def channel_reduce(x, C, S, channels_last, op, out):
    """``out[n, c]``: the mean (``op`` 0, float64 sum) or the maximum (``op``
    1) of channel ``c`` of sample ``n`` over its ``S`` positions, for flat
    maps ``(N, C, S)`` or, ``channels_last``, ``(N, S, C)``. ``S >= 1``: the
    host refuses maps without positions."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = i // C
        c = i % C
        t = 0.0 if op == 0 else -math.inf
        for p in range(S):
            v = float64(x[(n * S + p) * C + c] if channels_last else x[(n * C + c) * S + p])
            if op == 0:
                t += v
            elif v > t or v != v:  # NaN propagates, as NumPy's max
                t = v
        out[n, c] = t / S if op == 0 else t


@cuda.jit
def feature_sq(x, N, C, S, channels_last, out):
    """``out[c] += Σ x²`` over samples and positions of channel (feature) ``c``
    of flat ``(N, C, S)`` or, ``channels_last``, ``(N, S, C)`` inputs."""
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        t = 0.0
        for n in range(N):
            for p in range(S):
                v = float64(x[(n * S + p) * C + c] if channels_last else x[(n * C + c) * S + p])
                t += v * v
        out[c] += t


@cuda.jit
def unit_bin_counts(codes, counts):
    """``counts[u, code] += 1`` over samples (the marginal histograms);
    grid-stride over the flat (unit, sample) index."""
    n = codes.shape[1]
    for i in range(cuda.grid(1), codes.shape[0] * n, cuda.gridsize(1)):
        cuda.atomic.add(counts, (i // n, int64(codes[i // n, i % n])), 1)


@cuda.jit
def pair_counts(codes_out, codes_in, nb_in, counts):
    """``counts[o, i, a, b] += 1`` for each sample of the batch (a thread per
    pair owns its table; grid-stride in both axes)."""
    i0, o0 = cuda.grid(2)
    si, so = cuda.gridsize(2)
    for o in range(o0, codes_out.shape[0], so):
        for i in range(i0, codes_in.shape[0], si):
            for s in range(codes_out.shape[1]):
                counts[o, i, int32(codes_out[o, s]), int32(codes_in[i, s])] += 1


u8 = KEYS[2]
SIGNATURES = {
    "uniform_codes": combos(lambda x: (arr(x, 2), arr(f64), arr(f64), f64, arr(u8, 2)), FLOATS),
    "unit_label_counts": combos(lambda y: (arr(u8, 2), arr(y), arr(i64, 3)), (i64, u8)),  # class ids; target codes
    "pair_mi": [(arr(u8, 2), arr(u8, 2), i64, i64, arr(f64), arr(f64), arr(f64), i64, arr(f64, 2), arr(i64, 2))],
    "column_min_max": combos(lambda x: (arr(x, 2), arr(f64), arr(f64), arr(i64)), FLOATS),
    "channel_reduce": combos(lambda x: (arr(x), i64, i64, b1, i64, arr(x, 2)), FLOATS),
    "feature_sq": combos(lambda x: (arr(x), i64, i64, i64, b1, arr(f64)), FLOATS),
    "unit_bin_counts": [(arr(u8, 2), arr(i64, 2))],
    "pair_counts": [(arr(u8, 2), arr(u8, 2), i64, arr(INDEX[0], 4))],
}
