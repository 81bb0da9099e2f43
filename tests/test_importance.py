import math

import numpy as np
import pytest

import sparsecore as sc

from . import reference as ref
from .conftest import DTYPES

pytestmark = pytest.mark.kernel

ALL = ("g", "g2", "wg", "wg2")


@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
@pytest.mark.parametrize("shape", [(0,), (1, 1), (1, 9), (9, 1), (5, 7), (3, 4, 5), (10001,)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_accumulate_matches_reference(rng, dtype, shape, per_sample):
    batches, weights = [], []
    for _ in range(5):
        lead = (3,) if per_sample else ()
        batches.append(rng.standard_normal(lead + shape).astype(dtype))
        weights.append(rng.standard_normal(shape).astype(dtype))
    for precision, tol in (("float64", 1e-12), ("mixed", 1e-6)):
        acc = sc.GradientAccumulator(stats=ALL, precision=precision)
        for g, w in zip(batches, weights):
            acc.update(g, w, per_sample=per_sample)
        want = ref.accumulate(batches, weights, per_sample)
        st = acc.state()
        for k in ALL:
            exp = want[k] if want else np.zeros(shape)
            scale = np.abs(want["wg2" if k.startswith("w") else "g2"]) if want else 0
            np.testing.assert_allclose(st[k], exp, rtol=tol, atol=tol * np.max(scale, initial=0) + 1e-300)
            assert st[k].dtype == np.float64 and st[k].shape == shape
    assert st["count"] == (15 if per_sample else 5)


def test_mapping_and_per_sample_fisher_differs_from_batch(rng):
    g = {"a": rng.standard_normal((8, 4, 3)), "b": rng.standard_normal((8, 5))}
    ps = sc.GradientAccumulator().update(g, per_sample=True)
    bt = sc.GradientAccumulator().update({k: v.mean(axis=0) for k, v in g.items()})
    np.testing.assert_allclose(ps.state("a")["g2"], (g["a"] ** 2).sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(bt.state("a")["g2"], g["a"].mean(axis=0) ** 2, rtol=1e-6)
    assert ps.count == 8 and bt.count == 1
    assert sorted(ps.names) == ["a", "b"]


@pytest.mark.parametrize("precision,bound", [("mixed", 16 * 2.0**-24), ("float64", 10_000 * 2.0**-53)])
def test_drift_10000_float32_batches_against_exact_sums(rng, precision, bound):
    """The stated bounds: relative error of the sums of squares below
    16 * 2**-24 for "mixed" whatever the batch count, n * 2**-53 for
    "float64"; the signed sums within the same factor of sum |terms|."""
    n, nb = 64, 10_000
    g = rng.standard_normal((nb, n)).astype(np.float32) * np.float32(1e-3)
    w = rng.standard_normal(n).astype(np.float32)
    acc = sc.GradientAccumulator(stats=("g2", "wg"), precision=precision)
    for i in range(nb):
        acc.update(g[i], w)
    g64 = g.astype(np.float64)
    exact_g2 = np.array([math.fsum(c) for c in (g64 * g64).T])
    wg = g64 * w.astype(np.float64)
    exact_wg = np.array([math.fsum(c) for c in wg.T])
    st = acc.state()
    err_g2 = np.abs(st["g2"] - exact_g2) / exact_g2
    assert np.all(err_g2 <= bound)
    assert np.all(np.abs(st["wg"] - exact_wg) <= bound * np.abs(wg).sum(axis=0))
    # a plain float32 running sum drifts by far more
    naive = np.zeros(n, np.float32)
    for i in range(nb):
        naive += g[i] * g[i]
    assert np.max(np.abs(naive - exact_g2) / exact_g2) > 10 * np.max(err_g2)


@pytest.mark.parametrize("precision", ["mixed", "float64"])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_partial_flush_schedule(rng, precision, rows):
    # updates of many sizes cross the flush points at different phases
    acc = sc.GradientAccumulator(stats=("g", "g2"), precision=precision)
    batches = [rng.standard_normal((rows, 3, 70)) for _ in range(7)]
    for b in batches:
        acc.update(b, per_sample=True)
    want = ref.accumulate(batches, per_sample=True)
    tol = 1e-5 if precision == "mixed" else 1e-12
    for k in ("g", "g2"):
        np.testing.assert_allclose(acc.state()[k], want[k], rtol=tol, atol=tol * np.abs(want["g2"]).max())
    d = acc.state_dict()
    again = sc.GradientAccumulator.from_state_dict(d)
    assert again.precision == precision
    np.testing.assert_array_equal(again.state()["g2"], acc.state()["g2"])


def test_merge_save_restore_reset(rng):
    shards = [[{"w": rng.standard_normal((4, 3))} for _ in range(3)] for _ in range(2)]
    ws = {"w": rng.standard_normal((4, 3))}
    a = sc.GradientAccumulator(stats=ALL)
    b = sc.GradientAccumulator(stats=ALL)
    whole = sc.GradientAccumulator(stats=ALL)
    for g in shards[0]:
        a.update(g, ws)
        whole.update(g, ws)
    for g in shards[1]:
        b.update(g, ws)
        whole.update(g, ws)
    a.merge(b)
    for k in ALL:  # partials flushed at other points: equal within the mixed-precision bound
        np.testing.assert_allclose(a.state("w")[k], whole.state("w")[k], rtol=1e-6, atol=1e-6)
    assert a.count == whole.count == 6
    d = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in d.values())
    c = sc.GradientAccumulator.from_state_dict(d)
    for k in ALL:
        np.testing.assert_array_equal(c.state("w")[k], a.state("w")[k])
    assert c.count == 6 and c.n_batches == a.n_batches
    c.update(shards[0][0], ws)  # restored accumulators keep working
    a.reset()
    assert a.count == 0 and not a.state("w")["g2"].any()
    # empty merge into new
    e = sc.GradientAccumulator(stats=ALL).merge(c)
    np.testing.assert_array_equal(e.state("w")["g2"], c.state("w")["g2"])
    # single-array mode round-trips too
    s = sc.GradientAccumulator().update(np.ones(3))
    s2 = sc.GradientAccumulator.from_state_dict(s.state_dict())
    np.testing.assert_array_equal(s2.state()["g2"], np.ones(3))


def test_accumulator_errors_leave_state_untouched(rng):
    acc = sc.GradientAccumulator(stats=("g2", "wg"))
    w = {"a": np.ones((2, 3)), "b": np.ones(4)}
    acc.update({"a": np.ones((2, 3)), "b": np.ones(4)}, w)
    before = acc.state_dict()
    bad_g = {"a": np.ones((2, 3)), "b": np.array([1.0, np.nan, 1.0, np.inf])}
    with pytest.raises(ValueError, match=r"gradients 'b' hold 2 NaN or Inf values \(first: NaN at index \(1,\)\)"):
        acc.update(bad_g, w)
    with pytest.raises(ValueError, match=r"gradients 'a' have shape \(3, 2\), earlier batches \(2, 3\)"):
        acc.update({"a": np.ones((3, 2)), "b": np.ones(4)}, w)
    with pytest.raises(ValueError, match=r"shape \(4,\) but weights 'b' have shape \(5,\)"):
        acc.update({"a": np.ones((2, 3)), "b": np.ones(4)}, {"a": np.ones((2, 3)), "b": np.ones(5)})
    with pytest.raises(ValueError, match="need the weights"):
        acc.update({"a": np.ones((2, 3)), "b": np.ones(4)})
    with pytest.raises(ValueError, match="new \\['c'\\]"):
        acc.update({"a": np.ones((2, 3)), "b": np.ones(4), "c": np.ones(1)}, {**w, "c": np.ones(1)})
    with pytest.raises(TypeError, match="integer dtype"):
        acc.update({"a": np.ones((2, 3), int), "b": np.ones(4)}, w)
    with pytest.raises(TypeError, match="complex"):
        acc.update({"a": np.ones((2, 3), complex), "b": np.ones(4)}, w)
    with pytest.raises(ValueError, match=r"weights 'a' hold 1 NaN or Inf value \(first: NaN at index \(1, 1\)\)"):
        acc.update({"a": np.ones((2, 3)), "b": np.ones(4)},
                   {"a": np.array([[1, 1, 1], [1, np.nan, 1]]), "b": np.ones(4)})
    after = acc.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    with pytest.raises(ValueError, match="unknown statistics"):
        sc.GradientAccumulator(stats=("g3",))
    with pytest.raises(ValueError, match="precision must be one of \\['mixed', 'float64'\\]"):
        sc.GradientAccumulator(precision="float16")


def test_read_only_and_strided_gradients(rng):
    g = rng.standard_normal((6, 8))
    g.setflags(write=False)
    acc = sc.GradientAccumulator(stats=("g", "g2"))
    acc.update(g[:, ::2])
    acc.update(np.asfortranarray(g[:, 1::2]))
    np.testing.assert_allclose(acc.state()["g"], g[:, ::2] + g[:, 1::2], rtol=1e-6)


def test_builtin_criteria(rng):
    w = rng.standard_normal((4, 5))
    gs = [rng.standard_normal((4, 5)) for _ in range(3)]
    acc = sc.GradientAccumulator(stats=ALL, precision="float64")
    for g in gs:
        acc.update(g, w)
    st = acc.state()
    g2 = sum(g * g for g in gs)
    np.testing.assert_allclose(sc.get_criterion("fisher")(w, st), g2)
    np.testing.assert_allclose(sc.get_criterion("taylor")(w, st), np.abs(sum(w * g for g in gs)))
    np.testing.assert_allclose(sc.get_criterion("taylor_squared")(w, st), sum((w * g) ** 2 for g in gs))
    np.testing.assert_allclose(sc.get_criterion("obd")(w, st), 0.5 * w * w * g2)
    np.testing.assert_allclose(sc.get_criterion("magnitude")(w, {}), np.abs(w))
    np.testing.assert_allclose(sc.get_criterion("magnitude_squared")(w, {}), w * w)
    # fixed weights: taylor from sum g equals taylor from sum w*g
    acc2 = sc.GradientAccumulator.for_criteria("taylor")
    assert acc2.stats == ("wg",)
    acc3 = sc.GradientAccumulator(stats=("g",), precision="float64")
    for g in gs:
        acc3.update(g)
    np.testing.assert_allclose(acc3.scores("taylor", w), np.abs(sum(w * g for g in gs)))
    with pytest.raises(ValueError, match="needs the statistic 'g2'"):
        sc.get_criterion("fisher")(w, {"g": np.ones_like(w)})


def test_registry(rng):
    with pytest.raises(ValueError, match="unknown criterion 'fishr'; valid: fisher, magnitude"):
        sc.get_criterion("fishr")
    assert sc.list_criteria() == sorted(sc.list_criteria())
    assert {"magnitude", "fisher", "taylor", "obd"} <= set(sc.list_criteria())
    with pytest.raises(ValueError, match="registered already"):
        sc.register_criterion(sc.Criterion("fisher", lambda w, s: w))
    with pytest.raises(TypeError):
        sc.get_criterion(3)


def test_user_criterion_everywhere_a_builtin_works(rng):
    w = {"a": rng.standard_normal((6, 6)), "b": rng.standard_normal((3, 6))}
    acc = sc.GradientAccumulator()
    for _ in range(2):
        acc.update({k: rng.standard_normal(v.shape) for k, v in w.items()})

    def my_fisher(weights, state):
        return state["g2"] * 1.0

    class Obj:
        def __call__(self, weights, state):
            return state["g2"] + 0.0

    builtin = sc.prune(w, "fisher", sparsity=0.5, scope="global", state=acc)
    for crit in (my_fisher, Obj(), sc.Criterion("mine", my_fisher, ("g2",))):
        r = sc.prune(w, crit, sparsity=0.5, scope="global", state=acc)
        for k in w:
            np.testing.assert_array_equal(r.masks[k], builtin.masks[k])
    sc.register_criterion(sc.Criterion("test_user_crit", my_fisher, ("g2",)), overwrite=True)
    r = sc.prune(w, "test_user_crit", sparsity=0.5, scope="global", state=acc)
    np.testing.assert_array_equal(r.masks["a"], builtin.masks["a"])
    with pytest.raises(ValueError, match="returned scores of shape"):
        sc.prune(w, lambda ww, s: np.ones(3), sparsity=0.5)
    with pytest.raises(ValueError, match="hold 36 NaN"):
        sc.prune(w, lambda ww, s: np.full(ww.shape, np.nan), sparsity=0.5)


def test_the_accumulators_share_one_protocol():
    bins = sc.fit_bins(np.linspace(0, 1, 20).reshape(10, 2), bins=4)
    accs = [sc.GradientAccumulator(), sc.HessianAccumulator(3), sc.UnitMIAccumulator(bins, 2),
            sc.PairwiseMIAccumulator(bins, bins)]
    assert all(isinstance(a, sc.Accumulator) for a in accs)

    class Mine:  # a user's own statistics: the same four methods
        def update(self, x):
            return self

        def merge(self, other):
            return self

        def state_dict(self):
            return {}

        @classmethod
        def from_state_dict(cls, d):
            return cls()

    class NoMerge:
        def update(self, x):
            return self

        def state_dict(self):
            return {}

    assert isinstance(Mine(), sc.Accumulator) and not isinstance(NoMerge(), sc.Accumulator)
    assert not isinstance(np.ones(3), sc.Accumulator)
