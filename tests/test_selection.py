import numpy as np
import pytest

import sparsecore as sc
from sparsecore._kernels.keys import key_of, value_of

from . import reference as ref
from .conftest import DTYPES, SHAPES, make

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zero_rows"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_sparsity_mask_matches_reference(rng, dtype, shape, kind, sparsity):
    s = make(rng, shape, dtype, kind)
    k = round(sparsity * s.size)
    got = sc.sparsity_mask(s, sparsity)
    assert got.shape == s.shape
    assert int((~got).sum()) == k
    np.testing.assert_array_equal(got, ref.keep_mask_sparsity(s, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [-0.5, 0.0, 0.3, 1e-40, np.inf, -np.inf])
def test_threshold_mask_matches_reference(rng, dtype, shape, t):
    s = make(rng, shape, dtype)
    np.testing.assert_array_equal(sc.threshold_mask(s, t), ref.keep_mask_threshold(s, t))


def test_threshold_between_float32_values_is_exact():
    s = np.array([0.1, 0.2, 0.3], np.float32)
    t = float(np.float32(0.2)) + 1e-12  # just above the float32 0.2
    np.testing.assert_array_equal(sc.threshold_mask(s, t), [False, False, True])
    np.testing.assert_array_equal(sc.threshold_mask(s, float(np.float32(0.2))), [False, True, True])


def test_negative_zero_ties_with_zero():
    s = np.array([0.0, -0.0, 0.0, -0.0, 1.0])
    np.testing.assert_array_equal(sc.sparsity_mask(s, 0.4), [False, False, True, True, True])


def test_extreme_values_order():
    f = np.finfo(np.float64)
    s = np.array([f.max, -f.max, f.tiny, -f.tiny, 5e-324, -5e-324, 0.0, 1.0, -1.0])
    for k in range(s.size + 1):
        np.testing.assert_array_equal(sc.sparsity_mask(s, k / s.size), ref.keep_mask_sparsity(s, k))


@pytest.mark.parametrize("wide", [False, True])
def test_keys_order_and_round_trip(rng, wide):
    vals = np.sort(np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200),
                                   [0.0, 1.0, -1.0]]))
    if not wide:
        vals = np.unique(vals.astype(np.float32)).astype(np.float64)
    keys = [key_of(v, wide) for v in vals]
    assert keys == sorted(keys)
    for v, k in zip(vals, keys):
        assert value_of(k, wide) == v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_select_threshold_equals_partition(rng, dtype, kind):
    s = make(rng, (50, 40), dtype, kind)
    for sp_ in (0.01, 0.3, 0.9, 1.0):
        k = round(sp_ * s.size)
        assert sc.select_threshold(s, sp_) == float(np.partition(s.ravel(), k - 1)[k - 1])
    assert sc.select_threshold(s, 0.0) == -np.inf
    a = np.abs(s)
    for sp_ in (0.2, 0.9):
        k = round(sp_ * s.size)
        assert sc.select_threshold(s, sp_, absolute=True) == float(np.partition(a.ravel(), k - 1)[k - 1])
        np.testing.assert_array_equal(sc.sparsity_mask(s, sp_, absolute=True), ref.keep_mask_sparsity(a, k))


def _global(weights, scores, sparsity, lo=0.0, hi=1.0, **kw):
    return sc.prune(weights, scores, sparsity=sparsity, scope="global", min_sparsity=lo,
                    max_sparsity=hi, **kw)


def _check_global_without_caps(rng, shapes, kind, mixed, sparsities):
    """prune(scope="global") against the definitional reference."""
    dts = [(np.float32, np.float64)[i % 2] if mixed else np.float32 for i in range(len(shapes))]
    scores = {f"t{i}": make(rng, s, d, kind) for i, (s, d) in enumerate(zip(shapes, dts))}
    weights = {k: np.ones_like(v) for k, v in scores.items()}
    n = sum(v.size for v in scores.values())
    for sparsity in sparsities:
        r = _global(weights, scores, sparsity)
        want = ref.global_keep_masks(list(scores.values()), round(sparsity * n), [0] * len(shapes),
                                     [v.size for v in scores.values()])
        for (name, _), m in zip(scores.items(), want):
            np.testing.assert_array_equal(r.masks[name], m, err_msg=name)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("mixed", [False, True])
