"""Keras 3 adapter: weights, gradients and activations out; masks, schedules and smaller models back.

Works on any Keras 3 backend for weights, masks, callbacks, shrinking and
saving; gradients on the torch and TensorFlow backends. Importing it imports
Keras; ``import sparsecore`` never does.

Names and layouts. A weight is named by the path of layer names below the
model plus the variable name (``"dense/kernel"``, nested ``"block/conv/
kernel"``), stable across saving and loading (:func:`variables`). Keras stores a ``Dense`` kernel as
``(in, out)`` and a ``Conv2D`` kernel as ``(kh, kw, in, out)`` (``HWIO``):
:func:`layouts` says which; pass it to the engine where it needs one
(``Units(axis=-1)``, ``NM(axis=-2)`` for the input axis, ``Layer(layout=...)``);
the ``wanda`` and ``mutual_info`` criteria recognise ``(in, out)`` kernels.

Batch gradients versus per-sample gradients: ``per_sample=False`` adds one
gradient of the mean loss per batch; ``per_sample=True`` runs the model on
one sample at a time and sums each sample's squared gradient, the empirical
Fisher ``Σ_samples (∂L/∂w)²`` of the reference article (slower: one backward
pass per sample).
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from collections.abc import Iterable, Mapping

import keras
import numpy as np

import sparsecore as sc
from sparsecore.activations import ActivationStats, collect

from ._common import batches as _batches

__all__ = [
    "ActivationStats", "MaskCallback", "PackedDense", "PruningCallback", "apply_masks", "collect_activations",
    "collect_gradients", "file_names", "from_file_names", "kernel_name", "layouts", "prunable", "prune_sequential",
    "save_sparse", "shrink_model", "sparsify", "to_file_names", "variables", "weights",
]

KERNEL_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_LAYOUT = {2: "io", 3: "wio", 4: "hwio", 5: "dhwio"}


def _numpy(x):
    """A Keras variable or tensor as a new NumPy array, as ``keras.ops.convert_to_numpy`` gives it, without
    its NumPy 2 deprecation warning on the torch backend (it calls ``np.array`` on a tensor whose
    ``__array__`` takes no ``copy`` keyword)."""
    if keras.backend.backend() == "torch":
        import torch

        t = x.value if isinstance(x, keras.Variable) else x
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                return keras.ops.convert_to_numpy(t)
            return t.numpy().copy()
    return keras.ops.convert_to_numpy(x)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: its weights do not exist yet; call it on a batch "
                         f"or model.build(input_shape) first")


def _layers(model, prefix=""):
    """``(path, layer)`` of every layer inside ``model``, nested models
    included, in order; a path joins the layer names below the model."""
    out = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        out.append((path, layer))
        if hasattr(layer, "layers"):
            out.extend(_layers(layer, path + "/"))
    return out


def variables(model: keras.Model) -> dict:
    """Every variable by its stable name: the path of layer names below the
    model plus the variable's name (``"dense_1/kernel"``, nested
    ``"block/conv/kernel"``). Unlike ``Variable.path``, which holds the name
    of the model object that built it, this survives saving and loading."""
    _check_model(model)
    out = {}
    for path, layer in _layers(model):
        if hasattr(layer, "layers"):
            continue  # its variables belong to its layers
        for v in layer.weights:
            out[f"{path}/{v.name}"] = v
    return out


def _snake(name):
    """Keras' snake case of a class name (``BatchNormalization`` -> ``batch_normalization``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def file_names(model: keras.Model) -> dict:
    """``{adapter name: name in the model's weight files}``: how
    ``model.save("m.keras")`` and ``model.save_weights("m.weights.h5")`` store
    each variable, which is how ``sparsecore info``/``prune`` name it
    (``"dense/kernel"`` -> ``"layers/dense/vars/0"``). Keras names a layer in
    its files by its class in snake case, numbered in the order of the
    container's layers (``dense``, ``dense_1``, ...; nested models nest:
    ``layers/functional/layers/dense/vars/0``), and a variable by its index
    among the layer's trainable then non-trainable variables."""
    _check_model(model)
    out = {}

    def walk(container, path, file_path):
        used = {}
        for layer in container.layers:
            cls = _snake(type(layer).__name__)
            used[cls] = used.get(cls, -1) + 1
            fname = f"{file_path}layers/{cls if used[cls] == 0 else f'{cls}_{used[cls]}'}"
            lpath = f"{path}{layer.name}"
            if hasattr(layer, "layers"):
                walk(layer, lpath + "/", fname + "/")
                continue
            own = list(layer._trainable_variables) + list(layer._non_trainable_variables)
            for v in layer.weights:
                i = next((k for k, o in enumerate(own) if o is v), None)
                if i is not None:
                    out[f"{lpath}/{v.name}"] = f"{fname}/vars/{i}"
    walk(model, "", "")
    return out


