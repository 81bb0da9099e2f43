"""Packed sparse matrices: encodings against the entry-by-entry references,
exact round trips to CSR, products against the masked dense product."""

import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore import packed

from . import reference as ref

pytestmark = pytest.mark.kernel

VALUE_DTYPES = ["float32", "float64", "float16", "bfloat16"]
# CI's bounds-checked pass compiles every kernel variant afresh: there the
# index arithmetic (the same for every value dtype: the 16-bit path differs
# only in how a value is widened) is checked on float32 values only, with
# vectors and one matrix width.
BOUNDSCHECK = os.environ.get("NUMBA_BOUNDSCHECK") == "1"
if BOUNDSCHECK:
    VALUE_DTYPES = ["float32"]
SHAPES = [(0, 5), (4, 0), (1, 1), (1, 17), (17, 1), (7, 13), (9, 300), (3, 1000), (130, 64)]


def _dense(rng, shape, kind):
    """float64 values exactly representable in every value dtype (bfloat16's 8 bits of mantissa)."""
    w = np.round(rng.standard_normal(shape) * 64) / 64
    w[w == 0] = 0.5
    if kind == "random":
        w[rng.random(shape) < 0.6] = 0
    elif kind == "rows":  # empty rows, all-dense rows, one far column
        w[::3] = 0
        if shape[0] > 1:
            w[1, :] = 0.25 + np.arange(shape[1]) % 7
        if shape[0] > 2 and shape[1]:
            w[2, :] = 0
            w[2, -1] = -3.0
    elif kind == "gaps":  # steps of 255, 256, 510, 511 and over
        w[:] = 0
        for r in range(shape[0]):
            for c in (0, 255, 511, 1021, 1022)[: 1 + r % 5]:
                if c < shape[1]:
                    w[r, c] = 1.0 + r
    return w


def _x(rng, cols, k):
    return rng.standard_normal(cols if k is None else (cols, k)).astype(np.float32)


def _stored(vals, dtype):
    return ref.half_value(vals, dtype) if dtype in ("float16", "bfloat16") else vals.astype(np.float64)


def _as(dense, dtype):
    """The dense weight as the input dtype (bfloat16: float32 values, stored via ``dtype=``)."""
    return dense.astype({"float64": np.float64, "float16": np.float16}.get(dtype, np.float32))


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "rows", "gaps"])
def test_delta8_and_bitmask_match_reference(rng, dtype, shape, kind):
    d = _dense(rng, shape, kind)
    w = _as(d, dtype)
    p = sc.pack(w, "delta8", dtype=dtype)
    ptr, deltas, vals = ref.packed_delta8(d)
    np.testing.assert_array_equal(p.ptr, ptr)
    np.testing.assert_array_equal(p.deltas, deltas)
    np.testing.assert_array_equal(_stored(p.vals, dtype), vals)
    b = sc.pack(w, "bitmask", dtype=dtype)
    words, bvals = ref.packed_bitmask(d)
    np.testing.assert_array_equal(b.words, words)
    np.testing.assert_array_equal(_stored(b.vals[:b.ptr[-1]], dtype), bvals)
    assert b.vals.size == b.ptr[-1] + packed._PAD and not b.vals[b.ptr[-1]:].any()  # the AVX2 kernel's slack
    for q in (p, b):
        assert q.dtype == dtype
        assert q.nnz == np.count_nonzero(d)
        assert q.nbytes == sum(a.nbytes for a in (q.vals, q.ptr, q.deltas, q.words) if a is not None)
        a = q.to_csr()
        sc.check_csr(a, full=True)
        data, indices, indptr = ref.csr_parts(d)
        np.testing.assert_array_equal(a.indptr, indptr)
        np.testing.assert_array_equal(a.indices, indices)
        np.testing.assert_array_equal(a.data, data)
        assert a.dtype == (np.float64 if dtype == "float64" else np.float32)


def _nm_dense(rng, shape, n, m, fewer):
    d = _dense(rng, shape, "none")
    rows, cols = shape
    keep = np.zeros(shape, bool)
    for r in range(rows):
        for g in range(0, cols, m):
            width = min(m, cols - g)
            k = min(n, width) - (fewer and (r + g) % 3 == 0)
            keep[r, g + rng.choice(width, size=max(k, 0), replace=False)] = True
    return np.where(keep, d, 0)


# 2:4 in every value dtype; the other patterns (each a kernel variant to compile) in one dtype each
NM_CASES = [(2, 4, dt) for dt in VALUE_DTYPES] + [(n, m, dt) for n, m, dt in [
    (2, 8, "float32"), (1, 2, "float16"), (3, 16, "float64")] if dt in VALUE_DTYPES]