def test_global_matches_reference(rng, kind, mixed):
    _check_global_without_caps(rng, [(10, 12), (0, 3), (1, 1), (30, 7), (5,)], kind, mixed,
                               (0.0, 0.25, 0.7, 1.0))


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("lo,hi", [(0.2, 0.8), (0.5, 0.5), (0.0, 0.3), (0.6, 1.0)])
def test_global_caps_match_reference(rng, kind, lo, hi):
    shapes = [(20, 10), (3, 3), (40,), (7, 9)]
    scores = {f"t{i}": make(rng, s, np.float64, kind) * (10.0 ** i) for i, s in enumerate(shapes)}
    weights = {k: np.ones_like(v) for k, v in scores.items()}
    sizes = [v.size for v in scores.values()]
    los, his = ref.cap_counts([lo] * len(sizes), [hi] * len(sizes), sizes)
    n = sum(sizes)
    for sparsity in (0.3, 0.5, 0.65):
        target = round(sparsity * n)
        if not sum(los) <= target <= sum(his):
            with pytest.raises(ValueError, match="caps allow"):
                _global(weights, scores, sparsity, lo, hi)
            continue
        r = _global(weights, scores, sparsity, lo, hi)
        want = ref.global_keep_masks(list(scores.values()), target, los, his)
        for (name, _), m in zip(scores.items(), want):
            np.testing.assert_array_equal(r.masks[name], m, err_msg=name)
        pruned = [s.pruned for s in r.summary]
        assert sum(pruned) == target
        assert all(a <= p <= b for a, p, b in zip(los, pruned, his))


def test_global_caps_per_tensor_mapping(rng):
    w = {"a": rng.standard_normal((10, 10)), "b": rng.standard_normal((10, 10)) * 0.001}
    r = _global(w, None, 0.5, lo={"a": 0.0, "b": 0.0}, hi={"a": 1.0, "b": 0.2})
    assert r.summary[1].pruned == 20 and r.summary[0].pruned == 80


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_global_normalisation_matches_reference(rng, norm):
    scores = {"a": rng.random((20, 5)), "b": (rng.random((8, 8)) + 1.0) * 1000.0}
    weights = {k: np.ones_like(v) for k, v in scores.items()}
    r = _global(weights, scores, 0.5, normalize=norm)
    normed = [v / ref.norm(v, 0, norm) for v in scores.values()]
    n = sum(v.size for v in scores.values())
    want = ref.global_keep_masks(normed, round(0.5 * n), [0, 0], [v.size for v in scores.values()])
    for (name, _), m in zip(scores.items(), want):
        np.testing.assert_array_equal(r.masks[name], m)
    # without normalisation the large-scaled tensor keeps everything
    r0 = _global(weights, scores, 0.5)
    assert r0.summary[1].pruned == 0


def test_global_is_not_local(rng):
    w = {"small": rng.random((10, 10)), "big": rng.random((10, 10)) + 1.0}
    r = _global(w, None, 0.5)
    assert r.summary[0].pruned == 100 and r.summary[1].pruned == 0
    r = sc.prune(w, sparsity=0.5)
    assert r.summary[0].pruned == 50 and r.summary[1].pruned == 50


def test_many_tensors_use_narrow_histograms(rng):
    # > 64 tensors shrink the digit width; the answer must not change.
    scores = {f"t{i}": make(rng, (3, 4), np.float32, "ties") for i in range(300)}
    weights = {k: np.ones_like(v) for k, v in scores.items()}
    r = _global(weights, scores, 0.4)
    n = 300 * 12
    want = ref.global_keep_masks(list(scores.values()), round(0.4 * n), [0] * 300, [12] * 300)
    for (name, _), m in zip(scores.items(), want):
        np.testing.assert_array_equal(r.masks[name], m)


def test_same_answer_on_any_thread_count(rng):
    import numba

    s = make(rng, (300, 400), np.float32, "ties")
    w = {"a": s, "b": s[::-1].copy()}
    before = numba.get_num_threads()
    results = []
    try:
        for t in sorted({1, before}):
            numba.set_num_threads(t)
            r = sc.prune(w, sparsity=0.6, scope="global", normalize="l2")
            results.append((r.masks["a"].copy(), r.masks["b"].copy(), sc.sparsity_mask(s, 0.37)))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            np.testing.assert_array_equal(x, y)


