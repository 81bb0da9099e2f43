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


def cap_counts(lo, hi, sizes):
    """Per-tensor caps in entries, by definition: ``round(f * n)``, except that a
    cap ``hi < 1`` keeps at least one entry of a non-empty tensor; ``lo`` never
    exceeds ``hi``."""
    his = [min(round(h * n), n - 1) if h < 1 and n > 0 else round(h * n) for h, n in zip(hi, sizes)]
    los = [min(round(x * n), y) for x, n, y in zip(lo, sizes, his)]
    return los, his


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


def nm_keep(scores, n, m, axis):
    """Keep the n highest of each m consecutive entries along ``axis``
    (ties: the lower index is pruned first), group by group."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    keep = np.ones(s.shape, bool)
    for idx in np.ndindex(s.shape[:-1]):
        row = s[idx]
        for g in range(0, row.size, m):
            drop = np.argsort(row[g:g + m], kind="stable")[: m - n]
            keep[idx + (g + drop,)] = False
    return np.moveaxis(keep, -1, axis)


def block_pool(scores2d, r, c, pool):
    """Pooled block scores, block by block, over the entries present."""
    s = np.asarray(scores2d, np.float64)
    R, C = s.shape
    out = np.zeros((-(-R // r), -(-C // c)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            b = s[i * r:(i + 1) * r, j * c:(j + 1) * c]
            out[i, j] = {"mean": b.mean, "max": b.max, "l2": lambda: np.sqrt((b * b).sum())}[pool]()
    return out


def unit_reduce(scores, axis, reduce):
    """Per-unit reduction of the slices along ``axis``."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, 0).reshape(np.shape(scores)[axis], -1)
    f = {"l1": lambda v: np.abs(v).sum(), "l2": lambda v: np.sqrt((v * v).sum()),
         "mean": lambda v: v.mean() if v.size else 0.0, "max": lambda v: v.max() if v.size else -np.inf}[reduce]
    return np.array([f(row) for row in s])


def dense_forward(x, layers, act=lambda z: np.maximum(z, 0.0), unit_masks=None):
    """An MLP by the definition: x @ W.T + b (layout 'oi') or x @ W + b ('io'),
    batch norm in inference form, ReLU between layers; removed units output 0."""
    h = np.asarray(x, np.float64)
    names = list(layers)
    for k, name in enumerate(names):
        lay = layers[name]
        w = np.asarray(lay.weight, np.float64)
        h = h @ (w.T if lay.layout == "oi" else w)
        if lay.bias is not None:
            h = h + lay.bias
        h = batch_norm(h, lay.bn, axis=-1)
        if k < len(names) - 1:
            h = act(h)
        if unit_masks is not None and name in unit_masks:
            h = h * unit_masks[name]
    return h


def batch_norm(h, bn, axis):
    if not bn:
        return h
    shape = [1] * h.ndim
    shape[axis] = -1
    g, b, mu, var = (np.asarray(bn[k], np.float64).reshape(shape) for k in ("gamma", "beta", "mean", "var"))
    return (h - mu) / np.sqrt(var + 1e-5) * g + b


