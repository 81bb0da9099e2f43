import numpy as np
import pytest
import scipy.sparse as sp

import sparsecore as sc

from . import reference as ref
from .conftest import DTYPES, SHAPES, make

pytestmark = pytest.mark.kernel


def _assert_canonical(a, dense2d):
    sc.check_csr(a, full=True)
    assert a.indices.dtype == a.indptr.dtype
    data, indices, indptr = ref.csr_parts(dense2d)
    np.testing.assert_array_equal(a.indptr, indptr)
    np.testing.assert_array_equal(a.indices, indices)
    np.testing.assert_array_equal(a.data, data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zero_rows"])
@pytest.mark.parametrize("int64", [False, True])
def test_to_csr_sparsity_matches_reference(rng, dtype, shape, kind, int64, monkeypatch):
    if int64:
        monkeypatch.setattr(sc.csr, "INT32_LIMIT", -1)
    w = make(rng, shape, dtype, kind)
    s = make(rng, shape, dtype, "ties")
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        a = sc.to_csr(w, scores=s, sparsity=sparsity)
        keep = ref.keep_mask_sparsity(s, round(sparsity * s.size))
        dense = np.where(keep, w, 0).reshape(sc.matrix_shape(shape))
        _assert_canonical(a, dense)
        assert a.dtype == dtype
        assert a.indices.dtype == (np.int64 if int64 else np.int32)
        np.testing.assert_array_equal(sc.to_dense(a, shape), dense.reshape(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_to_csr_threshold_and_mask_match_reference(rng, dtype, shape):
    w = make(rng, shape, dtype, "zero_rows")
    a = sc.to_csr(w, threshold=0.5)  # magnitude scores
    dense = np.where(np.abs(w.astype(np.float64)) < 0.5, 0, w)
    _assert_canonical(a, dense.reshape(sc.matrix_shape(shape)))
    mask = rng.random(shape) < 0.3
    a = sc.to_csr(w, mask)
    _assert_canonical(a, np.where(mask, w, 0).reshape(sc.matrix_shape(shape)))
    a = sc.to_csr(w)
    _assert_canonical(a, w.reshape(sc.matrix_shape(shape)))


def test_to_csr_equals_scipy(rng):
    w = make(rng, (40, 70), np.float32, "ties")
    a = sc.to_csr(w)
    b = sp.csr_array(w)
    b.sum_duplicates()
    b.eliminate_zeros()
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    assert isinstance(a, sp.csr_array)


def test_partial_tie_row_split(rng):
    # Ties at the threshold spread over many rows, the quota ending mid-row,
    # with zero weights among the ties.
    s = np.ones((9, 11))
    w = rng.standard_normal((9, 11))
    w[4, ::3] = 0
    for k in range(0, 100, 7):
        a = sc.to_csr(w, scores=s, sparsity=k / 99)
        keep = ref.keep_mask_sparsity(s, k)
        _assert_canonical(a, np.where(keep, w, 0))


def test_float16_weights_give_float32_values(rng):
    w = rng.standard_normal((5, 6)).astype(np.float16)
    a = sc.to_csr(w, sparsity=0.5)
    assert a.dtype == np.float32
    keep = ref.keep_mask_sparsity(np.abs(w.astype(np.float32)), 15)
    _assert_canonical(a, np.where(keep, w.astype(np.float32), 0))


def test_index_dtype_rule():
    assert sc.index_dtype((10, 10), 100) == np.int32
    assert sc.index_dtype((2**31, 1), 0) == np.int64
    assert sc.index_dtype((1, 1), 2**31) == np.int64
    assert sc.index_dtype((2**31 - 1, 5), 2**31 - 1) == np.int32


def test_nd_shapes_round_trip(rng):
    for shape in [(), (7,), (4, 3, 2, 2)]:
        w = rng.standard_normal(shape)
        a = sc.to_csr(w)
        assert a.shape == sc.matrix_shape(shape)
        np.testing.assert_array_equal(sc.to_dense(a, shape), w)
    with pytest.raises(ValueError, match="cannot take the weight shape"):
        sc.to_dense(sc.to_csr(np.ones((4, 6))), (6, 4))


def _csr(data, indices, indptr, shape):
    a = sp.csr_array((np.asarray(data, float), np.asarray(indices), np.asarray(indptr)), shape=shape)
    return a


@pytest.mark.parametrize("bad,match", [
    (lambda: _csr([1.0, 2.0], [0, 5], [0, 1, 2], (2, 3)), "lie in"),
    (lambda: _csr([1.0, 2.0], [1, 1], [0, 2, 2], (2, 3)), "strictly increasing"),
    (lambda: _csr([1.0, 0.0], [0, 1], [0, 1, 2], (2, 3)), "explicit zeros"),
])
def test_check_csr_full_scan_names_rule(bad, match):
    a = bad()
    sc.check_csr(a)  # O(1) checks pass
    with pytest.raises(ValueError, match=match):
        sc.check_csr(a, full=True)


def test_check_csr_cheap_checks():
    a = _csr([1.0, 2.0], [0, 1], [0, 1, 2], (2, 3))
    a.indptr = np.array([0, 1, 3], a.indices.dtype)
    with pytest.raises(ValueError, match="indptr\\[-1\\] must equal nnz"):
        sc.check_csr(a)
    a = _csr([1.0, 2.0], [0, 1], [0, 1, 2], (2, 3))
    a.indptr = np.array([0, 2, 1, 2], a.indices.dtype)
    with pytest.raises(ValueError, match="rows \\+ 1"):
        sc.check_csr(a)
    a = _csr([1.0, 2.0], [0, 1], [0, 2, 2], (2, 3))
    a.indptr = np.array([0, 2, 2], np.int64)
    a.indices = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="share one dtype"):
        sc.check_csr(a)
    a = _csr([1.0, 2.0], [0, 1], [0, 2, 2], (2, 3))
    a.indptr = np.array([0, 3, 2], a.indices.dtype)
    with pytest.raises(ValueError, match="non-decreasing"):
        sc.check_csr(a, full=True)
    with pytest.raises(TypeError, match="CSR"):
        sc.check_csr(np.eye(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 17), (17, 1), (64, 300), (5, 0)])
@pytest.mark.parametrize("k", [None, 1, 7])
@pytest.mark.parametrize("int64", [False, True])
def test_csr_matmul_matches_dense(rng, dtype, shape, k, int64, monkeypatch):
    if int64:
        monkeypatch.setattr(sc.csr, "INT32_LIMIT", -1)
    w = make(rng, shape, dtype, "zero_rows")
    a = sc.to_csr(w, sparsity=0.7)
    dense = a.toarray()
    x = make(rng, (shape[1],) if k is None else (shape[1], k), dtype)
    got = sc.csr_matmul(a, x)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref.matmul(dense, x), rtol=tol, atol=tol * max(1, shape[1]))
    np.testing.assert_allclose(got, a @ x, rtol=tol, atol=tol * max(1, shape[1]))


