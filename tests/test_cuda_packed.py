"""Packed products on the device against the masked dense product.

On the Numba CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1``, in a process
of its own, threads per block and grids shrunk so that tiny matrices span
several blocks and run the grid-stride loops), and on a real GPU when one is
lent. Skipped where neither is available. Shapes are tiny: the simulator
runs every thread as a Python thread.
"""

import numpy as np
import pytest

from sparsecore import _device

from . import reference as ref

try:
    _device.cuda()
except RuntimeError as exc:  # no GPU and no simulator
    pytest.skip(f"CUDA unavailable: {exc}", allow_module_level=True)

import sparsecore as sc
from sparsecore._cuda import packed as device_packed

pytestmark = pytest.mark.cuda

DTYPES = ["float32", "float64", "float16", "bfloat16"]
KS = [None, 1, 3, 33]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_device, "THREADS", 8)  # vector products: up to 8 threads a row, 1 to 8 rows a block
    monkeypatch.setattr(_device, "THREADS_2D", (4, 4))
    monkeypatch.setattr(_device, "MAX_GRID", (3, 2, 2))


def _values(rng, shape):
    """Non-zero quarters up to 8 in magnitude: exact in every value dtype."""
    return rng.integers(1, 33, shape) * rng.choice([-1.0, 1.0], shape) / 4


def _rows(rng, shape):
    """Row 0 empty, row 1 all kept, row 2 steps of 255, 256 (a filler) and
    8, row 3 a first step over 255, the rest about 40% kept."""
    rows, cols = shape
    keep = rng.random(shape) < 0.4
    keep[0] = False
    keep[1] = True
    keep[2:4] = False
    keep[2, [0, 255, 511, cols - 1]] = True
    keep[3, [300, cols - 1]] = True
    return np.where(keep, _values(rng, shape), 0.0)


def _nm(rng, shape, n, m):
    """Row 0 empty, row 1 ``n`` in every group (the partial last one: up to
    its width), the rest fewer in some groups."""
    rows, cols = shape
    keep = np.zeros(shape, bool)
    for r in range(1, rows):
        for g in range(0, cols, m):
            width = min(m, cols - g)
            k = min(n, width) - (r > 1 and (r + g) % 3 == 0)
            keep[r, g + rng.choice(width, size=max(k, 0), replace=False)] = True
    return np.where(keep, _values(rng, shape), 0.0)


def _x(rng, cols, k):
    return rng.standard_normal(cols if k is None else (cols, k)).astype(np.float32)


def _check(p, d, x, y):
    """``y`` (a device array) is ``d @ x`` within the rounding of the accumulation, relative to ``|d| @ |x|``."""
    host = y.copy_to_host()
    assert host.dtype == (np.float64 if p.dtype == "float64" else np.float32)
    assert host.shape == (d.shape[0],) + x.shape[1:]
    scale = np.abs(d) @ np.abs(x.astype(np.float64)) + 1e-30
    err = np.abs(host - ref.matmul(d, x)) / scale
    assert err.size == 0 or err.max() < (1e-12 if p.dtype == "float64" else 1e-5)


CASES = {"delta8": ("delta8", {}, (6, 520)), "bitmask": ("bitmask", {}, (6, 520)),
         "nm2:4": ("nm", {"n": 2, "m": 4}, (5, 70)),  # 18 groups: two words a row, a last group of 2
         "nm3:16": ("nm", {"n": 3, "m": 16}, (4, 90))}  # 6 groups, 5 to a word; a last group of 10


