import subprocess
import sys

import numpy as np
import pytest

import sparsecore as sc

from . import reference as ref


def _weights(rng):
    return {"fc1": rng.standard_normal((16, 8)).astype(np.float32),
            "fc1.bias": rng.standard_normal(16).astype(np.float32),
            "conv": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}


def test_prune_local_summary_and_csr(rng):
    w = _weights(rng)
    r = sc.prune(w, sparsity=0.75, ignore=["fc1.bias"])
    assert list(r.csr) == ["fc1", "conv"] and r.ignored == ["fc1.bias"]
    for s in r.summary:
        n = w[s.name].size
        assert s.pruned == round(0.75 * n) and s.size == n
        assert s.shape == w[s.name].shape
        assert s.dense_bytes == w[s.name].nbytes
        a = r.csr[s.name]
        assert s.nnz == a.nnz
        assert s.csr_bytes == a.data.nbytes + a.indices.nbytes + a.indptr.nbytes
        sc.check_csr(a, full=True)
        np.testing.assert_array_equal(r.dense(s.name), np.where(r.masks[s.name], w[s.name], 0))
        np.testing.assert_array_equal(r.masks[s.name], ref.keep_mask_sparsity(np.abs(w[s.name]), s.pruned))
    assert r.csr["conv"].shape == (4, 27)
    assert "total" in r.table() and "(ignored)" in r.table()


def test_prune_threshold_rule_and_caps(rng):
    w = _weights(rng)
    r = sc.prune(w, threshold=0.5)
    for n, arr in w.items():
        np.testing.assert_array_equal(r.masks[n], ~(np.abs(arr) < 0.5))
    r = sc.prune(w, threshold={"fc1": 0.1, "fc1.bias": 10.0, "conv": 0.0}, max_sparsity=0.5)
    assert r.summary[1].pruned == 8  # capped at half of 16
    np.testing.assert_array_equal(r.masks["fc1.bias"], ref.keep_mask_sparsity(np.abs(w["fc1.bias"]), 8))
    r = sc.prune(w, threshold=0.0, min_sparsity=0.25)
    assert [s.pruned for s in r.summary] == [32, 4, 27]
    r = sc.prune(w, "magnitude_squared", threshold=0.25)
    np.testing.assert_array_equal(r.masks["fc1"], ~(w["fc1"].astype(np.float64) ** 2 < 0.25))