def to_file_names(model: keras.Model, arrays: Mapping) -> dict:
    """``arrays`` (scores, masks) keyed by adapter names, keyed by the names
    the model's weight files use (see :func:`file_names`), e.g. to save
    scores for ``sparsecore prune m.keras --scores s.npz``."""
    names = file_names(model)
    bad = [k for k in arrays if k not in names]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a variable of model {model.name!r}; names look like "
                         f"{next(iter(names), 'dense/kernel')!r}")
    return {names[k]: v for k, v in arrays.items()}


def from_file_names(model: keras.Model, arrays: Mapping) -> dict:
    """The inverse of :func:`to_file_names`: arrays keyed by file names (as
    ``sparsecore`` reads a saved model) keyed by adapter names."""
    back = {f: a for a, f in file_names(model).items()}
    bad = [k for k in arrays if k not in back]
    if bad:
        raise ValueError(f"{bad[0]!r} names no variable of model {model.name!r} in its weight files; names look "
                         f"like {next(iter(back), 'layers/dense/vars/0')!r}")
    return {back[k]: v for k, v in arrays.items()}


def kernel_name(model: keras.Model, layer) -> str:
    """The stable name of ``layer``'s kernel in ``model``."""
    for name, v in variables(model).items():
        if v is layer.kernel:
            return name
    raise ValueError(f"layer {layer.name!r} is not in model {model.name!r}")


def prunable(model: keras.Model, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict:
    """Variables to prune, by stable name (see :func:`variables`). By default
    the ``kernel`` of every Dense and Conv1D/2D/3D layer (nested models too);
    with ``include`` (fnmatch patterns on the names) those instead;
    ``exclude`` removes."""
    _check_model(model)
    allv = variables(model)
    if include is None:
        kernels = {id(layer.kernel) for _, layer in _layers(model) if isinstance(layer, KERNEL_LAYERS)}
        out = {k: v for k, v in allv.items() if id(v) in kernels}
    else:
        pats = [include] if isinstance(include, str) else list(include)
        out = {k: v for k, v in allv.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
        if not out:
            raise ValueError(f"include={pats} matches no variable; the model has {list(allv)[:8]}")
    ex = [exclude] if isinstance(exclude, str) else list(exclude)
    return {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, p) for p in ex)}


def layouts(model: keras.Model, include=None, exclude=()) -> dict:
    """The layout of each prunable weight: ``"io"`` for Dense, ``"hwio"`` for Conv2D, ..."""
    return {k: _LAYOUT.get(len(v.shape), "?") for k, v in prunable(model, include, exclude).items()}


def weights(model: keras.Model, include=None, exclude=()) -> dict:
    """The prunable weights as NumPy arrays, by path, in Keras' own layouts."""
    return {k: _numpy(v) for k, v in prunable(model, include, exclude).items()}


# --- gradients ------------------------------------------------------------------

def _loss_fn(model, loss):
    if loss is not None:
        return lambda x, y, y_pred: loss(y, y_pred)
    if not getattr(model, "compiled", False) or getattr(model, "_compile_loss", None) is None:
        raise ValueError("the model is not compiled with a loss; compile it or pass loss=(y_true, y_pred) -> scalar")
    return lambda x, y, y_pred: model.compute_loss(x=x, y=y, y_pred=y_pred)


