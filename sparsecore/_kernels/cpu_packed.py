"""Packed sparse matrices: encoders from CSR, decoders back, and products.

Three encodings of the kept entries of each row, all with the values packed
row by row in one array (``vals``; float32, float64, or the bits of float16 /
bfloat16 as uint16) and ``ptr[r]`` the row's first value:

- **delta8**: ``deltas[p]`` (uint8) is the column step from the previous
  entry of the row (from column 0 for the first). A step over 255 is taken
  by filler entries of step 255 and value 0.
- **bitmask**: ``words[r, w]`` (uint64) holds bit ``j`` for column
  ``64 w + j``; the set bits' values are packed in column order.
- **nm**: every group of ``m`` columns stores exactly ``n`` values (zero
  padded) and their in-group positions, ``b = ceil(log2 m)`` bits each,
  ``gpw = 64 // (n b)`` groups to a uint64 word (``words[r, w]``); the row's
  values start at ``r * groups * n``.

Each product compiles twice: parallel over ranges of rows, and serial for
products too small to share (no parallel region to enter and leave: a few
microseconds that a decode step pays per layer). Products accumulate in
float32 (float64 for float64 values) in four partial sums, so that the
additions do not wait on one another; each value is widened to float32 as it
is read. Rows are split into ranges of about equal
stored entries (``cpu_csr.row_bounds``). Kernels specialise on the value
kind (and ``n, m``) as closure constants (``by_kind``).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import variants
from .cpu_csr import row_bounds
from .keys import cttz, popcount

KIND_F32 = 0
KIND_F64 = 1
KIND_F16 = 2  # IEEE half, stored as its uint16 bits
KIND_BF16 = 3  # bfloat16, stored as its uint16 bits


def _widening_intrinsic(convert, doc):
    """An intrinsic taking uint16 bits to float32 by ``convert``, and any
    float unchanged (so that every branch of ``_read`` types for every
    value array; the branch a kernel takes is folded at compile time)."""

    def impl(typingctx, u):
        if u in (types.float32, types.float64):
            return u(u), lambda context, builder, signature, args: args[0]
        if u != types.uint16:
            return None

        def codegen(context, builder, signature, args):
            return convert(builder, args[0])

        return types.float32(types.uint16), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


_half_bits_to_f32 = _widening_intrinsic(
    lambda b, u: b.fpext(b.bitcast(u, ir.HalfType()), ir.FloatType()),
    "float32 of IEEE-half bits: LLVM's ``fpext`` (F16C's ``vcvtph2ps`` where the CPU has it).")
_bf16_bits_to_f32 = _widening_intrinsic(
    lambda b, u: b.bitcast(b.shl(b.zext(u, ir.IntType(32)), ir.Constant(ir.IntType(32), 16)), ir.FloatType()),
    "float32 of bfloat16 bits: the bits moved to the top half of a float32 (exact).")


@njit(inline="always", cache=True)
def _read(vals, p, kind):
    """The stored value at ``p`` as float32 (float64 values as they are);
    ``kind`` is a kernel's compile-time constant."""
    v = vals[p]
    if kind == KIND_F16:
        return _half_bits_to_f32(v)
    return _bf16_bits_to_f32(v)


def by_kind(factory):
    """Memoise a kernel factory ``factory(kind, *more)`` on its constants
    (ints, and the accumulator's NumPy type): see ``variants``."""
    return variants(factory)


# ---------------------------------------------------------------- encoders

@njit(parallel=True, cache=True)
def delta8_counts(indptr, indices, counts):
    """Entries per row of the delta8 encoding of a canonical CSR (fillers included)."""
    rows = indptr.size - 1
    for r in prange(rows):
        prev = 0
        c = 0
        for p in range(indptr[r], indptr[r + 1]):
            col = indices[p]
            gap = col - prev
            if gap > 255:
                c += (gap - 1) // 255
            c += 1
            prev = col
        counts[r] = c


@njit(parallel=True, cache=True)
def delta8_fill(indptr, indices, data, ptr, deltas, vals):
    """Write the delta8 steps and values (``vals`` has the CSR data's dtype)."""
    rows = indptr.size - 1
    for r in prange(rows):
        q = ptr[r]
        prev = 0
        for p in range(indptr[r], indptr[r + 1]):
            col = indices[p]
            gap = col - prev
            while gap > 255:
                deltas[q] = 255
                vals[q] = 0
                q += 1
                gap -= 255
            deltas[q] = gap
            vals[q] = data[p]
            q += 1
            prev = col


@njit(parallel=True, cache=True)
def bitmask_fill(indptr, indices, words):
    """Set the bit of every stored column of a canonical CSR (``words`` zeroed)."""
    rows = indptr.size - 1
    for r in prange(rows):
        for p in range(indptr[r], indptr[r + 1]):
            col = indices[p]
            words[r, col >> 6] |= np.uint64(1) << np.uint64(col & 63)


@njit(cache=True)
def nm_first_overfull(indptr, indices, n, m):
    """``(row, group, count)`` of the first group holding more than ``n``
    stored entries, or ``(-1, -1, 0)``."""
    rows = indptr.size - 1
    for r in range(rows):
        g = -1
        c = 0
        for p in range(indptr[r], indptr[r + 1]):
            gg = indices[p] // m
            if gg != g:
                g = gg
                c = 0
            c += 1
            if c > n:
                more = c
                q = p + 1
                while q < indptr[r + 1] and indices[q] // m == g:
                    more += 1
                    q += 1
                return r, g, more
    return -1, -1, 0


