"""Keras 3 adapter, on the backend KERAS_BACKEND names (torch by default; CI also runs tensorflow)."""

import os
import pathlib
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import sparsecore as sc
from sparsecore.adapters import keras as sck

GRAD_BACKENDS = ("torch", "tensorflow")


def dense_model(seed=0, bn=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((12,)), keras.layers.Dense(16, name="d1")]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn1"))
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(8, activation="relu", name="d2"),
               keras.layers.Dense(3, name="out")]
    return keras.Sequential(layers, name="seq")


def test_names_layouts_and_nested_models():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(6, name="a"), keras.layers.Dense(4, name="b")], name="inner")
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inp)
    x = keras.layers.Flatten()(x)
    out = inner(x)
    model = keras.Model(inp, out, name="m")
    names = list(sck.prunable(model))
    assert names == ["conv/kernel", "inner/a/kernel", "inner/b/kernel"]
    assert sck.layouts(model) == {"conv/kernel": "hwio", "inner/a/kernel": "io", "inner/b/kernel": "io"}
    w = sck.weights(model)
    assert w["conv/kernel"].shape == (3, 3, 2, 3) and w["inner/a/kernel"].shape == (27, 6)
    assert list(sck.prunable(model, include=["*/bias"])) == ["conv/bias", "inner/a/bias", "inner/b/bias"]
    with pytest.raises(ValueError, match="matches no variable"):
        sck.prunable(model, include=["nothing"])


def test_bad_input():
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="is not built"):
        sck.prunable(unbuilt)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.ones((2, 4), np.float32))
    assert list(sck.weights(sub)) == [f"{sub.d.name}/kernel"]  # weights work for subclassed models
    with pytest.raises(ValueError, match="subclassed"):
        sck.collect_activations(sub, [(np.ones((2, 4), np.float32), np.zeros(2))], n_classes=2)
    model = dense_model()
    with pytest.raises(ValueError, match="has shape"):
        sck.apply_masks(model, {"d1/kernel": np.ones((3, 3), bool)})
    with pytest.raises(TypeError, match="bool"):
        sck.apply_masks(model, {"d1/kernel": np.ones((12, 16))})
    with pytest.raises(ValueError, match="no variable"):
        sck.apply_masks(model, {"nope": np.ones(3, bool)})
    with pytest.raises(ValueError, match="not compiled"):
        if keras.backend.backend() in GRAD_BACKENDS:
            sck.collect_gradients(model, [(np.ones((2, 12), np.float32), np.zeros(2))])
        else:
            raise ValueError("not compiled")


def test_mixed_precision_policy():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = dense_model()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    w = sck.weights(model)
    assert w["d1/kernel"].dtype == np.float32  # variables stay float32 under mixed precision
    r = sc.prune(w, sparsity=0.5)
    sck.apply_masks(model, r.masks)
    assert (sck.weights(model)["d1/kernel"] == 0).sum() == 12 * 16 // 2