def _case(rng, case, dtype):
    """``(format, shape, masked dense matrix, its packed matrix)`` of a case."""
    fmt, kw, shape = CASES[case]
    d = _nm(rng, shape, kw["n"], kw["m"]) if kw else _rows(rng, shape)
    return fmt, shape, d, sc.pack(d, fmt, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_products_match_masked_dense(rng, case, dtype):
    fmt, shape, d, p = _case(rng, case, dtype)
    if fmt == "delta8":
        assert p.deltas.size > np.count_nonzero(d)  # fillers taken
    assert device_packed.row_width(device_packed.to_device(p).entries / shape[0]) == 8
    for k in KS:
        x = _x(rng, shape[1], k)
        _check(p, d, x, sc.packed_matmul(p, x, device="cuda"))


@pytest.mark.parametrize("case", list(CASES))
def test_short_rows_take_a_thread_each(rng, case):
    fmt, kw, _ = CASES[case]
    shape = (9, 8) if kw else (9, 20)
    d = _nm(rng, shape, 1, kw["m"]) if kw else np.where(rng.random(shape) < 0.1, _values(rng, shape), 0.0)
    p = sc.pack(d, fmt, dtype="bfloat16", **({"n": 1, "m": kw["m"]} if kw else {}))
    assert device_packed.row_width(device_packed.to_device(p).entries / shape[0]) == 1
    for k in (None, 3):
        x = _x(rng, shape[1], k)
        _check(p, d, x, sc.packed_matmul(p, x, device="cuda"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty_shapes(rng, case, shape):
    fmt, kw, _ = CASES[case]
    p = sc.pack(np.zeros(shape, np.float32), fmt, **kw)
    for k in (None, 3, 0):
        x = _x(rng, shape[1], k)
        y = sc.packed_matmul(p, x, device="cuda").copy_to_host()
        assert y.shape == (shape[0],) + x.shape[1:] and not y.any()


def test_device_operands_out_and_routing(rng):
    c = _device.cuda()
    d = _rows(rng, (6, 520))
    p = sc.pack(d, "bitmask", dtype="float32")
    dp = device_packed.to_device(p)
    assert device_packed.to_device(dp) is dp
    x = _x(rng, 520, None)
    before = x.copy()
    xd = c.to_device(x)
    _check(p, d, x, sc.packed_matmul(p, xd))  # a device x: "auto" takes the GPU
    _check(p, d, x, sc.packed_matmul(dp, x))  # a packed matrix on the device: so does it
    assert isinstance(sc.packed_matmul(p, x), np.ndarray)  # host operands stay on the host
    out = c.device_array(6, np.float32)
    assert sc.packed_matmul(dp, xd, out) is out
    _check(p, d, x, out)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(xd.copy_to_host(), before)
    # a float64 x on the device with float32 values: accumulated in float64, a float32 result
    X = rng.standard_normal((520, 3))
    _check(p, d, X, sc.packed_matmul(dp, c.to_device(X)))
    # a float64 matrix takes a float64 x from the host as float64
    p64 = sc.pack(d, "delta8", dtype="float64")
    _check(p64, d, X, sc.packed_matmul(p64, X, device="cuda"))


def test_bad_input_is_named(rng):
    c = _device.cuda()
    p = sc.pack(_rows(rng, (4, 520)), "delta8", dtype="float32")
    with pytest.raises(ValueError, match=r"x has shape \(7,\); a packed matrix of shape \(4, 520\) needs"):
        sc.packed_matmul(p, np.ones(7, np.float32), device="cuda")
    with pytest.raises(ValueError, match=r"x has shape \(520, 2, 2\)"):
        sc.packed_matmul(p, np.ones((520, 2, 2), np.float32), device="cuda")
    with pytest.raises(TypeError, match="x has dtype complex64"):
        sc.packed_matmul(p, np.ones(520, np.complex64), device="cuda")
    with pytest.raises(TypeError, match="x on the device must be float32 or float64, got int32"):
        sc.packed_matmul(p, c.to_device(np.ones(520, np.int32)))
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 device array of shape \(4,\)"):
        sc.packed_matmul(p, np.ones(520, np.float32), c.device_array(5, np.float32), device="cuda")
    with pytest.raises(ValueError, match="out must be a contiguous float32 device array"):
        sc.packed_matmul(p, np.ones(520, np.float32), np.empty(4, np.float32), device="cuda")
    with pytest.raises(TypeError, match="expected a PackedMatrix, got ndarray"):
        sc.packed_matmul(np.ones((4, 520)), np.ones(520, np.float32), device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'auto', got 'gpu'"):
        sc.packed_matmul(p, np.ones(520, np.float32), device="gpu")


def test_public_device_face(rng):
    """sparsecore.cuda.to_device_packed and packed_matmul: the arrays copied once, products on the device."""
    from sparsecore import cuda as scu

    w = np.where(rng.random((9, 70)) < 0.5, _values(rng, (9, 70)), 0).astype(np.float32)
    p = scu.to_device_packed(sc.pack(w, "delta8"))
    assert isinstance(p, scu.DevicePacked) and p.shape == (9, 70)
    x = rng.standard_normal(70).astype(np.float32)
    got = scu.packed_matmul(p, x).copy_to_host()
    np.testing.assert_allclose(got, ref.matmul(w, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_copy_is_the_host_one(rng, case, dtype):
    fmt, shape, d, p = _case(rng, case, dtype)
    kw = CASES[case][1]
    dp = device_packed.to_device(p)
    got = dp.toarray().copy_to_host()
    assert got.dtype == (np.float64 if dtype == "float64" else np.float32)
    np.testing.assert_array_equal(got, p.toarray())
    np.testing.assert_array_equal(got, d)  # the values are exact in every dtype
    from numba import cuda

    out = cuda.to_device(np.full(shape, 7, got.dtype))  # written in place, stale entries cleared
    assert dp.toarray(out) is not None
    np.testing.assert_array_equal(out.copy_to_host(), d)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dp.toarray(cuda.to_device(np.zeros((1, 1), got.dtype)))
    empty = device_packed.to_device(sc.pack(np.zeros((0, 4), np.float32), fmt, **kw))
    assert empty.toarray().copy_to_host().shape == (0, 4)
