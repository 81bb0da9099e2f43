"""Selection: which entries to prune, by threshold or by exact count.

Scores are compared through order-preserving integer keys (see
``sparsecore._kernels.keys``). The k-th smallest score of one tensor, or of
many tensors together, is found without sorting and without concatenating the
tensors: from 2**18 elements on, the k-th key is bracketed between two
quantiles of an evenly strided sample and one pass counts the keys below the
bracket and copies the few inside it; otherwise, when the bracket misses, or
when per-tensor caps apply, a radix select histograms the keys level by level
(two passes for float32, four for float64). Both are exact.

Tie-breaking rule: among equal scores, the entry with the smaller flat
(row-major) index is pruned first; across tensors in a global selection, the
tensor that comes first in the mapping's order is pruned first. The answer is
the same on every run and every thread count.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._device import is_device_array, resolve
from ._kernels import cpu_csr, cpu_select, threads_for
from ._kernels.keys import MODE_ABS, MODE_IDENTITY, cut_value, key_of, value_of
from ._source import NORM_KINDS, NORM_NONE, Rule, Source
from ._validate import (
    as_float_array,
    check_fraction,
    check_threshold,
    flat,
    nonfinite_error,
)

__all__ = ["select_threshold", "sparsity_mask", "threshold_mask"]

# Histogram memory for one level of a global selection, all tensors together.
_HIST_BUDGET_BYTES = 32 << 20
# Tensors from this size on are selected by the one-pass sampled bracket
# (tests lower it to run that path on small inputs).
_SAMPLE_MIN = 1 << 18
# Tensors up to this size are selected from their sorted keys: one read, no
# histogram (a radix level's histogram row alone holds 2**16 counts). In a
# global selection their keys are pooled, up to _POOL_BUDGET keys in all
# (the memory of the histograms); tests change both.
_SORT_MAX = 1 << 12
_POOL_BUDGET = _HIST_BUDGET_BYTES // 8
# Elements per segment of a mask-only rule pass, at least.
_SEG_MIN = 1 << 16


def _sorts(size):
    """Whether a tensor of ``size`` entries is selected from its sorted keys
    (the sampled bracket keeps the sizes from ``_SAMPLE_MIN`` on)."""
    return size <= _SORT_MAX and size < _SAMPLE_MIN


def _nchunks(n):
    """Chunks (one per thread) of a pass over ``n`` elements: see ``threads_for``."""
    return threads_for(n)


def _levels(wide, ntensors):
    keybits = 64 if wide else 32
    bits = 16
    while bits > 8 and ntensors * (8 << bits) > _HIST_BUDGET_BYTES:
        bits -= 1
    levels = []
    shift = keybits
    while shift > 0:
        b = min(bits, shift)
        shift -= b
        levels.append((shift, b))
    return levels


def _raise_nonfinite(src, count, first):
    raise nonfinite_error(src.name, src.role, src.errors_index(), count, first)


def each_source(sources, fn, per, executor=None):
    """``[fn(src, *per[t]) for each source t]``, ``None`` where ``per[t]`` is
    None: every pass a selection makes over the data goes through here. In
    this process; or, given an ``executor`` (``executor.map(fn, per)``: a
    checkpoint's shards on a Dask cluster), where the data lives, each
    shard's tensors in one task, only the arguments and results crossing."""
    if executor is not None:
        return executor.map(fn, per)
    return [None if a is None else fn(src, *a) for src, a in zip(sources, per)]


def _hist_part(src, wide, first_level, prefix, shift, bits):
    """One level of the radix select over one source: its histogram of the ``bits`` digits at ``shift`` of
    the keys whose higher digits are ``prefix``."""
    part = np.zeros((_nchunks(src.size), 1 << bits), np.int64)
    bad, first = cpu_select.hist_level(src.data, src.mode, src.inv, src.scaled, wide, first_level,
                                       np.uint64(prefix), shift + bits, shift, bits, part)
    if bad:
        _raise_nonfinite(src, bad, first)
    return part.sum(axis=0)


def _sample_part(src, mt, wide):
    """``mt`` keys of one source, evenly strided (fewer from a smaller tensor)."""
    # A source read from a file offers a cheap subset (every k-th row) to sample.
    data = src.sample_data(mt) if hasattr(src, "sample_data") else src.data
    part = np.empty(min(mt, data.size), np.uint64)
    cpu_select.sample_keys(data, src.mode, src.inv, src.scaled, wide, part)
    return part


def _bracket_cap(size, share):
    """Room per chunk for the keys inside the bracket: twice the ``share`` of them the sample saw."""
    return int(2 * share * size / _nchunks(size)) + 1024


def _range_part(src, wide, lo_key, hi_key, share):
    """``(keys below lo_key, the keys in [lo_key, hi_key])`` of one source,
    or None when a chunk holds more than its room (:func:`_bracket_cap`)."""
    nchunks = _nchunks(src.size)
    cap = _bracket_cap(src.size, share)
    buf = np.empty(cap * nchunks, np.uint64)
    n_less = np.empty(nchunks, np.int64)
    n_cand = np.empty(nchunks, np.int64)
    bad, first = cpu_select.range_pass(src.data, src.mode, src.inv, src.scaled, wide, np.uint64(lo_key),
                                       np.uint64(hi_key), nchunks, cap, buf, n_less, n_cand)
    if bad:
        _raise_nonfinite(src, bad, first)
    if n_cand.max() > cap:
        return None
    return int(n_less.sum()), np.concatenate([buf[c * cap:c * cap + n_cand[c]] for c in range(nchunks)])


def _sorted_keys(src, wide):
    """All keys of one (small) source, sorted; its non-finite scores refused."""
    keys = np.empty(src.size, np.uint64)
    bad, first = cpu_select.all_keys(src.data, src.mode, src.inv, src.scaled, wide, keys)
    if bad:
        _raise_nonfinite(src, bad, first)
    keys.sort()
    return keys


def _counts_of_sorted(keys, T):
    """``(keys < T, keys == T)`` of sorted keys."""
    below = int(np.searchsorted(keys, np.uint64(T), "left"))
    return below, int(np.searchsorted(keys, np.uint64(T), "right")) - below


def _rule_of_sorted(keys, k, wide):
    """:func:`select_one`'s rule for the ``k`` lowest of sorted ``keys``."""
    if k <= 0:
        return Rule(0, 0, wide)
    T = int(keys[k - 1])
    below, ties = _counts_of_sorted(keys, T)
    return _rule_for(T, ties, k - below, wide)


def _pool_keys(sources, wide, executor=None):
    """``(pooled, keys, offs)``: which sources of a global selection are
    selected from their sorted keys (those of at most ``_SORT_MAX`` entries,
    in order, while the keys held stay within ``_POOL_BUDGET``), and those
    keys, each pooled source's sorted and laid end to end in ``keys``, the
    ``i``-th pooled source's at ``[offs[i], offs[i+1])``. One pass over them,
    the only one before the rules."""
    ntens = len(sources)
    pooled = np.zeros(ntens, np.bool_)
    if not ntens or sources[0].on_device:
        return pooled, None, None
    sizes = np.fromiter((src.size for src in sources), np.int64, ntens)
    sorts = (sizes <= _SORT_MAX) & (sizes < _SAMPLE_MIN)  # _sorts, for all at once
    if int(sizes[sorts].sum()) <= _POOL_BUDGET:  # all of them fit (always, but for a test's budget)
        pooled = sorts
    else:  # in order, while the keys held stay within the budget
        room = _POOL_BUDGET
        for t in np.flatnonzero(sorts).tolist():
            if sizes[t] <= room:
                pooled[t] = True
                room -= int(sizes[t])
    if not pooled.any():
        return pooled, None, None
    where = np.flatnonzero(pooled)
    taken = [sources[t] for t in where.tolist()]
    offs = np.zeros(len(taken) + 1, np.int64)
    np.cumsum(sizes[where], out=offs[1:])
    if executor is not None:  # a cluster's sources: each shard's keys where it lives
        per = [(wide,) if p else None for p in pooled.tolist()]
        keys = np.concatenate([k for k in each_source(sources, _sorted_keys, per, executor) if k is not None])
        return pooled, keys, offs
    keys = np.empty(int(offs[-1]), np.uint64)
    start = 0
    while start < len(taken):  # runs of sources whose keys one kernel call makes (a file's tiny tensors)
        form = _run_form(taken[start])
        end, total = start + 1, taken[start].size
        while end < len(taken) and _run_form(taken[end]) == form and total + taken[end].size <= _RUN_MAX:
            total += taken[end].size
            end += 1
        run = taken[start:end]
        joined = getattr(run[0], "joined_data", None)  # a file's sources read their run at once
        data = joined(run) if joined is not None else np.concatenate([src.data for src in run])
        inv = np.array([src.inv for src in run], np.float64)
        bad = cpu_select.sorted_keys_runs(data, offs[start:end + 1] - offs[start], run[0].mode, inv,
                                          bool(run[0].scaled), wide, keys[offs[start]:offs[end]])
        if bad >= 0:
            _sorted_keys(run[bad], wide)  # names the tensor and its first non-finite score
        start = end
    return pooled, keys, offs


#: Entries of one run of small sources whose keys are made at once, at most.
_RUN_MAX = 1 << 20


def _run_form(src):
    """What the sources of one run share: their data's dtype, their scores' form."""
    return src.dtype, src.mode, bool(src.scaled)


def _pool_hist(keys, first, prefix, shift, bits):
    """One radix level's histogram of pooled keys (see :func:`_hist_part`)."""
    if not first:
        keys = keys[(keys >> np.uint64(shift + bits)) == np.uint64(prefix)]
    digits = (keys >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
    return np.bincount(digits.astype(np.intp), minlength=1 << bits)


def _active(ntens, skip):
    return [t for t in range(ntens) if skip is None or not skip[t]]


def _search(sources, lo, hi, target, wide, pool=None, skip=None, executor=None):
    """Smallest key T whose capped count sum_t clip(#{key_t <= T}, lo_t, hi_t)
    reaches ``target``. Returns ``(T, below, ties)``: per tensor the count of
    keys < T and == T. ``pool``: keys that count as one more tensor without
    caps, standing for the sources that ``skip`` marks (their counts are 0
    here)."""
    if sources and sources[0].on_device:
        from ._cuda import select as device_select

        return device_select.search(sources, lo, hi, target, wide)
    ntens = len(sources)
    active = _active(ntens, skip)
    lo, hi = lo[active], hi[active]
    if pool is not None:
        lo, hi = np.append(lo, 0), np.append(hi, pool.size)
    rows = lo.size
    below = np.zeros(rows, np.int64)
    prefix = 0
    hist = None
    d = 0
    for li, (shift, bits) in enumerate(_levels(wide, rows)):
        hist = np.zeros((rows, 1 << bits), np.int64)
        per = [None] * ntens
        for t in active:
            per[t] = (wide, li == 0, prefix, shift, bits)
        parts = each_source(sources, _hist_part, per, executor)
        for r, t in enumerate(active):
            hist[r] = parts[t]
        if pool is not None:
            hist[-1] = _pool_hist(pool, li == 0, prefix, shift, bits)
        d = cpu_select.pick_digit(hist, below, lo, hi, target)
        prefix = (prefix << bits) | int(d)
    below_all, ties_all = np.zeros(ntens, np.int64), np.zeros(ntens, np.int64)
    below_all[active] = below[:len(active)]
    ties_all[active] = hist[:len(active), d]
    return prefix, below_all, ties_all


def _rule_for(T, ties, extra, wide):
    """The rule pruning keys below ``T`` and ``extra`` of its ``ties``."""
    if extra >= ties:
        return Rule(T + 1, 0, wide)
    return Rule(T, extra, wide)


def select_rules(sources, counts=None, target=None, lo=None, hi=None, executor=None):
    """Exact selection rules.

    ``counts``: per-tensor numbers to prune (local). Or ``target`` (a total
    over all sources) with per-tensor caps ``lo``/``hi`` (global).
    """
    if counts is not None:
        return [select_one(src, int(k)) for src, k in zip(sources, counts)]
    wide = any(s.needs_wide() for s in sources) or len({s.dtype for s in sources}) > 1
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    if target == int(lo.sum()):
        return [select_one(src, int(k), wide) for src, k in zip(sources, lo)]
    sizes = np.array([src.size for src in sources], np.int64)
    # Small tensors are pooled: tensor t's capped count clip(#{key <= T}, lo_t, hi_t) is lo_t plus the
    # count of its keys of ranks lo_t + 1 .. hi_t that are <= T, so their keys of those ranks, pooled,
    # count as one tensor without caps, and target drops by their lo_t.
    pooled, keys, offs = _pool_keys(sources, wide, executor)
    pool, k = None, target
    if pooled.any():
        k -= int(lo[pooled].sum())
        sizes_p = np.diff(offs)  # each pooled tensor's keys of ranks lo_t + 1 .. hi_t
        rank = np.arange(offs[-1]) - np.repeat(offs[:-1], sizes_p)
        pool = keys[(rank >= np.repeat(lo[pooled], sizes_p)) & (rank < np.repeat(hi[pooled], sizes_p))]
    found = None
    if pooled.all():  # 1 <= k <= pool.size: the plain k-th of the pool
        pool.partition(k - 1)
        found = int(pool[k - 1]), np.zeros(len(sources), np.int64), np.zeros(len(sources), np.int64)
    else:
        if pool is not None and pool.size == 0:  # the pooled tensors' caps fix their counts
            pool = None
        big = ~pooled
        if not lo[big].any() and np.array_equal(hi[big], sizes[big]):  # no caps: the plain k-th of all keys
            found = _search_sampled(sources, k, wide, pool, pooled, executor)
        if found is None:
            found = _search(sources, lo, hi, k, wide, pool, pooled, executor)
    T, below, ties = found
    slot = np.full(len(sources), -1, np.int64)  # a pooled tensor's place among the pooled
    if pooled.any():
        slot[pooled] = np.arange(len(offs) - 1)
        below_p, ties_p = np.empty(len(offs) - 1, np.int64), np.empty(len(offs) - 1, np.int64)
        cpu_select.counts_in_runs(keys, offs, np.uint64(T), below_p, ties_p)
        below[pooled], ties[pooled] = below_p, ties_p
    base = np.clip(below, lo, hi)
    room = np.clip(below + ties, lo, hi) - base
    rest = target - int(base.sum())
    rules, own = [], []
    # Python ints, not NumPy scalars: this loop runs once per tensor, and a file may hold 100,000
    for t, (b, r, bl, n_t) in enumerate(zip(base.tolist(), room.tolist(), below.tolist(), ties.tolist())):
        extra = min(r, rest)
        rest -= extra
        p = b + extra
        if bl <= p <= bl + n_t:
            rules.append(_rule_for(T, n_t, p - bl, wide))
            own.append(None)
        elif pooled[t]:  # a cap binds beyond the global threshold: the tensor's own p smallest
            rules.append(_rule_of_sorted(keys[offs[slot[t]]:offs[slot[t] + 1]], p, wide))
            own.append(None)
        else:
            rules.append(None)
            own.append((p, wide))
    capped = each_source(sources, select_one, own, executor)
    return [r if r is not None else c for r, c in zip(rules, capped)]


def _search_one(src, k, wide):
    """``(T, below, ties)`` of the k-th smallest key (1 <= k <= n) of one tensor."""
    if not src.on_device and _sorts(src.size):
        keys = _sorted_keys(src, wide)
        T = int(keys[k - 1])
        return (T, *_counts_of_sorted(keys, T))
    found = _search_sampled([src], k, wide)
    if found is None:
        found = _search([src], np.zeros(1, np.int64), np.array([src.size], np.int64), k, wide)
    T, below, ties = found
    return T, int(below[0]), int(ties[0])


def _search_sampled(sources, k, wide, pool=None, skip=None, executor=None):
    """The k-th smallest key of all sources together, in one pass instead of
    two to four: bracket it between two quantiles of an evenly strided
    sample, count the keys below the bracket and copy the few inside it,
    then select among those. Returns ``(T, below, ties)`` per source like
    :func:`_search`, or None (the caller falls back to the radix passes)
    when the tensors are small, or the bracket misses or holds more keys
    than the buffer: adversarial orders, heavy ties. ``pool`` and ``skip``:
    as for :func:`_search`."""
    ntens = len(sources)
    active = _active(ntens, skip)
    sizes = [sources[t].size for t in active]
    psize = 0 if pool is None else pool.size
    n = sum(sizes) + psize
    if n < _SAMPLE_MIN or n == 0 or sources[0].on_device:
        return None
    m_all = min(max(n // 256, 1024), 1 << 20, n)
    # proportional, at least one of a non-empty tensor
    per = [None] * ntens
    for t, size in zip(active, sizes):
        per[t] = (min(size, -(-m_all * size // n)), wide)
    got = each_source(sources, _sample_part, per, executor)
    parts = [got[t] for t in active]
    if psize:
        mp = min(psize, -(-m_all * psize // n))
        parts.append(pool[np.arange(mp, dtype=np.int64) * psize // mp])
    sample = np.concatenate(parts)
    m = sample.size
    q = k / n
    margin = 3.0 * np.sqrt(max(q * (1.0 - q), 1.0 / m) / m) + 2.0 / m
    j_lo = int(np.floor((q - margin) * m))
    j_hi = int(np.ceil((q + margin) * m))
    at = [j for j in (j_lo, j_hi) if 0 <= j < m]
    if at:
        sample.partition(at)
    lo_key = sample[j_lo] if j_lo >= 0 else np.uint64(0)
    hi_key = sample[j_hi] if j_hi < m else np.uint64(0xFFFFFFFFFFFFFFFF)
    frac = (min(j_hi, m) - max(j_lo, 0) + 1) / m
    per = [None] * ntens
    for t, part in zip(active, parts):
        # room for twice the share of this tensor's own sample inside the bracket
        share = max(int(np.count_nonzero((part >= lo_key) & (part <= hi_key))) / max(part.size, 1), frac)
        if _bracket_cap(sources[t].size, share) * _nchunks(sources[t].size) > max(sources[t].size // 8, 1 << 16):
            return None  # the bracket is too wide to pay off
        per[t] = (wide, int(lo_key), int(hi_key), share)
    got = each_source(sources, _range_part, per, executor)
    found = [got[t] for t in active]
    if psize:
        found.append((int(np.count_nonzero(pool < lo_key)), pool[(pool >= lo_key) & (pool <= hi_key)]))
    if any(f is None for f in found):
        return None
    less = np.array([f[0] for f in found], np.int64)
    cands = [f[1] for f in found]
    total_less = int(less.sum())
    cand = np.concatenate(cands)
    if not (total_less < k <= total_less + cand.size):
        return None
    cand.partition(k - total_less - 1)
    T = cand[k - total_less - 1]
    below = less + np.array([np.count_nonzero(c < T) for c in cands], np.int64)
    ties = np.array([np.count_nonzero(c == T) for c in cands], np.int64)
    below_all, ties_all = np.zeros(ntens, np.int64), np.zeros(ntens, np.int64)
    below_all[active] = below[:len(active)]
    ties_all[active] = ties[:len(active)]
    return int(T), below_all, ties_all


def select_one(src, k, wide=None):
    """The rule pruning the ``k`` lowest scores of one source (ties: lower flat index first)."""
    if wide is None:
        wide = src.needs_wide()
    if k <= 0:
        return Rule(0, 0, wide)
    T, below, ties = _search_one(src, k, wide)
    return _rule_for(T, ties, k - below, wide)


def threshold_rule(src, threshold):
    """The rule that prunes scores strictly below ``threshold``."""
    wide = src.needs_wide()
    t = float(threshold)
    if not wide:
        with np.errstate(over="ignore"):
            t32 = np.float32(t)
        if float(t32) < t:
            t32 = np.nextafter(t32, np.float32(np.inf))
        t = t32
    return Rule(key_of(t, wide), 0, wide)


def apply_rule(weights_flat, src, rule, nseg, *, want_mask=True, want_csr=False,
               index_dtype=None, weights_name=None, weights_original=None):
    """Apply ``rule``: returns ``(mask or None, (data, indices, indptr) or None)``.

    A parallel count pass over weights and scores writes the keep-mask, a bit
    set of the kept non-zeros and their count per segment (one bit per
    element: 1/32 of a float32 weight's size); a prefix sum sizes the CSR
    exactly; a parallel fill writes the entries from the bit sets, reading
    the weights only where they are kept. Rows whose ties at the threshold
    key are kept under a quota (a sparsity target that splits equal scores)
    are rescanned instead. No dense masked temporary is formed.
    ``index_dtype(nnz)`` picks the CSR index dtype.
    """
    s = src.data
    n = weights_flat.size
    # With no quota every tie is kept: the bits hold key >= T. With one, the
    # bits hold key > T and the fill adds the kept ties. The kernels compare
    # scores with the floats these keys stand for.
    cut = cut_value(rule.key if rule.quota == 0 else rule.key + 1, rule.wide)
    T = cut_value(rule.key, rule.wide)
    seglen = -(-n // nseg) if nseg else 0
    bitmap = np.empty((nseg, -(-seglen // 64)), np.uint64)
    kept_nz, bad_w, bad_s = (np.empty(nseg, np.int64) for _ in range(3))
    tie_total, tie_nz = np.zeros(nseg, np.int64), np.zeros(nseg, np.int64)  # kept 0 without a quota
    mask = np.empty(n if want_mask else 0, np.bool_)
    cpu_csr.seg_count(weights_flat, s, src.mode, src.inv, src.scaled, rule.wide, cut, T, rule.quota > 0, nseg,
                      bitmap, kept_nz, tie_total, tie_nz, bad_w, bad_s, want_mask, mask)
    if bad_w.any():
        count, first = cpu_select.first_nonfinite(weights_flat)
        raise nonfinite_error(weights_name or src.name, "weights",
                              weights_original if weights_original is not None else weights_flat,
                              count, first)
    if bad_s.any():  # a one-bit histogram pass finds the first one
        _raise_nonfinite(src, *cpu_select.hist_level(
            s, src.mode, src.inv, src.scaled, rule.wide, True, np.uint64(0), 64, 63, 1,
            np.zeros((1, 2), np.int64)))
    tie_start = np.zeros(nseg, np.int64)
    if nseg > 1:
        np.cumsum(tie_total[:-1], out=tie_start[1:])
    row_nnz = kept_nz
    if rule.quota:
        pruned_ties = np.clip(rule.quota - tie_start, 0, tie_total)
        row_nnz = kept_nz + np.where(pruned_ties == 0, tie_nz, 0)
        for r in np.nonzero((pruned_ties > 0) & (pruned_ties < tie_total))[0]:
            row_nnz[r] += cpu_csr.seg_kept_ties_nz(weights_flat, s, src.mode, src.inv, src.scaled,
                                                   rule.wide, T, rule.quota, int(tie_start[r]), int(r), nseg)
    row_start = np.zeros(nseg + 1, np.int64)
    np.cumsum(row_nnz, out=row_start[1:])
    nnz = int(row_start[-1]) if want_csr else 0
    idt = index_dtype(nnz) if want_csr else np.int64
    data = np.empty(nnz, weights_flat.dtype)
    indices = np.empty(nnz, idt)
    if want_csr or (want_mask and rule.quota):
        cpu_csr.seg_fill(weights_flat, s, src.mode, src.inv, src.scaled, rule.wide, T, rule.quota, tie_start,
                         tie_total, nseg, bitmap, row_start, want_csr, data, indices, want_mask, mask)
    if not want_csr:
        return mask, None
    return (mask if want_mask else None), (data, indices, row_start.astype(idt))


def mask_nseg(n):
    """Segments of a mask-only rule pass over ``n`` entries: four per thread
    that the pass gets (see ``threads_for``), each of at least ``_SEG_MIN``."""
    threads = threads_for(n)
    return 1 if threads == 1 else max(1, min(4 * threads, n // _SEG_MIN))


def scores_source(scores, name="scores", mode=MODE_IDENTITY, role="scores", absolute=False, device="cpu"):
    """A :class:`Source` over ``scores``; on the GPU (``device="cuda"``, or
    ``"auto"`` with a device array) a ``sparsecore.cuda.DeviceSource``."""
    if absolute:
        mode = MODE_ABS
    if resolve(device, scores) == "cuda":
        from ._cuda import select as device_select

        return device_select.device_source(name, scores, mode, role)
    arr = as_float_array(scores, name, role)
    return Source(name, flat(arr), arr.shape, mode, role=role, original=arr)


def weights_array(a, name, on_device, role="weights"):
    """``a`` as float32/float64 weights: a host array (float16 upcast), or
    with ``on_device`` a contiguous float device array."""
    if on_device:
        from ._cuda import arrays as device_arrays

        return device_arrays.float_array(a, name, role)
    return as_float_array(a, name, role)


def weights_source(w, name, mode):
    """A source scoring float weights ``w`` themselves (``mode``: ``|w|`` or
    ``w²``), read in place, on the host or the device like ``w``."""
    if is_device_array(w):
        from ._cuda import select as device_select

        return device_select.device_source(name, w, mode, role="weights")
    return Source(name, flat(w), tuple(w.shape), mode, role="weights", original=w)


def kept_count(mask, other=None):
    """Kept entries of a flat keep-mask (host or device), after ``mask &= other`` when given."""
    if is_device_array(mask):
        from ._cuda import select as device_select

        return device_select.count_kept(mask, other)
    if other is not None:
        mask &= flat(other)
    return int(np.count_nonzero(mask))


def row_mask(src, fraction, column_block=None):
    """Flat keep-mask pruning, in every row of the source's 2-D view (and
    within each block of ``column_block`` consecutive columns of a row),
    exactly ``round(fraction * entries)`` of its lowest scores; ties: lower
    index first. Host sources only."""
    if src.on_device:
        raise ValueError(f"scope='row' of {src.name!r}: row selection runs on the CPU for now; pass device='cpu'")
    shape = tuple(src.shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = src.size // max(rows, 1)
    if src.size:
        count, first = cpu_select.first_nonfinite(src.data)
        if count:
            _raise_nonfinite(src, count, first)
    keys = np.empty(src.size, np.uint64)
    cpu_select.sample_keys(src.data, src.mode, src.inv, src.scaled, src.needs_wide(), keys)
    keys = keys.reshape(rows, cols)
    keep = np.ones((rows, cols), np.bool_)
    step = cols if column_block is None else int(column_block)
    for c0 in range(0, cols, max(step, 1)):
        c1 = min(c0 + step, cols)
        k = round(fraction * (c1 - c0))
        if k:
            order = np.argsort(keys[:, c0:c1], axis=1, kind="stable")[:, :k]
            np.put_along_axis(keep[:, c0:c1], order, False, axis=1)
    return keep.reshape(-1)


def mask_from(src, rule):
    """The keep-mask of a source under ``rule``, shaped like the source (on
    the device for a device source)."""
    return masked_count(src, rule)[0]


def masked_count(src, rule):
    """``(keep-mask shaped like the source, entries the rule prunes)``; on the
    device the count comes from the pass that checks the scores."""
    if src.on_device:
        from ._cuda import select as device_select

        return device_select.mask_of(src, rule)
    mask, _ = apply_rule(src.data, src, rule, mask_nseg(src.size), want_mask=True)
    return mask.reshape(src.shape), int(mask.size - np.count_nonzero(mask))


def threshold_mask(scores: ArrayLike, threshold: float, *, device: str = "auto") -> np.ndarray:
    """Keep-mask of the scores at or above ``threshold``.

    The rule of the reference article: an entry is pruned where its score is
    strictly below the threshold.

    Parameters
    ----------
    scores : array_like of float
        Importance scores, any shape. float16 is compared in float32.
    threshold : float
        Scores ``< threshold`` are pruned. Must not be NaN.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores, anything with
        ``__cuda_array_interface__``) computes the mask on the GPU and
        returns a numba device array.

    Returns
    -------
    numpy.ndarray of bool
        ``True`` where the entry is kept, shaped like ``scores``.

    Raises
    ------
    TypeError
        For non-float scores.
    ValueError
        For NaN or Inf scores, or a NaN threshold.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.threshold_mask(np.array([0.1, 0.5, 0.3]), 0.3)
    array([False,  True,  True])
    """
    t = check_threshold(threshold, "scores")
    src = scores_source(scores, device=device)
    return mask_from(src, threshold_rule(src, t))


def sparsity_mask(scores: ArrayLike, sparsity: float, *, absolute: bool = False,
                  device: str = "auto") -> np.ndarray:
    """Keep-mask that prunes exactly ``round(sparsity * n)`` lowest scores.

    Python's ``round`` counts (as ``torch.nn.utils.prune`` does). Among equal
    scores the entry with the smaller flat index is pruned first.

    Parameters
    ----------
    scores : array_like of float
        Importance scores, any shape.
    sparsity : float
        Fraction in [0, 1] of the entries to prune.
    absolute : bool
        Rank ``|scores|`` (magnitude) without forming it in memory.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with GPU scores): radix histograms and the
        mask on the GPU (the same mask); returns a numba device array.

    Returns
    -------
    numpy.ndarray of bool
        ``True`` where the entry is kept.

    Raises
    ------
    TypeError, ValueError
        For non-float scores, NaN/Inf scores, a sparsity outside [0, 1].

    Notes
    -----
    The k-th score is found by a radix select on order-preserving integer
    keys: two histogram passes for float32, four for float64.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.sparsity_mask(np.array([3.0, 1.0, 1.0, 2.0]), 0.5)
    array([ True, False, False,  True])
    >>> sc.sparsity_mask(np.array([1.0, 1.0, 1.0]), 0.34)   # ties: lower index first
    array([False,  True,  True])
    """
    s = check_fraction(sparsity, "scores")
    src = scores_source(scores, absolute=absolute, device=device)
    k = round(s * src.size)
    return mask_from(src, select_one(src, k))


def select_threshold(scores: ArrayLike, sparsity: float, *, absolute: bool = False, device: str = "auto") -> float:
    """The largest pruned score when ``round(sparsity * n)`` lowest scores go.

    Equals ``np.partition(scores.ravel(), k - 1)[k - 1]`` for ``k >= 1``;
    ``-inf`` when nothing is pruned. With ``absolute=True`` the scores are
    ``|scores|`` (magnitude), never formed in memory. ``device="cuda"`` (or
    ``"auto"`` with GPU scores) selects on the GPU (a float comes back).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.select_threshold(np.array([0.4, 0.1, 0.3, 0.2]), 0.5)
    0.2
    """
    s = check_fraction(sparsity, "scores")
    src = scores_source(scores, absolute=absolute, device=device)
    return kth_value(src, round(s * src.size))


def kth_value(src, k):
    """Value of the k-th smallest score of ``src`` (1-based); -inf for k = 0."""
    if k <= 0:
        return float("-inf")
    wide = src.needs_wide()
    return value_of(_search_one(src, k, wide)[0], wide)


def norm_inverse(src, normalize):
    """1 / the source's norm (1.0 for no normalisation or an all-zero tensor)."""
    kind = NORM_KINDS[normalize]
    if kind == NORM_NONE:
        return 1.0
    if src.on_device:
        from ._cuda import select as device_select

        nrm = device_select.score_norm(src, kind)
    else:
        nrm = cpu_select.score_norm(src.data, src.mode, kind)
    return 1.0 / nrm if nrm > 0 and np.isfinite(nrm) else 1.0