@pytest.mark.skipif(keras.backend.backend() not in GRAD_BACKENDS, reason="gradients: torch and tensorflow")
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradients_match_the_analytic_ones(per_sample, rng):
    """A linear model under mean squared error: dL/dK = 2 x^T (x K + b - y) / (n * outputs)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="lin")], name="lin_model")
    model.compile("sgd", keras.losses.MeanSquaredError())
    k, b = (sck._numpy(v).astype(np.float64) for v in model.layers[0].weights)
    data = [(rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32))
            for _ in range(3)]
    acc = sck.collect_gradients(model, data, per_sample=per_sample,
                                accumulator=sc.GradientAccumulator(stats=("g2", "wg"), precision="float64"))
    g2 = np.zeros_like(k)
    wg = np.zeros_like(k)
    for x, y in data:
        groups = [(x[i:i + 1], y[i:i + 1]) for i in range(4)] if per_sample else [(x, y)]
        for xs, ys in groups:
            xs64 = xs.astype(np.float64)
            g = 2 * xs64.T @ (xs64 @ k + b - ys) / (len(xs) * 3)
            g2 += g * g
            wg += k * g
    assert acc.count == (12 if per_sample else 3)
    np.testing.assert_allclose(acc.state("lin/kernel")["g2"], g2, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(acc.state("lin/kernel")["wg"], wg, rtol=1e-4, atol=1e-7)


def test_activations_match_engine(rng):
    model = dense_model()
    x = rng.standard_normal((120, 12)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    data = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 120, 40)]
    st = sck.collect_activations(model, data, n_classes=3, bins=8, pairwise=True, feature_norms=True)
    d1 = sck._numpy(model.get_layer("d1")(x))
    h1 = np.maximum(d1, 0)
    d2 = sck._numpy(model.get_layer("d2")(h1))
    np.testing.assert_allclose(st.unit_mi()["d1"], sc.unit_mi(d1, y, bins=8), rtol=1e-12)
    np.testing.assert_allclose(st.state()["d2/kernel"]["mi"], sc.pairwise_mi(h1, d2, bins=8),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.state()["d1/kernel"]["x_norm"], np.linalg.norm(x.astype(np.float64), axis=0),
                               rtol=1e-6)
    r = sc.prune(sck.weights(model), "mutual_info", state=st.state(), sparsity=0.5)  # (in, out) kernels
    assert r.masks["d2/kernel"].shape == (16, 8)
    r = sc.prune(sck.weights(model), "wanda", state=st.state(), sparsity=0.5)
    want = np.abs(sck.weights(model)["d1/kernel"]) * st.state()["d1/kernel"]["x_norm"][:, None]
    np.testing.assert_array_equal(r.masks["d1/kernel"], sc.sparsity_mask(want, 0.5))


class _Check(keras.callbacks.Callback):
    def __init__(self, masks_fn):
        super().__init__()
        self.masks_fn, self.checked = masks_fn, 0

    def on_train_batch_end(self, batch, logs=None):
        masks = self.masks_fn()
        if masks is None:
            return
        w = sck.weights(self.model)
        for k, m in masks.items():
            assert (w[k][~m] == 0).all()
        self.checked += 1


def test_mask_callback_holds_zeros_at_every_step(rng):
    model = dense_model()
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # optimizer state from before the pruning
    r = sc.prune(sck.weights(model), sparsity=0.7, scope="global")
    check = _Check(lambda: r.masks)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[sck.MaskCallback(r.masks), check])
    assert check.checked == 8
    w = sck.weights(model)
    assert any((w[k][m] != 0).any() for k, m in r.masks.items())


def test_pruning_callback_follows_a_schedule(rng):
    model = dense_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    sched = sc.PolynomialDecay(0.0, 0.8, begin=0, end=12, frequency=4)
    cb = sck.PruningCallback(sched, scope="global")
    check = _Check(lambda: cb.masks)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[cb, check])
    assert [s.step for s in cb.history.steps] == [0, 4, 8, 12]
    total = sum(m.size for m in cb.masks.values())
    assert sum(int((~m).sum()) for m in cb.masks.values()) == round(0.8 * total)
    prev = None
    for st in cb.history.steps:
        masks = cb.history.masks(upto=st.step)
        if prev is not None:
            assert all(not (masks[k] & ~prev[k]).any() for k in masks)
        prev = masks
    assert check.checked == 16


def _masked_copy(model, keep):
    """The masked network: removed units' kernel columns, biases and batch-norm gamma/beta zeroed."""
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    for layer in m.layers:
        key = sck.kernel_name(m, layer) if hasattr(layer, "kernel") else None
        if key in keep:
            drop = ~keep[key]
            k = sck._numpy(layer.kernel).copy()
            k[..., drop] = 0
            ws = [k] + ([np.where(drop, 0, sck._numpy(layer.bias))] if layer.use_bias else [])
            layer.set_weights(ws)
            nxt = m.layers[m.layers.index(layer) + 1]
            if isinstance(nxt, keras.layers.BatchNormalization):
                g, b, mu, var = nxt.get_weights()
                nxt.set_weights([np.where(drop, 0, g), np.where(drop, 0, b), mu, var])
    return m


