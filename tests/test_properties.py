"""Hypothesis properties of selection and CSR."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sparsecore as sc

from . import reference as ref

pytestmark = pytest.mark.kernel

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([np.float32, np.float64])
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9)


@st.composite
def weights(draw, dtype=None, shape=None):
    dtype = dtype or draw(dtypes)
    shape = shape or draw(shapes)
    # few distinct values make ties; zeros and negative zeros too
    elems = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.25, 1e-30, 7.0])
    if draw(st.booleans()):
        elems = st.floats(-1e6, 1e6, allow_nan=False, width=32 if dtype == np.float32 else 64)
    return draw(hnp.arrays(dtype, shape, elements=elems))


@SETTINGS
@given(w=weights(), s=st.floats(0, 1))
def test_exact_nnz_subset_canonical_dense_equal(w, s):
    k = round(s * w.size)
    a = sc.to_csr(w, sparsity=s)
    sc.check_csr(a, full=True)
    keep = sc.sparsity_mask(np.abs(w), s)  # to_csr's default scores: magnitude
    assert int((~keep).sum()) == k
    dense = sc.to_dense(a, w.shape)
    np.testing.assert_array_equal(dense, np.where(keep, w, 0))
    assert a.nnz == int(np.count_nonzero(np.where(keep, w, 0)))
    # kept values are a subset of the input, at their own positions
    assert np.all((dense == 0) | (dense == w))


@SETTINGS
@given(w=weights(), s1=st.floats(0, 1), s2=st.floats(0, 1))
def test_masks_monotone_in_sparsity(w, s1, s2):
    lo, hi = sorted((s1, s2))
    m_lo = sc.sparsity_mask(w, lo)
    m_hi = sc.sparsity_mask(w, hi)
    assert not np.any(m_hi & ~m_lo)  # whatever the higher sparsity keeps, the lower keeps too


@SETTINGS
@given(w=weights(), s=st.floats(0, 1))
def test_matches_stable_sort_reference(w, s):
    k = round(s * w.size)
    np.testing.assert_array_equal(sc.sparsity_mask(w, s), ref.keep_mask_sparsity(w, k))


@SETTINGS
@given(ws=st.lists(weights(), min_size=1, max_size=4), s=st.floats(0, 1),
       caps=st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)))
def test_global_with_caps_matches_reference(ws, s, caps):
    names = {f"t{i}": w for i, w in enumerate(ws)}
    sizes = [w.size for w in ws]
    lo, hi = ref.cap_counts([caps[0]] * len(sizes), [caps[1]] * len(sizes), sizes)
    target = round(s * sum(sizes))
    if not sum(lo) <= target <= sum(hi):
        with pytest.raises(ValueError, match="caps allow"):
            sc.prune(names, sparsity=s, scope="global", min_sparsity=caps[0], max_sparsity=caps[1])
        return
    r = sc.prune(names, sparsity=s, scope="global", min_sparsity=caps[0], max_sparsity=caps[1])
    want = ref.global_keep_masks([np.abs(w) for w in ws], target, lo, hi)
    for (n, _), m in zip(names.items(), want):
        np.testing.assert_array_equal(r.masks[n], m)
    assert sum(x.pruned for x in r.summary) == target


@SETTINGS
@given(w=weights(shape=(7, 5)), x=hnp.arrays(np.float64, (5, 3), elements=st.floats(-10, 10)))
def test_matmul_equals_dense(w, x):
    a = sc.to_csr(w, sparsity=0.5)
    np.testing.assert_allclose(sc.csr_matmul(a, x), ref.matmul(a.toarray(), x), rtol=1e-5, atol=1e-3)