def _grads_fn(model, variables, lossf, on_device=False):
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        def out(t):  # on the GPU the gradient tensors stay there (the accumulator reads them in place)
            return t.detach().contiguous() if on_device else t.detach().cpu().numpy()

        def grads(x, y):
            params = [v.value for v in variables]
            saved = [p.requires_grad for p in params]
            try:
                for p in params:
                    p.requires_grad_(True)
                loss = lossf(x, y, model(x, training=False))
                g = torch.autograd.grad(loss, params)
            finally:
                for p, r in zip(params, saved):
                    p.requires_grad_(r)
            return [out(t) for t in g]

        return grads
    if backend == "tensorflow":
        import tensorflow as tf

        def grads(x, y):
            with tf.GradientTape() as tape:
                tape.watch([v.value for v in variables])
                loss = lossf(x, y, model(x, training=False))
            return [np.asarray(g) for g in tape.gradient(loss, [v.value for v in variables])]

        return grads
    raise ValueError(f"gradients on the {backend!r} backend are not supported; use KERAS_BACKEND=torch or "
                     f"tensorflow (weights, masks, callbacks and shrinking work on every backend)")


def _on_device(variables, device):
    """Whether the variables' values live on a GPU the engine can read in place."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if keras.backend.backend() != "torch":
        if device == "cuda":
            raise ValueError(f"device='cuda' reads tensors in place through __cuda_array_interface__, which the "
                             f"{keras.backend.backend()!r} backend's tensors lack; use KERAS_BACKEND=torch, or "
                             f"device='cpu'")
        return False
    if device == "auto":
        from sparsecore.cuda import is_device_array

        return any(is_device_array(v.value) for v in variables.values())
    return device == "cuda"


def collect_gradients(model: keras.Model, data: Iterable, loss=None, *, include=None, exclude=(),
                      accumulator: sc.GradientAccumulator | None = None, stats=("g2",),
                      per_sample: bool = False, max_batches: int | None = None,
                      device: str = "auto") -> sc.GradientAccumulator:
    """Feed gradients over ``data`` to an accumulator (names: variable paths).

    ``loss``: ``(y_true, y_pred) -> scalar`` (a Keras loss); default the
    compiled model's loss. The model runs with ``training=False`` (batch norm
    on its moving statistics, no dropout); nothing in the model changes.
    ``device="cuda"`` (or ``"auto"`` with the variables on a GPU, which the
    torch backend exposes through ``__cuda_array_interface__``) keeps the
    gradients and the sums on the GPU: ``GradientAccumulator(device="cuda")``
    reads the gradient tensors in place. The TensorFlow backend's tensors
    have no CUDA array interface: there the gradients come to the host.
    """
    variables = prunable(model, include, exclude)
    names = list(variables)
    on_device = _on_device(variables, device)
    grads = _grads_fn(model, list(variables.values()), _loss_fn(model, loss), on_device)
    acc = accumulator if accumulator is not None else sc.GradientAccumulator(
        stats=stats, device="cuda" if on_device else "cpu")
    need_w = "wg" in acc.stats or "wg2" in acc.stats
    for x, y in _batches(data, max_batches):
        x, y = np.asarray(x), np.asarray(y)
        if need_w:
            w = {k: v.value.detach().contiguous() if on_device else _numpy(v)
                 for k, v in variables.items()}
        else:
            w = None
        if per_sample:
            rows = [grads(x[i:i + 1], y[i:i + 1]) for i in range(len(x))]
            stack = keras.ops.stack if on_device else np.stack
            acc.update({k: stack([r[j] for r in rows]) for j, k in enumerate(names)}, weights=w, per_sample=True)
        else:
            g = grads(x, y)
            acc.update(dict(zip(names, g)), weights=w)
    return acc


# --- activations ------------------------------------------------------------------

def collect_activations(model: keras.Model, data: Iterable, layers: Iterable[str] | None = None, *,
                        n_classes: int | None = None, bins: int = 16, unit: bool = True,
                        pairwise: bool = False, feature_norms: bool = False,
                        max_batches: int | None = None, device: str = "auto") -> ActivationStats:
    """Layer outputs (and inputs) through a functional sub-model, fed to the engine.

    Needs a Sequential or functional model (symbolic inputs); ``layers`` are
    names of its top-level layers (default: its Dense and Conv layers).
    Two passes over ``data`` (a list of batches or a re-iterable dataset):
    ranges, then counts. See the PyTorch adapter for the statistics.
    ``device="cuda"`` (or ``"auto"`` with the model on a GPU, torch backend):
    the layer tensors are reduced, binned and counted on the GPU in place.
    """
    _check_model(model)
    if iter(data) is data:
        raise TypeError("collect_activations reads data twice (ranges, then counts): pass a list of batches "
                        "or a re-iterable dataset, not a generator or an iterator")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(f"model {model.name!r} is subclassed (no symbolic inputs): activations need a "
                         f"Sequential or functional model; weights, gradients and masks work for it")
    if layers is None:
        chosen = [layer for layer in model.layers if isinstance(layer, KERNEL_LAYERS)]
    else:
        chosen = [model.get_layer(n) for n in layers]
    outs = []
    for layer in chosen:
        outs.extend([layer.input, layer.output])
    sub = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outs)  # called on one array: no structure warning
    weight_of = {layer.name: kernel_name(model, layer) for layer in chosen if isinstance(layer, KERNEL_LAYERS)}

    on_device = _on_device(prunable(model), device)
    keep = (lambda t: t.detach().contiguous()) if on_device else _numpy

    def run(pass_fn):
        for x, y in _batches(data, max_batches):
            got = sub(x if isinstance(x, (list, tuple, dict)) else np.asarray(x), training=False)
            cap = {}
            for i, layer in enumerate(chosen):
                cap[layer.name] = (keep(got[2 * i]), keep(got[2 * i + 1]), isinstance(layer, keras.layers.Dense))
            pass_fn(cap, np.asarray(y).astype(np.int64).reshape(-1))

    return collect(run, weight_of, n_classes=n_classes, bins=bins, unit=unit, pairwise=pairwise,
                   feature_norms=feature_norms, channels_last=True, device=on_device)


# --- into Keras -----------------------------------------------------------------------

def _variable(model, name):
    allv = variables(model)
    if name not in allv:
        raise ValueError(f"the model has no variable {name!r}; variables: {list(allv)[:8]}...")
    return allv[name]


def apply_masks(model: keras.Model, masks: Mapping) -> keras.Model:
    """Zero the pruned weights (``masks``: variable path -> bool array, True = kept)."""
    _check_model(model)
    for name, mask in masks.items():
        v = _variable(model, name)
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise TypeError(f"mask {name!r} has dtype {m.dtype}; pass a bool array (True = kept)")
        if tuple(m.shape) != tuple(v.shape):
            raise ValueError(f"mask {name!r} has shape {m.shape} but the variable has {tuple(v.shape)}")
        w = _numpy(v)
        v.assign(np.where(m, w, np.zeros((), w.dtype)))
    return model


class MaskCallback(keras.callbacks.Callback):
    """Hold masks during ``model.fit``: the pruned weights are set to exactly
    zero when training starts and after every training batch."""

    def __init__(self, masks: Mapping):
        super().__init__()
        self.masks = {k: np.asarray(v) for k, v in masks.items()}

    def on_train_begin(self, logs=None):
        """Zero the pruned weights before the first batch."""
        apply_masks(self.model, self.masks)

    def on_train_batch_end(self, batch, logs=None):
        """Zero the pruned weights again after the optimizer's step."""
        apply_masks(self.model, self.masks)