def test_torch_l1_unstructured_oracle(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune as tprune

    w = rng.standard_normal((37, 53)).astype(np.float32)  # continuous: tie-free
    for amount in (0.0, 0.1, 0.5, 0.93, 1.0):
        lin = torch.nn.Linear(53, 37, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
        tprune.l1_unstructured(lin, "weight", amount=amount)
        want = lin.weight_mask.numpy().astype(bool)
        got = sc.prune({"w": w}, sparsity=amount).masks["w"]
        np.testing.assert_array_equal(got, want)


def test_torch_global_unstructured_oracle(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune as tprune

    mods = [torch.nn.Linear(30, 20), torch.nn.Linear(20, 10), torch.nn.Conv2d(3, 4, 3)]
    weights = {}
    for i, m in enumerate(mods):
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(rng.standard_normal(tuple(m.weight.shape)).astype(np.float32)))
        weights[f"m{i}"] = m.weight.detach().numpy().copy()
    tprune.global_unstructured([(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured,
                               amount=0.8)
    r = sc.prune(weights, sparsity=0.8, scope="global")
    for i, m in enumerate(mods):
        np.testing.assert_array_equal(r.masks[f"m{i}"], m.weight_mask.numpy().astype(bool))


@pytest.fixture
def sampled(monkeypatch):
    """Route every single-tensor selection through the sampled bracket."""
    import sparsecore.selection as sel

    monkeypatch.setattr(sel, "_SAMPLE_MIN", 0)
    calls = {"range": 0, "radix": 0}
    real_range, real_search = sel.cpu_select.range_pass, sel._search

    def range_pass(*a):
        calls["range"] += 1
        return real_range(*a)

    def search(*a):
        calls["radix"] += 1
        return real_search(*a)

    monkeypatch.setattr(sel.cpu_select, "range_pass", range_pass)
    monkeypatch.setattr(sel, "_search", search)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (7, 13), (64, 300), (300, 700)])
@pytest.mark.parametrize("kind", ["normal", "ties", "zero_rows"])
def test_sampled_selection_matches_reference(rng, sampled, dtype, shape, kind):
    s = make(rng, shape, dtype, kind)
    for sparsity in (0.001, 0.1, 0.5, 0.9, 0.999, 1.0):
        k = round(sparsity * s.size)
        np.testing.assert_array_equal(sc.sparsity_mask(s, sparsity), ref.keep_mask_sparsity(s, k))
        if k:
            assert sc.select_threshold(s, sparsity) == ref.kth_smallest(s, k)
    assert sampled["range"] > 0


def test_sampled_path_taken_on_continuous_data_and_falls_back_on_ties(rng, sampled):
    s = rng.standard_normal((300, 700)).astype(np.float32)
    sc.sparsity_mask(s, 0.9)
    assert sampled["range"] == 1 and sampled["radix"] == 0
    flat_ties = np.zeros((300, 700), np.float32)
    flat_ties[0, :5] = 1.0
    got = sc.sparsity_mask(flat_ties, 0.5)
    np.testing.assert_array_equal(got, ref.keep_mask_sparsity(flat_ties, round(0.5 * flat_ties.size)))
    assert sampled["radix"] == 1  # the bracket held too many equal keys: exact radix instead
    # a sorted layout defeats the strided sample's spread less than one would fear
    srt = np.sort(rng.standard_normal(210000)).astype(np.float64)
    for sparsity in (0.3, 0.77):
        np.testing.assert_array_equal(sc.sparsity_mask(srt, sparsity),
                                      ref.keep_mask_sparsity(srt, round(sparsity * srt.size)))


def test_sampled_nonfinite_is_reported(rng, sampled):
    s = rng.standard_normal((50, 60))
    s[7, 9] = np.nan
    with pytest.raises(ValueError, match=r"scores 'scores' hold 1 NaN or Inf value \(first: NaN at index \(7, 9\)\)"):
        sc.sparsity_mask(s, 0.5)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("mixed", [False, True])
def test_sampled_global_matches_reference(rng, sampled, kind, mixed):
    _check_global_without_caps(rng, [(100, 120), (0, 3), (1, 1), (300, 70), (2000,)], kind, mixed,
                               (0.05, 0.5, 0.93))
    assert sampled["range"] > 0


@pytest.mark.parametrize("wide", [False, True])
def test_cut_value_splits_scores_as_the_key_splits_keys(rng, wide):
    from sparsecore._kernels.keys import cut_value

    dt = np.float64 if wide else np.float32
    f = np.finfo(dt)
    vals = np.concatenate([rng.standard_normal(300) * 10.0 ** rng.integers(-40, 30, 300),
                           [0.0, -0.0, f.max, -f.max, f.tiny, -f.tiny, f.smallest_subnormal,
                            -f.smallest_subnormal, 1.0, -1.0]]).astype(dt)
    vals = vals[np.isfinite(vals)]
    top = 1 << (64 if wide else 32)
    cuts = [0, 1, top - 1, key_of(np.inf, wide), key_of(-np.inf, wide), key_of(0.0, wide) - 1,
            key_of(0.0, wide), key_of(0.0, wide) + 1] + [key_of(v, wide) + d for v in vals[:50] for d in (-1, 0, 1)]
    for c in cuts:
        cv = cut_value(c, wide)
        for v in vals:
            assert (key_of(v, wide) >= c) == bool(v >= cv), (c, v, cv)
