"""CUDA twins of ``cpu_packed``'s products: delta8, bitmask and N:M packed
matrices times a vector and times a matrix; and of its dense copies (the
prefill route's matrix, written straight from the packed arrays).

The layouts are ``cpu_packed``'s, and so is the argument order (``vec``,
the threads per row, replaces ``nchunks``; the N:M constants ``n, m, bits,
gpw`` follow as runtime arguments, since a CUDA kernel is specialised by
its argument types only). The kernels tell the value kind by the dtype of
``vals``: float32, float64, float16 (IEEE half: the host views the stored
uint16 bits as float16) or uint16 (bfloat16 bits). ``widen`` takes each
value to float32 as it is read (float64 values stay float64), and the
products accumulate in float32, float64 where the values or ``x`` are
float64.

Vector products run ``vec`` threads per row (a power of two up to a warp,
picked by the host from the stored entries per row, dividing the block),
and combine the row's per-thread sums by a tree in shared memory, as
``cuda_csr.csr_matvec_vector`` does. A warp shuffle would spare the shared
memory and the block barriers, but Numba's CUDA simulator, where these
kernels are tested, implements no shuffle; the tree is ``log2(vec)`` steps
per row group, small beside a row's reads, and this keeps one kernel for
the simulator and the GPU. A thread group rather than one thread per row
because a decode step's matrix has a few thousand rows: a thread each would
leave most of a GPU idle and read each row with one thread. How the threads
share a row:

- **delta8**: each thread takes a contiguous chunk of the row's entries; a
  column is the sum of the steps before it, so each sums its chunk's steps
  first, and its first column is the sum of the chunks before it (read from
  shared memory after a barrier).
- **bitmask**: thread ``t`` takes the columns ``64 w + j`` with
  ``j = t (mod vec)`` of every word: all threads read the same word, and a
  set bit's value sits at the row's offset plus the popcount of the word's
  bits below it, so no thread waits on another. Adjacent threads read
  adjacent columns of ``x`` and values.
- **nm**: thread ``t`` takes the groups ``g = t (mod vec)``: a group's
  values and positions are found by arithmetic alone.

Matrix products (``x`` of ``k`` columns) run a thread per output entry
``(r, j)`` with a 2-D grid-stride loop, as ``cuda_csr.csr_matmat``: the
threads of a warp share the row (its steps, words and values are read once
for all of them) and read consecutive columns of ``x``.

Padding and fillers are stored zeros, multiplied like any value (as on the
CPU); a position at or past the last column (a partial last N:M group) is
skipped.
"""

from llvmlite import ir
from numba import cuda, float32, float64, int64, types, uint64
from numba.cuda.core import config

from ._signatures import arr, i64, u64
from .cuda_csr import store_row_sum

MAX_THREADS = 256  # most threads of a vector product's block (its shared arrays)


def acc_of(v):
    """The result dtype of a product with values ``v``: float64 for float64 values, else float32."""
    return types.float64 if v == types.float64 else types.float32


if config.ENABLE_CUDASIM:
    # The simulator runs kernels as Python and cannot run an intrinsic (LLVM
    # IR): there ``widen`` is this NumPy twin.
    import numpy as np

    def widen(v):
        """float32 of a bfloat16's uint16 bits or of a float16; float32/float64 as they are."""
        if v.dtype == np.uint16:
            return (np.uint32(v) << np.uint32(16)).view(np.float32)
        if v.dtype == np.float16:
            return np.float32(v)
        return v
else:
    from numba.cuda.extending import intrinsic

    @intrinsic
    def widen(typingctx, v):
        """float32 of a bfloat16's uint16 bits (moved to the top of a 32-bit
        word and bit-cast: exact, one shift) or of a float16 (``cvt.f32.f16``);
        float32/float64 as they are. Dispatched on the type at compile time.
        An intrinsic because numba-cuda's ``overload`` and ``array.view``
        compile through a device dispatcher that asks the driver for the
        GPU's compute capability, which the PTX gate (no GPU) has not."""
        if v in (types.float32, types.float64):
            return v(v), lambda context, builder, signature, args: args[0]
        if v == types.float16:
            return types.float32(v), lambda context, builder, signature, args: context.cast(
                builder, args[0], types.float16, types.float32)
        if v != types.uint16:
            return None

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

        return types.float32(types.uint16), codegen


# ---------------------------------------------------------------- vector products

@cuda.jit(device=True, inline=True)
def _row_of(vec):
    """``(row, lane, rows a block, first row of the block)``: the row this
    thread shares with ``vec - 1`` others, and its lane in the row."""
    tid = cuda.threadIdx.x
    per_block = cuda.blockDim.x // vec
    return tid // vec, tid % vec, per_block, cuda.blockIdx.x * per_block


