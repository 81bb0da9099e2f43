"""Histogram mutual-information kernels: binning, joint counts, MI from counts."""

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def uniform_codes(x, lo, width, nbins, out):
    """Equal-width codes: ``out[u, s]`` = bin of ``x[s, u]`` for unit u's
    ``lo[u]`` and bin ``width[u]`` (0 width: a constant unit, code 0).
    Values outside the fitted range go to the first or last bin."""
    nsamp, nunits = x.shape
    for u in prange(nunits):
        o = out[u]
        w = width[u]
        base = lo[u]
        if w <= 0:
            o[:] = 0
            continue
        inv = 1.0 / w
        top = nbins - 1
        for s in range(nsamp):
            c = math.floor((np.float64(x[s, u]) - base) * inv)
            if c < 0:
                c = 0
            elif c > top:
                c = top
            o[s] = c


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
    nunits, nsamp = codes.shape
    for u in prange(nunits):
        c = codes[u]
        h = counts[u]
        for s in range(nsamp):
            h[c[s], labels[s]] += 1


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


@njit(parallel=True, cache=True)
def mi_from_counts(counts, out, correction):
    """MI in nats of each joint count table ``counts[t]`` (tables x nx x ny),
    with the Miller-Madow correction when ``correction``. Also returns the
    marginal entropies (for normalisation) in ``out[:, 1:3]``."""
    ntab, nx, ny = counts.shape
    for t in prange(ntab):
        h = counts[t]
        n = 0.0
        px = np.zeros(nx)
        py = np.zeros(ny)
        mxy = 0
        for a in range(nx):
            for b in range(ny):
                v = np.float64(h[a, b])
                if v > 0:
                    px[a] += v
                    py[b] += v
                    n += v
                    mxy += 1
        if n == 0:
            out[t, 0] = 0.0
            out[t, 1] = 0.0
            out[t, 2] = 0.0
            continue
        mi = 0.0
        for a in range(nx):
            if px[a] == 0:
                continue
            for b in range(ny):
                v = np.float64(h[a, b])
                if v > 0:
                    mi += v * math.log(v * n / (px[a] * py[b]))
        mi /= n
        hx = 0.0
        mx = 0
        for a in range(nx):
            if px[a] > 0:
                hx -= px[a] / n * math.log(px[a] / n)
                mx += 1
        hy = 0.0
        my = 0
        for b in range(ny):
            if py[b] > 0:
                hy -= py[b] / n * math.log(py[b] / n)
                my += 1
        if correction:
            mi += (mx + my - mxy - 1) / (2.0 * n)
        if mi < 0 and not correction:
            mi = 0.0  # rounding below zero; MI is non-negative
        out[t, 0] = mi
        out[t, 1] = hx
        out[t, 2] = hy
