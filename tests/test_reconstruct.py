"""Hessians of layer inputs, the OBS sweep, the exact refit and row scope, against oracles."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore._kernels import cpu_reconstruct
from sparsecore.io import open_weights, prune_file

from . import reference as ref


def _layer(rng, rows=6, cols=12, samples=80, correlated=True):
    X = rng.standard_normal((samples, cols))
    if correlated:  # inputs that share directions, as real activations do
        X = X @ rng.standard_normal((cols, cols)) + 0.5 * rng.standard_normal((1, cols))
    return X, rng.standard_normal((rows, cols))


def _error(X, W, W_hat):
    return float(np.linalg.norm(X @ (W - W_hat).T) ** 2)


# --- Hessians ----------------------------------------------------------------------

def test_hessian_is_the_sum_of_outer_products(rng):
    X = rng.standard_normal((37, 5)).astype(np.float32)
    want = X.astype(np.float64).T @ X.astype(np.float64)
    acc = sc.HessianAccumulator(5, precision="float64").update(X[:20]).update(X[20:].reshape(1, 17, 5))
    np.testing.assert_allclose(acc.hessian(), want, rtol=1e-12)
    assert acc.count == 37
    np.testing.assert_array_equal(acc.hessian(), acc.hessian().T)
    mixed = sc.HessianAccumulator(5).update(X[:20]).update(X[20:])  # float32 products, float64 sums
    np.testing.assert_allclose(mixed.hessian(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mixed.hessian(), mixed.hessian().T)
    with pytest.raises(ValueError, match="precision must be"):
        sc.HessianAccumulator(5, precision="half")


def test_merged_hessians_equal_one_pass(rng):
    X = rng.standard_normal((60, 7))
    one = sc.HessianAccumulator(7).update(X)
    a, b = sc.HessianAccumulator(7).update(X[:25]), sc.HessianAccumulator(7).update(X[25:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.hessian(), one.hessian(), rtol=1e-13, atol=1e-12)
    assert merged.count == 60
    back = sc.HessianAccumulator.from_state_dict(merged.state_dict())
    np.testing.assert_array_equal(back.hessian(), merged.hessian())
    assert back.count == 60


def test_gram_updates_equal_input_updates(rng):
    X = rng.standard_normal((50, 6))
    want = sc.HessianAccumulator(6).update(X)
    got = sc.HessianAccumulator(6)
    for part in (X[:10], X[10:]):
        g = part.T @ part
        got.update_gram(g if len(part) == 10 else np.asfortranarray(g), len(part))  # either memory order
    np.testing.assert_allclose(got.hessian(), want.hessian(), rtol=1e-12)
    assert got.count == 50
    acc = sc.HessianAccumulator(6, name="fc")
    with pytest.raises(ValueError, match=r"Gram matrix of 'fc' has shape \(5, 5\); \(6, 6\) needed"):
        acc.update_gram(np.eye(5), 3)
    with pytest.raises(ValueError, match="count for 'fc' must be an integer >= 0, got -1"):
        acc.update_gram(np.eye(6), -1)
    bad = np.eye(6)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"'fc' hold 1 NaN or Inf value \(first: Inf at index \(1, 2\)\)"):
        acc.update_gram(bad, 2)
    assert acc.count == 0 and not acc.hessian().any()


@pytest.mark.parametrize("triangle", ["upper", "lower"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_gram_updates_read_one_triangle_only(rng, triangle, order):
    X = rng.standard_normal((40, 9))
    want = sc.HessianAccumulator(9).update(X)
    g = X.T @ X
    half = np.triu(g) if triangle == "upper" else np.tril(g)
    other = np.tril(np.ones_like(g), -1) if triangle == "upper" else np.triu(np.ones_like(g), 1)
    half = np.asarray(np.where(other > 0, np.nan, half), order=order)  # the triangle not read: anything
    kept = half.copy()
    got = sc.HessianAccumulator(9, name="fc").update_gram(half, 40, triangle=triangle)
    np.testing.assert_allclose(got.hessian(), want.hessian(), rtol=1e-12)
    np.testing.assert_array_equal(half, kept)  # the caller's array untouched
    assert np.isfinite(got.state_dict()["hessian"]).all()
    bad = kept.copy()
    bad[(0, 3) if triangle == "upper" else (3, 0)] = np.inf
    with pytest.raises(ValueError, match=r"'fc' hold 1 NaN or Inf value \(first: Inf at index \((0, 3|3, 0)\)\)"):
        got.update_gram(bad, 1, triangle=triangle)
    with pytest.raises(ValueError, match="triangle must be 'both', 'upper' or 'lower', got 'diag'"):
        got.update_gram(g, 1, triangle="diag")
    assert got.count == 40


@pytest.mark.kernel
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reverse_matches_its_reference(rng, n, dtype):
    m = np.asfortranarray(rng.standard_normal((n, n)).astype(dtype))
    want = m[::-1, ::-1].copy()
    flat = m.reshape(-1, order="F")  # a view
    cpu_reconstruct.reverse(flat)  # a Fortran-ordered matrix's buffer reversed: both axes reversed
    np.testing.assert_array_equal(m, want)
    v = rng.standard_normal(2 * n + 1).astype(dtype)
    w = v[::-1].copy()
    cpu_reconstruct.reverse(v)
    np.testing.assert_array_equal(v, w)


@pytest.mark.kernel
@pytest.mark.parametrize("n", [0, 1, 2, 5, 70, 130])
def test_damped_reversed_matches_its_reference(rng, n):
    X = rng.standard_normal((3 * n + 1, n))
    X[:, ::4] = 0.0  # dead inputs: every fourth
    H = X.T @ X
    upper = np.asfortranarray(np.triu(H) + np.tril(np.full_like(H, np.nan), -1))  # below the diagonal: not read
    A, dead = cpu_reconstruct.damped_reversed(upper, 0.01)
    want, want_dead = ref.damped_reversed(H, 0.01)
    np.testing.assert_array_equal(dead, want_dead)
    np.testing.assert_allclose(np.tril(A), np.tril(want), rtol=1e-14, atol=0)  # potrf reads the lower one only
    assert A.flags.f_contiguous


def test_shared_accumulators_factor_once_and_forget_on_update(rng):
    X, W = _layer(rng, 4, 8)
    acc = sc.HessianAccumulator(8).update(X)
    first = sc.sparsegpt({"a": W}, {"a": acc}, sparsity=0.5)
    again = sc.sparsegpt({"b": W}, {"b": acc}, sparsity=0.5)  # the memo: the same answer
    np.testing.assert_array_equal(first.dense("a"), again.dense("b"))
    acc.update(X[:5] * 3)  # new inputs: H and its factors are formed anew
    fresh = sc.sparsegpt({"a": W}, {"a": sc.HessianAccumulator(8).update(X).update(X[:5] * 3)}, sparsity=0.5)
    np.testing.assert_array_equal(sc.sparsegpt({"a": W}, {"a": acc}, sparsity=0.5).dense("a"), fresh.dense("a"))
    with pytest.raises(ValueError, match="read 5 input features"):
        sc.sparsegpt({"c": W[:, :5]}, {"c": acc}, sparsity=0.5)


def test_padding_tokens_are_left_out(rng):
    x = rng.standard_normal((2, 4, 3))  # (batch, seq, features)
    real = np.array([[True, True, False, False], [True, True, True, False]])
    acc = sc.HessianAccumulator(3).update(x, mask=real)
    kept = x[real]
    np.testing.assert_allclose(acc.hessian(), kept.T @ kept, rtol=1e-12)
    assert acc.count == 5


def test_hessian_refuses_bad_input(rng):
    with pytest.raises(ValueError, match=r"needs 100000² float64 = 76293.9 MiB, over memory_limit"):
        sc.HessianAccumulator(100_000, name="fc")
    acc = sc.HessianAccumulator(3, name="fc")
    with pytest.raises(ValueError, match="last axis must hold 3 features"):
        acc.update(np.ones((4, 2)))
    bad = np.ones((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"inputs 'fc' hold 1 NaN or Inf value \(first: NaN at index \(2, 1\)\)"):
        acc.update(bad)
    with pytest.raises(ValueError, match="one entry per token"):
        acc.update(np.ones((4, 3)), mask=np.ones(3, bool))
    with pytest.raises(TypeError, match="integer"):
        acc.update(np.ones((4, 3), np.int64))
    assert acc.count == 0 and not acc.hessian().any()  # nothing was added by the refused updates
    with pytest.raises(ValueError, match="can merge only"):
        acc.merge(sc.HessianAccumulator(4))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("opts", [dict(), dict(stride=2), dict(padding=1), dict(dilation=2, padding=(1, 2))])
def test_unfolded_patches_give_the_convolution(rng, layout, opts):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 7, 8))
    w = rng.standard_normal((4, 3, 3, 2))  # OIHW
    want = torch.nn.functional.conv2d(torch.as_tensor(x), torch.as_tensor(w), **opts).numpy()
    if layout == "nchw":
        patches = sc.unfold_patches(x, (3, 2), layout="nchw", **opts)
        got = patches @ w.reshape(4, -1).T
    else:
        patches = sc.unfold_patches(x.transpose(0, 2, 3, 1), (3, 2), layout="nhwc", **opts)
        got = patches @ w.transpose(2, 3, 1, 0).reshape(-1, 4)  # an HWIO kernel's (in, out) view
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1).reshape(-1, 4), rtol=1e-10, atol=1e-10)


# --- the OBS sweep ---------------------------------------------------------------

@pytest.mark.parametrize("blocksize", [1, 4, 128])
def test_sweep_equals_naive_obs(rng, blocksize):
    X, W = _layer(rng, 5, 10)
    prune = rng.random(W.shape) < 0.5
    masks = {"fc": ~prune}
    got = sc.reconstruct({"fc": W}, {"fc": X.T @ X}, masks, method="obs", damp=0.0, blocksize=blocksize)
    np.testing.assert_allclose(got.dense("fc"), ref.obs_sweep(W, X.T @ X, prune), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("blocksize, target", [(4, 0.5), (5, 0.3), (128, 0.7), (4, (2, 4)), (6, (2, 4)),
                                               (128, (1, 3))])
def test_sparsegpt_chooses_its_mask_as_the_naive_sweep_does(rng, blocksize, target):
    X, W = _layer(rng, 5, 12)
    H = X.T @ X
    kw = dict(pattern=sc.NM(*target)) if isinstance(target, tuple) else dict(sparsity=target)
    got = sc.sparsegpt({"fc": W}, {"fc": H}, damp=0.0, blocksize=blocksize, **kw)
    if isinstance(target, tuple):  # sparsegpt rounds its column blocks down to whole groups
        want, prune = ref.sparsegpt_sweep(W, H, nm=target, blocksize=max(target[1], blocksize // target[1] * target[1]))
    else:
        want, prune = ref.sparsegpt_sweep(W, H, sparsity=target, blocksize=blocksize)
    np.testing.assert_array_equal(~got.masks["fc"], prune)
    np.testing.assert_allclose(got.dense("fc"), want, rtol=1e-8, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.data())
def test_lowest_takes_ties_in_index_order(values, data):
    from sparsecore.reconstruct import _lowest

    sal = np.array(values, np.float64)
    k = data.draw(st.integers(0, sal.size))
    want = np.zeros(sal.size, bool)
    want[np.argsort(sal, kind="stable")[:k]] = True
    np.testing.assert_array_equal(_lowest(sal, k), want)


def test_identity_hessian_changes_nothing_and_selects_by_magnitude(rng):
    W = rng.standard_normal((8, 16))
    masks = sc.prune({"fc": W}, sparsity=0.5).masks
    for damp in (0.0, 0.01):
        got = sc.reconstruct({"fc": W}, {"fc": np.eye(16)}, masks, method="obs", damp=damp)
        np.testing.assert_array_equal(got.dense("fc"), np.where(masks["fc"], W, 0))
        sg = sc.sparsegpt({"fc": W}, {"fc": np.eye(16)}, sparsity=0.5, damp=damp)  # one column block: whole layer
        np.testing.assert_array_equal(sg.masks["fc"], masks["fc"])
        np.testing.assert_array_equal(sg.dense("fc"), np.where(masks["fc"], W, 0))
    nm = sc.sparsegpt({"fc": W}, {"fc": np.eye(16)}, pattern="2:4")
    np.testing.assert_array_equal(nm.masks["fc"], sc.prune({"fc": W}, pattern="2:4").masks["fc"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparsity_zero_returns_the_weights_bit_for_bit(rng, dtype):
    X, W = _layer(rng)
    W = W.astype(dtype)
    H = X.T @ X
    for method in ("obs", "refit", "obs+refit"):
        got = sc.reconstruct({"fc": W}, {"fc": H}, {"fc": np.ones(W.shape, bool)}, method=method, damp=0.0)
        if method == "obs":
            np.testing.assert_array_equal(got.dense("fc"), W)
        else:  # the refit solves for the same weights: equal within rounding
            np.testing.assert_allclose(got.dense("fc"), W, rtol=1e-6 if dtype == np.float32 else 1e-9)
    sg = sc.sparsegpt({"fc": W}, {"fc": H}, sparsity=0.0)
    np.testing.assert_array_equal(sg.dense("fc"), W)
    assert sg.dense("fc").dtype == dtype


def test_sparsegpt_prunes_exactly_and_lowers_the_error(rng):
    X, W = _layer(rng, 16, 64, 300)
    H = sc.HessianAccumulator(64).update(X)
    mag = sc.prune({"fc": W}, sparsity=0.5).masks["fc"]
    sg = sc.sparsegpt({"fc": W}, {"fc": H}, sparsity=0.5, blocksize=16)
    assert sg.summary[0].pruned == W.size // 2
    assert _error(X, W, sg.dense("fc")) < _error(X, W, np.where(mag, W, 0))
    nm = sc.sparsegpt({"fc": W}, {"fc": H}, pattern=sc.NM(2, 4), refit="exact")
    assert sc.is_n_m(nm.masks["fc"], 2, 4) and np.all(nm.dense("fc")[~nm.masks["fc"]] == 0)
    assert _error(X, W, nm.dense("fc")) < _error(X, W, np.where(sc.prune({"fc": W}, pattern="2:4").masks["fc"], W, 0))


def test_sparsegpt_refit_leaves_rows_the_sweep_emptied_at_zero(rng):
    X, W = _layer(rng, 32, 9, 100)
    r = sc.sparsegpt({"c": W}, {"c": X.T @ X}, sparsity=0.9, refit="auto")
    empty = ~r.masks["c"].any(axis=1)
    assert empty.any()  # nine inputs at 90%: the block-wide selection empties some rows
    assert not r.dense("c")[empty].any() and np.isfinite(r.dense("c")).all()


# --- the exact refit ---------------------------------------------------------------

def _drifted(rng, rows=5, cols=10, samples=60):
    """A layer, its dense-model inputs X and the pruned model's X̂ = X + drift."""
    X, W = _layer(rng, rows, cols, samples)
    return X, X + 0.3 * rng.standard_normal(X.shape) * X.std(axis=0), W


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_dense_objective_refit_equals_lstsq_against_the_dense_outputs(rng, solver):
    X, Xh, W = _drifted(rng)
    keep = sc.prune({"fc": W}, sparsity=0.5).masks["fc"]
    acc = sc.HessianAccumulator(W.shape[1], cross=True).update(Xh, dense=X)
    got = sc.reconstruct({"fc": W}, {"fc": acc}, {"fc": keep}, method="refit", damp=0.0, refit=solver)
    np.testing.assert_allclose(got.dense("fc"), ref.refit_lstsq(W, X, keep, Xh), rtol=1e-7, atol=1e-7)