# Twin of cpu_packed.delta8_matvec.
@cuda.jit
def delta8_matvec(ptr, deltas, vals, x, out, vec):
    """``out = P @ x``, ``vec`` threads per row, each a contiguous chunk of
    the row's entries: its steps summed first, then its first column from the
    chunks before it (shared memory), then its products."""
    part = cuda.shared.array(MAX_THREADS, float64)
    steps = cuda.shared.array(MAX_THREADS, int64)
    tid = cuda.threadIdx.x
    rid, lane, per_block, first = _row_of(vec)
    for base in range(first, out.size, cuda.gridDim.x * per_block):  # the same trip count for the whole block
        r = base + rid
        lo = int64(0)
        hi = int64(0)
        if r < out.size:
            a = ptr[r]
            n = ptr[r + 1] - a
            lo = a + lane * n // vec
            hi = a + (lane + 1) * n // vec
        step = int64(0)
        for p in range(lo, hi):
            step += deltas[p]
        steps[tid] = step
        cuda.syncthreads()
        col = int64(0)
        for t in range(tid - lane, tid):
            col += steps[t]
        s = float32(0)
        for p in range(lo, hi):
            col += deltas[p]
            s += widen(vals[p]) * x[col]
        store_row_sum(part, s, tid, lane, vec, out, r)  # its barriers also guard ``steps``


# Twin of cpu_packed.bitmask_matvec.
@cuda.jit
def bitmask_matvec(ptr, words, vals, x, out, vec):
    """``out = P @ x``, ``vec`` threads per row: thread ``t`` takes the set
    bits ``j = t (mod vec)`` of each word, a bit's value at the row's offset
    plus the popcount of the bits below it."""
    part = cuda.shared.array(MAX_THREADS, float64)
    tid = cuda.threadIdx.x
    rid, lane, per_block, first = _row_of(vec)
    one = uint64(1)
    mine = uint64(0)  # this lane's bit positions
    for j in range(lane, 64, vec):
        mine |= one << uint64(j)
    for base in range(first, out.size, cuda.gridDim.x * per_block):
        r = base + rid
        s = float32(0)
        if r < out.size:
            p = ptr[r]
            for w in range(words.shape[1]):
                word = words[r, w]
                bits = word & mine
                while bits:
                    low = bits & (~bits + one)
                    at = p + int64(cuda.popc(word & (low - one)))
                    s += widen(vals[at]) * x[64 * w + int64(cuda.popc(low - one))]
                    bits ^= low
                p += int64(cuda.popc(word))
        store_row_sum(part, s, tid, lane, vec, out, r)