def conv2d_nchw(x, w_oihw, bias):
    """'Valid' cross-correlation of NCHW input with OIHW filters, loop over the kernel."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w_oihw, np.float64)
    n, _, H, W = x.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, H - kh + 1, W - kw + 1))
    for p in range(kh):
        for q in range(kw):
            patch = x[:, :, p:p + H - kh + 1, q:q + W - kw + 1]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, p, q])
    return out + np.asarray(bias, np.float64).reshape(1, -1, 1, 1)


def keep_raw(raw, mask):
    """Bit patterns with the dropped entries zeroed, and the kept non-zero count."""
    out = np.where(mask, raw, 0).astype(raw.dtype)
    return out, int(np.count_nonzero(np.asarray(raw)[mask]))


def obs_sweep(W, H, prune):
    """Optimal Brain Surgeon, one column at a time, naively: column j's pruned
    weights go, and the error moves onto the columns right of it through the
    inverse of H restricted to columns j.. (what SparseGPT's Cholesky sweep
    computes in O(cols³) instead of O(cols⁴))."""
    W = np.array(W, np.float64)
    rows, cols = W.shape
    for j in range(cols):
        F = np.arange(j, cols)
        Hi = np.linalg.inv(np.asarray(H, np.float64)[np.ix_(F, F)])
        for r in range(rows):
            if prune[r, j]:
                W[r, F] -= W[r, j] / Hi[0, 0] * Hi[0, :]
    W[prune] = 0.0
    return W


def sparsegpt_sweep(W, H, *, sparsity=None, nm=None, blocksize=128):
    """SparseGPT with its mask chosen inside the sweep, naively: the OBS
    saliency of column c is w² / [(H restricted to columns c..)⁻¹]₀₀; per
    column block (saliencies from the weights at the block's start) the
    round(sparsity · entries) lowest, or per row at each group of m columns
    (weights as updated so far; the group cut at the block's end) the m - n
    lowest; ties to the lower index. Then ``obs_sweep``'s update."""
    W = np.array(W, np.float64)
    H = np.asarray(H, np.float64)
    rows, cols = W.shape
    prune = np.zeros(W.shape, bool)

    def inv00(c):
        return np.linalg.inv(H[c:, c:])[0, 0]

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if nm is None:
            sal = [(W[r, c] ** 2 / inv00(c), (r - 0) * (b1 - b0) + (c - b0), r, c)
                   for r in range(rows) for c in range(b0, b1)]
            for _, _, r, c in sorted(sal)[:round(sparsity * rows * (b1 - b0))]:
                prune[r, c] = True
        for j in range(b0, b1):
            if nm is not None and j % nm[1] == 0:
                group = range(j, min(j + nm[1], b1))
                for r in range(rows):
                    order = sorted(group, key=lambda c: (W[r, c] ** 2 / inv00(c), c))
                    prune[r, order[:nm[1] - nm[0]]] = True
            Hi = np.linalg.inv(H[j:, j:])
            for r in range(rows):
                if prune[r, j]:
                    W[r, j:] -= W[r, j] / Hi[0, 0] * Hi[0, :]
    W[prune] = 0.0
    return W, prune


def refit_lstsq(W, X, keep, X_hat=None):
    """Per row: the least-squares weights over the kept columns, min ‖X w − X ŵ‖ (X: samples x features),
    or, given the inputs ``X_hat`` the pruned model gives, min ‖X w − X_hat ŵ‖."""
    W = np.asarray(W, np.float64)
    X_hat = X if X_hat is None else X_hat
    out = np.zeros_like(W)
    for r in range(W.shape[0]):
        K = np.flatnonzero(keep[r])
        out[r, K] = np.linalg.lstsq(X_hat[:, K], X @ W[r], rcond=None)[0]
    return out


def row_keep(scores, fraction, block=None):
    """Per row (and column block), the round(fraction * n) lowest scores pruned, lower index first on ties."""
    s = np.asarray(scores, np.float64).reshape(scores.shape[0] if scores.ndim >= 2 else 1, -1)
    keep = np.ones(s.shape, bool)
    step = block or s.shape[1]
    for r in range(s.shape[0]):
        for c0 in range(0, s.shape[1], step):
            part = s[r, c0:c0 + step]
            k = round(fraction * part.size)
            order = sorted(range(part.size), key=lambda i: (part[i], i))[:k]
            keep[r, [c0 + i for i in order]] = False
    return keep.reshape(scores.shape)


def owl_sparsities(scores, groups, sparsity, m=5.0, lam=0.08):
    """OWL's layer-wise sparsities, as its authors' code computes them: per
    group the fraction of scores above m times their mean, scaled to
    [0, 2 lam], keep ratios 1 - sparsity + (r - mean r)."""
    labels = []
    for n in scores:
        if groups[n] not in labels:
            labels.append(groups[n])
    lod = []
    for g in labels:
        s = np.concatenate([np.ravel(scores[n]) for n in scores if groups[n] == g]).astype(np.float64)
        lod.append(sum(1 for v in s if v > m * s.mean()) / len(s))
    lod = np.array(lod)
    if lod.max() > lod.min():
        r = (lod - lod.min()) * (1 / (lod.max() - lod.min()) * lam * 2)
    else:
        r = np.zeros(len(lod))
    keep = r - np.mean(r) + (1 - sparsity)
    return {n: 1 - keep[labels.index(groups[n])] for n in scores}


def damped_reversed(H, damp):
    """``J (H + λI) J`` with ``λ = damp ·`` mean diagonal (a dead input, zero diagonal, counted as 1 and made
    independent first), and the dead inputs."""
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(H))) if len(H) else 0.0
    return (H + lam * np.eye(len(H)))[::-1, ::-1], dead


