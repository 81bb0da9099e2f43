"""CUDA twins of ``cpu_mi``: equal-width binning, label counts, pairwise MI.

Same argument order as the CPU kernels. ``pair_mi`` gives every (out, in)
pair a thread that counts its joint histogram in local memory (at most
``MAX_CELLS`` cells) and finishes the MI itself, so the counts of all pairs
never exist at once.
"""

import math

from numba import cuda, float64, int32, int64, uint8

MAX_CELLS = 1024  # nb_out * nb_in per pair (32 x 32 bins)


@cuda.jit
def uniform_codes(x, lo, inv, topf, out):
    """``out[u, s]`` = equal-width bin of ``x[s, u]`` (floor, clipped to the end bins)."""
    u, s = cuda.grid(2)
    if s < x.shape[0] and u < x.shape[1]:
        v = (float64(x[s, u]) - lo[u]) * inv[u]
        out[u, s] = uint8(min(max(v, 0.0), topf))


@cuda.jit
def unit_label_counts(codes, labels, counts):
    """``counts[u, code, label] += 1`` over samples (atomics: units share no counter)."""
    u, s = cuda.grid(2)
    if u < codes.shape[0] and s < codes.shape[1]:
        cuda.atomic.add(counts, (u, int64(codes[u, s]), int64(labels[s])), 1)


@cuda.jit(device=True, inline=True)
def _xlogx(v, table):
    if v < table.size:
        return table[v]
    return float64(v) * math.log(float64(v))


@cuda.jit
def pair_mi(codes_out, codes_in, nb_out, nb_in, table, sx_out, sx_in, n, mi, mxy):
    """MI in nats of every pair: log n + (Σ N_ab log N_ab - sx_out[o] - sx_in[i]) / n."""
    i, o = cuda.grid(2)
    if o >= codes_out.shape[0] or i >= codes_in.shape[0]:
        return
    h = cuda.local.array(MAX_CELLS, int32)
    ncell = nb_out * nb_in
    for c in range(ncell):
        h[c] = 0
    nsamp = codes_out.shape[1]
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
    maps ``(N, C, S)`` or, ``channels_last``, ``(N, S, C)``."""
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
    """``counts[u, code] += 1`` over samples (the marginal histograms)."""
    u, s = cuda.grid(2)
    if u < codes.shape[0] and s < codes.shape[1]:
        cuda.atomic.add(counts, (u, int64(codes[u, s])), 1)


@cuda.jit
def pair_counts(codes_out, codes_in, nb_in, counts):
    """``counts[o, i, a, b] += 1`` for each sample of the batch (a thread per pair owns its table)."""
    i, o = cuda.grid(2)
    if o >= codes_out.shape[0] or i >= codes_in.shape[0]:
        return
    for s in range(codes_out.shape[1]):
        counts[o, i, int32(codes_out[o, s]), int32(codes_in[i, s])] += 1
