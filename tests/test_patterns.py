"""N:M, block and unit patterns against their references and oracles."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sparsecore as sc

from . import reference as ref
from .conftest import DTYPES, make

pytestmark = pytest.mark.kernel

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# --- N:M --------------------------------------------------------------------

# TensorFlow Model Optimization, pruning_utils_test.py: generate_m_to_n_mask
# (window (1, m), k kept) and is_pruned_2x4.
TFMOT_NM = [
    ([[1, 2, 3, 4]], 2, 4, [[0, 0, 1, 1]]),
    ([[1, 2, 3, 4, 5, 6]], 3, 6, [[0, 0, 0, 1, 1, 1]]),
    ([[1, 2], [3, 4]], 1, 2, [[0, 1], [0, 1]]),
]
TFMOT_IS_2X4 = [
    ([[1, 2, 3, 4]], False),
    ([[1, 2, 0, 4], [0, 0, 1, 2]], False),
    ([[1, 2, 3, 4, 5, 6]], False),
    ([[1, 2, 0, 0]], True),
    ([[1, 2, 0, 0], [0, 0, 0, 1], [0, 2, 1, 0]], True),
    ([[0, 0, 0, 0]], True),
    ([], True),
]


@pytest.mark.parametrize("w, n, m, expected", TFMOT_NM)
def test_nm_mask_tfmot_oracle(w, n, m, expected):
    got = sc.nm_mask(np.array(w, np.float32), n, m)
    np.testing.assert_array_equal(got, np.array(expected, bool))


def test_nm_mask_tfmot_incompatible_shape_is_an_error():
    # TFMOT returns None for a (1, 2) weight with a (1, 6) window; we refuse with a clear message
    with pytest.raises(ValueError, match=r"axis 1 has 2 entries, not a multiple of 6"):
        sc.nm_mask(np.array([[1.0, 2.0]]), 1, 6)


@pytest.mark.parametrize("w, expected", TFMOT_IS_2X4)
def test_is_n_m_tfmot_oracle(w, expected):
    assert sc.is_n_m(np.array(w, np.float32), 2, 4) is expected


NM_CASES = [((8, 16), 2, 4, None), ((8, 16), 4, 8, 1), ((3, 8, 2, 2), 2, 4, None), ((12, 5), 1, 3, 0),
            ((6, 4, 3), 2, 4, 1), ((2, 3, 14), 3, 7, -1), ((16,), 2, 4, None), ((0, 8), 2, 4, None),
            ((6, 0), 1, 2, 0), ((1, 4), 3, 4, None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, m, axis", NM_CASES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zero_rows"])
@pytest.mark.parametrize("absolute", [False, True])
def test_nm_mask_matches_reference(rng, dtype, shape, n, m, axis, kind, absolute):
    s = make(rng, shape, dtype, kind)
    got = sc.nm_mask(s, n, m, axis=axis, absolute=absolute)
    ax = (1 if len(shape) >= 2 else 0) if axis is None else axis
    np.testing.assert_array_equal(got, ref.nm_keep(np.abs(s) if absolute else s, n, m, ax))


@pytest.mark.parametrize("n, m, match", [(2, 2, "1 <= N < M"), (0, 4, "1 <= N < M"), (5, 4, "1 <= N < M")])
def test_nm_bad_n_m(n, m, match):
    with pytest.raises(ValueError, match=match):
        sc.nm_mask(np.ones((2, 4)), n, m)
    with pytest.raises(ValueError, match=match):
        sc.NM(n, m)


def test_nm_bad_input():
    with pytest.raises(TypeError, match="integer"):
        sc.NM(2.0, 4)
    with pytest.raises(ValueError, match="written like '2:4'"):
        sc.NM.parse("2-4")
    with pytest.raises(ValueError, match="scalar"):
        sc.nm_mask(np.float64(1.0), 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        sc.nm_mask(np.ones((2, 4)), 2, 4, axis=2)
    s = np.ones((2, 8))
    s[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or Inf value \(first: NaN at index \(1, 5\)\)"):
        sc.nm_mask(s, 2, 4)
    with pytest.raises(ValueError, match=r"'conv'.*axis 1 has 6 entries, not a multiple of 4"):
        sc.prune({"conv": np.ones((4, 6, 3, 3))}, pattern="2:4")
    with pytest.raises(ValueError, match="fixes the sparsity"):
        sc.prune({"w": np.ones((4, 8))}, pattern="2:4", sparsity=0.5)


@SETTINGS
@given(data=st.data(), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 5), (1, 4)]))
def test_nm_every_group_keeps_exactly_n(data, nm):
    n, m = nm
    rows = data.draw(st.integers(0, 6))
    groups = data.draw(st.integers(0, 4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    elems = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 7.0])
    s = data.draw(hnp.arrays(dtype, (rows, groups * m), elements=elems))
    keep = sc.nm_mask(s, n, m)
    counts = keep.reshape(rows, groups, m).sum(axis=2)
    assert (counts == n).all()
    # every kept entry scores at least as high as every pruned one of its group
    g = s.astype(np.float64).reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    lo_kept = np.where(k, g, np.inf).min(axis=2)
    hi_pruned = np.where(~k, g, -np.inf).max(axis=2)
    assert (lo_kept >= hi_pruned).all()
    w = np.where(keep, s, 0)
    assert sc.is_n_m(w, n, m)
    c = sc.NMCompact.from_dense(s, n, m, mask=keep)
    np.testing.assert_array_equal(c.dense(), w)
    np.testing.assert_array_equal(sc.NMCompact.from_dense(c.dense(), n, m).dense(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((4, 16), None), ((3, 8, 3, 3), 1), ((8, 6), 0), ((3, 3, 8, 5), 2)])
def test_nm_compact_round_trip(rng, dtype, shape, axis):
    w = make(rng, shape, dtype)
    keep = sc.nm_mask(w, 2, 4, axis=axis, absolute=True)
    c = sc.NMCompact.from_dense(w, 2, 4, mask=keep, axis=axis)
    ax = 1 if axis is None else axis
    moved = np.moveaxis(w, ax, -1).shape
    assert c.values.shape == moved[:-1] + (moved[-1] // 2,)
    assert c.values.dtype == w.dtype and c.positions.dtype == np.uint8
    assert c.positions.max() < 4
    assert c.nbytes == c.values.nbytes + c.positions.nbytes
    masked = np.where(keep, w, 0)
    np.testing.assert_array_equal(c.dense(), masked)
    again = sc.NMCompact.from_dense(c.dense(), 2, 4, axis=axis)
    np.testing.assert_array_equal(again.values, c.values)
    np.testing.assert_array_equal(again.positions, c.positions)


def test_nm_compact_refuses_dense_groups():
    with pytest.raises(ValueError, match=r"not 2:4 sparse along axis 1: a group holds 3 kept entries"):
        sc.NMCompact.from_dense(np.array([[1.0, 1.0, 1.0, 0.0]]), 2, 4)


@pytest.mark.parametrize("criterion", ["magnitude", "fisher", "taylor", "obd"])
def test_prune_nm_with_any_criterion(rng, criterion):
    w = {"fc1": rng.standard_normal((8, 16)).astype(np.float32), "conv": rng.standard_normal((4, 8, 3, 3))}
    acc = sc.GradientAccumulator(stats=("g2", "wg"))
    for _ in range(3):
        acc.update({k: rng.standard_normal(v.shape) for k, v in w.items()}, weights=w)
    r = sc.prune(w, criterion, state=acc, pattern=sc.NM(2, 4))
    for name, arr in w.items():
        scores = sc.get_criterion(criterion)(arr, acc.state(name))
        np.testing.assert_array_equal(r.masks[name], ref.nm_keep(scores, 2, 4, 1))
        np.testing.assert_array_equal(r.dense(name), np.where(r.masks[name], arr, 0))
        sc.check_csr(r.csr[name], full=True)
        assert sc.is_n_m(r.dense(name), 2, 4)
        assert r.summary[list(w).index(name)].sparsity == 0.5


# --- blocks -----------------------------------------------------------------

BLOCK_SHAPES = [(8, 8), (9, 10), (1, 7), (7, 1), (4, 3, 3), (16, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("block", [(1, 1), (2, 2), (1, 4), (3, 2)])
@pytest.mark.parametrize("pool", ["mean", "max", "l2"])
def test_block_scores_match_reference(rng, dtype, shape, block, pool):
    s = make(rng, shape, dtype)
    R, C = sc.matrix_shape(shape)
    if block[0] > R or block[1] > C:
        with pytest.raises(ValueError, match="larger than tensor"):
            sc.block_scores(s, block, pool)
        return
    got = sc.block_scores(s, block, pool, absolute=True)
    np.testing.assert_allclose(got, ref.block_pool(np.abs(s).reshape(R, C), *block, pool), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 8), (9, 10), (16, 12)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_block_prune_local_matches_reference(rng, dtype, shape, sparsity, kind):
    w = make(rng, shape, dtype, kind)
    r = sc.prune({"w": w}, sparsity=sparsity, pattern=sc.Blocks((2, 4), "mean"))
    pooled = ref.block_pool(np.abs(w), 2, 4, "mean")
    keep_b = ref.keep_mask_sparsity(pooled, round(sparsity * pooled.size))
    np.testing.assert_array_equal(r.groups["w"], keep_b)
    keep = np.kron(keep_b, np.ones((2, 4), bool))[: shape[0], : shape[1]].astype(bool)
    np.testing.assert_array_equal(r.masks["w"], keep)
    np.testing.assert_array_equal(r.dense("w"), np.where(keep, w, 0))


def test_block_prune_global_with_caps_matches_reference(rng):
    w = {"a": rng.standard_normal((8, 12)), "b": 3 * rng.standard_normal((6, 8)).astype(np.float32)}
    lo, hi = {"a": 0.2, "b": 0.0}, {"a": 1.0, "b": 0.5}
    r = sc.prune(w, sparsity=0.6, scope="global", pattern=sc.Blocks((2, 2), "max"),
                 min_sparsity=lo, max_sparsity=hi)
    pooled = [ref.block_pool(np.abs(v), 2, 2, "max") for v in w.values()]
    sizes = [p.size for p in pooled]
    want = ref.global_keep_masks(pooled, round(0.6 * sum(sizes)),
                                 *ref.cap_counts([lo[k] for k in w], [hi[k] for k in w], sizes))
    for k, m in zip(w, want):
        np.testing.assert_array_equal(r.groups[k], m)


def test_block_prune_threshold(rng):
    w = rng.standard_normal((8, 8))
    r = sc.prune({"w": w}, threshold=0.8, pattern=sc.Blocks((4, 4), "mean"))
    pooled = ref.block_pool(np.abs(w), 4, 4, "mean")
    np.testing.assert_array_equal(r.groups["w"], pooled >= 0.8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_bsr(rng, dtype, force_int64):
    w = make(rng, (8, 12), dtype)
    keep = sc.prune({"w": w}, sparsity=0.5, pattern=sc.Blocks((4, 3))).masks["w"]
    b = sc.to_bsr(w, (4, 3), mask=keep)
    assert isinstance(b, sp.bsr_array) and b.blocksize == (4, 3)
    assert b.indices.dtype == np.int64
    np.testing.assert_array_equal(b.toarray(), np.where(keep, w, 0))
    assert b.data.shape[0] == 4  # half of the 8 blocks
    np.testing.assert_array_equal(sc.to_bsr(np.where(keep, w, 0), (4, 3)).toarray(), np.where(keep, w, 0))


def test_block_bad_input():
    with pytest.raises(ValueError, match=r"block \(4, 4\) is larger than tensor 'w', whose 2-D view is \(2, 8\)"):
        sc.prune({"w": np.ones((2, 8))}, sparsity=0.5, pattern=sc.Blocks((4, 4)))
    with pytest.raises(ValueError, match="not a multiple of block"):
        sc.to_bsr(np.ones((5, 8)), (2, 2))
    with pytest.raises(ValueError, match="block pool must be one of"):
        sc.Blocks((2, 2), "median")
    with pytest.raises(ValueError, match="at least 1"):
        sc.Blocks((0, 2))
    with pytest.raises(ValueError, match=r"\(rows, cols\)"):
        sc.Blocks((1, 2, 3))


# --- units ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((6, 5), 0), ((5, 6), -1), ((4, 3, 2, 2), 0), ((2, 2, 3, 4), 3),
                                         ((7,), 0), ((0, 3), 1), ((3, 0), 0)])
@pytest.mark.parametrize("reduce", ["l1", "l2", "mean", "max"])
def test_unit_scores_match_reference(rng, dtype, shape, axis, reduce):
    s = make(rng, shape, dtype)
    got = sc.unit_scores(s, axis=axis, reduce=reduce)
    np.testing.assert_allclose(got, ref.unit_reduce(s, axis, reduce), rtol=1e-12)


def test_units_local_global_min_keep(rng):
    w = {"fc1": rng.standard_normal((16, 8)), "fc2": rng.standard_normal((10, 16)) * 0.01,
         "k": rng.standard_normal((10, 4)).astype(np.float32)}  # Keras (in, out)
    r = sc.prune(w, sparsity=0.5, pattern=sc.Units(reduce="l1"), ignore=["k"])
    for k in ("fc1", "fc2"):
        scores = ref.unit_reduce(np.abs(w[k]), 0, "l1")
        np.testing.assert_array_equal(r.groups[k], ref.keep_mask_sparsity(scores, round(0.5 * scores.size)))
        np.testing.assert_array_equal(r.masks[k], np.repeat(r.groups[k][:, None], w[k].shape[1], axis=1))
    # global: the small layer would go entirely; min_keep holds 3 of its units
    r = sc.prune({k: w[k] for k in ("fc1", "fc2")}, sparsity=0.6, scope="global",
                 pattern=sc.Units(reduce="l2", min_keep=3))
    assert r.groups["fc2"].sum() == 3
    assert r.groups["fc1"].sum() + r.groups["fc2"].sum() == 26 - round(0.6 * 26)
    # never zero units, even at sparsity 1 with a threshold above every score
    r = sc.prune({"k": w["k"]}, threshold=1e9, pattern=sc.Units(axis=-1))
    assert r.groups["k"].sum() == 1 and r.masks["k"][:, r.groups["k"]].all()


def test_units_from_per_unit_scores(rng):
    w = {"fc1": rng.standard_normal((6, 4)), "fc2": rng.standard_normal((3, 6))}
    mi = {"fc1": np.array([0.5, 0.1, 0.9, 0.2, 0.05, 0.3]), "fc2": np.array([0.4, 0.6, 0.1])}
    r = sc.prune(w, mi, sparsity=0.5, scope="global", pattern=sc.Units())
    np.testing.assert_array_equal(r.groups["fc1"], [True, False, True, False, False, True])
    np.testing.assert_array_equal(r.groups["fc2"], [True, True, False])
    with pytest.raises(ValueError, match="shape"):
        sc.prune(w, {"fc1": np.ones(5), "fc2": np.ones(3)}, sparsity=0.5, pattern=sc.Units())


def test_units_bad_input():
    with pytest.raises(ValueError, match="unit reduce must be one of"):
        sc.Units(reduce="median")
    with pytest.raises(ValueError, match="min_keep of a Units pattern must be at least 1"):
        sc.Units(min_keep=0)
    with pytest.raises(ValueError, match="out of range"):
        sc.prune({"w": np.ones((2, 2))}, sparsity=0.5, pattern=sc.Units(axis=3))


# --- iterative pruning with current masks -----------------------------------

@pytest.mark.parametrize("pattern", [None, sc.Blocks((2, 2)), sc.Units()])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_masks_only_grow_and_count_the_whole_tensor(rng, pattern, scope):
    w = {"a": rng.standard_normal((8, 8)), "b": rng.standard_normal((6, 8))}
    masks = None
    prev = {k: 0 for k in w}
    for s in (0.25, 0.5, 0.75):
        w = {k: v + 0.5 * rng.standard_normal(v.shape) for k, v in w.items()}  # weights move between steps
        r = sc.prune(w, sparsity=s, scope=scope, pattern=pattern, masks=masks)
        for k in w:
            if masks is not None:
                assert not (r.masks[k] & ~masks[k]).any()
            pruned = int((~r.masks[k]).sum())
            assert pruned >= prev[k]
            prev[k] = pruned
        if scope == "local" and pattern is None:
            assert all(abs(t.sparsity - s) < 1e-12 for t in r.summary)
        masks = r.masks
    with pytest.raises(ValueError, match="masks only grow"):
        sc.prune(w, sparsity=0.5, scope=scope, pattern=pattern, masks=masks)


def test_masks_input_checks():
    w = {"a": np.ones((2, 2))}
    with pytest.raises(TypeError, match="bool"):
        sc.prune(w, sparsity=0.5, masks={"a": np.ones((2, 2))})
    with pytest.raises(ValueError, match="shape"):
        sc.prune(w, sparsity=0.5, masks={"a": np.ones(3, bool)})
    with pytest.raises(ValueError, match="unknown tensors"):
        sc.prune(w, sparsity=0.5, masks={"z": np.ones(3, bool)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 8), (9, 10), (3, 4, 5)])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_block_mask_matches_reference_and_prune(rng, dtype, shape, kind):
    s = make(rng, shape, dtype, kind)
    R, C = sc.matrix_shape(shape)
    pooled = ref.block_pool(np.abs(s).reshape(R, C), 2, 2, "l2")
    keep_b = ref.keep_mask_sparsity(pooled, round(0.4 * pooled.size))
    want = np.kron(keep_b, np.ones((2, 2), bool))[:R, :C].reshape(shape)
    got = sc.block_mask(s, (2, 2), "l2", sparsity=0.4, absolute=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sc.prune({"w": s}, sparsity=0.4, pattern=sc.Blocks((2, 2), "l2")).masks["w"], want)
    np.testing.assert_array_equal(sc.block_mask(s, (2, 2), "l2", threshold=1.0, absolute=True),
                                  np.kron(pooled >= 1.0, np.ones((2, 2), bool))[:R, :C].reshape(shape))
    with pytest.raises(ValueError, match="exactly one of"):
        sc.block_mask(s, (2, 2))


def test_units_from_unit_mutual_information(rng):
    """Per-unit MI of a layer's activations against the labels picks its neurons."""
    y = rng.integers(0, 3, 600)
    acts = rng.standard_normal((600, 6))
    acts[:, 1] += 3.0 * y  # units 1 and 4 carry the label
    acts[:, 4] -= 2.0 * y
    mi = sc.unit_mi(acts, y, bins=8)
    w = {"fc1": rng.standard_normal((6, 5))}
    r = sc.prune(w, {"fc1": mi}, sparsity=4 / 6, pattern=sc.Units())
    np.testing.assert_array_equal(np.flatnonzero(r.groups["fc1"]), [1, 4])
