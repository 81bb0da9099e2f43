"""Histogram mutual-information kernels: binning, joint counts, MI from counts."""

import math

import numpy as np
from numba import njit, prange

_SAMPLE_BLOCK = 64  # samples per block: reads whole rows, writes 64 codes per unit
_COUNT_BLOCK = 256  # samples per block of uniform_label_counts: codes in L2, counters hot



@njit(parallel=True, cache=True)
def column_min_max(x, lo, hi):
    """Per-column minimum and maximum of (samples, units) ``x`` into float64
    ``lo`` and ``hi``; parallel over sample blocks, reading whole rows."""
    nsamp, nunits = x.shape
    nblocks = max(1, min(64, nsamp // 256))
    part_lo = np.empty((nblocks, nunits))
    part_hi = np.empty((nblocks, nunits))
    for b in prange(nblocks):
        s0 = b * nsamp // nblocks
        s1 = (b + 1) * nsamp // nblocks
        pl = part_lo[b]
        ph = part_hi[b]
        row = x[s0]
        for u in range(nunits):
            pl[u] = row[u]
            ph[u] = row[u]
        for s in range(s0 + 1, s1):
            row = x[s]
            for u in range(nunits):
                v = np.float64(row[u])
                pl[u] = min(pl[u], v)
                ph[u] = max(ph[u], v)
    for u in range(nunits):
        lo[u] = part_lo[0, u]
        hi[u] = part_hi[0, u]
    for b in range(1, nblocks):
        for u in range(nunits):
            lo[u] = min(lo[u], part_lo[b, u])
            hi[u] = max(hi[u], part_hi[b, u])


@njit(cache=True)
def _inverse_widths(width):
    inv = np.empty(width.size)
    for u in range(width.size):
        inv[u] = 1.0 / width[u] if width[u] > 0 else 0.0
    return inv


@njit(inline="always", cache=True)
def _block_codes(x, s0, m, lo, inv, topf, tmp):
    """Equal-width codes of samples s0 .. s0+m-1 into ``tmp[u, j]``.

    Reads whole rows (a loop over units that vectorises); clamping before the
    truncation gives floor-then-clip: values outside the fitted range go to
    the first or last bin."""
    for j in range(m):
        row = x[np.uint64(s0 + j)]
        for u in range(row.size):
            v = (np.float64(row[u]) - lo[u]) * inv[u]
            tmp[u, j] = min(max(v, 0.0), topf)


@njit(parallel=True, cache=True)
def uniform_codes(x, lo, width, nbins, out):
    """Equal-width codes: ``out[u, s]`` = bin of ``x[s, u]`` for unit u's
    ``lo[u]`` and bin ``width[u]`` (0 width: a constant unit, code 0).
    Parallel over blocks of samples."""
    nsamp, nunits = x.shape
    inv = _inverse_widths(width)
    topf = np.float64(nbins - 1)
    nblocks = (nsamp + _SAMPLE_BLOCK - 1) // _SAMPLE_BLOCK
    for b in prange(nblocks):
        s0 = b * _SAMPLE_BLOCK
        m = min(nsamp, s0 + _SAMPLE_BLOCK) - s0
        tmp = np.empty((nunits, _SAMPLE_BLOCK), out.dtype)
        _block_codes(x, s0, m, lo, inv, topf, tmp)
        for u in range(nunits):
            out[u, s0:s0 + m] = tmp[u, :m]


@njit(inline="always", cache=True)
def _add_label_counts(h, codes, labels):
    """``h[code, label] += 1`` for one unit's codes and the samples' labels."""
    for j in range(codes.size):
        h[codes[j], np.uint64(labels[j])] += 1


@njit(parallel=True, cache=True)
def uniform_label_counts(x, lo, width, nbins, labels, parts):
    """Per-unit joint counts against labels straight from the activations
    (equal-width bins, the codes of :func:`uniform_codes`), one block of
    samples at a time, never forming all codes: ``parts[c]`` (units x nbins x
    classes) gets chunk c's samples; the caller adds the chunks."""
    nsamp, nunits = x.shape
    nchunks = parts.shape[0]
    inv = _inverse_widths(width)
    topf = np.float64(nbins - 1)
    for c in prange(nchunks):
        h = parts[c]
        tmp = np.empty((nunits, _COUNT_BLOCK), np.uint16)
        a0 = c * nsamp // nchunks
        a1 = (c + 1) * nsamp // nchunks
        for b0 in range(a0, a1, _COUNT_BLOCK):
            m = min(a1, b0 + _COUNT_BLOCK) - b0
            _block_codes(x, b0, m, lo, inv, topf, tmp)
            lab = labels[b0:b0 + m]
            for u in range(nunits):
                _add_label_counts(h[u], tmp[u, :m], lab)


@njit(parallel=True, cache=True)
def edge_codes(x, edges, nbins, out):
    """Codes by inner edges (quantile bins): the number of inner edges
    ``edges[u, 1:nbins]`` that are <= the value."""
    nsamp, nunits = x.shape
    for u in prange(nunits):
        o = out[u]
        inner = edges[u, 1:nbins]
        for s in range(nsamp):
            o[s] = np.searchsorted(inner, np.float64(x[s, u]), side="right")


@njit(parallel=True, cache=True)
def unit_label_counts(codes, labels, counts):
    """``counts[u, code, label] += 1`` over all samples; codes (units x samples)."""
    for u in prange(codes.shape[0]):
        _add_label_counts(counts[u], codes[u], labels)


@njit(parallel=True, cache=True)
def pair_counts(codes_out, codes_in, nb_in, counts):
    """``counts[o, i, a, b] += 1`` for every pair (o, i) and sample with
    codes a = codes_out[o, s], b = codes_in[i, s]. Parallel over output
    units; each pair's histogram is small enough to stay in L1."""
    nout, nsamp = codes_out.shape
    nin = codes_in.shape[0]
    for o in prange(nout):
        row = np.empty(nsamp, np.int64)
        co = codes_out[o]
        for s in range(nsamp):
            row[s] = np.int64(co[s]) * nb_in
        for i in range(nin):
            h = counts[o, i].reshape(-1)
            ci = codes_in[i]
            for s in range(nsamp):
                h[np.uint64(row[s] + ci[s])] += 1


@njit(inline="always", cache=True)
def _xlogx(v, table):
    """v * log(v) for a count v >= 0, from ``table`` when it reaches."""
    if v < table.size:
        return table[v]
    return v * math.log(v) if v > 0 else 0.0


@njit(parallel=True, cache=True)
def pair_mi(codes_out, codes_in, nb_out, nb_in, table, sx_out, sx_in, n, mi, mxy):
    """MI in nats of every pair (o, i), counted and finished pair by pair in
    a per-thread histogram: memory O(threads x bins**2), never the counts of
    all pairs. ``sx_*`` are the units' sums of N_a log N_a over their bins;
    MI = log n + (sum_ab N_ab log N_ab - sx_out[o] - sx_in[i]) / n. ``mxy``
    gets the number of non-empty joint cells (for Miller-Madow)."""
    nout, nsamp = codes_out.shape
    nin = codes_in.shape[0]
    ncell = nb_out * nb_in
    logn = math.log(n)
    for o in prange(nout):
        row = np.empty(nsamp, np.int64)
        co = codes_out[o]
        for s in range(nsamp):
            row[s] = np.int64(co[s]) * nb_in
        h = np.zeros(ncell, np.int64)
        for i in range(nin):
            ci = codes_in[i]
            for s in range(nsamp):
                h[np.uint64(row[s] + ci[s])] += 1
            acc = 0.0
            m = 0
            for c in range(ncell):
                v = h[c]
                if v:
                    acc += _xlogx(v, table)
                    m += 1
                    h[c] = 0
            val = logn + (acc - sx_out[o] - sx_in[i]) / n
            mi[o, i] = val if val > 0 else 0.0
            mxy[o, i] = m


@njit(parallel=True, cache=True)
def mi_from_counts(counts, table, out):
    """For each joint count table ``counts[t]`` (tables x nx x ny): MI in
    nats, the two marginal entropies and the non-empty cells of X, Y and
    (X, Y), into ``out[t, 0:6]``."""
    ntab, nx, ny = counts.shape
    for t in prange(ntab):
        h = counts[t]
        px = np.zeros(nx, np.int64)
        py = np.zeros(ny, np.int64)
        sxy = 0.0
        mxy = 0
        for a in range(nx):
            for b in range(ny):
                v = np.int64(h[a, b])
                if v > 0:
                    px[a] += v
                    py[b] += v
                    sxy += _xlogx(v, table)
                    mxy += 1
        n = 0
        sx = 0.0
        mx = 0
        for a in range(nx):
            if px[a] > 0:
                n += px[a]
                sx += _xlogx(px[a], table)
                mx += 1
        sy = 0.0
        my = 0
        for b in range(ny):
            if py[b] > 0:
                sy += _xlogx(py[b], table)
                my += 1
        if n == 0:
            out[t, :] = 0.0
            continue
        logn = math.log(n)
        mi = logn + (sxy - sx - sy) / n
        out[t, 0] = mi if mi > 0 else 0.0
        out[t, 1] = logn - sx / n
        out[t, 2] = logn - sy / n
        out[t, 3] = mx
        out[t, 4] = my
        out[t, 5] = mxy