class PruningCallback(keras.callbacks.Callback):
    """Gradual pruning during ``model.fit`` along an engine schedule
    (``sc.PolynomialDecay``, ``sc.ConstantSparsity`` or a function): at the
    schedule's steps the weights are pruned further among those still kept
    (a :class:`sparsecore.GradualPruner`), and after every batch the masks
    are applied, so pruned weights stay exactly zero. The role of TensorFlow
    Model Optimization's ``prune_low_magnitude`` with ``PolynomialDecay``.

    ``criterion``: one that works from the weights alone (default magnitude);
    or ``scores_fn``: ``model -> mapping name -> scores``, evaluated at each
    pruning step. Other options as for :func:`sparsecore.prune`.
    """

    def __init__(self, schedule, criterion=None, *, scores_fn=None, include=None, exclude=(), scope="local",
                 pattern=None, min_sparsity=0.0, max_sparsity=1.0, normalize="none"):
        super().__init__()
        self.pruner = sc.GradualPruner(schedule, criterion, scope=scope, pattern=pattern, min_sparsity=min_sparsity,
                                       max_sparsity=max_sparsity, normalize=normalize)
        self.score_fn = scores_fn
        self.include, self.exclude = include, exclude
        self.step = 0

    @property
    def masks(self):
        """The current keep-masks by weight name (None before the first pruning step)."""
        return self.pruner.masks

    @property
    def history(self):
        """The :class:`sparsecore.PruningHistory` of the steps so far."""
        return self.pruner.history

    def on_train_batch_begin(self, batch, logs=None):
        """Prune further when the schedule says so at this step."""
        w = weights(self.model, self.include, self.exclude)
        scores = self.score_fn(self.model) if self.score_fn is not None else None
        if self.pruner.step(self.step, w, scores=scores) is not None:
            apply_masks(self.model, self.pruner.masks)

    def on_train_batch_end(self, batch, logs=None):
        """Hold the masks after the optimizer's step and count the step."""
        if self.pruner.masks is not None:
            apply_masks(self.model, self.pruner.masks)
        self.step += 1


