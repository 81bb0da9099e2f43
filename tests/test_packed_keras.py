"""PackedDense and sparsify for Keras 3 (torch backend): packed layers give the masked model's outputs."""

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("the packed Keras layers are tested on the torch backend", allow_module_level=True)

import sparsecore as sc  # noqa: E402
from sparsecore.adapters import keras as sck  # noqa: E402


def _model(rng, functional):
    keras.utils.set_random_seed(0)
    if functional:
        inp = keras.Input((20,))
        h = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
        out = keras.layers.Dense(5, name="fc2")(h)
        model = keras.Model(inp, out)
    else:
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu", name="fc1"),
                                  keras.layers.Dense(5, name="fc2")])
    masks = sc.prune({"fc1/kernel": sck._numpy(model.get_layer("fc1").kernel)}, sparsity=0.8).masks
    sck.apply_masks(model, masks)
    return model


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_sparsify_gives_the_masked_models_outputs(rng, functional, batch):
    model = _model(rng, functional)
    x = rng.standard_normal((batch, 20)).astype(np.float32)
    want = sck._numpy(model(x))
    packed, report = sck.sparsify(model)
    assert list(report) == ["fc1"] and report["fc1"]["swapped"]  # fc2 has no zero: left alone
    assert isinstance(packed.get_layer("fc1"), sck.PackedDense)
    assert isinstance(packed.get_layer("fc2"), keras.layers.Dense)
    np.testing.assert_allclose(sck._numpy(packed(x)), want, rtol=1e-5, atol=1e-5)
    assert packed.get_layer("fc1").packed.nbytes < report["fc1"]["dense_nbytes"]


def test_packed_dense_refuses_what_is_not_packed():
    with pytest.raises(TypeError, match="PackedMatrix"):
        sck.PackedDense(np.eye(3))
