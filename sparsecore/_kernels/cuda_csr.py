"""CUDA twins of ``cpu_csr``: CSR construction under a selection rule, and CSR products.

Scores are read as their IEEE bit patterns (the array viewed as uint32 or
uint64; a uint8 keep-mask also serves, its keys ordering 0 below 1) and
compared as the order-preserving keys of ``keys.py`` (``cuda_select.key_of_bits``): an entry is
pruned when its key is below ``T``, or equal to ``T`` and among the first
``quota`` such ties in flat (row-major) order, as on the CPU. ``absolute``
drops the sign bit first (magnitude).

Construction runs one block per row (grid-stride over rows): each thread
takes a contiguous chunk of the row, counts, and a block-wide scan in shared memory orders the chunks, so
row order is kept without atomics. Three passes: ties per row (only with a
quota, and the tie offsets of a chunk only in rows whose ties the quota
splits), kept non-zeros per row, then the fill; the host turns the per-row
counts into offsets (one small array each way).
"""

from numba import cuda, float64, int64

from ._signatures import FLOATS, INDEX, KEYS, arr, b1, combos, i64, u64, wider
from .cuda_select import key_of_bits

MAX_THREADS = 256  # most threads of a row block and of csr_matvec_vector (their shared arrays)
SCAN_SLOTS = MAX_THREADS + 1  # a shared size must be a literal or a bare global name to compile


@cuda.jit(device=True, inline=True)
def _block_scan(vals, tid, nthreads):
    """Exclusive scan of ``vals[:nthreads]`` in shared memory; returns the total."""
    cuda.syncthreads()
    if tid == 0:
        run = int64(0)
        for t in range(nthreads):
            v = vals[t]
            vals[t] = run
            run += v
        vals[nthreads] = run
    cuda.syncthreads()
    return vals[nthreads]


@cuda.jit(device=True, inline=True)
def _ties_before(sbits, lo, hi, T, absolute, wide, shared, tid, nt):
    """Count the keys equal to ``T`` in this thread's chunk ``[lo, hi)`` of
    the row, scan across the block: returns the row's ties before the chunk
    (``shared[nt]`` then holds the row's total)."""
    t = int64(0)
    for i in range(lo, hi):
        if key_of_bits(sbits[i], absolute, wide) == T:
            t += 1
    shared[tid] = t
    _block_scan(shared, tid, nt)
    return shared[tid]