# --- structure ---------------------------------------------------------------------------

def shrink_model(model: keras.Model, keep: Mapping) -> keras.Model:
    """A smaller copy of a Sequential or functional chain of Dense / Conv /
    BatchNormalization layers (activations, pooling, dropout, flatten over
    a 1x1 map between them are fine).

    ``keep``: per layer (its kernel path, e.g. ``PruneResult.groups`` of
    ``prune(..., pattern=Units(axis=-1))``, or the layer name) the units or
    filters to keep. The copy computes what the masked model computes
    (removed units output zero), via the engine's :func:`sparsecore.shrink`.
    """
    _check_model(model)
    if not model.inputs:
        raise ValueError("shrink_model needs a Sequential or functional model (clone_model rebuilds it)")
    chain = [layer for layer in model.layers
             if isinstance(layer, (*KERNEL_LAYERS, keras.layers.BatchNormalization))]
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ValueError(f"nested model {layer.name!r}: shrink_model works on one level of layers")
    eng, bn_of, order = {}, {}, []
    for layer in chain:
        if isinstance(layer, KERNEL_LAYERS):
            if getattr(layer, "groups", 1) != 1:
                raise ValueError(f"layer {layer.name!r} is a grouped convolution; shrink handles groups=1")
            k = _numpy(layer.kernel)
            b = _numpy(layer.bias) if layer.use_bias else None
            eng[layer.name] = sc.Layer(k, b, _LAYOUT[k.ndim])
            order.append(layer.name)
        else:
            if not order:
                raise ValueError(f"batch normalization {layer.name!r} comes before any Dense/Conv layer")
            if layer.axis not in (-1, len(layer.input.shape) - 1) and layer.axis != [-1]:
                raise ValueError(f"batch normalization {layer.name!r} normalises axis {layer.axis}, not the "
                                 f"channels-last axis")
            vals = {v.name: _numpy(v) for v in layer.weights}
            eng[order[-1]].bn = vals
            bn_of[order[-1]] = layer.name
    by_path = {kernel_name(model, layer): layer.name for layer in chain if isinstance(layer, KERNEL_LAYERS)}
    k = {}
    for key, v in keep.items():
        name = by_path.get(key, key)
        if name not in eng:
            raise ValueError(f"keep names {key!r}, which is not a Dense/Conv layer of the model ({order})")
        k[name] = np.asarray(v)
    small = sc.shrink({n: eng[n] for n in order}, k)
    sizes = {n: small[n].weight.shape[-1] for n in order}

    def clone(layer):
        cfg = layer.get_config()
        if layer.name in sizes:
            cfg["units" if isinstance(layer, keras.layers.Dense) else "filters"] = int(sizes[layer.name])
        return layer.__class__.from_config(cfg)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        nl = new.get_layer(layer.name)
        if layer.name in small:
            s = small[layer.name]
            nl.set_weights([s.weight] + ([s.bias] if s.bias is not None else []))
        elif layer.weights:
            bn_owner = [o for o, b in bn_of.items() if b == layer.name]
            if bn_owner:
                bn = small[bn_owner[0]].bn
                nl.set_weights([bn[v.name] for v in layer.weights])
            else:
                nl.set_weights(layer.get_weights())
    return new