@pytest.mark.parametrize("n,m,dtype", NM_CASES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 10), (1, 3), (0, 8), (6, 0), (2, 1030)])
def test_nm_matches_reference(rng, n, m, shape, dtype, monkeypatch):
    d = _nm_dense(rng, shape, n, m, fewer=True)
    p = sc.pack(_as(d, dtype), "nm", n=n, m=m, dtype=dtype)
    words, vals = ref.packed_nm(d, n, m)
    np.testing.assert_array_equal(p.words, words)
    np.testing.assert_array_equal(_stored(p.vals, dtype), vals)
    np.testing.assert_array_equal(p.toarray(), d)
    for k in (None, 1, 3, 70):
        x = _x(rng, shape[1], k)
        for avx2 in ([None, False] if k is None else [None]):  # the AVX2 vector kernel (2:4, 1:2) and the portable
            monkeypatch.setattr(packed, "_AVX2", avx2)
            np.testing.assert_allclose(p @ x, ref.matmul(d, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["delta8", "bitmask"])
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [None, 3] if BOUNDSCHECK else [None, 1, 2, 5, 64, 300])
def test_products_match_masked_dense(rng, fmt, dtype, shape, k, monkeypatch):
    if k is not None and dtype == "float16":
        pytest.skip("the matrix products read float16 as bfloat16 does but for one conversion: tested by vectors")
    d = _dense(rng, shape, "rows")
    p = sc.pack(_as(d, dtype), fmt, dtype=dtype)
    x = _x(rng, shape[1], k)
    # the vector products: the AVX2 kernels where the CPU has them, and the portable ones
    for avx2 in ([None, False] if k is None else [None]):
        monkeypatch.setattr(packed, "_AVX2", avx2)
        y = sc.packed_matmul(p, x)
        assert y.dtype == (np.float64 if dtype == "float64" else np.float32)
        assert y.shape == ((shape[0],) if k is None else (shape[0], k))
        # within float32 rounding of the accumulation: relative to sum |w| |x|
        scale = np.abs(d) @ np.abs(x.astype(np.float64)) + 1e-30
        err = np.abs(y - ref.matmul(d, x)) / scale
        assert err.size == 0 or err.max() < (1e-13 if dtype == "float64" else 4e-6)


def test_products_split_between_threads(rng, monkeypatch):
    """Balanced ranges of rows on several threads give the one-thread result."""
    d = _dense(rng, (301, 700), "random")
    x = _x(rng, 700, None)
    X = _x(rng, 700, 9)
    for fmt, kw in [("delta8", {}), ("bitmask", {}), ("nm", {"n": 2, "m": 4})]:
        dd = _nm_dense(rng, (301, 700), 2, 4, fewer=True) if fmt == "nm" else d
        p = sc.pack(dd.astype(np.float32), fmt, **kw)
        one = (p @ x, p @ X)
        monkeypatch.setattr(packed, "_PAR_ENTRIES", 1)
        many = (p @ x, p @ X)
        monkeypatch.setattr(packed, "_PAR_ENTRIES", 1 << 15)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


def test_from_csr_nmcompact_and_nd(rng):
    d = _dense(rng, (6, 40), "random").astype(np.float32)
    a = sp.csr_array(d)
    for fmt in ("delta8", "bitmask"):
        p = sc.pack(a, fmt)
        assert p.dtype == "float32"
        np.testing.assert_array_equal(p.toarray(), d)
    w4 = d.reshape(6, 2, 4, 5)  # N-D: packed as (6, 40)
    assert sc.pack(w4, "delta8").shape == (6, 40)
    nd = _nm_dense(rng, (4, 16), 2, 4, fewer=False)
    c = sc.NMCompact.from_dense(nd, 2, 4)
    p = sc.pack(c)
    assert (p.format, p.n, p.m) == ("nm", 2, 4)
    np.testing.assert_array_equal(p.toarray(), nd)


def test_bfloat16_rounds_to_nearest_even():
    vals = np.array([1.0, 1.00390625, 1.01171875, -3.0e38, 1e-40, np.float32(1) + np.float32(2**-9)], np.float32)
    p = sc.pack(vals.reshape(1, -1), "delta8", dtype="bfloat16")
    np.testing.assert_array_equal(p.vals, ref.half_bits(vals, "bfloat16"))
    h = sc.pack(vals[:3].reshape(1, -1), "bitmask", dtype="float16")
    np.testing.assert_array_equal(h.vals[:3], ref.half_bits(vals[:3], "float16"))


