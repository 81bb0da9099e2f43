"""Slow, obviously-correct NumPy versions of every kernel's job."""

import numpy as np


def transform(x, mode):
    x = np.asarray(x, np.float64).reshape(-1)
    return {0: x, 1: np.abs(x), 2: x * x}[mode]


def order(scores):
    """Flat indices in pruning order: ascending score, ties by index."""
    s = np.asarray(scores).reshape(-1)
    if s.dtype == np.float16:
        s = s.astype(np.float32)
    return np.argsort(s, kind="stable")


def keep_mask_sparsity(scores, k):
    """Keep-mask that prunes the k lowest scores (ties: lower index first)."""
    s = np.asarray(scores)
    mask = np.ones(s.size, bool)
    mask[order(s)[:k]] = False
    return mask.reshape(s.shape)


def keep_mask_threshold(scores, t):
    return ~(np.asarray(scores, np.float64) < t)


def kth_smallest(scores, k):
    s = np.sort(np.asarray(scores).reshape(-1), kind="stable")
    return float(s[k - 1])


def global_keep_masks(scores_list, target, lo, hi):
    """Global selection with caps, by definition.

    Walk the entries of all tensors in ascending score order (ties: earlier
    tensor, then lower flat index). After j entries tensor t holds c_t of
    them; the capped total is sum_t clip(c_t, lo_t, hi_t). Stop at the first
    j where it reaches ``target``; tensor t then prunes its own
    clip(c_t, lo_t, hi_t) lowest scores.
    """
    flat = [np.asarray(s, np.float64).reshape(-1) for s in scores_list]
    allv = np.concatenate(flat) if flat else np.zeros(0)
    owner = np.concatenate([np.full(f.size, t) for t, f in enumerate(flat)]) if flat else np.zeros(0, int)
    ordr = np.argsort(allv, kind="stable")
    c = np.zeros(len(flat), int)
    lo = np.asarray(lo)
    hi = np.asarray(hi)
    if np.clip(c, lo, hi).sum() < target:
        for idx in ordr:
            c[owner[idx]] += 1
            if np.clip(c, lo, hi).sum() >= target:
                break
    p = np.clip(c, lo, hi)
    return [keep_mask_sparsity(s, int(k)) for s, k in zip(scores_list, p)]


def csr_parts(dense2d):
    """(data, indices, indptr) of the non-zeros of a 2-D array, row-major."""
    d = np.asarray(dense2d)
    rows, cols = np.nonzero(d)
    indptr = np.zeros(d.shape[0] + 1, np.int64)
    np.add.at(indptr, rows + 1, 1)
    return d[rows, cols], cols, np.cumsum(indptr)


def matmul(dense2d, x):
    return np.asarray(dense2d, np.float64) @ np.asarray(x, np.float64)


def accumulate(batches, weights=None, per_sample=False):
    """Float64 sums of g, g**2, w*g, (w*g)**2 over all samples, element by element."""
    out = None
    for i, g in enumerate(batches):
        g = np.asarray(g, np.float64)
        rows = g if per_sample else g[None]
        w = None if weights is None else np.asarray(weights[i], np.float64)
        for r in rows:
            if out is None:
                out = {k: np.zeros(r.shape) for k in ("g", "g2", "wg", "wg2")}
            out["g"] += r
            out["g2"] += r * r
            if w is not None:
                out["wg"] += w * r
                out["wg2"] += (w * r) ** 2
    return out


def norm(x, mode, kind):
    v = np.abs(transform(x, mode))
    if kind == "l1":
        return v.sum()
    if kind == "l2":
        return np.sqrt((v * v).sum())
    return v.max() if v.size else 0.0


def uniform_codes(acts, nbins):
    """Equal-width codes per unit (units x samples), by the definition."""
    a = np.asarray(acts, np.float64)
    out = np.zeros((a.shape[1], a.shape[0]), np.int64)
    for u in range(a.shape[1]):
        lo, hi = a[:, u].min(), a[:, u].max()
        width = (hi - lo) / nbins
        if width > 0:
            out[u] = np.clip(np.floor((a[:, u] - lo) / width), 0, nbins - 1)
    return out


def mi_counts(x, y, nx, ny):
    """Joint counts of two code vectors by np.histogram2d."""
    h, _, _ = np.histogram2d(x, y, bins=[np.arange(nx + 1) - 0.5, np.arange(ny + 1) - 0.5])
    return h


def mi_from_counts(h):
    """MI in nats of a joint count table, straight from the definition."""
    h = np.asarray(h, np.float64)
    n = h.sum()
    p = h / n
    px = p.sum(axis=1, keepdims=True)
    py = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())