@njit(parallel=True, cache=True)
def nm_fill(indptr, indices, data, n, m, bits, gpw, groups, words, vals):
    """Positions (``bits`` each, ``gpw`` groups to a word) and values of an
    N:M CSR; the unused slots of a group are value 0 at position 0 (``vals``
    and ``words`` zeroed)."""
    rows = indptr.size - 1
    for r in prange(rows):
        base = r * groups * n
        g = -1
        slot = 0
        for p in range(indptr[r], indptr[r + 1]):
            col = indices[p]
            gg = col // m
            if gg != g:
                g = gg
                slot = 0
            e = g * n + slot  # entry of the row
            vals[base + e] = data[p]
            w = g // gpw
            shift = ((g % gpw) * n + slot) * bits
            words[r, w] |= np.uint64(col - g * m) << np.uint64(shift)
            slot += 1


# ---------------------------------------------------------------- decoders (to CSR)

@njit(parallel=True, cache=True)
def kept_counts(ptr_lo, ptr_hi, vals, counts):
    """Non-zero values of each row ``[ptr_lo[r], ptr_hi[r])`` (fillers and padding are zero)."""
    for r in prange(counts.size):
        c = 0
        for p in range(ptr_lo[r], ptr_hi[r]):
            c += vals[p] != 0
        counts[r] = c


@njit(parallel=True, cache=True)
def delta8_to_csr(ptr, deltas, vals, indptr, indices, data):
    for r in prange(indptr.size - 1):
        q = indptr[r]
        col = 0
        for p in range(ptr[r], ptr[r + 1]):
            col += deltas[p]
            if vals[p] != 0:
                indices[q] = col
                data[q] = vals[p]
                q += 1


@njit(parallel=True, cache=True)
def bitmask_to_csr(ptr, words, vals, indptr, indices, data):
    one = np.uint64(1)
    for r in prange(indptr.size - 1):
        q = indptr[r]
        p = ptr[r]
        for w in range(words.shape[1]):
            bits = words[r, w]
            while bits:
                j = cttz(bits)
                if vals[p] != 0:
                    indices[q] = 64 * w + np.int64(j)
                    data[q] = vals[p]
                    q += 1
                p += 1
                bits &= bits - one


