"""Schedules, gradual pruning and the pruning history."""

import json

import numpy as np
import pytest

import sparsecore as sc


def zhu_gupta(t, s_i, s_f, t0, n_dt, power=3.0):
    """Zhu & Gupta 2017, eq. 1, written out."""
    t = min(max(t, t0), t0 + n_dt)
    return s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** power


def test_polynomial_decay_tfmot_oracle():
    # TFMOT pruning_schedule_test: PolynomialDecay(0.2, 0.8, begin 100, end 110, power 3).
    # By the formula: 0.8 - 0.6 * 0.8**3 = 0.4928 and 0.8 - 0.6 * 0.5**3 = 0.725.
    assert zhu_gupta(102, 0.2, 0.8, 100, 10) == pytest.approx(0.4928, abs=1e-12)
    assert zhu_gupta(105, 0.2, 0.8, 100, 10) == pytest.approx(0.725, abs=1e-12)
    s = sc.PolynomialDecay(0.2, 0.8, begin=100, end=110, power=3)
    assert s(102) == pytest.approx(0.4928, abs=1e-12)
    assert s(105) == pytest.approx(0.725, abs=1e-12)
    assert s(100) == 0.2 and s(110) == 0.8 and s(0) == 0.2 and s(10**6) == 0.8


@pytest.mark.parametrize("power", [1, 2, 3, 0.5])
def test_polynomial_decay_formula_and_monotone(power):
    s = sc.PolynomialDecay(0.1, 0.9, begin=7, end=57, power=power, frequency=5)
    vals = [s(t) for t in range(80)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    for t in range(80):
        assert s(t) == pytest.approx(zhu_gupta(t, 0.1, 0.9, 7, 50, power), abs=1e-12)
    assert [t for t in range(80) if s.prunes_at(t)] == list(range(7, 58, 5))


def test_constant_sparsity():
    s = sc.ConstantSparsity(0.6, begin=3, end=9, frequency=3)
    assert [s(t) for t in (0, 2, 3, 100)] == [0.0, 0.0, 0.6, 0.6]
    assert [t for t in range(20) if s.prunes_at(t)] == [3, 6, 9]
    assert [t for t in range(6) if sc.ConstantSparsity(0.1).prunes_at(t)] == list(range(6))


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="ends at step 5, before it begins at step 10"):
        sc.PolynomialDecay(0.0, 0.5, begin=10, end=5)
    with pytest.raises(ValueError, match="ends at step 1, before it begins at step 2"):
        sc.ConstantSparsity(0.5, begin=2, end=1)
    with pytest.raises(ValueError, match="never decreases"):
        sc.PolynomialDecay(0.8, 0.2, begin=0, end=10)
    with pytest.raises(ValueError, match="end > begin"):
        sc.PolynomialDecay(0.0, 0.5, begin=3, end=3)
    with pytest.raises(ValueError, match="frequency must be at least 1"):
        sc.ConstantSparsity(0.5, frequency=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        sc.ConstantSparsity(1.5)
    with pytest.raises(ValueError, match="power"):
        sc.PolynomialDecay(0.0, 0.5, begin=0, end=3, power=0)
    with pytest.raises(TypeError, match="integer step"):
        sc.PolynomialDecay(0.0, 0.5, begin=0, end=3)(1.5)
    with pytest.raises(ValueError, match="step >= 0"):
        sc.ConstantSparsity(0.5).prunes_at(-1)


def _train_like(rng, w):
    return {k: v - 0.3 * rng.standard_normal(v.shape) * (v != 0) for k, v in w.items()}


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("pattern", [None, sc.Units(), sc.Blocks((2, 2))])
def test_gradual_pruner_monotone_and_replayable(rng, tmp_path, scope, pattern):
    w = {"a": rng.standard_normal((8, 12)), "b": rng.standard_normal((6, 8)).astype(np.float32)}
    sched = sc.PolynomialDecay(0.0, 0.8, begin=2, end=12, frequency=2)
    p = sc.GradualPruner(sched, "magnitude", scope=scope, pattern=pattern)
    seen = {}
    prev = None
    for t in range(16):
        w = _train_like(rng, w)
        r = p.step(t, w)
        assert (r is None) == (not sched.prunes_at(t))
        if r is None:
            continue
        if prev is not None:
            for k in w:
                assert not (r.masks[k] & ~prev[k]).any()  # masks only shrink
        if pattern is None:
            total = sum(s.pruned for s in r.summary)
            size = sum(s.size for s in r.summary)
            if scope == "global":
                assert total == round(sched(t) * size)  # of the whole tensors, not of what is left
            else:
                assert all(s.pruned == round(sched(t) * s.size) for s in r.summary)
        w = {k: np.where(r.masks[k], v, 0) for k, v in w.items()}
        seen[t] = {k: v.copy() for k, v in r.masks.items()}
        prev = r.masks
    assert [st.step for st in p.history.steps] == sorted(seen)
    for t, masks in seen.items():
        for k in w:
            np.testing.assert_array_equal(p.history.masks(upto=t)[k], masks[k])
    path = tmp_path / "history.npz"
    p.history.save(path)
    back = sc.PruningHistory.load(path)
    for k in w:
        np.testing.assert_array_equal(back.masks()[k], p.masks[k])
    j = json.loads(json.dumps(p.history.to_dict()))
    for k in w:
        np.testing.assert_array_equal(sc.PruningHistory.from_dict(j).masks()[k], p.masks[k])
    st = back.steps[-1]
    assert st.criterion == "magnitude" and st.scope == scope and st.target == pytest.approx(0.8)
    assert set(st.sparsity) == {"a", "b"}
    assert [f.name for f in tmp_path.iterdir()] == ["history.npz"]  # no temporary left behind


def test_gradual_pruner_is_deterministic(rng):
    w0 = {"a": rng.standard_normal((16, 16))}
    runs = []
    for _ in range(2):
        p = sc.GradualPruner(sc.ConstantSparsity(0.5, begin=1, frequency=2), "magnitude")
        local = np.random.default_rng(5)
        w = dict(w0)
        for t in range(6):
            w = _train_like(local, w)
            p.step(t, w)
        runs.append(p.history.masks()["a"])
    np.testing.assert_array_equal(*runs)


def test_relative_to_whole_tensor_unlike_torch(rng):
    """0.5 then 0.75 leaves 25% of the tensor; torch's amount=0.5 twice also leaves 25%,
    but amount=0.75 after 0.5 would leave 12.5% (a fraction of what is left)."""
    w = {"a": rng.standard_normal((20, 20))}
    vals = iter([0.5, 0.75])
    p = sc.GradualPruner(lambda step: next(vals))
    p.step(0, w)
    r = p.step(1, w)
    assert r.masks["a"].mean() == 0.25


def test_user_schedule_must_not_decrease(rng):
    w = {"a": rng.standard_normal((4, 4))}
    vals = iter([0.5, 0.25])
    p = sc.GradualPruner(lambda step: next(vals))
    p.step(0, w)
    with pytest.raises(ValueError, match=r"lowers the sparsity from 0.5 \(step 0\) to 0.25 \(step 1\)"):
        p.step(1, w)
    with pytest.raises(ValueError, match="nothing to schedule"):
        sc.GradualPruner(sc.ConstantSparsity(0.5), pattern="2:4")
    with pytest.raises(TypeError, match="function of the step"):
        sc.GradualPruner(0.5)


def test_torch_prune_counts_what_is_left():
    """The live oracle for the note in the docs: torch's amount is relative to what is left."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune as tprune

    lin = torch.nn.Linear(20, 20)
    tprune.l1_unstructured(lin, "weight", amount=0.5)
    tprune.l1_unstructured(lin, "weight", amount=0.75)
    assert float(lin.weight_mask.mean()) == 0.125
