import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sparsecore as sc

from . import reference as ref

pytestmark = pytest.mark.kernel

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_sklearn_reference_values():
    a = np.array([1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3])
    b = np.array([1, 1, 1, 1, 2, 1, 2, 2, 2, 2, 3, 1, 3, 3, 3, 2, 2])
    assert abs(sc.unit_mi(a[:, None].astype(float), b, bins=3)[0] - 0.4102186227404535) < 1e-12
    x = np.array([0, 1, 1, 0, 0])
    y = np.array([1, 0, 0, 0, 1])
    assert abs(sc.unit_mi(x[:, None].astype(float), y, bins=2)[0] - 0.29110316603236885) < 1e-12
    assert abs(sc.pairwise_mi(x[:, None].astype(float), y[:, None].astype(float), bins=2)[0, 0]
               - 0.29110316603236885) < 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nbins", [2, 5, 16, 300])
def test_unit_mi_matches_sklearn_on_the_same_codes(rng, dtype, nbins):
    acts = rng.standard_normal((500, 7)).astype(dtype)
    acts[:, 3] = 1.5  # constant unit
    labels = rng.integers(0, 4, 500)
    acts[:, 0] += labels  # a relevant unit
    codes = ref.uniform_codes(acts, nbins)
    np.testing.assert_array_equal(sc.fit_bins(acts, nbins).codes(acts), codes)
    got = sc.unit_mi(acts, labels, bins=nbins)
    want = [sklearn_metrics.mutual_info_score(codes[u], labels) for u in range(7)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[3] == 0.0 and got[0] > got[1]


def test_pairwise_mi_matches_histogram2d_and_sklearn(rng):
    a_in = rng.standard_normal((400, 6))
    a_out = np.tanh(a_in @ rng.standard_normal((6, 5))) + 0.1 * rng.standard_normal((400, 5))
    got = sc.pairwise_mi(a_in, a_out, bins=8)
    ci, co = ref.uniform_codes(a_in, 8), ref.uniform_codes(a_out, 8)
    for o in range(5):
        for i in range(6):
            want = ref.mi_from_counts(ref.mi_counts(co[o], ci[i], 8, 8))
            assert abs(got[o, i] - want) < 1e-12
            assert abs(got[o, i] - sklearn_metrics.mutual_info_score(co[o], ci[i])) < 1e-12
    assert got.shape == (5, 6)


def test_known_values_symmetry_permutation(rng):
    y = rng.integers(0, 5, 1000)
    a = np.stack([y.astype(float), rng.standard_normal(1000), np.full(1000, 3.0)], axis=1)
    mi = sc.unit_mi(a, y, bins=5)
    p = np.bincount(y) / y.size
    assert abs(mi[0] - float(-(p * np.log(p)).sum())) < 1e-12  # MI(y; y) = H(y)
    assert mi[1] < 0.02 and mi[2] == 0.0
    b = rng.standard_normal((300, 4))
    c = rng.standard_normal((300, 3))
    np.testing.assert_allclose(sc.pairwise_mi(b, c, bins=6), sc.pairwise_mi(c, b, bins=6).T, atol=1e-12)
    perm = rng.permutation(300)
    np.testing.assert_allclose(sc.pairwise_mi(b[perm], c[perm], bins=6), sc.pairwise_mi(b, c, bins=6), atol=1e-12)


def test_streaming_equals_one_batch_exactly(rng):
    a_in = rng.standard_normal((900, 5))
    a_out = a_in[:, :3] ** 2 + rng.standard_normal((900, 3))
    labels = rng.integers(0, 3, 900)
    bi, bo = sc.fit_bins(a_in, 8), sc.fit_bins(a_out, 8)
    whole = sc.PairwiseMIAccumulator(bi, bo).update(a_in, a_out)
    parts = [sc.PairwiseMIAccumulator(bi, bo) for _ in range(3)]
    for k, part in enumerate(parts):
        part.update(a_in[k * 300:(k + 1) * 300], a_out[k * 300:(k + 1) * 300])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_array_equal(merged.mi(), whole.mi())
    restored = sc.PairwiseMIAccumulator.from_state_dict(whole.state_dict())
    np.testing.assert_array_equal(restored.mi(), whole.mi())
    assert restored.n == 900
    np.testing.assert_allclose(whole.mi(), sc.pairwise_mi(a_in, a_out, bins=8), atol=1e-12)
    u_whole = sc.UnitMIAccumulator(bi, 3).update(a_in, labels)
    u_parts = sc.UnitMIAccumulator(bi, 3)
    for k in range(3):
        u_parts.update(a_in[k * 300:(k + 1) * 300], labels[k * 300:(k + 1) * 300])
    np.testing.assert_array_equal(u_parts.mi(), u_whole.mi())
    again = sc.UnitMIAccumulator.from_state_dict(u_whole.state_dict())
    np.testing.assert_array_equal(again.mi(), u_whole.mi())


def test_bits_correction_normalisation(rng):
    a = rng.standard_normal((200, 4))
    y = rng.integers(0, 3, 200)
    nats = sc.unit_mi(a, y, bins=6)
    np.testing.assert_allclose(sc.unit_mi(a, y, bins=6, base=2), nats / math.log(2), rtol=1e-14)
    codes = ref.uniform_codes(a, 6)
    mm = sc.unit_mi(a, y, bins=6, correction="miller-madow")
    for u in range(4):
        h = ref.mi_counts(codes[u], y, 6, 3)
        mx, my, mxy = (h.sum(1) > 0).sum(), (h.sum(0) > 0).sum(), (h > 0).sum()
        assert abs(mm[u] - (ref.mi_from_counts(h) + (mx + my - mxy - 1) / (2 * 200))) < 1e-12
    nmi = sc.unit_mi(a, y, bins=6, normalized=True)
    want = [sklearn_metrics.normalized_mutual_info_score(codes[u], y, average_method="arithmetic")
            for u in range(4)]
    np.testing.assert_allclose(nmi, want, atol=1e-12)


def test_quantile_bins_rules_and_conv(rng):
    a = rng.exponential(size=(1000, 3))
    b = sc.fit_bins(a, 4, "quantile")
    counts = np.stack([np.bincount(c, minlength=4) for c in b.codes(a)])
    assert np.all(np.abs(counts - 250) <= 1)  # equal-frequency
    np.testing.assert_array_equal(b.codes(a)[0], np.searchsorted(b.edges[0, 1:4], a[:, 0], side="right"))
    assert sc.fit_bins(a, "sturges").nbins == math.ceil(math.log2(1000)) + 1
    assert sc.fit_bins(a, "sqrt").nbins == 32
    assert 2 <= sc.fit_bins(a, "fd").nbins <= 1000
    conv = rng.standard_normal((50, 3, 4, 4))
    y = rng.integers(0, 2, 50)
    np.testing.assert_allclose(sc.unit_mi(conv, y, bins=4, reduce="mean"),
                               sc.unit_mi(conv.mean(axis=(2, 3)), y, bins=4), atol=1e-12)
    np.testing.assert_allclose(sc.unit_mi(conv, y, bins=4, reduce="max"),
                               sc.unit_mi(conv.max(axis=(2, 3)), y, bins=4), atol=1e-12)
    t = rng.standard_normal(300)
    acts = np.stack([t, rng.standard_normal(300)], axis=1)
    mi = sc.unit_mi(acts, t, bins=8, target="continuous")
    assert mi[0] > 1.5 and mi[1] < 0.2


def test_memory_budget_and_one_shot_equals_accumulator(rng):
    bi = sc.fit_bins(rng.standard_normal((10, 512)), 16)
    bo = sc.fit_bins(rng.standard_normal((10, 512)), 16)
    with pytest.raises(ValueError, match=r"need 256.0 MiB, over memory_limit=64.0 MiB"):
        sc.PairwiseMIAccumulator(bi, bo, memory_limit=64 << 20)
    a = rng.standard_normal((100, 9))
    c = rng.standard_normal((100, 7))
    acc = sc.PairwiseMIAccumulator(sc.fit_bins(a, 4), sc.fit_bins(c, 4)).update(a, c)
    for kw in ({}, {"correction": "miller-madow"}, {"normalized": True}, {"base": 2}):
        # the one-shot pair-by-pair kernel and the stored counts agree, option by option
        np.testing.assert_allclose(sc.pairwise_mi(a, c, bins=4, **kw), acc.mi(**kw), atol=1e-12)


def test_bad_input(rng):
    a = rng.standard_normal((20, 3))
    bad = a.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"hold 1 NaN or Inf value\(s\) \(first at sample 7, unit 2\)"):
        sc.unit_mi(bad, np.zeros(20, int))
    with pytest.raises(ValueError, match="labels .* hold 19 values but the activations 20 samples"):
        sc.unit_mi(a, np.zeros(19, int))
    with pytest.raises(TypeError, match="labels .* are floats"):
        sc.unit_mi(a, np.zeros(20))
    with pytest.raises(ValueError, match="labels .* hold NaN"):
        sc.unit_mi(a, np.full(20, np.nan))
    with pytest.raises(ValueError, match="must be >= 0, got -1 at sample 4"):
        sc.unit_mi(a, np.r_[np.zeros(4, int), -1, np.zeros(15, int)])
    with pytest.raises(ValueError, match="at least 2"):
        sc.unit_mi(a[:1], np.zeros(1, int))
    with pytest.raises(ValueError, match="bins for 'activations' must be >= 2, got 1"):
        sc.unit_mi(a, np.zeros(20, int), bins=1)
    with pytest.raises(ValueError, match="bins rule 'scott' is unknown"):
        sc.fit_bins(a, "scott")
    with pytest.raises(ValueError, match="reduce='mean'"):
        sc.unit_mi(rng.standard_normal((5, 2, 3, 3)), np.zeros(5, int))
    with pytest.raises(ValueError, match="inputs hold 20 samples but outputs 19"):
        sc.pairwise_mi(a, a[:19])
    with pytest.raises(ValueError, match="base must be"):
        sc.unit_mi(a, np.zeros(20, int), base=10)
    with pytest.raises(ValueError, match="fitted on 3"):
        sc.fit_bins(a).codes(a[:, :2])