@njit(parallel=True, cache=True)
def nm_to_csr(words, vals, n, m, bits, gpw, groups, indptr, indices, data):
    pm = np.uint64((1 << bits) - 1)
    for r in prange(indptr.size - 1):
        q = indptr[r]
        base = r * groups * n
        for g in range(groups):
            word = words[r, g // gpw]
            for s in range(n):
                v = vals[base + g * n + s]
                if v != 0:
                    shift = np.uint64(((g % gpw) * n + s) * bits)
                    indices[q] = g * m + np.int64((word >> shift) & pm)
                    data[q] = v
                    q += 1


@njit(cache=True)
def nm_positions_distinct(words, vals, n, m, bits, gpw, groups, cols):
    """``(row, group)`` of the first group whose non-zero values share a
    position or lie past the last column, or ``(-1, -1)`` (a file's words are
    not trusted)."""
    pm = np.uint64((1 << bits) - 1)
    for r in range(words.shape[0]):
        base = r * groups * n
        for g in range(groups):
            word = words[r, g // gpw]
            seen = 0
            for s in range(n):
                if vals[base + g * n + s] != 0:
                    pos = np.int64((word >> np.uint64(((g % gpw) * n + s) * bits)) & pm)
                    if pos >= m or g * m + pos >= cols or (seen >> pos) & 1:
                        return r, g
                    seen |= 1 << pos
    return -1, -1


# ---------------------------------------------------------------- products

@by_kind
def delta8_matvec(kind, parallel):
    acc = np.float64 if kind == KIND_F64 else np.float32

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(ptr, deltas, vals, x, out, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        bounds = row_bounds(ptr, nchunks)
        four = np.uint64(4)
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                p = np.uint64(ptr[r])
                hi = np.uint64(ptr[r + 1])
                col = np.uint64(0)
                a0 = acc(0)
                a1 = acc(0)
                a2 = acc(0)
                a3 = acc(0)
                while p + four <= hi:
                    c0 = col + np.uint64(deltas[p])
                    c1 = c0 + np.uint64(deltas[p + np.uint64(1)])
                    c2 = c1 + np.uint64(deltas[p + np.uint64(2)])
                    c3 = c2 + np.uint64(deltas[p + np.uint64(3)])
                    a0 += _read(vals, p, kind) * x[c0]
                    a1 += _read(vals, p + np.uint64(1), kind) * x[c1]
                    a2 += _read(vals, p + np.uint64(2), kind) * x[c2]
                    a3 += _read(vals, p + np.uint64(3), kind) * x[c3]
                    col = c3
                    p += four
                while p < hi:
                    col += np.uint64(deltas[p])
                    a0 += _read(vals, p, kind) * x[col]
                    p += np.uint64(1)
                out[r] = (a0 + a1) + (a2 + a3)

    return kernel


@by_kind
def bitmask_matvec(kind, parallel):
    acc = np.float64 if kind == KIND_F64 else np.float32

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(ptr, words, vals, x, out, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        bounds = row_bounds(ptr, nchunks)
        one = np.uint64(1)
        nw = words.shape[1]
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                p = np.uint64(ptr[r])
                a0 = acc(0)
                a1 = acc(0)
                a2 = acc(0)
                a3 = acc(0)
                for w in range(nw):
                    bits = words[r, w]
                    base = np.uint64(64 * w)
                    k = popcount(bits)
                    while k >= np.uint64(4):
                        j0 = cttz(bits)
                        bits &= bits - one
                        j1 = cttz(bits)
                        bits &= bits - one
                        j2 = cttz(bits)
                        bits &= bits - one
                        j3 = cttz(bits)
                        bits &= bits - one
                        a0 += _read(vals, p, kind) * x[base + j0]
                        a1 += _read(vals, p + one, kind) * x[base + j1]
                        a2 += _read(vals, p + np.uint64(2), kind) * x[base + j2]
                        a3 += _read(vals, p + np.uint64(3), kind) * x[base + j3]
                        p += np.uint64(4)
                        k -= np.uint64(4)
                    while bits:
                        a0 += _read(vals, p, kind) * x[base + cttz(bits)]
                        bits &= bits - one
                        p += one
                out[r] = (a0 + a1) + (a2 + a3)

    return kernel


@by_kind
def nm_matvec(kind, n, m, bits, gpw, parallel):
    acc = np.float64 if kind == KIND_F64 else np.float32
    per_word = gpw * n  # entries of a full word
    pm = np.uint64((1 << bits) - 1)

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(words, vals, x, out, groups, cols, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        rows = out.size
        full = groups // gpw  # words whose groups all lie inside the row
        for c in prange(nchunks):
            for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
                p = np.uint64(r * groups * n)
                a0 = acc(0)
                a1 = acc(0)
                a2 = acc(0)
                a3 = acc(0)
                for w in range(full):
                    word = words[r, w]
                    base = np.uint64(w * gpw * m)
                    e = 0
                    while e + 4 <= per_word:  # constant trip counts: unrolled
                        c0 = base + np.uint64((e // n) * m) + ((word >> np.uint64(e * bits)) & pm)
                        c1 = base + np.uint64(((e + 1) // n) * m) + ((word >> np.uint64((e + 1) * bits)) & pm)
                        c2 = base + np.uint64(((e + 2) // n) * m) + ((word >> np.uint64((e + 2) * bits)) & pm)
                        c3 = base + np.uint64(((e + 3) // n) * m) + ((word >> np.uint64((e + 3) * bits)) & pm)
                        a0 += _read(vals, p + np.uint64(e), kind) * x[c0]
                        a1 += _read(vals, p + np.uint64(e + 1), kind) * x[c1]
                        a2 += _read(vals, p + np.uint64(e + 2), kind) * x[c2]
                        a3 += _read(vals, p + np.uint64(e + 3), kind) * x[c3]
                        e += 4
                    while e < per_word:
                        a0 += _read(vals, p + np.uint64(e), kind) * x[base + np.uint64((e // n) * m)
                                                                + ((word >> np.uint64(e * bits)) & pm)]
                        e += 1
                    p += np.uint64(per_word)
                # The last word's groups, up to the row's end (a partial group is
                # bounded by the columns: its padding reads column 0 of the group).
                for g in range(full * gpw, groups):
                    word = words[r, g // gpw]
                    for s in range(n):
                        pos = np.int64((word >> np.uint64(((g % gpw) * n + s) * bits)) & pm)
                        col = g * m + pos
                        if col < cols:
                            a0 += _read(vals, p, kind) * x[col]
                        p += np.uint64(1)
                out[r] = (a0 + a1) + (a2 + a3)

    return kernel


@by_kind
def delta8_matmat(kind, parallel):

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(ptr, deltas, vals, x, out, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        k = x.shape[1]
        bounds = row_bounds(ptr, nchunks)
        four = np.uint64(4)
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                o = out[r]
                o[:] = 0
                p = np.uint64(ptr[r])
                hi = np.uint64(ptr[r + 1])
                col = np.uint64(0)
                while p + four <= hi:
                    c0 = col + np.uint64(deltas[p])
                    c1 = c0 + np.uint64(deltas[p + np.uint64(1)])
                    c2 = c1 + np.uint64(deltas[p + np.uint64(2)])
                    c3 = c2 + np.uint64(deltas[p + np.uint64(3)])
                    v0 = _read(vals, p, kind)
                    v1 = _read(vals, p + np.uint64(1), kind)
                    v2 = _read(vals, p + np.uint64(2), kind)
                    v3 = _read(vals, p + np.uint64(3), kind)
                    r0, r1, r2, r3 = x[c0], x[c1], x[c2], x[c3]
                    for j in range(k):
                        o[j] += (v0 * r0[j] + v1 * r1[j]) + (v2 * r2[j] + v3 * r3[j])
                    col = c3
                    p += four
                while p < hi:
                    col += np.uint64(deltas[p])
                    v = _read(vals, p, kind)
                    row = x[col]
                    for j in range(k):
                        o[j] += v * row[j]
                    p += np.uint64(1)

    return kernel


@by_kind
def bitmask_matmat(kind, parallel):

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(ptr, words, vals, x, out, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        k = x.shape[1]
        bounds = row_bounds(ptr, nchunks)
        one = np.uint64(1)
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                o = out[r]
                o[:] = 0
                p = np.uint64(ptr[r])
                for w in range(words.shape[1]):
                    bits = words[r, w]
                    base = np.uint64(64 * w)
                    while popcount(bits) >= np.uint64(4):
                        j0 = cttz(bits)
                        bits &= bits - one
                        j1 = cttz(bits)
                        bits &= bits - one
                        j2 = cttz(bits)
                        bits &= bits - one
                        j3 = cttz(bits)
                        bits &= bits - one
                        v0 = _read(vals, p, kind)
                        v1 = _read(vals, p + one, kind)
                        v2 = _read(vals, p + np.uint64(2), kind)
                        v3 = _read(vals, p + np.uint64(3), kind)
                        r0, r1, r2, r3 = x[base + j0], x[base + j1], x[base + j2], x[base + j3]
                        for j in range(k):
                            o[j] += (v0 * r0[j] + v1 * r1[j]) + (v2 * r2[j] + v3 * r3[j])
                        p += np.uint64(4)
                    while bits:
                        v = _read(vals, p, kind)
                        row = x[base + cttz(bits)]
                        for j in range(k):
                            o[j] += v * row[j]
                        bits &= bits - one
                        p += one

    return kernel


@by_kind
def nm_matmat(kind, n, m, bits, gpw, parallel):
    pm = np.uint64((1 << bits) - 1)

    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(words, vals, x, out, groups, cols, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        rows = out.shape[0]
        k = x.shape[1]
        for c in prange(nchunks):
            for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
                o = out[r]
                o[:] = 0
                p = np.uint64(r * groups * n)
                for g in range(groups):
                    word = words[r, g // gpw]
                    for s in range(n):
                        pos = np.int64((word >> np.uint64(((g % gpw) * n + s) * bits)) & pm)
                        col = g * m + pos
                        v = _read(vals, p, kind)
                        if v != 0 and col < cols:
                            row = x[col]
                            for j in range(k):
                                o[j] += v * row[j]
                        p += np.uint64(1)

    return kernel


# ---------------------------------------------------------------- bitmask products with AVX2

def permutation_table():
    """int32 ``(256, 16)``: for each byte of a bitmask, lanes ``0..7`` say
    which packed value lane ``i`` takes, ``popcount(byte & ((1 << i) - 1))``
    (0 where bit ``i`` is clear), and lanes ``8..15`` are all ones where bit
    ``i`` is set, zero where it is clear."""
    t = np.zeros((256, 16), np.int32)
    for b in range(256):
        rank = 0
        for i in range(8):
            if b >> i & 1:
                t[b, i] = rank
                t[b, 8 + i] = -1
                rank += 1
    return t


def _word_dot(half_kind):
    """An intrinsic ``(vals, p, word, x, base, perm) -> float32``: the dot
    product of one 64-column bitmask word with ``x[base:base + 64]``.

    For each byte of the word: eight packed values loaded from ``vals[p]``
    (float32, or half/bfloat16 bits widened: ``half_kind``), moved to their
    columns by ``vpermps`` with the byte's row of ``perm`` and zeroed where the
    byte's bit is clear (a mask from the same row), multiplied by eight entries of ``x`` and added into
    one of two vector sums (fused multiply-add); ``p`` advances by the byte's
    popcount. No branch and no gather. It reads up to 7 values past the
    word's last one and ``x`` up to ``base + 64``: the wrapper pads both.
    """

    def impl(typingctx, vals, p, word, x, base, perm):
        if not (isinstance(vals, types.Array) and vals.dtype in (types.float32, types.uint16)):
            return None

        def codegen(context, builder, signature, args):
            f32, i16, i32, i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
            v8f, v8i = ir.VectorType(f32, 8), ir.VectorType(i32, 8)
            vals_a = context.make_array(signature.args[0])(context, builder, args[0])
            x_a = context.make_array(signature.args[3])(context, builder, args[3])
            perm_a = context.make_array(signature.args[5])(context, builder, args[5])
            p, word, base = args[1], args[2], args[4]
            permps = builder.module.declare_intrinsic("llvm.x86.avx2.permps", fnty=ir.FunctionType(v8f, [v8f, v8i]))
            fma = builder.module.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f, [v8f, v8f, v8f]))
            ctpop = builder.module.declare_intrinsic("llvm.ctpop", [i64])
            zero = ir.Constant(v8f, [0.0] * 8)
            sums = [zero, zero]
            for i in range(8):
                byte = builder.and_(builder.lshr(word, ir.Constant(i64, 8 * i)), ir.Constant(i64, 255))
                at = builder.gep(vals_a.data, [p])
                if signature.args[0].dtype == types.float32:
                    v = builder.load(builder.bitcast(at, v8f.as_pointer()), align=4)
                else:
                    raw = builder.load(builder.bitcast(at, ir.VectorType(i16, 8).as_pointer()), align=2)
                    if half_kind == KIND_F16:
                        v = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 8)), v8f)
                    else:
                        v = builder.bitcast(builder.shl(builder.zext(raw, v8i), ir.Constant(v8i, [16] * 8)), v8f)
                row = builder.gep(perm_a.data, [builder.shl(byte, ir.Constant(i64, 4))])
                idx = builder.load(builder.bitcast(row, v8i.as_pointer()), align=4)
                lanes_on = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, 8)]), v8i.as_pointer()),
                                        align=4)
                moved = builder.call(permps, [v, idx])
                moved = builder.bitcast(builder.and_(builder.bitcast(moved, v8i), lanes_on), v8f)
                xat = builder.gep(x_a.data, [builder.add(base, ir.Constant(i64, 8 * i))])
                xv = builder.load(builder.bitcast(xat, v8f.as_pointer()), align=4)
                sums[i % 2] = builder.call(fma, [moved, xv, sums[i % 2]])
                p = builder.add(p, builder.call(ctpop, [byte]))
            s = builder.fadd(sums[0], sums[1])
            lanes = [builder.extract_element(s, ir.Constant(i32, i)) for i in range(8)]
            while len(lanes) > 1:
                lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
            return lanes[0]

        return types.float32(vals, types.uint64, types.uint64, x, types.uint64, perm), codegen

    impl.__doc__ = _word_dot.__doc__
    return intrinsic(impl)


_word_dot_f16 = _word_dot(KIND_F16)
_word_dot_bf16 = _word_dot(KIND_BF16)  # float32 values: the same code in both (no widening)


@njit(inline="always", cache=True)
def _dot(vals, p, word, x, base, perm, kind):
    if kind == KIND_F16:
        return _word_dot_f16(vals, p, word, x, base, perm)
    return _word_dot_bf16(vals, p, word, x, base, perm)


@by_kind
def bitmask_matvec_avx2(kind, parallel):
    @njit(parallel=parallel, cache=True)
    def kernel(ptr, words, vals, x, out, nchunks, perm):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        bounds = row_bounds(ptr, nchunks)
        nw = words.shape[1]
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                p = np.uint64(ptr[r])
                s = np.float32(0)
                for w in range(nw):
                    word = words[r, w]
                    s += _dot(vals, p, word, x, np.uint64(64 * w), perm, kind)
                    p += popcount(word)
                out[r] = s

    return kernel



def _lanes8(builder, vals_a, dtype, kind, at):
    """Eight values from ``vals[at]`` as a float32 vector (half/bfloat16 bits widened by ``kind``)."""
    f32, i16, i32 = ir.FloatType(), ir.IntType(16), ir.IntType(32)
    v8f = ir.VectorType(f32, 8)
    ptr = builder.gep(vals_a.data, [at])
    if dtype == types.float32:
        return builder.load(builder.bitcast(ptr, v8f.as_pointer()), align=4)
    h = builder.load(builder.bitcast(ptr, ir.VectorType(i16, 8).as_pointer()), align=2)
    if kind == KIND_F16:
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 8)), v8f)
    v8i = ir.VectorType(i32, 8)
    return builder.bitcast(builder.shl(builder.zext(h, v8i), ir.Constant(v8i, [16] * 8)), v8f)


def _hsum8(builder, v):
    """The sum of a float32 vector's eight lanes, pairwise."""
    i32 = ir.IntType(32)
    lanes = [builder.extract_element(v, ir.Constant(i32, k)) for k in range(8)]
    while len(lanes) > 1:
        lanes = [builder.fadd(lanes[k], lanes[k + 1]) for k in range(0, len(lanes), 2)]
    return lanes[0]


def _word_loop(builder, words_ptr, p0, full, values, columns, step):
    """Emit ``for i in range(full)`` over a row's 64-bit words with two float32
    vector sums carried across words: ``step(word, pp, base, sums) -> sums``
    emits one word's work, ``pp`` its first value (``values`` a word) and
    ``base`` its first column (``columns`` a word). Returns the sums' total."""
    f32, i64 = ir.FloatType(), ir.IntType(64)
    v8f = ir.VectorType(f32, 8)
    zero = ir.Constant(v8f, [0.0] * 8)
    entry = builder.basic_block
    head = builder.append_basic_block("words.head")
    body = builder.append_basic_block("words.body")
    done = builder.append_basic_block("words.done")
    builder.branch(head)
    builder.position_at_end(head)
    i, pp, base = builder.phi(i64), builder.phi(i64), builder.phi(i64)
    acc = [builder.phi(v8f), builder.phi(v8f)]
    for ph, v in ((i, ir.Constant(i64, 0)), (pp, p0), (base, ir.Constant(i64, 0)), (acc[0], zero), (acc[1], zero)):
        ph.add_incoming(v, entry)
    builder.cbranch(builder.icmp_unsigned("<", i, full), body, done)
    builder.position_at_end(body)
    word = builder.load(builder.gep(words_ptr, [i]), align=8)
    sums = step(word, pp, base, list(acc))
    end = builder.basic_block  # the body may have added blocks
    i.add_incoming(builder.add(i, ir.Constant(i64, 1)), end)
    pp.add_incoming(builder.add(pp, ir.Constant(i64, values)), end)
    base.add_incoming(builder.add(base, ir.Constant(i64, columns)), end)
    acc[0].add_incoming(sums[0], end)
    acc[1].add_incoming(sums[1], end)
    builder.branch(head)
    builder.position_at_end(done)
    return _hsum8(builder, builder.fadd(acc[0], acc[1]))


def _delta8_run(half_kind):
    """An intrinsic ``(deltas, vals, p, chunks, x) -> (float32, int64)``: the
    dot product of ``8 * chunks`` delta8 entries from ``p`` with ``x``, and
    the column of the last one (0 without any).

    Per chunk of eight: the eight steps read as one 64-bit word (one load,
    not eight) and taken out of it byte by byte into the running column,
    ``x`` loaded at each column into the lanes of one vector, eight values
    loaded at once (half/bfloat16 bits widened: ``half_kind``) and added
    into a vector sum by one fused multiply-add; two sums, alternating
    chunks, reduced once per call. Per kept weight that is two loads
    (``x`` and an eighth of the steps and values) where the scalar loop
    takes three (step, value, ``x``): the scalar loop is bound by the load
    ports (measured: 0.65-0.7 weights a cycle on AMD Zen 3, this one
    0.85-0.9). Reads nothing past the last entry. (A ``vgatherdps`` of ``x``
    ran at 0.4: slower than the loads it replaces, on Zen 3.)
    """

    def impl(typingctx, deltas, vals, p, chunks, x):
        if not (isinstance(vals, types.Array) and vals.dtype in (types.float32, types.uint16)):
            return None
        ret = types.Tuple((types.float32, types.int64))

        def codegen(context, builder, signature, args):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            v8f = ir.VectorType(f32, 8)
            d_a = context.make_array(signature.args[0])(context, builder, args[0])
            vals_a = context.make_array(signature.args[1])(context, builder, args[1])
            x_a = context.make_array(signature.args[4])(context, builder, args[4])
            p0, chunks = args[2], args[3]
            fma = builder.module.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f, [v8f, v8f, v8f]))
            zero_f = ir.Constant(v8f, [0.0] * 8)

            def chunk(pp, col, acc):
                word = builder.load(builder.bitcast(builder.gep(d_a.data, [pp]), i64.as_pointer()), align=1)
                xv = ir.Constant(v8f, ir.Undefined)
                for k in range(8):
                    step = builder.and_(builder.lshr(word, ir.Constant(i64, 8 * k)), ir.Constant(i64, 255))
                    col = builder.add(col, step)
                    xv = builder.insert_element(xv, builder.load(builder.gep(x_a.data, [col]), align=4),
                                                ir.Constant(i32, k))
                v = _lanes8(builder, vals_a, signature.args[1].dtype, half_kind, pp)
                return col, builder.call(fma, [v, xv, acc])

            entry = builder.basic_block
            head = builder.append_basic_block("d8.head")
            body = builder.append_basic_block("d8.body")
            done = builder.append_basic_block("d8.done")
            builder.branch(head)
            builder.position_at_end(head)
            i = builder.phi(i64)
            pp = builder.phi(i64)
            base = builder.phi(i64)
            acc0 = builder.phi(v8f)
            acc1 = builder.phi(v8f)
            for ph, v in ((i, ir.Constant(i64, 0)), (pp, p0), (base, ir.Constant(i64, 0)), (acc0, zero_f),
                          (acc1, zero_f)):
                ph.add_incoming(v, entry)
            builder.cbranch(builder.icmp_unsigned("<", i, chunks), body, done)
            builder.position_at_end(body)
            # two chunks an iteration where two remain, one otherwise
            two = builder.icmp_unsigned("<", builder.add(i, ir.Constant(i64, 1)), chunks)
            b1, a0 = chunk(pp, base, acc0)
            pair = builder.append_basic_block("d8.pair")
            join = builder.append_basic_block("d8.join")
            from_one = builder.basic_block
            builder.cbranch(two, pair, join)
            builder.position_at_end(pair)
            b2, a1 = chunk(builder.add(pp, ir.Constant(i64, 8)), b1, acc1)
            from_two = builder.basic_block
            builder.branch(join)
            builder.position_at_end(join)
            nb, na1, step = builder.phi(i64), builder.phi(v8f), builder.phi(i64)
            nb.add_incoming(b1, from_one)
            nb.add_incoming(b2, from_two)
            na1.add_incoming(acc1, from_one)
            na1.add_incoming(a1, from_two)
            step.add_incoming(ir.Constant(i64, 1), from_one)
            step.add_incoming(ir.Constant(i64, 2), from_two)
            i.add_incoming(builder.add(i, step), join)
            pp.add_incoming(builder.add(pp, builder.shl(step, ir.Constant(i64, 3))), join)
            base.add_incoming(nb, join)
            acc0.add_incoming(a0, join)
            acc1.add_incoming(na1, join)
            builder.branch(head)
            builder.position_at_end(done)
            return context.make_tuple(builder, ret, [_hsum8(builder, builder.fadd(acc0, acc1)), base])

        return ret(deltas, vals, types.uint64, types.uint64, x), codegen

    impl.__doc__ = _delta8_run.__doc__
    return intrinsic(impl)


_delta8_run_f16 = _delta8_run(KIND_F16)
_delta8_run_bf16 = _delta8_run(KIND_BF16)  # float32 values: the same code in both (no widening)


@njit(inline="always", cache=True)
def _run8(deltas, vals, p, chunks, x, kind):
    if kind == KIND_F16:
        return _delta8_run_f16(deltas, vals, p, chunks, x)
    return _delta8_run_bf16(deltas, vals, p, chunks, x)


@by_kind
def delta8_matvec_avx2(kind, parallel):
    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(ptr, deltas, vals, x, out, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        bounds = row_bounds(ptr, nchunks)
        eight = np.uint64(8)
        for c in prange(nchunks):
            for r in range(bounds[c], bounds[c + 1]):
                p = np.uint64(ptr[r])
                hi = np.uint64(ptr[r + 1])
                n8 = (hi - p) // eight
                s, last = _run8(deltas, vals, p, n8, x, kind)
                p += n8 * eight
                col = np.uint64(last)
                a = np.float32(0)
                while p < hi:
                    col += np.uint64(deltas[p])
                    a += _read(vals, p, kind) * x[col]
                    p += np.uint64(1)
                out[r] = s + a

    return kernel


@intrinsic
def _nm_run(typingctx, wrow, vals, p, full, x, kind, n, m, bits, gpw):
    """``(words_row, vals, p, full, x, kind, n, m, bits, gpw) -> float32``: the
    dot product with ``x`` of a row's first ``full`` N:M words (all their
    groups inside the row), its values from ``p``. The layout and value kind
    are compile-time constants (literal ints: the kernel's closure).

    Per word: each entry's column (the group's first column plus the
    position's bits) and ``x`` there loaded into the lanes of a vector,
    eight values loaded at once (widened by ``kind``) and added by one fused
    multiply-add into one of two vector sums; one load per kept weight for
    ``x`` and an eighth for the values, where the scalar loop takes two.
    Needs ``gpw * n`` a multiple of 8 (the caller's check).
    """
    consts = (kind, n, m, bits, gpw)
    if not all(isinstance(c, types.IntegerLiteral) for c in consts):
        return None
    if not (isinstance(vals, types.Array) and vals.dtype in (types.float32, types.uint16)):
        return None
    kind_v, n_v, m_v, bits_v, gpw_v = (c.literal_value for c in consts)
    per_word = gpw_v * n_v

    def codegen(context, builder, signature, args):
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v8f = ir.VectorType(f32, 8)
        w_a = context.make_array(signature.args[0])(context, builder, args[0])
        vals_a = context.make_array(signature.args[1])(context, builder, args[1])
        x_a = context.make_array(signature.args[4])(context, builder, args[4])
        fma = builder.module.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f, [v8f, v8f, v8f]))
        pm = ir.Constant(i64, (1 << bits_v) - 1)

        def step(word, pp, base, sums):
            for c in range(per_word // 8):
                xv = ir.Constant(v8f, ir.Undefined)
                for k in range(8):
                    e = 8 * c + k
                    pos = builder.and_(builder.lshr(word, ir.Constant(i64, e * bits_v)), pm)
                    col = builder.add(base, builder.add(ir.Constant(i64, (e // n_v) * m_v), pos))
                    xv = builder.insert_element(xv, builder.load(builder.gep(x_a.data, [col]), align=4),
                                                ir.Constant(i32, k))
                v = _lanes8(builder, vals_a, signature.args[1].dtype, kind_v,
                            builder.add(pp, ir.Constant(i64, 8 * c)))
                sums[c % 2] = builder.call(fma, [v, xv, sums[c % 2]])
            return sums

        return _word_loop(builder, w_a.data, args[2], args[3], per_word, gpw_v * m_v, step)

    return types.float32(wrow, vals, types.uint64, types.uint64, x, *consts), codegen



def position_table_24():
    """int32 ``(256, 8)``: for each byte of 2:4 positions (two groups, two
    2-bit positions each), the ``x`` lane of each of its four values among
    the groups' eight columns, ``[p0, p1, 4 + p2, 4 + p3]``, twice (lanes
    0-3 and 4-7: one table for either half of a vector)."""
    t = np.zeros((256, 8), np.int32)
    for b in range(256):
        lanes = [b & 3, b >> 2 & 3, 4 + (b >> 4 & 3), 4 + (b >> 6 & 3)]
        t[b] = lanes + lanes
    return t


@intrinsic
def _nm24_run(typingctx, wrow, vals, p, full, x, table, kind):
    """``(words_row, vals, p, full, x, table, kind) -> float32``: the dot
    product with ``x`` of a 2:4 row's first ``full`` words (64 columns each,
    all inside the row), its values from ``p``.

    Per four groups (16 columns, 8 kept values): ``x``'s 16 columns loaded
    as two vectors, each permuted (``vpermps``) by the table row of its
    two groups' position byte so that lane ``i`` holds the column of value
    ``i``, the halves joined, eight values loaded at once (widened by
    ``kind``) and added by one fused multiply-add: about 1.5 instructions
    per kept weight where ``_nm_run`` takes five (a column computed and a
    lane inserted for each). Needs ``table`` = :func:`position_table_24`.
    """
    if not isinstance(kind, types.IntegerLiteral):
        return None
    if not (isinstance(vals, types.Array) and vals.dtype in (types.float32, types.uint16)):
        return None
    kind_v = kind.literal_value

    def codegen(context, builder, signature, args):
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v8f, v8i = ir.VectorType(f32, 8), ir.VectorType(i32, 8)
        w_a = context.make_array(signature.args[0])(context, builder, args[0])
        vals_a = context.make_array(signature.args[1])(context, builder, args[1])
        x_a = context.make_array(signature.args[4])(context, builder, args[4])
        t_a = context.make_array(signature.args[5])(context, builder, args[5])
        fma = builder.module.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f, [v8f, v8f, v8f]))
        permps = builder.module.declare_intrinsic("llvm.x86.avx2.permps", fnty=ir.FunctionType(v8f, [v8f, v8i]))

        def step(word, pp, base, sums):
            def row(byte_at):
                b = builder.and_(builder.lshr(word, ir.Constant(i64, byte_at)), ir.Constant(i64, 255))
                at = builder.gep(t_a.data, [builder.shl(b, ir.Constant(i64, 3))])
                return builder.load(builder.bitcast(at, v8i.as_pointer()), align=4)

            def xs(offset):
                at = builder.gep(x_a.data, [builder.add(base, ir.Constant(i64, offset))])
                return builder.load(builder.bitcast(at, v8f.as_pointer()), align=4)

            for q in range(4):
                lo = builder.call(permps, [xs(16 * q), row(16 * q)])
                hi = builder.call(permps, [xs(16 * q + 8), row(16 * q + 8)])
                xv = builder.shuffle_vector(lo, hi, ir.Constant(v8i, [0, 1, 2, 3, 12, 13, 14, 15]))
                v = _lanes8(builder, vals_a, signature.args[1].dtype, kind_v,
                            builder.add(pp, ir.Constant(i64, 8 * q)))
                sums[q % 2] = builder.call(fma, [v, xv, sums[q % 2]])
            return sums

        return _word_loop(builder, w_a.data, args[2], args[3], 32, 64, step)

    return types.float32(wrow, vals, types.uint64, types.uint64, x, table, kind), codegen


@by_kind
def nm24_matvec_avx2(kind, parallel):
    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(words, vals, x, out, groups, cols, nchunks, table):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        rows = out.size
        full = min(groups // 16, cols // 64)  # words whose 64 columns all lie inside the row
        for c in prange(nchunks):
            for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
                p = np.uint64(r * groups * 2)
                s = _nm24_run(words[r], vals, p, np.uint64(full), x, table, kind)
                p += np.uint64(full * 32)
                for g in range(full * 16, groups):  # the rest, up to the row's end
                    word = words[r, g // 16]
                    for t in range(2):
                        col = g * 4 + np.int64((word >> np.uint64(((g % 16) * 2 + t) * 2)) & np.uint64(3))
                        if col < cols:
                            s += _read(vals, p, kind) * x[col]
                        p += np.uint64(1)
                out[r] = s

    return kernel

@by_kind
def nm_matvec_avx2(kind, n, m, bits, gpw, parallel):
    @njit(parallel=parallel, cache=True, fastmath={"contract"})
    def kernel(words, vals, x, out, groups, cols, nchunks):
        nchunks = nchunks if parallel else 1  # one chunk serially; keys the cache apart too
        rows = out.size
        full = groups // gpw
        for c in prange(nchunks):
            for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
                p = np.uint64(r * groups * n)
                s = _nm_run(words[r], vals, p, np.uint64(full), x, kind, n, m, bits, gpw)
                p += np.uint64(full * gpw * n)
                for g in range(full * gpw, groups):  # the last word's groups, up to the row's end
                    word = words[r, g // gpw]
                    for t in range(n):
                        pos = np.int64((word >> np.uint64(((g % gpw) * n + t) * bits)) & np.uint64((1 << bits) - 1))
                        col = g * m + pos
                        if col < cols:
                            s += _read(vals, p, kind) * x[col]
                        p += np.uint64(1)
                out[r] = s

    return kernel

# ---------------------------------------------------------------- dense copies (the prefill route)
# One compiled function per value array type: ``kind`` and the N:M layout are
# run-time arguments here (a copy is not a hot loop; fewer variants compile).

@njit(parallel=True, cache=True)
def delta8_dense(ptr, deltas, vals, kind, out, nchunks):
    rows = out.shape[0]
    for c in prange(nchunks):
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            o = out[r]
            o[:] = 0
            col = 0
            for p in range(ptr[r], ptr[r + 1]):
                col += deltas[p]
                o[col] += _read(vals, p, kind)  # fillers add zero


@njit(parallel=True, cache=True)
def bitmask_dense(ptr, words, vals, kind, out, nchunks):
    rows = out.shape[0]
    one = np.uint64(1)
    for c in prange(nchunks):
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            o = out[r]
            o[:] = 0
            p = ptr[r]
            for w in range(words.shape[1]):
                bits = words[r, w]
                while bits:
                    o[64 * w + np.int64(cttz(bits))] = _read(vals, p, kind)
                    p += 1
                    bits &= bits - one


@njit(parallel=True, cache=True)
def nm_dense(words, vals, kind, n, m, bits, gpw, groups, cols, out, nchunks):
    pm = np.uint64((1 << bits) - 1)
    rows = out.shape[0]
    for c in prange(nchunks):
        for r in range(c * rows // nchunks, (c + 1) * rows // nchunks):
            o = out[r]
            o[:] = 0
            p = r * groups * n
            for g in range(groups):
                word = words[r, g // gpw]
                for s in range(n):
                    col = g * m + np.int64((word >> np.uint64(((g % gpw) * n + s) * bits)) & pm)
                    if col < cols:
                        o[col] += _read(vals, p, kind)  # padding adds zero
                    p += 1