def test_csr_matmul_out_and_layouts(rng):
    w = rng.standard_normal((30, 20)).astype(np.float32)
    a = sc.to_csr(w, sparsity=0.5)
    x = np.asfortranarray(rng.standard_normal((20, 6)).astype(np.float32))
    out = np.empty((30, 6), np.float32)
    res = sc.csr_matmul(a, x, out=out)
    assert res is out
    np.testing.assert_allclose(out, a.toarray() @ x, rtol=1e-5, atol=1e-5)
    xs = rng.standard_normal(40).astype(np.float32)[::2]  # strided vector
    np.testing.assert_allclose(sc.csr_matmul(a, xs), a.toarray() @ xs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        sc.csr_matmul(a, np.ones(21, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        sc.csr_matmul(a, x, out=np.empty((30, 6), np.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        sc.csr_matmul(a, np.ones(20, np.complex64))
    # mixed precision computes in float64
    assert sc.csr_matmul(a, np.ones(20)).dtype == np.float64


def test_csr_matmul_skewed_rows_balance(rng):
    w = np.zeros((200, 300), np.float32)
    w[3] = rng.standard_normal(300)
    w[150:, :5] = 1.0
    a = sc.to_csr(w)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    np.testing.assert_allclose(sc.csr_matmul(a, x), w @ x, rtol=1e-5, atol=1e-5)