def test_mutual_info_criterion_in_prune(rng):
    a_in = rng.standard_normal((300, 6))
    w = rng.standard_normal((4, 6))
    a_out = np.maximum(a_in @ w.T, 0)
    acc = sc.PairwiseMIAccumulator(sc.fit_bins(a_in, 8), sc.fit_bins(a_out, 8)).update(a_in, a_out)
    r = sc.prune({"fc": w}, "mutual_info", state={"fc": acc.state()}, sparsity=0.5)
    np.testing.assert_array_equal(r.masks["fc"], ref.keep_mask_sparsity(acc.mi(), 12))
    rk = sc.prune({"k": w.T.copy()}, "mutual_info", state={"k": acc.state()}, sparsity=0.5)  # Keras (in, out)
    np.testing.assert_array_equal(rk.masks["k"], r.masks["fc"].T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 1), (3, 1), (2, 4), (17, 1), (5, 3)])
def test_edge_shapes_against_reference(rng, dtype, shape):
    a = rng.standard_normal(shape).astype(dtype)
    y = rng.integers(0, 2, shape[0])
    codes = ref.uniform_codes(a, 3)
    np.testing.assert_allclose(sc.unit_mi(a, y, bins=3),
                               [sklearn_metrics.mutual_info_score(codes[u], y) for u in range(shape[1])], atol=1e-12)
    b = rng.standard_normal((shape[0], 2)).astype(dtype)
    cb = ref.uniform_codes(b, 3)
    got = sc.pairwise_mi(a, b, bins=3)
    for o in range(2):
        for i in range(shape[1]):
            assert abs(got[o, i] - ref.mi_from_counts(ref.mi_counts(cb[o], codes[i], 3, 3))) < 1e-12


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=40),
                       elements=st.floats(-100, 100)),
       nbins=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_properties_bounds_symmetry_and_oracle(data, nbins, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, data.shape[0])
    mi = sc.unit_mi(data, y, bins=nbins)
    codes = ref.uniform_codes(data, nbins)
    hy = sklearn_metrics.mutual_info_score(y, y)
    for u in range(data.shape[1]):
        hx = sklearn_metrics.mutual_info_score(codes[u], codes[u])
        assert 0.0 <= mi[u] <= min(hx, hy) + 1e-12
        assert abs(mi[u] - sklearn_metrics.mutual_info_score(codes[u], y)) < 1e-12
    other = r.standard_normal((data.shape[0], 2))
    np.testing.assert_allclose(sc.pairwise_mi(data, other, bins=nbins), sc.pairwise_mi(other, data, bins=nbins).T,
                               atol=1e-12)