def test_shrink_dense_and_conv_chains(rng):
    model = dense_model(bn=True)
    bn = model.get_layer("bn1")
    bn.set_weights([rng.uniform(0.5, 1.5, 16), rng.standard_normal(16), rng.standard_normal(16),
                    rng.uniform(0.5, 2, 16)])
    w = sck.weights(model)
    r = sc.prune({k: v for k, v in w.items() if k != "out/kernel"}, sparsity=0.5,
                 pattern=sc.Units(axis=-1, reduce="l2"))
    small = sck.shrink_model(model, r.groups)
    assert small.get_layer("d1").units == 8 and small.get_layer("d2").units == 4
    x = rng.standard_normal((5, 12)).astype(np.float32)
    want = _masked_copy(model, r.groups).predict(x, verbose=0)
    np.testing.assert_allclose(small.predict(x, verbose=0), want, rtol=1e-5, atol=1e-5)

    keras.utils.set_random_seed(1)
    cnn = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3, name="c1"),
                            keras.layers.BatchNormalization(name="b1"), keras.layers.ReLU(),
                            keras.layers.Conv2D(5, 3, padding="same", name="c2"), keras.layers.ReLU(),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="fc")], name="cnn")
    cnn.get_layer("b1").set_weights([rng.uniform(0.5, 1.5, 6), rng.standard_normal(6), rng.standard_normal(6),
                                     rng.uniform(0.5, 2, 6)])
    w = sck.weights(cnn)
    r = sc.prune({k: w[k] for k in ("c1/kernel", "c2/kernel")}, sparsity=0.4,
                 pattern=sc.Units(axis=-1, reduce="l1"))
    small = sck.shrink_model(cnn, r.groups)
    assert small.get_layer("c1").filters == 4 and small.get_layer("c2").filters == 3
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    want = _masked_copy(cnn, r.groups).predict(x, verbose=0)
    np.testing.assert_allclose(small.predict(x, verbose=0), want, rtol=1e-4, atol=1e-5)


def test_saving(tmp_path, rng):
    model = dense_model()
    r = sc.prune(sck.weights(model), sparsity=0.6)
    sck.apply_masks(model, r.masks)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert list(sck.variables(loaded)) == list(sck.variables(model))  # names survive saving
    for k, m in r.masks.items():
        assert (sck.weights(loaded)[k][~m] == 0).all()
    res = sck.save_sparse(model, tmp_path / "m.sparse.h5")
    assert res.output_bytes > 0
    sc.io.densify_file(tmp_path / "m.sparse.h5", tmp_path / "back.weights.h5")
    fresh = dense_model(seed=3)
    fresh.load_weights(tmp_path / "back.weights.h5")
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        assert a.tobytes() == b.tobytes()


@pytest.mark.skipif(keras.backend.backend() not in GRAD_BACKENDS, reason="gradients: torch and tensorflow")
def test_article_workflow_on_digits():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
    try:
        import keras_digits
    finally:
        sys.path.pop(0)
    lines = []
    out = keras_digits.run("fisher", threshold=1e-6, scope="local", epochs=10, tune_epochs=2, out=lines.append)
    assert out["dense"] > 0.85 and out["held"] and out["csr"] == out["tuned"] and 0 < out["sparsity"] < 1
    out = keras_digits.run("mutual_info", sparsity=0.5, scope="global", epochs=10, tune_epochs=2, out=lines.append)
    assert out["held"] and out["csr"] == out["tuned"] and abs(out["sparsity"] - 0.5) < 1e-3
    assert out["tuned"] >= out["pruned"] - 0.05
    lines.clear()
    out = keras_digits.run(out=lines.append)  # the defaults: within 2 points of dense, with progress
    assert out["tuned"] >= out["dense"] - 0.02 and abs(out["sparsity"] - 0.9) < 1e-3
    assert sum("fine-tuning: epoch" in x for x in lines) == 3


# --- sequential calibration --------------------------------------------------------------

def _calibration(rng, n=192, d=12):
    x = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d))).astype(np.float32)
    return [x[i:i + 64] for i in range(0, n, 64)]


def test_sequential_sparsegpt_on_a_keras_mlp(rng):
    model = dense_model(seed=1)
    model.build((None, 12))
    dense = keras.models.clone_model(model)
    dense.set_weights(model.get_weights())
    data = _calibration(rng)
    r = sck.prune_sequential(model, data, sparsity=0.5)
    assert sorted(r.masks) == sorted(sck.prunable(model))
    for name, m in r.masks.items():
        w = sck.weights(model)[name]
        assert m.shape == w.shape and m.sum() == m.size // 2 and not w[~m].any()
    x = np.concatenate(data)
    mag = keras.models.clone_model(dense)
    mag.set_weights(dense.get_weights())
    sck.apply_masks(mag, sc.prune(sck.weights(mag), sparsity=0.5).masks)
    gap = float(np.mean((sck._numpy(model(x)) - sck._numpy(dense(x))) ** 2))
    gap_mag = float(np.mean((sck._numpy(mag(x)) - sck._numpy(dense(x))) ** 2))
    assert gap < gap_mag


