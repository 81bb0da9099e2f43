"""Structural shrink: the smaller arrays compute what the masked network computes."""

import numpy as np
import pytest

import sparsecore as sc

from . import reference as ref


def _bn(rng, k):
    return {"gamma": rng.uniform(0.5, 1.5, k), "beta": rng.standard_normal(k),
            "mean": rng.standard_normal(k), "var": rng.uniform(0.5, 2.0, k), "eps": np.float64(1e-5)}


def _keep(rng, k):
    keep = rng.random(k) < 0.6
    keep[rng.integers(k)] = True
    return keep


@pytest.mark.parametrize("layout", ["oi", "io"])
@pytest.mark.parametrize("with_bn", [False, True])
def test_mlp_shrink_equals_masked_network(rng, layout, with_bn):
    sizes = [10, 16, 12, 4]
    layers = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.standard_normal((b, a))
        layers[f"fc{i}"] = sc.Layer(w if layout == "oi" else w.T.copy(), rng.standard_normal(b), layout,
                                    _bn(rng, b) if with_bn and i < 2 else {})
    keep = {"fc0": _keep(rng, 16), "fc1": _keep(rng, 12)}
    x = rng.standard_normal((32, 10))
    masked = ref.dense_forward(x, layers, unit_masks={k: v.astype(float) for k, v in keep.items()})
    before = {k: (np.array(v.weight, copy=True), np.array(v.bias, copy=True)) for k, v in layers.items()}
    small = sc.shrink(layers, keep)
    for k, v in layers.items():  # the inputs are untouched
        np.testing.assert_array_equal(v.weight, before[k][0])
        np.testing.assert_array_equal(v.bias, before[k][1])
    assert small["fc0"].weight.shape == ((int(keep["fc0"].sum()), 10) if layout == "oi"
                                         else (10, int(keep["fc0"].sum())))
    assert not np.shares_memory(small["fc2"].weight, layers["fc2"].weight)
    np.testing.assert_allclose(ref.dense_forward(x, small), masked, rtol=1e-12, atol=1e-12)
    if with_bn:
        assert small["fc0"].bn["gamma"].shape == (int(keep["fc0"].sum()),)
        assert small["fc0"].bn["eps"] == 1e-5


def test_units_prune_then_shrink(rng):
    """Whole neurons chosen by prune(pattern=Units) feed shrink; outputs match."""
    layers = {"fc0": sc.Layer(rng.standard_normal((32, 8)), rng.standard_normal(32)),
              "fc1": sc.Layer(rng.standard_normal((24, 32)), rng.standard_normal(24)),
              "out": sc.Layer(rng.standard_normal((3, 24)), rng.standard_normal(3))}
    r = sc.prune({k: layers[k].weight for k in ("fc0", "fc1")}, sparsity=0.5, scope="global",
                 pattern=sc.Units(reduce="l2", min_keep=2), normalize="l2")
    small = sc.shrink(layers, r.groups)
    x = rng.standard_normal((16, 8))
    masked = ref.dense_forward(x, layers, unit_masks={k: v.astype(float) for k, v in r.groups.items()})
    np.testing.assert_allclose(ref.dense_forward(x, small), masked, rtol=1e-12, atol=1e-12)
    assert sum(small[k].weight.shape[0] for k in ("fc0", "fc1")) == 56 - 28