def batch_keep(scores_list, rules):
    """Keep-masks of small tensors one by one: a rule ``("count", k)`` prunes the k lowest scores (ties: lower
    index first); ``("cut", t, quota, lo, hi)`` prunes scores below ``t`` and the first ``quota`` equal to it,
    and, when that count leaves ``[lo, hi]``, the clipped count of lowest scores instead."""
    out = []
    for s, rule in zip(scores_list, rules):
        s = np.asarray(s, np.float64).reshape(-1)
        if rule[0] == "count":
            out.append(keep_mask_sparsity(s, rule[1]))
            continue
        _, t, quota, lo, hi = rule
        keep = ~(s < t)
        ties = np.flatnonzero(s == t)[:quota]
        keep[ties] = False
        p = int((~keep).sum())
        if not lo <= p <= hi:
            keep = keep_mask_sparsity(s, min(max(p, lo), hi))
        out.append(keep)
    return out


def sorted_scores(scores_list, mode, invs, scaled, wide):
    """Each tensor's scores (transformed by ``mode``, times ``inv`` when ``scaled``), sorted ascending: float64
    when ``wide``, else float32."""
    out = []
    for s, inv in zip(scores_list, invs):
        v = transform(s, mode)
        if wide:
            out.append(np.sort(v * inv if scaled else v))
        else:
            out.append(np.sort(transform(np.asarray(s, np.float32), mode).astype(np.float32)))
    return out


def below_and_ties(sorted_list, v):
    """Per sorted array: how many entries are below ``v``, how many equal it."""
    return [int((s < v).sum()) for s in sorted_list], [int((s == v).sum()) for s in sorted_list]


def packed_delta8(dense2d):
    """(row offsets, uint8 steps, values) of the delta8 encoding, entry by entry:
    each non-zero's column step from the previous one (from column 0), gaps
    over 255 bridged by fillers of step 255 and value 0."""
    ptr, deltas, vals = [0], [], []
    for row in np.asarray(dense2d):
        prev = 0
        for c in np.flatnonzero(row):
            gap = int(c) - prev
            while gap > 255:
                deltas.append(255)
                vals.append(0.0)
                gap -= 255
            deltas.append(gap)
            vals.append(row[c])
            prev = int(c)
        ptr.append(len(deltas))
    return np.array(ptr, np.int64), np.array(deltas, np.uint8), np.array(vals, np.float64)