def test_auto_takes_the_fewest_bytes(rng):
    rows, cols = 64, 512
    # float16 30% sparse: bitmask reads far fewer bytes (38%); float32 70%: delta8 within 20% of the
    # bitmask, and faster; 97%: delta8 the fewest
    for sparsity, dtype, want in [(0.3, np.float16, "bitmask"), (0.7, np.float32, "delta8"),
                                  (0.97, np.float32, "delta8")]:
        d = np.where(rng.random((rows, cols)) < sparsity, 0, 1.0).astype(dtype)
        sizes = {f: sc.pack(d, f).nbytes for f in ("delta8", "bitmask")}
        p = sc.pack(d)
        assert p.format == want
        assert p.nbytes == sizes[want] <= (1 + packed._TIE) * min(sizes.values())
    assert sizes["delta8"] < sizes["bitmask"]
    nm = _nm_dense(rng, (rows, cols), 2, 4, fewer=False).astype(np.float32)
    assert sc.pack(nm).format == "nm"  # 2:4 fits: fewer bytes than a bitmask (no row offsets)
    wide = np.zeros((2, 64), np.float32)
    wide[:, ::2] = 1.0  # fits 20:32, whose positions (20 x 5 bits) do not fit a word: auto passes it by
    assert sc.pack(wide, n=20, m=32).format != "nm"
    assert sc.pack(nm).nbytes < sc.pack(nm, "bitmask").nbytes


def test_inputs_left_untouched(rng):
    d = _dense(rng, (5, 30), "random").astype(np.float32)
    mask = d != 0
    before = (d.copy(), mask.copy())
    p = sc.pack(d, "bitmask", mask=mask)
    x = _x(rng, 30, None)
    x0 = x.copy()
    p @ x
    np.testing.assert_array_equal(d, before[0])
    np.testing.assert_array_equal(mask, before[1])
    np.testing.assert_array_equal(x, x0)


def test_mask_keeps_where_true(rng):
    d = rng.standard_normal((4, 9)).astype(np.float32)
    mask = rng.random((4, 9)) < 0.5
    for fmt in ("delta8", "bitmask"):
        np.testing.assert_array_equal(sc.pack(d, fmt, mask=mask).toarray(), np.where(mask, d, 0))


def test_bad_input_is_named():
    w = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown format 'csc'"):
        sc.pack(w, "csc", name="fc1")
    with pytest.raises(ValueError, match="mask for 'fc1' must be bool"):
        sc.pack(w, mask=np.ones((4, 3), bool), name="fc1")
    with pytest.raises(TypeError, match="cannot have dtype"):
        sc.pack(w, dtype="int8")
    with pytest.raises(TypeError, match="integer dtype"):
        sc.pack(np.eye(3, dtype=np.int32))
    with pytest.raises(ValueError, match="row 0 holds 3 entries in its group 0"):
        sc.pack(np.array([[1.0, 1.0, 1.0, 0.0]], np.float32), "nm", n=2, m=4)
    with pytest.raises(ValueError, match="give both n and m"):
        sc.pack(w, "nm", n=2)
    with pytest.raises(ValueError, match="1 <= N < M"):
        sc.pack(w, "nm", n=4, m=4)
    bad = sp.csr_array((np.ones(2), np.array([1, 0]), np.array([0, 2])), shape=(1, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        sc.pack(bad)
    with pytest.raises(TypeError, match="CSC"):
        sc.pack(sp.csc_array(w))
    p = sc.pack(w)
    with pytest.raises(ValueError, match=r"x has shape \(3,\)"):
        p @ np.ones(3, np.float32)
    with pytest.raises(ValueError, match="out must be a float32 ndarray of shape"):
        sc.packed_matmul(p, np.ones(4), out=np.empty(4, np.float64))
    with pytest.raises(TypeError, match="expected a PackedMatrix"):
        sc.packed_matmul(w, np.ones(4))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 12), cols=st.integers(0, 700), density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       fmt=st.sampled_from(["delta8", "bitmask", "auto"]), dtype=st.sampled_from(VALUE_DTYPES))
def test_property_round_trip_and_product(rows, cols, density, seed, fmt, dtype):
    rng = np.random.default_rng(seed)
    d = np.where(rng.random((rows, cols)) < density, np.round(rng.standard_normal((rows, cols)) * 8) / 8, 0)
    p = sc.pack(_as(d, dtype), fmt, dtype=dtype)
    np.testing.assert_array_equal(p.toarray(), d)
    assert p.nnz == np.count_nonzero(d)
    x = _x(rng, cols, None)
    scale = np.abs(d) @ np.abs(x.astype(np.float64)) + 1e-30
    assert rows == 0 or (np.abs(p @ x - ref.matmul(d, x)) / scale).max() < 4e-6