def test_sequential_keras_layers_see_the_pruned_layers_before(rng):
    model = dense_model(seed=2)
    dense = keras.models.clone_model(model)
    dense.set_weights(model.get_weights())
    data = _calibration(rng)
    sck.prune_sequential(model, data, sparsity=0.5, method="magnitude", update="refit")
    layer = model.get_layer("d2")
    upto = keras.Model(model.inputs, layer.input)  # the final model: d1 already pruned and refitted
    acc = sc.HessianAccumulator(16)
    for x in data:
        acc.update(sck._numpy(upto([x])).astype(np.float64))
    w = sck._numpy(dense.get_layer("d2").kernel)
    keep = sc.prune({"k": w.T}, sparsity=0.5).masks["k"].T
    want = sc.reconstruct({"k": w}, {"k": acc}, {"k": keep}, method="refit", layouts="io").dense("k")
    np.testing.assert_allclose(sck._numpy(layer.kernel), want, rtol=1e-4, atol=1e-5)


def _attention_model(seed=0, d=12):
    """q/k/v Dense layers reading the very same tensor (one shared H), then o and a head."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((d,))
    q, k, v = (keras.layers.Dense(d, name=n)(x) for n in ("q", "k", "v"))
    a = keras.layers.Add()([keras.layers.Multiply()([q, keras.layers.Activation("tanh")(k)]), v])
    o = keras.layers.Dense(d, name="o")(a)
    return keras.Model(x, keras.layers.Dense(4, name="out")(keras.layers.Activation("relu")(o)))


def _layer_inputs(model, name, data):
    upto = keras.Model(model.inputs, model.get_layer(name).input)
    return [sck._numpy(upto([x])).astype(np.float64) for x in data]


@pytest.mark.parametrize("dense_batches", [None, 2])
def test_sequential_keras_dense_target_redone_by_hand(rng, dense_batches):
    """Every option the torch adapter has, on Keras: dense_target (the cross term from the dense model's
    inputs, on the first dense_batches batches scaled to all), dense_layers, order, each layer redone by hand
    from the inputs the final (pruned) model and the dense model give it."""
    model = _attention_model(seed=4)
    dense = _attention_model(seed=4)
    data = _calibration(rng)
    r = sck.prune_sequential(model, data, sparsity=0.5, dense_target=0.5, dense_batches=dense_batches,
                             dense_layers=["q/*", "o/*"], order="layer")
    assert sorted(r.masks) == ["k/kernel", "o/kernel", "out/kernel", "q/kernel", "v/kernel"]
    for n in ("q", "k", "v", "o", "out"):
        got, want = _layer_inputs(model, n, data), _layer_inputs(dense, n, data)
        w = sck._numpy(dense.get_layer(n).kernel)
        if n == "out":  # not in dense_layers: SparseGPT's own objective
            acc = sc.HessianAccumulator(w.shape[0]).update(np.concatenate(got))
        else:  # k and v follow q, their group's first layer
            part = sc.HessianAccumulator(w.shape[0], cross=True)
            for x, y in list(zip(got, want))[:dense_batches]:
                part.update(x, dense=y)
            count = sum(len(x) for x in got)
            acc = sc.HessianAccumulator(w.shape[0], cross=True).update_gram(
                sc.HessianAccumulator(w.shape[0]).update(np.concatenate(got)).hessian(), count,
                part.cross_term() * (count / part.count))
        redo = sc.sparsegpt({n: w}, {n: acc}, sparsity=0.5, layouts="io", dense_target=0.5).dense(n)
        np.testing.assert_allclose(sck._numpy(model.get_layer(n).kernel), redo, rtol=2e-4,
                                   atol=2e-5, err_msg=n)
    block = _attention_model(seed=4)
    sck.prune_sequential(block, data, sparsity=0.5, dense_target=0.5, dense_batches=dense_batches,
                         dense_layers=["q/*", "o/*"])  # order="block": each block is the layers reading one tensor
    for a, b in zip(block.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sequential_keras_global_allocation_and_refit(rng):
    """A per-layer sparsity mapping (an allocation made beforehand, here OWL's) with a selection method, the
    OBS update and the exact refit, each layer redone by hand."""
    model = _attention_model(seed=5)
    dense = _attention_model(seed=5)
    data = _calibration(rng)
    alloc = sc.outlier_allocation({n: np.abs(w) for n, w in sck.weights(dense).items()}, 0.5, m=2.0, lam=0.1)
    assert len(set(alloc.values())) > 1
    r = sck.prune_sequential(model, data, sparsity=alloc, method="wanda", update="obs", refit="exact")
    for n in ("q", "k", "v", "o", "out"):
        key = f"{n}/kernel"
        acc = sc.HessianAccumulator(12).update(np.concatenate(_layer_inputs(model, n, data)))
        w = sck._numpy(dense.get_layer(n).kernel)
        want = sc.prune_layer(key, w, acc, method="wanda", sparsity=alloc, update="obs", refit="exact",
                              layout="io").dense(key)
        np.testing.assert_allclose(sck._numpy(model.get_layer(n).kernel), want, rtol=2e-4,
                                   atol=2e-5, err_msg=n)
        kept = set(r.masks[key].sum(axis=0).tolist())  # wanda ranks within each output unit (a kernel column)
        assert len(kept) == 1 and abs(kept.pop() - (1 - alloc[key]) * w.shape[0]) <= 1


@pytest.mark.parametrize("padding, strides", [("same", 1), ("same", 2), ("valid", 1)])
def test_sequential_keras_conv_patches_give_the_convolution(rng, padding, strides):
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(5, (3, 2), strides=strides, padding=padding, use_bias=False)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    y = sck._numpy(conv(x))
    features, rows = sck._hessian_feed(conv)
    k = sck._numpy(conv.kernel).reshape(features, -1)
    np.testing.assert_allclose(rows(x.astype(np.float64)) @ k, y.reshape(-1, 5), rtol=1e-4, atol=1e-4)


def test_sequential_keras_cnn_and_restoring_on_failure(rng):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3, padding="same", name="c1"),
                              keras.layers.Activation("relu"), keras.layers.Conv2D(8, 3, strides=2, name="c2"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="out")])
    data = [rng.standard_normal((16, 8, 8, 4)).astype(np.float32) for _ in range(2)]
    before = [w.copy() for w in model.get_weights()]

    def boom(done, total, name):
        if done == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sck.prune_sequential(model, data, sparsity=0.5, progress=boom)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    r = sck.prune_sequential(model, data, pattern="2:4", method="wanda", update="obs")
    assert sorted(r.masks) == ["c1/kernel", "c2/kernel", "out/kernel"]
    for name, m in r.masks.items():  # N:M along the layer's inputs: the (kh, kw, C) axis of the (in, out) view
        assert sc.is_n_m(m.reshape(-1, m.shape[-1]), 2, 4, axis=0)


def test_file_names_map_the_adapter_to_the_saved_files_and_back(tmp_path, rng):
    """The README's scores workflow: scores named by the adapter, renamed to the file's names, prune the
    saved .keras with the CLI; every variable of a nested model with a conv, batch norm and dense
    layers maps to the dataset that holds its values, both ways."""
    import subprocess

    from sparsecore.io import open_weights

    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(6, name="a"), keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(4, name="b")], name="inner")
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="head")(inner(x))
    model = keras.Model(inp, out, name="m")
    path = tmp_path / "m.keras"
    model.save(path)
    names = sck.file_names(model)
    assert names["conv/kernel"] == "layers/conv2d/vars/0"
    assert names["inner/bn/moving_variance"] == "layers/sequential/layers/batch_normalization/vars/3"
    assert names["head/kernel"] == "layers/dense/vars/0"  # numbered per container, in its layers' order
    values = {k: sck._numpy(v) for k, v in sck.variables(model).items()}
    with open_weights(path) as r:
        assert set(names.values()) == set(r.entries)
        for a, f in names.items():
            np.testing.assert_array_equal(r.raw(f), values[a], err_msg=a)
        back = sck.from_file_names(model, {f: r.raw(f) for f in r.entries})
    assert set(back) == set(values)
    scores = {k: rng.random(v.shape).astype(np.float32) for k, v in sck.weights(model).items()}
    np.savez(tmp_path / "s.npz", **sck.to_file_names(model, scores))
    r = subprocess.run([sys.executable, "-m", "sparsecore", "prune", path, "-o", tmp_path / "p.keras", "--scores",
                        tmp_path / "s.npz", "--sparsity", "0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with open_weights(tmp_path / "p.keras") as p:
        for a, s in scores.items():
            w = p.raw(names[a])
            np.testing.assert_array_equal(w == 0, s <= np.sort(s.reshape(-1))[s.size // 2 - 1])
    with pytest.raises(ValueError, match="'conv/weights' is not a variable of model 'm'"):
        sck.to_file_names(model, {"conv/weights": 1})
    with pytest.raises(ValueError, match="'layers/nope/vars/0' names no variable"):
        sck.from_file_names(model, {"layers/nope/vars/0": 1})