def test_dense_objective_with_the_same_inputs_changes_nothing(rng):
    """x̂ = x: the cross term is zero and every repair is the one of SparseGPT's objective, bit for bit."""
    X, W = _layer(rng)
    plain = sc.HessianAccumulator(W.shape[1]).update(X)
    cross = sc.HessianAccumulator(W.shape[1], cross=True).update(X, dense=X)
    assert not cross.cross_term().any()
    np.testing.assert_array_equal(sc.sparsegpt({"fc": W}, {"fc": cross}, pattern="2:4").dense("fc"),
                                  sc.sparsegpt({"fc": W}, {"fc": plain}, pattern="2:4").dense("fc"))
    np.testing.assert_array_equal(
        sc.prune_layer("fc", W, cross, method="wanda", sparsity=0.5, update="obs").dense("fc"),
        sc.prune_layer("fc", W, plain, method="wanda", sparsity=0.5, update="obs").dense("fc"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 5), cols=st.integers(2, 12), frac=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_dense_objective_is_closer_to_the_dense_outputs(rows, cols, frac, seed):
    """For a given mask, the exact refit aimed at the dense outputs is never further from them than the
    refit aimed at the layer's own outputs on the drifted inputs (SparseGPT's objective)."""
    X, Xh, W = _drifted(np.random.default_rng(seed), rows, cols, 3 * cols)
    keep = sc.prune({"fc": W}, sparsity=frac, scope="row").masks["fc"]
    keep[:, 0] = True
    accs = {c: sc.HessianAccumulator(cols, cross=c).update(Xh, **({"dense": X} if c else {})) for c in (False, True)}
    err = {c: float(np.linalg.norm(X @ W.T - Xh @ sc.reconstruct({"fc": W}, {"fc": a}, {"fc": keep}, method="refit",
                                                                    damp=0.0, refit="exact").dense("fc").T) ** 2)
           for c, a in accs.items()}
    assert err[True] <= err[False] * (1 + 1e-9) + 1e-9


def test_cross_terms_merge_save_and_refuse_mixing(rng):
    X, Xh, W = _drifted(rng, samples=90)
    one = sc.HessianAccumulator(10, cross=True).update(Xh, dense=X)
    parts = sc.HessianAccumulator(10, cross=True).update(Xh[:40], dense=X[:40])
    parts.merge(sc.HessianAccumulator(10, cross=True).update(Xh[40:], dense=X[40:]))
    np.testing.assert_allclose(parts.cross_term(), one.cross_term(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.cross_term(), (X - Xh).T @ Xh, rtol=1e-12, atol=1e-12)
    gram = sc.HessianAccumulator(10, cross=True).update_gram(Xh.T @ Xh, 90, cross=(X - Xh).T @ Xh)
    np.testing.assert_allclose(gram.cross_term(), one.cross_term(), rtol=1e-12, atol=1e-12)
    back = sc.HessianAccumulator.from_state_dict(one.state_dict())
    assert back.has_cross and np.array_equal(back.cross_term(), one.cross_term())
    plain = sc.HessianAccumulator(10).update(Xh)
    assert "cross" not in plain.state_dict() and not plain.has_cross
    with pytest.raises(ValueError, match="both keep the cross term, or neither"):
        one.merge(plain)
    with pytest.raises(ValueError, match="keeps the cross term .cross=True.: pass dense="):
        one.update(Xh)
    with pytest.raises(ValueError, match="has no cross term: dense= needs"):
        plain.update(Xh, dense=X)
    with pytest.raises(ValueError, match="dense inputs of 'layer' have 89 tokens, the inputs 90"):
        one.update(Xh, dense=X[1:])
    with pytest.raises(ValueError, match="keeps the cross term .cross=True.: pass cross="):
        one.update_gram(Xh.T @ Xh, 90)
    with pytest.raises(ValueError, match=r"cross term of 'layer' has shape \(3, 3\)"):
        one.update_gram(Xh.T @ Xh, 90, cross=np.eye(3))
    with pytest.raises(ValueError, match="keeps no cross term"):
        plain.cross_term()
    with pytest.raises(ValueError, match=r"2 x 10² float64"):
        sc.HessianAccumulator(10, cross=True, memory_limit=1000)
    keep = sc.prune({"fc": W}, sparsity=0.5).masks
    with pytest.raises(ValueError, match="keeps the cross term, which only an update uses"):
        sc.reconstruct({"fc": W}, {"fc": one}, keep, method="none")
    with pytest.raises(ValueError, match="keeps the cross term, which only an update uses"):
        sc.prune_layer("fc", W, one, method="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match=r"dense_target must be a number in \[0, 1\], got 2"):
        sc.reconstruct({"fc": W}, {"fc": one}, keep, method="obs", dense_target=2)


@pytest.mark.parametrize("a", [0.0, 0.25, 1.0])
def test_dense_target_weighs_the_target_between_layer_and_dense(rng, a):
    """dense_target=a: the refit reaches toward T = W X̂ + a·W (X − X̂), as lstsq does."""
    X, Xh, W = _drifted(rng)
    keep = sc.prune({"fc": W}, sparsity=0.5).masks["fc"]
    acc = sc.HessianAccumulator(W.shape[1], cross=True).update(Xh, dense=X)
    got = sc.reconstruct({"fc": W}, {"fc": acc}, {"fc": keep}, method="refit", damp=0.0, refit="exact",
                         dense_target=a).dense("fc")
    T = Xh @ W.T + a * (X - Xh) @ W.T
    want = np.zeros_like(W)
    for r in range(W.shape[0]):
        K = np.flatnonzero(keep[r])
        want[r, K] = np.linalg.lstsq(Xh[:, K], T[:, r], rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)


def test_refit_equals_lstsq_row_by_row(rng):
    X, W = _layer(rng, 6, 12, 50)
    keep = sc.prune({"fc": W}, sparsity=0.6).masks["fc"]
    want = ref.refit_lstsq(W, X, keep)
    for solver in ("exact", "cg"):
        got = sc.reconstruct({"fc": W}, {"fc": X.T @ X}, {"fc": keep}, method="refit", damp=0.0, refit=solver)
        np.testing.assert_allclose(got.dense("fc"), want, rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), cols=st.integers(2, 14), frac=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_refit_is_never_worse_than_the_sweep_or_no_update(rows, cols, frac, seed):
    rng = np.random.default_rng(seed)
    X, W = _layer(rng, rows, cols, 3 * cols)
    keep = sc.prune({"fc": W}, sparsity=frac, scope="row").masks["fc"]
    if not keep.any(axis=1).all():
        keep[:, 0] = True
    H = X.T @ X
    err = {m: _error(X, W, sc.reconstruct({"fc": W}, {"fc": H}, {"fc": keep}, method=m, damp=0.0).dense("fc"))
           for m in ("none", "obs", "refit", "obs+refit")}
    tol = 1e-9 * (1 + err["none"])
    assert err["refit"] <= err["obs"] + tol
    assert err["refit"] <= err["none"] + tol
    assert err["obs+refit"] <= err["obs"] + tol


def test_layouts_and_dtypes(rng):
    X, W = _layer(rng, 6, 12)
    keep = sc.prune({"fc": W}, sparsity=0.5).masks["fc"]
    oi = sc.reconstruct({"fc": W}, {"fc": X.T @ X}, {"fc": keep})
    io = sc.reconstruct({"k": W.T.copy()}, {"k": X.T @ X}, {"k": keep.T.copy()}, layouts={"k": "io"})
    np.testing.assert_allclose(io.dense("k"), oi.dense("fc").T, rtol=1e-12)
    w32 = sc.reconstruct({"fc": W.astype(np.float32)}, {"fc": X.T @ X}, {"fc": keep})
    assert w32.dense("fc").dtype == np.float32
    np.testing.assert_allclose(w32.dense("fc"), oi.dense("fc"), rtol=1e-4, atol=1e-5)
    w16 = sc.reconstruct({"fc": W.astype(np.float16)}, {"fc": X.T @ X}, {"fc": keep}, method="obs")
    assert w16.masks["fc"].dtype == bool and w16.summary[0].dense_bytes == W.size * 2
    conv = rng.standard_normal((4, 3, 2, 2))  # OIHW: 12 inputs per output
    got = sc.reconstruct({"c": conv}, {"c": X.T @ X}, {"c": np.abs(conv) > 0.5})
    assert got.dense("c").shape == conv.shape


def test_obs_criterion_ranks_by_saliency(rng):
    X, W = _layer(rng, 6, 12)
    acc = sc.HessianAccumulator(12).update(X)
    sal = sc.obs_saliency(W, acc)
    got = sc.prune({"fc": W}, "obs", state={"fc": {"hessian": acc}}, sparsity=0.5, scope="global")
    np.testing.assert_array_equal(got.masks["fc"], sc.prune({"fc": W}, {"fc": sal}, sparsity=0.5).masks["fc"])
    Hinv = np.linalg.inv(X.T @ X + 0.01 * np.mean(np.diag(X.T @ X)) * np.eye(12))
    np.testing.assert_allclose(sal, W ** 2 / np.diag(Hinv)[None, :] ** 2, rtol=1e-9)


def test_reconstruction_refuses_bad_input(rng):
    X, W = _layer(rng, 4, 6)
    H = X.T @ X
    keep = np.ones(W.shape, bool)
    with pytest.raises(ValueError, match=r"Hessian of 'fc' has shape \(5, 5\), but its weights read 6 input"):
        sc.reconstruct({"fc": W}, {"fc": np.eye(5)}, {"fc": keep})
    bad = H.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"Hessian 'fc' hold 1 NaN or Inf value"):
        sc.reconstruct({"fc": W}, {"fc": bad}, {"fc": keep})
    singular = np.outer(X[0], X[0])  # rank 1
    with pytest.raises(ValueError, match="singular without damping; pass damp > 0"):
        sc.reconstruct({"fc": W}, {"fc": singular}, {"fc": keep}, method="obs", damp=0.0)
    empty_row = keep.copy()
    empty_row[2] = False
    with pytest.raises(ValueError, match="keeps nothing in output row 2"):
        sc.reconstruct({"fc": W}, {"fc": H}, {"fc": empty_row}, method="refit")
    with pytest.raises(ValueError, match="must be bool"):
        sc.reconstruct({"fc": W}, {"fc": H}, {"fc": keep.astype(int)})
    with pytest.raises(ValueError, match="method must be one of"):
        sc.reconstruct({"fc": W}, {"fc": H}, {"fc": keep}, method="magic")
    with pytest.raises(ValueError, match="hessians lack layer 'fc'"):
        sc.reconstruct({"fc": W}, {}, {"fc": keep})
    with pytest.raises(ValueError, match="has seen no inputs"):
        sc.reconstruct({"fc": W}, {"fc": sc.HessianAccumulator(6)}, {"fc": keep})
    nan_w = W.copy()
    nan_w[0, 0] = np.nan
    with pytest.raises(ValueError, match="weights 'fc' hold 1 NaN"):
        sc.sparsegpt({"fc": nan_w}, {"fc": H}, sparsity=0.5)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        sc.sparsegpt({"fc": W}, {"fc": H}, pattern="2:4")
    with pytest.raises(ValueError, match="exactly one of sparsity= and pattern="):
        sc.sparsegpt({"fc": W}, {"fc": H})
    with pytest.raises(ValueError, match="N:M pattern along the input axis"):
        sc.sparsegpt({"fc": W}, {"fc": H}, pattern=sc.Blocks(2))
    before = W.copy()
    sc.sparsegpt({"fc": W}, {"fc": H}, sparsity=0.5)
    np.testing.assert_array_equal(W, before)  # the caller's array is never written


# --- row scope ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 12), (3, 2, 3, 3), (1, 7), (9,)])
@pytest.mark.parametrize("block", [None, 4])
def test_row_scope_prunes_exactly_per_row(rng, shape, block):
    w = np.round(rng.standard_normal(shape), 1)  # ties
    for frac in (0.0, 0.3, 0.5, 1.0):
        got = sc.prune({"w": w}, sparsity=frac, scope="row", column_block=block).masks["w"]
        np.testing.assert_array_equal(got, ref.row_keep(np.abs(w), frac, block))


def test_row_scope_takes_any_criterion(rng):
    w = rng.standard_normal((4, 6))
    x_norm = rng.random(6) + 0.1
    got = sc.prune({"fc": w}, "wanda", state={"fc": {"x_norm": x_norm}}, sparsity=0.5, scope="row")
    np.testing.assert_array_equal(got.masks["fc"], ref.row_keep(np.abs(w) * x_norm, 0.5))
    # Wanda's reference code prunes int(s * cols) per row: the same here where s * cols is whole
    assert (got.masks["fc"].sum(axis=1) == 3).all()


def test_row_scope_refuses_what_it_cannot_do(rng):
    w = {"fc": rng.standard_normal((4, 8))}
    with pytest.raises(ValueError, match="a threshold compares each entry alone"):
        sc.prune(w, threshold=0.5, scope="row")
    with pytest.raises(ValueError, match="a Blocks pattern has its own groups"):
        sc.prune(w, sparsity=0.5, scope="row", pattern=sc.Blocks(2))
    with pytest.raises(ValueError, match="column_block ranks blocks of a row apart: it needs scope='row'"):
        sc.prune(w, sparsity=0.5, column_block=4)
    with pytest.raises(ValueError, match="does not take current masks"):
        sc.prune(w, sparsity=0.5, scope="row", masks={"fc": np.ones((4, 8), bool)})
    bad = w["fc"].copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"weights 'fc' hold 1 NaN or Inf value \(first: Inf at index \(1, 3\)\)"):
        sc.prune({"fc": bad}, sparsity=0.5, scope="row")


def test_row_scope_offline_equals_in_memory(rng, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    w = {"a.weight": rng.standard_normal((6, 10)).astype(np.float32)}
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(w, str(path))
    prune_file(path, tmp_path / "o.safetensors", sparsity=0.4, scope="row")
    with open_weights(tmp_path / "o.safetensors") as f:
        got = f.floats("a.weight")
    want = sc.prune(w, sparsity=0.4, scope="row")
    np.testing.assert_array_equal(got, np.where(want.masks["a.weight"], w["a.weight"], 0))


def test_reconstruct_module_is_public():
    assert sc.HessianAccumulator.__module__ == "sparsecore.reconstruct"
    assert "obs" in sc.list_criteria()


def test_an_accumulator_keeps_what_is_derived_until_it_changes(rng):
    x = rng.standard_normal((20, 5))
    h = sc.HessianAccumulator(5).update(x)
    calls = []
    first = h.cached("k", lambda: calls.append(1) or np.ones(2))
    assert h.cached("k", lambda: calls.append(1) or np.zeros(2)) is first and calls == [1]
    up = h.upper()
    assert not up.flags.writeable and np.allclose(np.triu(up), np.triu(x.T @ x))
    h.update(x)  # an update forgets it
    assert h.cached("k", lambda: calls.append(1) or np.zeros(2)).sum() == 0 and calls == [1, 1]
    with pytest.raises(ValueError):
        up[0, 0] = 1.0


# --- the registry of repair methods ---------------------------------------------------

class _MagnitudeThenRefit(sc.RepairMethod):
    """A method that chooses its own mask: the smallest |w| (per row, so the refit has entries to solve for),
    then the exact refit; one class in one file is all a new method needs."""

    name, roles = "test-magnitude-refit", frozenset({"choose"})

    def choose(self, problem):
        rows = problem.rows
        k = round(problem.sparsity * rows.shape[1])
        prune = np.zeros(rows.shape, np.bool_)
        np.put_along_axis(prune, np.argsort(np.abs(rows), axis=1, kind="stable")[:, :k], True, axis=1)
        return np.where(prune, 0.0, sc.get_repair("refit").update(problem, prune)), prune


class _Halfway(sc.RepairMethod):
    name, roles = "test-halfway", frozenset({"update"})

    def update(self, problem, prune):
        return 0.5 * (problem.rows + sc.get_repair("refit").update(problem, prune))


def test_a_registered_method_serves_prune_layer_reconstruct_and_the_sequential_driver(rng):
    sc.register_repair(_MagnitudeThenRefit(), overwrite=True)
    sc.register_repair(_Halfway(), overwrite=True)
    assert "test-magnitude-refit" in sc.list_repairs("mask") and "test-halfway" in sc.list_repairs("update")
    X = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    W = rng.standard_normal((6, 16))
    acc = sc.HessianAccumulator(16).update(X)
    r = sc.prune_layer("fc", W, acc, method="test-magnitude-refit", sparsity=0.5, damp=0.0)
    keep = r.masks["fc"]
    assert (keep.sum(axis=1) == 8).all()
    want = ref.refit_lstsq(W, X, keep)
    np.testing.assert_allclose(r.dense("fc"), want, rtol=1e-8, atol=1e-10)
    half = sc.reconstruct({"fc": W}, {"fc": acc}, {"fc": keep}, method="test-halfway", damp=0.0)
    np.testing.assert_allclose(half.dense("fc"), np.where(keep, 0.5 * (W + want), 0.0), rtol=1e-8, atol=1e-10)
    viaup = sc.prune_layer("fc", W, acc, method="magnitude", update="test-halfway", sparsity=0.5, scope="row",
                           damp=0.0)
    np.testing.assert_allclose(viaup.dense("fc"), half.dense("fc"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="updates the weights itself; update= is for the other methods"):
        sc.prune_layer("fc", W, acc, method="test-magnitude-refit", update="refit", sparsity=0.5)
    with pytest.raises(ValueError, match="method must be one of .*'test-magnitude-refit'.*, got 'test-halfway'"):
        sc.prune_layer("fc", W, acc, method="test-halfway", sparsity=0.5)
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        sc.register_repair(_Halfway())
    with pytest.raises(ValueError, match="roles must be a non-empty subset"):
        sc.register_repair(type("Bad", (sc.RepairMethod,), {"name": "test-bad", "roles": frozenset({"fit"})})())
    with pytest.raises(TypeError, match="register_repair takes a RepairMethod, got function"):
        sc.register_repair(lambda p: p)


def test_the_built_in_methods_are_registry_entries():
    assert sc.list_repairs("mask")[:4] == ["sparsegpt", "wanda", "magnitude", "obs"]
    assert sc.list_repairs("update")[:4] == ["obs", "refit", "obs+refit", "none"]
    assert sc.get_repair("obs").criterion == "obs" and sc.get_repair("wanda").default_scope == "row"
    with pytest.raises(ValueError, match=r"update must be one of \[None, 'obs', 'refit', 'obs\+refit'"):
        sc.prune_layer("fc", np.ones((2, 4)), np.eye(4), method="wanda", update="none", sparsity=0.5)


def test_repair_results_carry_their_dense_arrays(rng):
    X = rng.standard_normal((100, 8))
    W = rng.standard_normal((4, 8)).astype(np.float16)
    r = sc.sparsegpt({"fc": W}, {"fc": sc.HessianAccumulator(8).update(X)}, sparsity=0.5)
    assert set(r.arrays) == {"fc"} and r.arrays["fc"].dtype == np.float32
    got = r.dense("fc")
    assert got is not r.arrays["fc"]
    np.testing.assert_array_equal(got, sc.to_dense(r.csr["fc"], r.shapes["fc"]))
    got[:] = 7  # a copy: the result is unchanged
    assert not (r.dense("fc") == 7).any()
    r.arrays.clear()  # dropped: dense() rebuilds from the CSR, the same values
    np.testing.assert_array_equal(r.dense("fc"), sc.to_dense(r.csr["fc"], r.shapes["fc"]))