def packed_bitmask(dense2d):
    """(uint64 words, row by row, bit j of word w for column 64*w + j; values in order)."""
    d = np.asarray(dense2d)
    rows, cols = d.shape
    words = np.zeros((rows, -(-cols // 64)), np.uint64)
    for r in range(rows):
        for c in np.flatnonzero(d[r]):
            words[r, c // 64] |= np.uint64(1) << np.uint64(c % 64)
    return words, d[d != 0].astype(np.float64)


def packed_nm(dense2d, n, m):
    """(uint64 words, values) of the N:M encoding: per group of m columns, the
    kept values in column order padded to n with zeros at position 0, each
    position in ceil(log2 m) bits, 64 // (n * bits) groups to a word."""
    d = np.asarray(dense2d)
    rows, cols = d.shape
    bits = max(1, int(np.ceil(np.log2(m))))
    gpw = 64 // (n * bits)
    groups = -(-cols // m)
    words = np.zeros((rows, -(-groups // gpw)), np.uint64)
    vals = np.zeros((rows, groups, n))
    for r in range(rows):
        for g in range(groups):
            kept = np.flatnonzero(d[r, g * m:(g + 1) * m])
            assert len(kept) <= n
            for s, pos in enumerate(kept):
                vals[r, g, s] = d[r, g * m + pos]
                shift = ((g % gpw) * n + s) * bits
                words[r, g // gpw] |= np.uint64(pos) << np.uint64(shift)
    return words, vals.reshape(-1)


def half_bits(x, dtype):
    """IEEE half or bfloat16 bits (uint16) of float values, rounded to nearest even, one by one."""
    out = []
    for v in np.asarray(x, np.float32).reshape(-1):
        if dtype == "float16":
            out.append(int(np.float16(v).view(np.uint16)))
        else:
            b = int(np.float32(v).view(np.uint32))
            out.append(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)
    return np.array(out, np.uint16).reshape(np.shape(x))


def half_value(bits, dtype):
    """float64 of half or bfloat16 bits."""
    b = np.asarray(bits, np.uint16)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def unpack(encoding, shape, vals, ptr=None, deltas=None, words=None, n=0, m=0):
    """Dense float64 matrix of packed arrays, entry by entry (values already widened to floats);
    ``None`` where the arrays do not describe a matrix of ``shape`` (an index out of range, a
    column repeated or falling within a row, a count that does not add up)."""
    rows, cols = shape
    out = np.zeros(shape)
    vals = np.asarray(vals, np.float64)
    if encoding in ("delta8", "bitmask"):
        if len(ptr) != rows + 1 or ptr[0] != 0 or any(ptr[r + 1] < ptr[r] for r in range(rows)):
            return None
    if encoding == "delta8":
        if ptr[-1] != len(deltas) or len(deltas) != len(vals):
            return None
        for r in range(rows):
            col = 0
            for i, p in enumerate(range(ptr[r], ptr[r + 1])):
                if i and deltas[p] == 0:
                    return None
                col += int(deltas[p])
                if col >= cols:
                    return None
                out[r, col] = vals[p]
    elif encoding == "bitmask":
        if ptr[-1] > len(vals) or np.shape(words) != (rows, -(-cols // 64)):
            return None
        for r in range(rows):
            p = ptr[r]
            for c in range(np.shape(words)[1] * 64):
                if int(words[r, c // 64]) >> (c % 64) & 1:
                    if c >= cols or p >= ptr[r + 1]:
                        return None
                    out[r, c] = vals[p]
                    p += 1
            if p != ptr[r + 1]:
                return None
    else:
        bits = max(1, int(np.ceil(np.log2(m))))
        gpw = 64 // (n * bits)
        groups = -(-cols // m)
        if len(vals) != rows * groups * n or np.shape(words) != (rows, -(-groups // gpw)):
            return None
        for r in range(rows):
            for g in range(groups):
                seen = set()
                for s in range(n):
                    v = vals[(r * groups + g) * n + s]
                    pos = int(words[r, g // gpw]) >> (((g % gpw) * n + s) * bits) & ((1 << bits) - 1)
                    if v != 0:
                        if pos >= m or g * m + pos >= cols or pos in seen:
                            return None
                        seen.add(pos)
                        out[r, g * m + pos] = v
    return out