def test_prune_scores_mapping_and_gradient_criteria(rng):
    w = _weights(rng)
    acc = sc.GradientAccumulator(stats=("g2",))
    for _ in range(4):
        acc.update({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()})
    r = sc.prune(w, "obd", state=acc, sparsity=0.5, scope="global", normalize="max")
    scores = {k: 0.5 * w[k].astype(np.float64) ** 2 * acc.state(k)["g2"] for k in w}
    r2 = sc.prune(w, scores, sparsity=0.5, scope="global", normalize="max")
    for k in w:
        np.testing.assert_array_equal(r.masks[k], r2.masks[k])
    with pytest.raises(ValueError, match="scores lack tensor 'conv'"):
        sc.prune(w, {"fc1": scores["fc1"], "fc1.bias": scores["fc1.bias"]}, sparsity=0.5)
    with pytest.raises(ValueError, match="scores name unknown tensors \\['nope'\\]"):
        sc.prune(w, {**scores, "nope": np.ones(2)}, sparsity=0.5)
    with pytest.raises(ValueError, match=r"scores 'fc1' have shape \(8, 16\) but weights 'fc1' have shape \(16, 8\)"):
        sc.prune(w, {**scores, "fc1": scores["fc1"].T}, sparsity=0.5)
    with pytest.raises(ValueError, match="needs the statistic"):
        sc.prune(w, "taylor", state=acc, sparsity=0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_and_scores(rng, bad):
    w = _weights(rng)
    w["fc1"][3, 5] = bad
    for kw in ({"sparsity": 0.5}, {"threshold": 0.1}, {"sparsity": 0.5, "scope": "global"}):
        with pytest.raises(ValueError,
                           match=r"weights 'fc1' hold 1 NaN or Inf value \(first: (NaN|Inf) at index \(3, 5\)\)"):
            sc.prune(w, **kw)
    w = _weights(rng)
    scores = {k: np.abs(v) for k, v in w.items()}
    scores["conv"][1, 2, 0, 1] = bad
    with pytest.raises(ValueError,
                       match=r"scores 'conv' hold 1 NaN or Inf value \(first: (NaN|Inf) at index \(1, 2, 0, 1\)\)"):
        sc.prune(w, scores, sparsity=0.5)
    # with scores given separately, a bad weight is still caught
    w["conv"][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="weights 'conv'"):
        sc.prune(w, {k: np.ones(v.shape) for k, v in w.items()}, sparsity=0.5)


@pytest.mark.parametrize("dtype,kind", [(np.int32, "integer"), (np.bool_, "bool"), (np.complex64, "complex"),
                                        (object, "object"), (np.uint8, "unsigned integer")])
def test_non_float_dtypes_raise_type_error(dtype, kind):
    w = {"a": np.ones((3, 3), dtype=dtype)}
    with pytest.raises(TypeError, match=f"weights 'a' have {kind} dtype .*pass a floating-point array"):
        sc.prune(w, sparsity=0.5)
    with pytest.raises(TypeError, match=f"have {kind} dtype"):
        sc.to_csr(w["a"])
    with pytest.raises(TypeError, match=f"scores 'a' have {kind} dtype"):
        sc.prune({"a": np.ones((3, 3))}, {"a": w["a"]}, sparsity=0.5)


def test_float16_computed_in_float32(rng):
    w = rng.standard_normal((10, 10)).astype(np.float16)
    r = sc.prune({"h": w}, sparsity=0.3)
    assert r.csr["h"].dtype == np.float32
    np.testing.assert_array_equal(r.masks["h"], ref.keep_mask_sparsity(np.abs(w.astype(np.float32)), 30))


def test_empty_tensors(rng):
    w = {"e": np.zeros((0, 4), np.float32), "f": rng.standard_normal((3, 3))}
    for scope in ("local", "global"):
        r = sc.prune(w, sparsity=0.5, scope=scope)
        assert r.csr["e"].shape == (0, 4) and r.csr["e"].nnz == 0 and r.summary[0].sparsity == 0.0
        assert r.masks["e"].shape == (0, 4)
    r = sc.prune({"e": np.zeros(0)}, sparsity=1.0, scope="global")
    assert r.summary[0].pruned == 0


@pytest.mark.parametrize("s", [-0.1, 1.5, np.nan])
def test_sparsity_outside_unit_interval(s):
    with pytest.raises(ValueError, match=r"sparsity for 'a' must lie in \[0, 1\]"):
        sc.prune({"a": np.ones(4)}, sparsity=s)
    with pytest.raises(ValueError, match="must lie in"):
        sc.sparsity_mask(np.ones(4), s)
    with pytest.raises(ValueError, match="min_sparsity for 'a' must lie in"):
        sc.prune({"a": np.ones(4)}, sparsity=0.5, min_sparsity=s)
    with pytest.raises(TypeError, match="must be a number"):
        sc.prune({"a": np.ones(4)}, sparsity="0.5")


def test_nan_threshold():
    with pytest.raises(ValueError, match="threshold for 'a' is NaN"):
        sc.prune({"a": np.ones(4)}, threshold=float("nan"))
    with pytest.raises(ValueError, match="is NaN"):
        sc.threshold_mask(np.ones(3), np.nan)
    with pytest.raises(ValueError, match="is NaN"):
        sc.to_csr(np.ones(3), threshold=np.nan)


def test_option_errors(rng):
    w = {"a": np.ones((2, 2))}
    with pytest.raises(ValueError, match="exactly one of sparsity= and threshold="):
        sc.prune(w)
    with pytest.raises(ValueError, match="exactly one"):
        sc.prune(w, sparsity=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="scope must be 'local' or 'global', got 'globl'"):
        sc.prune(w, sparsity=0.5, scope="globl")
    with pytest.raises(ValueError, match="normalize must be one of \\['none', 'l1', 'l2', 'max'\\]"):
        sc.prune(w, sparsity=0.5, normalize="l3")
    with pytest.raises(ValueError, match="ignore names unknown tensors \\['b'\\]"):
        sc.prune(w, sparsity=0.5, ignore=["b"])
    with pytest.raises(TypeError, match="mapping name -> array"):
        sc.prune(np.ones(3), sparsity=0.5)
    with pytest.raises(ValueError, match="min_sparsity 0.6 exceeds max_sparsity 0.4"):
        sc.prune(w, sparsity=0.5, scope="global", min_sparsity=0.6, max_sparsity=0.4)
    with pytest.raises(ValueError, match="sparsity misses tensors"):
        sc.prune({"a": np.ones(2), "b": np.ones(2)}, sparsity={"a": 0.5})
    with pytest.raises(TypeError, match="global sparsity is one number"):
        sc.prune(w, sparsity={"a": 0.5}, scope="global")
    with pytest.raises(ValueError, match="unknown criterion"):
        sc.prune(w, "nope", sparsity=0.5)
    with pytest.raises(ValueError, match="give at most one of mask, threshold, sparsity"):
        sc.to_csr(np.ones(3), np.ones(3, bool), sparsity=0.5)
    with pytest.raises(ValueError, match=r"mask for 'weights' has shape \(2,\)"):
        sc.to_csr(np.ones(3), np.ones(2, bool))
    with pytest.raises(TypeError, match="pass a bool array"):
        sc.to_csr(np.ones(3), np.ones(3))


def test_layouts_and_read_only_inputs_never_written(rng):
    base = rng.standard_normal((12, 10))
    variants = {"c": base.copy(), "f": np.asfortranarray(base), "strided": np.repeat(base, 2, axis=1)[:, ::2]}
    scores = {k: np.abs(v) + 0.0 for k, v in variants.items()}
    keep = {}
    for k in variants:
        variants[k].setflags(write=False)
        scores[k].setflags(write=False)
    frozen = {k: v.copy() for k, v in variants.items()}
    r = sc.prune(variants, sparsity=0.6)
    r2 = sc.prune(variants, scores, sparsity=0.6, scope="global", normalize="l1")
    for k, v in variants.items():
        np.testing.assert_array_equal(v, frozen[k])
        keep[k] = r.masks[k]
        np.testing.assert_array_equal(r.masks[k], r.masks["c"])
        np.testing.assert_array_equal(r2.masks[k], r2.masks["c"])
        np.testing.assert_array_equal(r.dense(k), np.where(keep[k], base, 0))
    acc = sc.GradientAccumulator(stats=("g2", "wg"))
    acc.update(variants, variants)
    np.testing.assert_array_equal(variants["c"], frozen["c"])


def test_import_does_not_import_frameworks():
    code = "import sys, sparsecore; print(any(m in sys.modules for m in ('torch', 'keras', 'tensorflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_all_is_sorted_and_complete():
    assert sc.__all__ == sorted(sc.__all__)
    for name in sc.__all__:
        assert hasattr(sc, name), name
    public = {n for n in dir(sc) if not n.startswith("_") and callable(getattr(sc, n))}
    assert public <= set(sc.__all__)