def test_check_packed_accepts_packs_and_names_each_broken_rule(rng):
    import dataclasses

    d = _dense(rng, (5, 130), "random").astype(np.float32)
    for fmt, kw in [("delta8", {}), ("bitmask", {}), ("nm", {"n": 2, "m": 4})]:
        w = _nm_dense(rng, (5, 130), 2, 4, fewer=True).astype(np.float32) if fmt == "nm" else d
        assert sc.check_packed(sc.pack(w, fmt, **kw)) is not None
    p = sc.pack(d, "delta8")
    cases = [
        (dataclasses.replace(p, ptr=p.ptr[:-1]), "rows \\+ 1"),
        (dataclasses.replace(p, ptr=np.r_[1, p.ptr[1:]]), "from 0 without going back"),
        (dataclasses.replace(p, deltas=np.r_[p.deltas[:1], 0, p.deltas[2:]].astype(np.uint8)), "rise within a row"),
        (dataclasses.replace(p, deltas=np.full_like(p.deltas, 200)), "lie in \\[0, columns\\)"),
        (dataclasses.replace(p, vals=p.vals.astype(np.float64)), "1-D float32"),
        (dataclasses.replace(p, format="csr"), "unknown format"),
    ]
    b = sc.pack(d, "bitmask")
    words = b.words.copy()
    words[0, 0] ^= np.uint64(1) << np.uint64(63) if not words[0, 0] >> np.uint64(63) & np.uint64(1) else \
        np.uint64(1) << np.uint64(62)
    cases += [(dataclasses.replace(b, words=words), "set bits must match"),
              (dataclasses.replace(b, ptr=b.ptr + np.r_[0, np.full(5, b.vals.size)]), "past the values")]
    tail = b.words.copy()
    tail[0, -1] |= np.uint64(1) << np.uint64(63)  # column 191 of 130
    cases.append((dataclasses.replace(b, words=tail), "set bits must match|past the last column"))
    nm = sc.pack(_nm_dense(rng, (3, 16), 2, 4, fewer=False).astype(np.float32), "nm")
    same = nm.words.copy()
    same[0, 0] = np.uint64(0)  # both positions of every group of row 0 read 0
    cases += [(dataclasses.replace(nm, words=same), "inside their group and differ"),
              (dataclasses.replace(nm, vals=nm.vals[:-1]), "n values per group")]
    for broken, rule in cases:
        with pytest.raises(ValueError, match=rule):
            sc.check_packed(broken, "fc1")
    with pytest.raises(TypeError, match="expected a PackedMatrix"):
        sc.check_packed(d)


@pytest.mark.parametrize("fmt", ["delta8", "bitmask", "nm"])
def test_kernel_is_what_the_product_runs(rng, fmt):
    d = _nm_dense(rng, (9, 100), 2, 4, fewer=False) if fmt == "nm" else _dense(rng, (9, 100), "random")
    p = sc.pack(d.astype(np.float32), fmt)
    x = rng.standard_normal(100).astype(np.float32)
    kern, head, tail, width, threads = p.kernel(True, threads=1)
    assert threads == 1 and width >= 100
    out = np.empty(9, np.float32)
    kern(*head, np.concatenate([x, np.zeros(width - 100, np.float32)]), out, *tail)
    np.testing.assert_allclose(out, ref.matmul(d, x), rtol=1e-5, atol=1e-4)
    assert sc.pack(np.zeros((0, 4), np.float32), fmt if fmt != "nm" else "delta8").kernel()[0] is None


def test_products_are_made_once_per_matrix_and_threads(rng, monkeypatch):
    import pickle

    d = _dense(rng, (40, 300), "random")
    p = sc.pack(d.astype(np.float32), "delta8")
    x = rng.standard_normal(300).astype(np.float32)
    made = []
    real = packed.PackedMatrix.product
    monkeypatch.setattr(packed.PackedMatrix, "product", lambda self, vector=True: made.append(vector) or
                        real(self, vector))
    for _ in range(3):
        np.testing.assert_allclose(sc.packed_matmul(p, x), ref.matmul(d, x), rtol=1e-5, atol=1e-4)
    sc.packed_matmul(p, x[:, None])
    assert made == [True, False]
    q = pickle.loads(pickle.dumps(p))  # the kept callables live beside the matrix, not in it
    np.testing.assert_allclose(sc.packed_matmul(q, x), ref.matmul(d, x), rtol=1e-5, atol=1e-4)
    assert made == [True, False, True]