@cuda.jit(device=True, inline=True)
def _row_chunk(r, cols):
    """``(thread, threads, lo, hi)``: this thread's contiguous chunk
    ``[lo, hi)`` of row ``r`` (flat indices)."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    return tid, nt, r * cols + tid * cols // nt, r * cols + (tid + 1) * cols // nt


@cuda.jit(device=True, inline=True)
def _tie_offset(sbits, lo, hi, T, absolute, wide, shared, tid, nt, pruned_ties):
    """The row's ties before this chunk, counted only when the row prunes
    some ties (``pruned_ties`` is the same for the whole block, so every
    thread takes the same branch); else 0, which keeps every tie."""
    if pruned_ties == 0:
        return int64(0)
    return _ties_before(sbits, lo, hi, T, absolute, wide, shared, tid, nt)


@cuda.jit(device=True, inline=True)
def _keep(k, T, tie_index, pruned_ties):
    return k > T or (k == T and tie_index >= pruned_ties)


@cuda.jit(device=True, inline=True)
def _kept_in_chunk(sbits, w, lo, hi, T, absolute, wide, tie, pruned_ties):
    """``(kept non-zero entries, NaN/Inf weights)`` of the chunk, its first tie being number ``tie`` of the row."""
    c = int64(0)
    nb = int64(0)
    for i in range(lo, hi):
        k = key_of_bits(sbits[i], absolute, wide)
        x = float64(w[i])
        if x != x or x - x != 0:  # NaN or Inf weight
            nb += 1
        if _keep(k, T, tie, pruned_ties) and w[i] != 0:
            c += 1
        if k == T:
            tie += 1
    return c, nb


@cuda.jit
def row_ties(sbits, cols, T, absolute, wide, ties):
    """Per row: entries whose key equals ``T``."""
    shared = cuda.shared.array(SCAN_SLOTS, int64)
    for r in range(cuda.blockIdx.x, ties.size, cuda.gridDim.x):  # a block per row, grid-stride over rows
        tid, nt, lo, hi = _row_chunk(r, cols)
        _ties_before(sbits, lo, hi, T, absolute, wide, shared, tid, nt)
        if tid == 0:
            ties[r] = shared[nt]
        cuda.syncthreads()  # the total is read before the next row's counts overwrite it


@cuda.jit
def row_kept(sbits, w, cols, T, absolute, wide, pruned_ties, counts, bad):
    """Per row: kept entries whose weight is non-zero (NaN/Inf weights counted in ``bad``)."""
    shared = cuda.shared.array(SCAN_SLOTS, int64)
    for r in range(cuda.blockIdx.x, counts.size, cuda.gridDim.x):
        tid, nt, lo, hi = _row_chunk(r, cols)
        tie = _tie_offset(sbits, lo, hi, T, absolute, wide, shared, tid, nt, pruned_ties[r])
        c, nb = _kept_in_chunk(sbits, w, lo, hi, T, absolute, wide, tie, pruned_ties[r])
        cuda.syncthreads()  # every thread has read its tie offset before the counts overwrite them
        shared[tid] = c
        total = _block_scan(shared, tid, nt)
        if tid == 0:
            counts[r] = total
        if nb:
            cuda.atomic.add(bad, 0, nb)
        cuda.syncthreads()


# Twin of cpu_csr.seg_fill: the GPU must reproduce the CPU's CSR structure and values.
@cuda.jit
def row_fill(sbits, w, cols, T, absolute, wide, pruned_ties, indptr, data, indices):
    """Write the kept non-zeros of each row at ``indptr[r]``, in column order."""
    shared = cuda.shared.array(SCAN_SLOTS, int64)
    for r in range(cuda.blockIdx.x, pruned_ties.size, cuda.gridDim.x):
        tid, nt, lo, hi = _row_chunk(r, cols)
        pr = pruned_ties[r]
        tie = _tie_offset(sbits, lo, hi, T, absolute, wide, shared, tid, nt, pr)
        c, _ = _kept_in_chunk(sbits, w, lo, hi, T, absolute, wide, tie, pr)
        cuda.syncthreads()
        shared[tid] = c
        _block_scan(shared, tid, nt)
        p = indptr[r] + shared[tid]
        for i in range(lo, hi):
            k = key_of_bits(sbits[i], absolute, wide)
            if _keep(k, T, tie, pr) and w[i] != 0:
                data[p] = w[i]
                indices[p] = i - r * cols
                p += 1
            if k == T:
                tie += 1
        cuda.syncthreads()


# Twin of cpu_csr.seg_count's mask: the GPU must reproduce the CPU's bits.
@cuda.jit
def row_mask(sbits, cols, T, absolute, wide, pruned_ties, mask):
    """The keep-mask of the rule (kept = key above ``T``, or a tie past the row's quota)."""
    shared = cuda.shared.array(SCAN_SLOTS, int64)
    for r in range(cuda.blockIdx.x, pruned_ties.size, cuda.gridDim.x):
        tid, nt, lo, hi = _row_chunk(r, cols)
        pr = pruned_ties[r]
        tie = _tie_offset(sbits, lo, hi, T, absolute, wide, shared, tid, nt, pr)
        for i in range(lo, hi):
            k = key_of_bits(sbits[i], absolute, wide)
            mask[i] = _keep(k, T, tie, pr)
            if k == T:
                tie += 1
        cuda.syncthreads()


@cuda.jit
def csr_matvec(data, indices, indptr, x, out):
    """``out = A @ x``: a thread per row (grid-stride), float64 sums."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for r in range(start, out.size, stride):
        s = 0.0
        for p in range(indptr[r], indptr[r + 1]):
            s += float64(data[p]) * float64(x[indices[p]])
        out[r] = s


@cuda.jit(device=True, inline=True)
def store_row_sum(part, s, tid, lane, vec, out, r):
    """Add a row's ``vec`` per-thread sums by a tree in ``part`` (shared)
    and write ``out[r]``. Every thread of the block calls it (barriers).
    The row products with ``vec`` threads a row (CSR here, the packed
    formats in ``cuda_packed``) end with it."""
    part[tid] = s
    cuda.syncthreads()
    step = vec // 2
    while step > 0:
        if lane < step:
            part[tid] += part[tid + step]
        cuda.syncthreads()
        step //= 2
    if lane == 0 and r < out.size:
        out[r] = part[tid]
    cuda.syncthreads()  # the sum is read before the next rows overwrite ``part``


@cuda.jit
def csr_matvec_vector(data, indices, indptr, x, out, vec):
    """``out = A @ x`` with ``vec`` threads per row (a power of two dividing
    the block): each reads every ``vec``-th entry of the row, so a warp's
    loads of ``data`` and ``indices`` are contiguous, then a tree reduction in
    shared memory; float64 sums. For rows with many entries."""
    shared = cuda.shared.array(MAX_THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % vec
    per_block = cuda.blockDim.x // vec
    for base in range(cuda.blockIdx.x * per_block, out.size, cuda.gridDim.x * per_block):
        r = base + tid // vec
        s = 0.0
        if r < out.size:
            for p in range(indptr[r] + lane, indptr[r + 1], vec):
                s += float64(data[p]) * float64(x[indices[p]])
        store_row_sum(shared, s, tid, lane, vec, out, r)


@cuda.jit
def csr_matmat(data, indices, indptr, x, out):
    """``out = A @ X``: a thread per output entry (row r, column j), grid-stride
    in both axes; the threads of a warp share the row and read consecutive
    columns of X."""
    j0, r0 = cuda.grid(2)
    sj, sr = cuda.gridsize(2)
    for r in range(r0, out.shape[0], sr):
        for j in range(j0, out.shape[1], sj):
            s = 0.0
            for p in range(indptr[r], indptr[r + 1]):
                s += data[p] * x[indices[p], j]
            out[r, j] = s


SIGNATURES = {
    "row_ties": combos(lambda k: (arr(k), i64, u64, b1, b1, arr(i64)), KEYS),
    "row_kept": combos(lambda k, w: (arr(k), arr(w), i64, u64, b1, b1, arr(i64), arr(i64), arr(i64)), KEYS, FLOATS),
    "row_fill": combos(lambda k, w, ix: (arr(k), arr(w), i64, u64, b1, b1, arr(i64), arr(ix), arr(w), arr(ix)),
                       KEYS, FLOATS, INDEX),
    "row_mask": combos(lambda k: (arr(k), i64, u64, b1, b1, arr(i64), arr(b1)), KEYS),
    "csr_matvec": combos(lambda d, x, ix: (arr(d), arr(ix), arr(ix), arr(x), arr(wider(d, x))),
                         FLOATS, FLOATS, INDEX),
    "csr_matvec_vector": combos(lambda d, x, ix: (arr(d), arr(ix), arr(ix), arr(x), arr(wider(d, x)), i64),
                                FLOATS, FLOATS, INDEX),
    "csr_matmat": combos(lambda d, x, ix: (arr(d), arr(ix), arr(ix), arr(x, 2), arr(wider(d, x), 2)),
                         FLOATS, FLOATS, INDEX),
}
