"""Allocations of sparsity across layers (OWL's outlier ratios) against the authors' arithmetic."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc

from . import reference as ref


def _scores(rng, n, spikes):
    out = {}
    for i in range(n):
        s = rng.random(200)
        s[rng.choice(200, spikes[i], replace=False)] *= 40.0  # outliers
        out[f"l{i}.w"] = s
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6), st.floats(0.31, 0.69), st.floats(0.0, 0.15),
       st.sampled_from([3, 5, 7]))
def test_equals_the_authors_arithmetic(seed, n, target, lam, m):
    rng = np.random.default_rng(seed)
    scores = _scores(rng, 2 * n, rng.integers(0, 20, 2 * n))
    groups = {k: int(k[1:].split(".")[0]) // 2 for k in scores}  # two tensors a group, as q/k... in a block
    got = sc.outlier_allocation(scores, target, groups=groups, m=m, lam=lam)
    want = ref.owl_sparsities(scores, groups, target, m=m, lam=lam)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in scores], [want[k] for k in scores], atol=1e-10)
    per_group = {groups[k]: got[k] for k in scores}
    assert np.mean(list(per_group.values())) == pytest.approx(target, abs=1e-10)  # the mean is the target
    assert max(per_group.values()) - min(per_group.values()) <= 2 * lam + 1e-12


def test_more_outliers_are_pruned_less_and_lam_zero_is_uniform(rng):
    scores = _scores(rng, 4, [0, 3, 6, 12])
    got = sc.outlier_allocation(scores, 0.7)
    assert got["l0.w"] > got["l1.w"] > got["l2.w"] > got["l3.w"]
    assert got["l0.w"] - got["l3.w"] == pytest.approx(0.16)
    assert set(sc.outlier_allocation(scores, 0.7, lam=0.0).values()) == {0.7}
    same = {k: np.ones(10) for k in "ab"}
    assert sc.outlier_allocation(same, 0.5) == {"a": 0.5, "b": 0.5}
    r = sc.prune(scores, sparsity=got)  # what it is for: a per-tensor sparsity mapping
    np.testing.assert_allclose([s.sparsity for s in r.summary], [got[k] for k in scores], atol=0.5 / 200)


def test_refuses_bad_input(rng):
    scores = _scores(rng, 2, [0, 5])
    with pytest.raises(ValueError, match=r"sparsity for 'the allocation' must lie in \[0, 1\], got 1.2"):
        sc.outlier_allocation(scores, 1.2)
    with pytest.raises(ValueError, match="m must be a number > 0"):
        sc.outlier_allocation(scores, 0.5, m=0)
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        sc.outlier_allocation(scores, 0.5, lam=-0.1)
    with pytest.raises(ValueError, match=r"groups name no group for \['l1.w'\]"):
        sc.outlier_allocation(scores, 0.5, groups={"l0.w": 0})
    with pytest.raises(ValueError, match=r"scores 'l0.w' must be finite and >= 0"):
        sc.outlier_allocation({"l0.w": -np.ones(3), "l1.w": np.ones(3)}, 0.5)
    with pytest.raises(ValueError, match=r"lam=0.08 takes 1 tensor\(s\) outside \[0, 1\]"):
        sc.outlier_allocation(scores, 0.95)
    with pytest.raises(TypeError, match="non-empty mapping"):
        sc.outlier_allocation({}, 0.5)