def save_sparse(model: keras.Model, path, *, force: bool = False) -> sc.io.FileResult:
    """Write the model's weights as sparsecore sparse HDF5 (the ``.weights.h5``
    layout, its zeros as the pruned entries): ``sparsecore densify`` gives a
    ``.weights.h5`` that ``model.load_weights`` reads. Apply the masks first."""
    from sparsecore.io import prune_file

    with tempfile.TemporaryDirectory(prefix="sparsecore-") as d:
        src = os.path.join(d, "model.weights.h5")
        model.save_weights(src)
        # prune exactly the zeros: |w| below the smallest positive float
        return prune_file(src, path, threshold=float(np.finfo(np.float64).smallest_subnormal), sparse=True,
                          force=force, criterion="masks applied in Keras")


# --- sequential calibration -------------------------------------------------------------

def _same_padding(size, k, stride, dilation):
    """Keras' ``padding="same"``: ``(before, after)`` on one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _hessian_feed(layer):
    """``(features, rows(x))``: a layer's NHWC input as the 2-D rows its
    kernel multiplies (Conv1D/2D: unfolded ``(kh, kw, C)`` patches, the
    order of an ``HWIO`` kernel, ``"same"`` padding as Keras pads); None for
    layers left out (grouped, causal or channels-first convolutions)."""
    if isinstance(layer, keras.layers.Dense):
        features = int(layer.kernel.shape[0])

        def rows(x):
            return x.reshape(-1, features)
        return features, rows
    if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) or getattr(layer, "groups", 1) != 1 \
            or layer.padding not in ("valid", "same") or layer.data_format != "channels_last":
        return None
    two = isinstance(layer, keras.layers.Conv2D)
    kh, kw = (layer.kernel_size if two else (1, layer.kernel_size[0]))
    sh, sw = (layer.strides if two else (1, layer.strides[0]))
    dh, dw = (layer.dilation_rate if two else (1, layer.dilation_rate[0]))
    features = int(np.prod(layer.kernel.shape[:-1]))

    def rows(x):
        a = x if two else x[:, None, :, :]
        if layer.padding == "same":
            pads = (_same_padding(a.shape[1], kh, sh, dh), _same_padding(a.shape[2], kw, sw, dw))
            a = np.pad(a, ((0, 0), pads[0], pads[1], (0, 0)))
        return sc.unfold_patches(a, (kh, kw), stride=(sh, sw), dilation=(dh, dw), layout="nhwc")
    return features, rows


class _KerasHooks(sc.SequentialHooks):
    """:func:`sparsecore.prune_sequential`'s hooks for a functional or
    Sequential Keras model: every Dense and Conv1D/Conv2D in turn (layers
    reading the very same tensor, one block), its inputs computed by the
    model up to it (``keras.Model(model.inputs, layer.input)``) from the
    already pruned layers before it."""

    layout = "io"

    def __init__(self, model, data, include, exclude, max_batches):
        self.model, self.data, self.include, self.exclude, self.max_batches = model, data, include, exclude, \
            max_batches
        self.found, self.dtypes, self.upto, self._blocks = {}, {}, {}, []

    def layers(self):
        chosen = prunable(self.model, self.include, self.exclude)
        self.found, self.dtypes = {}, {}
        for _, layer in _layers(self.model):
            if isinstance(layer, KERNEL_LAYERS) and any(v is layer.kernel for v in chosen.values()):
                feed = _hessian_feed(layer)
                if feed is not None:
                    name = kernel_name(self.model, layer)
                    self.found[name] = (layer, *feed)
                    self.dtypes[name] = _numpy(layer.kernel).dtype  # once: write() casts to it
        if not self.found:
            raise ValueError("no Dense, Conv1D or Conv2D layer to prune (grouped, causal and channels-first "
                             "convolutions are left out)")
        return {name: sc.Feed(f, ("dense", f) if isinstance(layer, keras.layers.Dense) else None)
                for name, (layer, f, _) in self.found.items()}

    def blocks(self):
        self._blocks = []
        for name, (layer, *_) in self.found.items():  # layers reading the same tensor: one block, one forward
            if self._blocks and _input_of(layer) is _input_of(self.found[self._blocks[-1][-1]][0]):
                self._blocks[-1].append(name)
            else:
                self._blocks.append([name])
        return self._blocks

    def inputs(self):
        for j, batch in enumerate(self.data):
            if self.max_batches is not None and j >= self.max_batches:
                return
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def run(self, block, item, catch):
        names = self._blocks[block]
        if block not in self.upto:
            layer = self.found[names[0]][0]
            try:
                self.upto[block] = keras.Model(self.model.inputs, layer.input)
            except Exception as exc:  # a subclassed model has no graph to cut
                raise ValueError(f"cannot reach the inputs of {layer.name!r}: sequential calibration needs a "
                                 f"functional or Sequential model ({exc})") from None
        if len(self.model.inputs) == 1 and not isinstance(item, (list, tuple, dict)):
            item = [item]  # the structure the sub-model was built with: no warning on every call
        x = np.asarray(_numpy(self.upto[block](item, training=False)), np.float64)
        if catch is not None:
            for name in names:
                catch(name, x)

    def rows(self, name, x, item):
        return self.found[name][2](x)

    def read(self, name):
        w = _numpy(self.found[name][0].kernel)
        return w.astype(np.float32) if w.dtype == np.float16 else w

    def write(self, name, array):
        self.found[name][0].kernel.assign(np.asarray(array).astype(self.dtypes[name]))

    def backup(self, name):
        return _numpy(self.found[name][0].kernel).copy()

    def restore(self, name, saved):
        self.found[name][0].kernel.assign(saved)


def _input_of(layer):
    try:
        return layer.input
    except (AttributeError, ValueError):  # never called, or called on several inputs
        return None


def prune_sequential(model: keras.Model, data: Iterable, *, sparsity=None, pattern=None, method: str = "sparsegpt",
                     update: str | None = None, scope: str | None = None, include=None, exclude=(),
                     max_batches: int | None = None, damp: float = 0.01, blocksize: int = 128,
                     refit: str | None = None, order: str = "block", dense_target: float = 0.0,
                     dense_batches: int | None = None, dense_layers=None, progress=None) -> sc.PruneResult:
    """Prune a functional or Sequential Keras model layer by layer, each from
    the inputs that the already pruned layers before it produce, and repair
    each (:func:`sparsecore.prune_sequential` with Keras hooks; the options
    are those of :func:`sparsecore.adapters.torch.prune_sequential`).

    Every Dense and Conv1D/Conv2D layer in turn (``include``/``exclude`` as
    :func:`prunable`, by kernel name): its inputs are computed by the model
    up to it (``keras.Model(model.inputs, layer.input)``), ``H = Σ x xᵀ``
    (convolutions: unfolded ``(kh, kw, C)`` patches, ``"same"`` padding as
    Keras pads) gives the mask and the update, and the kernel is replaced.
    Layers that read the very same tensor share one ``H``. ``sparsity`` may
    be a mapping by kernel name (a global allocation made beforehand).
    ``dense_target`` above 0 also runs the model with its dense kernels on
    the first ``dense_batches`` batches; ``order`` matters only where a
    block holds several layers fed by different tensors, which this walk
    never makes (each block is the layers reading one tensor), so both
    orders give the same model. ``data`` yields input batches or
    ``(inputs, targets)`` tuples. If anything fails, every kernel already
    changed is restored before the error is raised.
    """
    _check_model(model)
    return sc.prune_sequential(_KerasHooks(model, data, include, exclude, max_batches), sparsity=sparsity,
                               pattern=pattern, method=method, update=update, scope=scope, damp=damp,
                               blocksize=blocksize, refit=refit, order=order, dense_target=dense_target,
                               dense_batches=dense_batches, dense_layers=dense_layers, progress=progress)


class PackedDense(keras.layers.Layer):
    """A ``Dense`` whose kernel is a :class:`sparsecore.PackedMatrix` (of the
    kernel's transpose, ``(out, in)``): ``activation(x @ W + b)`` with
    sparsecore's packed products, on the CPU, for inference.

    The product runs on NumPy arrays (``keras.ops.convert_to_numpy``), so the
    layer runs eagerly: on the torch and JAX backends as they are, on
    TensorFlow with ``run_eagerly=True``. One row of ``x`` is a product with
    a vector, more rows a product with a matrix. Values keep the kernel's
    dtype; the output is float32 (float64 for float64 kernels).
    """

    def __init__(self, packed: sc.PackedMatrix, bias=None, activation=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(packed, sc.PackedMatrix):
            raise TypeError(f"packed must be a sparsecore.PackedMatrix, got {type(packed).__name__}")
        self.packed = packed
        self.units, self.in_features = packed.shape
        self.activation = keras.activations.get(activation)
        work = np.float64 if packed.dtype == "float64" else np.float32
        self._bias = None if bias is None else np.array(bias, work)
        self._vector, self._matrix = packed.product(True), packed.product(False)
        self.trainable = False

    @classmethod
    def from_dense(cls, layer, mask=None, *, format: str = "auto") -> PackedDense:
        """A :class:`PackedDense` of a built ``keras.layers.Dense``, kept where
        ``mask`` (shaped like its ``(in, out)`` kernel) is True, its non-zeros without one."""
        kernel = _numpy(layer.kernel)
        packed = sc.pack(kernel.T, format, mask=None if mask is None else np.asarray(mask).T,
                         name=layer.name)
        bias = None if layer.bias is None else _numpy(layer.bias)
        return cls(packed, bias, layer.activation, name=layer.name)

    def call(self, x):
        """``activation(x @ W + b)``."""
        xn = _numpy(x)
        work = np.float64 if self.packed.dtype == "float64" else np.float32
        lead = xn.shape[:-1]
        x2 = np.ascontiguousarray(xn.reshape(-1, self.in_features), work)
        if x2.shape[0] == 1:
            y = self._vector(np.ascontiguousarray(x2[0]), np.empty(self.units, work))[None]
        elif x2.shape[0] == 0 or self.in_features == 0 or self.units == 0:
            y = np.zeros((x2.shape[0], self.units), work)
        else:
            y = self._matrix(np.ascontiguousarray(x2.T), np.empty((self.units, x2.shape[0]), work)).T
        if self._bias is not None:
            y = y + self._bias
        return self.activation(keras.ops.convert_to_tensor(y.reshape(*lead, self.units)))

    def compute_output_shape(self, input_shape):
        """The input's shape with its last axis the units."""
        return (*input_shape[:-1], self.units)


def sparsify(model: keras.Model, format: str = "auto", *, include: Iterable[str] | None = None,
             min_ratio: float = 1.0):
    """A copy of ``model`` whose pruned ``Dense`` layers are :class:`PackedDense`
    where the packed kernel reads fewer bytes than the dense one (``min_ratio``
    times over); the other layers are the model's own (shared, not copied).

    Parameters
    ----------
    model : keras.Model
        Sequential or functional (``keras.models.clone_model`` rebuilds it).
    format : {"auto", "delta8", "bitmask", "nm"}
    include : iterable of str, optional
        Layer names (``fnmatch`` patterns) to consider; all by default.
    min_ratio : float
        Dense bytes over packed bytes that a layer must reach to be swapped.

    Returns
    -------
    (keras.Model, dict)
        The new model, and layer name -> ``{"format", "nbytes",
        "dense_nbytes", "swapped"}`` for each Dense with a zero weight.
    """
    if not isinstance(model, (keras.Sequential, keras.Model)) or \
            (not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", True)):
        raise ValueError("sparsify needs a Sequential or functional model (clone_model rebuilds it)")
    report = {}

    def swap(layer):
        if not isinstance(layer, keras.layers.Dense) or \
                (include is not None and not any(fnmatch.fnmatchcase(layer.name, p) for p in include)):
            return layer
        kernel = _numpy(layer.kernel)
        if np.count_nonzero(kernel) == kernel.size:
            return layer
        new = PackedDense.from_dense(layer, format=format)
        dense_nbytes = kernel.nbytes
        ok = dense_nbytes >= min_ratio * new.packed.nbytes
        report[layer.name] = {"format": new.packed.format, "nbytes": new.packed.nbytes, "dense_nbytes": dense_nbytes,
                              "swapped": ok}
        return new if ok else layer

    return keras.models.clone_model(model, clone_function=swap), report