# Twin of cpu_packed.nm_matvec.
@cuda.jit
def nm_matvec(words, vals, x, out, groups, cols, n, m, bits, gpw, vec):
    """``out = P @ x``, ``vec`` threads per row, thread ``t`` the groups
    ``g = t (mod vec)``."""
    part = cuda.shared.array(MAX_THREADS, float64)
    tid = cuda.threadIdx.x
    rid, lane, per_block, first = _row_of(vec)
    pm = (uint64(1) << uint64(bits)) - uint64(1)
    for base in range(first, out.size, cuda.gridDim.x * per_block):
        r = base + rid
        s = float32(0)
        if r < out.size:
            row = r * groups * n
            for g in range(lane, groups, vec):
                word = words[r, g // gpw]
                shift = (g % gpw) * n * bits
                for e in range(n):
                    col = g * m + int64((word >> uint64(shift + e * bits)) & pm)
                    if col < cols:
                        s += widen(vals[row + g * n + e]) * x[col]
        store_row_sum(part, s, tid, lane, vec, out, r)


# ---------------------------------------------------------------- matrix products

# Twin of cpu_packed.delta8_matmat.
@cuda.jit
def delta8_matmat(ptr, deltas, vals, x, out):
    """``out = P @ X``: a thread per output entry ``(r, j)``, grid-stride in both axes."""
    j0, r0 = cuda.grid(2)
    sj, sr = cuda.gridsize(2)
    for r in range(r0, out.shape[0], sr):
        for j in range(j0, out.shape[1], sj):
            s = float32(0)
            col = int64(0)
            for p in range(ptr[r], ptr[r + 1]):
                col += deltas[p]
                s += widen(vals[p]) * x[col, j]
            out[r, j] = s


# Twin of cpu_packed.bitmask_matmat.
@cuda.jit
def bitmask_matmat(ptr, words, vals, x, out):
    """``out = P @ X``: a thread per output entry ``(r, j)``, each walking the
    row's set bits (lowest first: the column is the popcount below the bit)."""
    j0, r0 = cuda.grid(2)
    sj, sr = cuda.gridsize(2)
    one = uint64(1)
    for r in range(r0, out.shape[0], sr):
        for j in range(j0, out.shape[1], sj):
            s = float32(0)
            p = ptr[r]
            for w in range(words.shape[1]):
                bits = words[r, w]
                while bits:
                    low = bits & (~bits + one)
                    s += widen(vals[p]) * x[64 * w + int64(cuda.popc(low - one)), j]
                    p += 1
                    bits ^= low
            out[r, j] = s


# Twin of cpu_packed.nm_matmat.
@cuda.jit
def nm_matmat(words, vals, x, out, groups, cols, n, m, bits, gpw):
    """``out = P @ X``: a thread per output entry ``(r, j)``, grid-stride in both axes."""
    j0, r0 = cuda.grid(2)
    sj, sr = cuda.gridsize(2)
    pm = (uint64(1) << uint64(bits)) - uint64(1)
    for r in range(r0, out.shape[0], sr):
        row = r * groups * n
        for j in range(j0, out.shape[1], sj):
            s = float32(0)
            w = 0  # the group's word and its slot there, counted (no division per group)
            slot = 0
            for g in range(groups):
                word = words[r, w]
                for e in range(n):
                    col = g * m + int64((word >> uint64((slot * n + e) * bits)) & pm)
                    if col < cols:
                        s += widen(vals[row + g * n + e]) * x[col, j]
                slot += 1
                if slot == gpw:
                    slot = 0
                    w += 1
            out[r, j] = s


# ---------------------------------------------------------------- dense copies

# Twin of cpu_packed.delta8_dense.
@cuda.jit
def delta8_dense(ptr, deltas, vals, out):
    """``out`` = the dense matrix: a thread per row (grid-stride), the row
    zeroed, then its values added at their columns (fillers add zero)."""
    r0 = cuda.grid(1)
    for r in range(r0, out.shape[0], cuda.gridsize(1)):
        for c in range(out.shape[1]):
            out[r, c] = 0
        col = int64(0)
        for p in range(ptr[r], ptr[r + 1]):
            col += deltas[p]
            out[r, col] += widen(vals[p])


# Twin of cpu_packed.bitmask_dense.
@cuda.jit
def bitmask_dense(ptr, words, vals, out):
    """``out`` = the dense matrix: a thread per row (grid-stride)."""
    r0 = cuda.grid(1)
    one = uint64(1)
    for r in range(r0, out.shape[0], cuda.gridsize(1)):
        for c in range(out.shape[1]):
            out[r, c] = 0
        p = ptr[r]
        for w in range(words.shape[1]):
            bits = words[r, w]
            while bits:
                low = bits & (~bits + one)
                out[r, 64 * w + int64(cuda.popc(low - one))] = widen(vals[p])
                p += 1
                bits ^= low


# Twin of cpu_packed.nm_dense.
@cuda.jit
def nm_dense(words, vals, out, groups, cols, n, m, bits, gpw):
    """``out`` = the dense matrix: a thread per row (grid-stride); a position
    at or past the last column (padding of a partial group) is skipped."""
    r0 = cuda.grid(1)
    pm = (uint64(1) << uint64(bits)) - uint64(1)
    for r in range(r0, out.shape[0], cuda.gridsize(1)):
        for c in range(out.shape[1]):
            out[r, c] = 0
        p = r * groups * n
        for g in range(groups):
            word = words[r, g // gpw]
            for e in range(n):
                col = g * m + int64((word >> uint64(((g % gpw) * n + e) * bits)) & pm)
                if col < cols:
                    out[r, col] += widen(vals[p])
                p += 1


_u8 = types.uint8
# (values, x) pairs the host code launches: x converted to float32 (float64 for float64 values), or a device
# x taken as it is, float64 beside float32 values; the half types never meet a float64 x from the host.
PAIRS = [(types.float32, types.float32), (types.float16, types.float32), (types.uint16, types.float32),
         (types.float64, types.float64), (types.float32, types.float64)]


VALUES = (types.float32, types.float16, types.uint16, types.float64)  # the value dtypes a dense copy reads


def _pairs(build):
    return [tuple(build(v, x)) for v, x in PAIRS]


SIGNATURES = {
    "delta8_matvec": _pairs(lambda v, x: (arr(i64), arr(_u8), arr(v), arr(x), arr(acc_of(v)), i64)),
    "bitmask_matvec": _pairs(lambda v, x: (arr(i64), arr(u64, 2), arr(v), arr(x), arr(acc_of(v)), i64)),
    "nm_matvec": _pairs(lambda v, x: (arr(u64, 2), arr(v), arr(x), arr(acc_of(v)), *(i64,) * 7)),
    "delta8_matmat": _pairs(lambda v, x: (arr(i64), arr(_u8), arr(v), arr(x, 2), arr(acc_of(v), 2))),
    "bitmask_matmat": _pairs(lambda v, x: (arr(i64), arr(u64, 2), arr(v), arr(x, 2), arr(acc_of(v), 2))),
    "nm_matmat": _pairs(lambda v, x: (arr(u64, 2), arr(v), arr(x, 2), arr(acc_of(v), 2), *(i64,) * 6)),
    "delta8_dense": [(arr(i64), arr(_u8), arr(v), arr(acc_of(v), 2)) for v in VALUES],
    "bitmask_dense": [(arr(i64), arr(u64, 2), arr(v), arr(acc_of(v), 2)) for v in VALUES],
    "nm_dense": [(arr(u64, 2), arr(v), arr(acc_of(v), 2), *(i64,) * 6) for v in VALUES],
}