def _cnn_forward(x, L, masks=None, layout="oihw"):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> global mean -> dense."""
    h = x
    for name in ("c1", "c2"):
        w = L[name].weight if layout == "oihw" else np.transpose(L[name].weight, (3, 2, 0, 1))
        h = ref.conv2d_nchw(h, w, L[name].bias)
        h = np.maximum(ref.batch_norm(h, L[name].bn, axis=1), 0.0)
        if masks is not None and name in masks:
            h = h * masks[name].reshape(1, -1, 1, 1)
    h = h.mean(axis=(2, 3))
    return h @ L["fc"].weight.T + L["fc"].bias


@pytest.mark.parametrize("layout", ["oihw", "hwio"])
def test_cnn_with_batch_norm_shrink(rng, layout):
    def conv(o, i):
        w = rng.standard_normal((o, i, 3, 3))
        return w if layout == "oihw" else np.transpose(w, (2, 3, 1, 0)).copy()

    L = {"c1": sc.Layer(conv(8, 3), rng.standard_normal(8), layout.upper(), _bn(rng, 8)),
         "c2": sc.Layer(conv(6, 8), rng.standard_normal(6), layout, _bn(rng, 6)),
         "fc": sc.Layer(rng.standard_normal((5, 6)), rng.standard_normal(5), "oi")}
    axis = 0 if layout == "oihw" else -1
    r = sc.prune({k: L[k].weight for k in ("c1", "c2")}, sparsity=0.4, pattern=sc.Units(axis=axis, reduce="l1"))
    keep = r.groups
    assert keep["c1"].sum() == 5 and keep["c2"].sum() == 4
    x = rng.standard_normal((4, 3, 9, 9))
    masked = _cnn_forward(x, L, {k: v.astype(float) for k, v in keep.items()}, layout)
    small = sc.shrink(L, keep)
    assert small["c2"].weight.shape == ((4, 5, 3, 3) if layout == "oihw" else (3, 3, 5, 4))
    assert small["c1"].bn["var"].shape == (5,) and small["fc"].weight.shape == (5, 4)
    np.testing.assert_allclose(_cnn_forward(x, small, layout=layout), masked, rtol=1e-10, atol=1e-10)


def test_shrink_bad_input(rng):
    a = sc.Layer(np.ones((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"layers 'a' and 'b' do not connect: 'a' has 4 units \(weight \(4, 3\)"
                                         r".*'b' takes 5 inputs \(weight \(2, 5\)"):
        sc.shrink({"a": a, "b": sc.Layer(np.ones((2, 5)))}, {})
    conv = sc.Layer(np.ones((4, 3, 3, 3)), layout="oihw")
    with pytest.raises(ValueError, match="do not connect"):  # a flatten over 2x2 positions
        sc.shrink({"conv": conv, "fc": sc.Layer(np.ones((2, 16)))}, {})
    b = sc.Layer(np.ones((2, 4)))
    with pytest.raises(ValueError, match="removes all 4 units"):
        sc.shrink({"a": a, "b": b}, {"a": np.zeros(4, bool)})
    with pytest.raises(ValueError, match=r"keep for layer 'a' has shape \(3,\); the layer has 4 units"):
        sc.shrink({"a": a, "b": b}, {"a": np.ones(3, bool)})
    with pytest.raises(TypeError, match="bool"):
        sc.shrink({"a": a, "b": b}, {"a": np.ones(4)})
    with pytest.raises(ValueError, match="unknown layers"):
        sc.shrink({"a": a, "b": b}, {"z": np.ones(4, bool)})
    with pytest.raises(ValueError, match="bias of layer 'a' has 3 entries but the layer has 4 units"):
        sc.shrink({"a": sc.Layer(np.ones((4, 3)), np.zeros(3))}, {})
    with pytest.raises(ValueError, match="bn 'gamma' of layer 'a' has 5 entries"):
        sc.shrink({"a": sc.Layer(np.ones((4, 3)), bn={"gamma": np.ones(5)})}, {})
    with pytest.raises(ValueError, match="exactly one 'o'"):
        sc.Layer(np.ones((2, 2)), layout="ab")
    with pytest.raises(ValueError, match="layout 'oihw'"):
        sc.shrink({"a": sc.Layer(np.ones((2, 2)), layout="oihw")}, {})
    with pytest.raises(TypeError, match="sparsecore.Layer"):
        sc.shrink({"a": np.ones((2, 2))}, {})


# --- refit_inputs: the consumer of removed units repaired from its inputs' statistics -----------------------

def _consumer(rng, n=400, d=12, out=5):
    z = rng.standard_normal((n, d))
    x = z @ (np.eye(d) + 0.4 * rng.standard_normal((d, d))) + rng.standard_normal(d)  # correlated, off-centre
    return x, rng.standard_normal((out, d))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_refit_inputs_is_least_squares_on_the_samples(rng, dtype):
    x, w = _consumer(rng)
    kept = np.array([0, 2, 3, 7, 8, 11])
    h, mu = x.T @ x / len(x), x.mean(0)
    y = x @ w.T
    new, shift = sc.refit_inputs(w.astype(dtype), kept, h, damp=0.0)
    want = np.linalg.lstsq(x[:, kept], y, rcond=None)[0].T
    assert shift is None and new.dtype == dtype and new.shape == (5, 6)
    np.testing.assert_allclose(new, want, rtol=1e-4 if dtype == np.float32 else 1e-8, atol=1e-5)
    new_b, c = sc.refit_inputs(w, kept, h, mean=mu, bias=True, damp=0.0)
    ones = np.concatenate([x[:, kept], np.ones((len(x), 1))], axis=1)
    want_b = np.linalg.lstsq(ones, y, rcond=None)[0].T
    np.testing.assert_allclose(np.concatenate([new_b, c[:, None]], axis=1), want_b, rtol=1e-8, atol=1e-8)
    # FLAP's compensation: the removed inputs' mean output moves into the bias; each repair fits better
    cut, c0 = sc.refit_inputs(w, kept, h, method="bias", mean=mu)
    np.testing.assert_array_equal(cut, w[:, kept])
    gone = np.setdiff1d(np.arange(12), kept)
    np.testing.assert_allclose(c0, w[:, gone] @ mu[gone])

    def err(wk, c=0.0):
        return float(np.square(y - x[:, kept] @ wk.T - c).sum())
    assert err(new_b, c) <= err(new) <= err(w[:, kept])
    assert err(new_b, c) <= err(cut, c0) <= err(w[:, kept])


def test_refit_inputs_damps_collinear_inputs_and_refuses_bad_arguments(rng):
    x, w = _consumer(rng, d=6)
    x[:, 1] = x[:, 0]  # two kept inputs that are one
    h = x.T @ x / len(x)
    new, _ = sc.refit_inputs(w, np.array([0, 1, 2]), h)
    assert np.isfinite(new).all()
    with pytest.raises(ValueError, match="sorted distinct"):
        sc.refit_inputs(w, np.array([2, 1]), h)
    with pytest.raises(ValueError, match="needs the inputs' mean"):
        sc.refit_inputs(w, np.array([0]), h, method="bias")
    with pytest.raises(ValueError, match=r"hessian of 'weight' must be \(6, 6\)"):
        sc.refit_inputs(w, np.array([0]), h[:5, :5])
    with pytest.raises(ValueError, match="method must be one of"):
        sc.refit_inputs(w, np.array([0]), h, method="obs")
    with pytest.raises(ValueError, match="singular"):
        sc.refit_inputs(w, np.array([0, 1]), h, damp=0.0)
