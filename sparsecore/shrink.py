"""Structural shrink: remove whole units from a chain of layers on raw arrays.

Removing unit ``i`` of layer ``l`` removes its output slice of ``W_l`` (row
``i`` of an ``(out, in)`` weight, filter ``i`` of an ``OIHW`` kernel), entry
``i`` of ``b_l`` and of every per-unit vector of a batch norm that follows
(``gamma``, ``beta``, running mean and variance), and the input slice ``i``
of ``W_{l+1}`` (column ``i``, input channel ``i``). The smaller arrays compute
exactly what the masked network computes, the network in which the removed
units output zero (their weight slice, bias and batch-norm output masked).

A layout names the weight's axes with one letter each: ``o`` the output
units, ``i`` the inputs, any other letters spatial (``"oi"`` for PyTorch
``Linear``, ``"io"`` for a Keras ``Dense`` kernel, ``"oihw"`` for PyTorch
``Conv2d``, ``"hwio"`` for Keras ``Conv2D``). Case does not matter.
Consecutive layers connect when the next layer's input axis has as many
entries as this layer has units (a convolution followed by global pooling
and a dense layer connects; a flatten over spatial positions does not, and
is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from ._validate import as_float_array
from .groups import kept_entries

__all__ = ["Layer", "refit_inputs", "shrink"]


@dataclass
class Layer:
    """One layer of a chain: its weight, optional bias and batch norm.

    Parameters
    ----------
    weight : array_like of float
    bias : array_like of float, optional
        One entry per output unit.
    layout : str
        The weight's axes, e.g. ``"oi"``, ``"io"``, ``"oihw"``, ``"hwio"``.
    bn : mapping name -> array, optional
        A batch norm after the layer: every 1-D entry with one value per unit
        (gamma, beta, running mean, running variance, whatever the names)
        follows the units; other entries (``eps``, counters) pass through.
    """

    weight: ArrayLike
    bias: ArrayLike | None = None
    layout: str = "oi"
    bn: Mapping[str, ArrayLike] = field(default_factory=dict)

    def __post_init__(self):
        lay = str(self.layout).lower()
        if lay.count("o") != 1 or lay.count("i") != 1 or len(set(lay)) != len(lay):
            raise ValueError(f"a layout names each axis once with exactly one 'o' (outputs) and one 'i' "
                             f"(inputs), e.g. 'oi', 'io', 'oihw', 'hwio'; got {self.layout!r}")
        self.layout = lay
        if self.bn is None:
            self.bn = {}
        if not isinstance(self.bn, Mapping):
            raise TypeError(f"bn must be a mapping name -> array, got {type(self.bn).__name__}")

    @property
    def out_axis(self) -> int:
        """The axis of the weight's output units in its layout."""
        return self.layout.index("o")

    @property
    def in_axis(self) -> int:
        """The axis of the weight's input units in its layout."""
        return self.layout.index("i")


def _check_layer(name, layer):
    if not isinstance(layer, Layer):
        raise TypeError(f"layer {name!r} must be a sparsecore.Layer, got {type(layer).__name__}")
    w = as_float_array(layer.weight, name, "weight of layer")
    if w.ndim != len(layer.layout):
        raise ValueError(f"layer {name!r} has layout {layer.layout!r} ({len(layer.layout)} axes) but its "
                         f"weight has shape {w.shape}")
    units = w.shape[layer.out_axis]
    vecs = {}
    if layer.bias is not None:
        vecs["bias"] = as_float_array(layer.bias, name, "bias of layer")
    for k, v in layer.bn.items():
        vecs[f"bn {k!r}"] = np.asarray(v)
    for what, v in vecs.items():
        if v.ndim == 1 and v.shape[0] != units and (what == "bias" or v.shape[0] > 1):
            raise ValueError(f"{what} of layer {name!r} has {v.shape[0]} entries but the layer has {units} "
                             f"units (weight {w.shape}, layout {layer.layout!r})")
        if what == "bias" and v.ndim != 1:
            raise ValueError(f"bias of layer {name!r} must be 1-D, got shape {v.shape}")
    return w, units


def _keep_index(name, keep, units):
    if keep is None:
        return None
    k = np.asarray(keep)
    if k.dtype != np.bool_:
        raise TypeError(f"keep for layer {name!r} has dtype {k.dtype}; pass a bool vector (True = kept)")
    if k.shape != (units,):
        raise ValueError(f"keep for layer {name!r} has shape {k.shape}; the layer has {units} units")
    if not k.any():
        raise ValueError(f"keep for layer {name!r} removes all {units} units; at least one must stay")
    return np.flatnonzero(k)


def shrink(layers: Mapping[str, Layer], keep: Mapping[str, ArrayLike], *, groups=None) -> dict:
    """Remove units from a chain of layers, or from coupled groups, and
    return the smaller arrays.

    Parameters
    ----------
    layers : mapping name -> Layer, or (with ``groups``) name -> array
        The chain in order: each layer's units feed the next layer's inputs.
        With ``groups``: any tensors (weights, biases, norms) by name.
    keep : mapping name -> array of bool
        Per layer (per group, with ``groups``), which units stay (e.g.
        ``PruneResult.groups`` of a :class:`Units` or a ``groups=``
        pruning). Layers (groups) not named keep all their units.
    groups : iterable of Group, optional
        Coupled groups (:class:`sparsecore.Group`): each removed unit's
        entries are cut out of every member along the member's axis; a tensor
        in several groups is cut by each (entries removed by any group go).

    Returns
    -------
    dict name -> Layer (with ``groups``: name -> array)
        New arrays (never views of the inputs), same layouts.

    Raises
    ------
    ValueError
        Layers whose shapes do not connect (naming both), keep vectors of
        the wrong length or that remove every unit, biases or batch-norm
        vectors of the wrong length, bad layouts.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> chain = {"fc1": sc.Layer(rng.standard_normal((4, 3)), np.zeros(4)),
    ...          "fc2": sc.Layer(rng.standard_normal((2, 4)), np.zeros(2))}
    >>> small = sc.shrink(chain, {"fc1": np.array([True, False, True, True])})
    >>> small["fc1"].weight.shape, small["fc1"].bias.shape, small["fc2"].weight.shape
    ((3, 3), (3,), (2, 3))
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping name -> Layer in chain order, got {type(layers).__name__}")
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep must be a mapping name -> bool vector, got {type(keep).__name__}")
    if groups is not None:
        return _shrink_groups(layers, keep, list(groups))
    unknown = [k for k in keep if k not in layers]
    if unknown:
        raise ValueError(f"keep names unknown layers {unknown}; the chain has {list(layers)}")
    names = list(layers)
    checked = [_check_layer(n, layers[n]) for n in names]
    for (a, (wa, units)), (b, (wb, _)) in zip(zip(names, checked), zip(names[1:], checked[1:])):
        inputs = wb.shape[layers[b].in_axis]
        if inputs != units:
            raise ValueError(f"layers {a!r} and {b!r} do not connect: {a!r} has {units} units (weight "
                             f"{wa.shape}, layout {layers[a].layout!r}) but {b!r} takes {inputs} inputs "
                             f"(weight {wb.shape}, layout {layers[b].layout!r})")
    out = {}
    prev = None
    for n, (w, units) in zip(names, checked):
        layer = layers[n]
        idx = _keep_index(n, keep.get(n), units)
        new_w = w if idx is None else np.take(w, idx, axis=layer.out_axis)
        if prev is not None:
            new_w = np.take(new_w, prev, axis=layer.in_axis)
        if new_w is w:
            new_w = w.copy()
        bias = None
        if layer.bias is not None:
            b = np.asarray(layer.bias)
            bias = b.copy() if idx is None else b[idx]
        bn = {}
        for k, v in layer.bn.items():
            v = np.asarray(v)
            bn[k] = v[idx] if (idx is not None and v.ndim == 1 and v.shape[0] == units) else v.copy()
        out[n] = Layer(new_w, bias, layer.layout, bn)
        prev = idx
    return out


def _shrink_groups(arrays, keep, groups):
    shapes = {n: np.shape(a) for n, a in arrays.items()}
    kept = kept_entries(groups, keep, shapes)
    out = {}
    for n, a in arrays.items():
        new = np.array(a)  # a copy, never a view of the input
        for (t, axis), idx in kept.items():
            if t == n:
                new = np.take(new, idx, axis=axis)
        out[n] = new
    return out


_INPUT_REPAIRS = ("bias", "refit")


def refit_inputs(weight: ArrayLike, kept: ArrayLike, hessian: ArrayLike, *, method: str = "refit",
                 mean: ArrayLike | None = None, bias: bool = False, damp: float = 0.01, name: str = "weight"):
    """Repair a layer whose inputs lost some units (the consumer of removed
    heads or channels: an attention's output projection, an MLP's down
    projection), from the statistics of its dense inputs ``x``, so that its
    outputs on them change as little as possible.

    Parameters
    ----------
    weight : array (out, in)
        The dense layer, PyTorch's layout.
    kept : int array
        The inputs that stay, sorted (``kept_entries``' answer for the layer's
        input axis).
    hessian : array (in, in)
        ``E[x xᵀ]`` of the layer's dense inputs (any positive multiple of it:
        ``Σ x xᵀ`` over the calibration tokens, with ``mean`` ``Σ x`` over the
        same tokens divided by their count).
    method : {"bias", "refit"}
        ``"bias"``: FLAP's compensation, no weight changed: the removed inputs'
        mean contribution ``W[:, R] E[x_R]`` moves into the bias (needs
        ``mean``). ``"refit"``: the kept columns refitted by least squares,
        ``argmin E‖W x − W' x_K − c‖²``, with an output shift ``c`` fitted too
        when ``bias`` (needs ``mean``), else ``c = 0``.
    mean : array (in,), optional
        ``E[x]`` of the same inputs (``hessian``'s scale must then be
        ``E[x xᵀ]`` itself).
    damp : float
        Added to the kept block's diagonal, relative to its mean (as
        SparseGPT's): keeps the solve stable when inputs are collinear.

    Returns
    -------
    (new_weight, shift)
        ``new_weight`` ``(out, len(kept))`` in ``weight``'s dtype, and the
        ``(out,)`` shift to add to the layer's bias (None without one).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1000, 3)) @ np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0.1]])  # x2 ≈ x0 + x1
    >>> w = np.array([[1.0, 2.0, 3.0]])
    >>> new, _ = sc.refit_inputs(w, np.array([0, 1]), x.T @ x / len(x), damp=0.0)
    >>> np.round(new, 1)  # x2's weight moves to the inputs it follows
    array([[4., 5.]])
    """
    w = as_float_array(weight, name, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight {name!r} must be (out, in), got shape {w.shape}")
    d = w.shape[1]
    k = np.asarray(kept)
    if k.dtype.kind not in "iu" or k.ndim != 1 or (k.size and (k.min() < 0 or k.max() >= d)) \
            or np.any(np.diff(k) <= 0):
        raise ValueError(f"kept inputs of {name!r} must be sorted distinct indices in [0, {d}), got {k!r}"[:300])
    h = as_float_array(hessian, name, "hessian").astype(np.float64, copy=False)
    if h.shape != (d, d):
        raise ValueError(f"hessian of {name!r} must be ({d}, {d}), got {h.shape}")
    if method not in _INPUT_REPAIRS:
        raise ValueError(f"method must be one of {list(_INPUT_REPAIRS)}, got {method!r}")
    if (method == "bias" or bias) and mean is None:
        raise ValueError(f"{'method=bias' if method == 'bias' else 'bias=True'} needs the inputs' mean (mean=)")
    if not np.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    mu = None
    if mean is not None:
        mu = as_float_array(mean, name, "mean").astype(np.float64, copy=False)
        if mu.shape != (d,):
            raise ValueError(f"mean of {name!r} must be ({d},), got {mu.shape}")
    w64 = w.astype(np.float64)
    gone = np.ones(d, np.bool_)
    gone[k] = False
    if method == "bias":
        return w[:, k].copy(), (w64[:, gone] @ mu[gone]).astype(w.dtype)
    hk = h[np.ix_(k, k)]
    rhs = w64 @ h[:, k]  # (out, |K|): E[(W x) x_Kᵀ]
    if bias:  # the kept inputs and a constant 1: E[x̃ x̃ᵀ] with x̃ = (x_K, 1)
        hk = np.block([[hk, mu[k][:, None]], [mu[k][None, :], np.ones((1, 1))]])
        rhs = np.concatenate([rhs, (w64 @ mu)[:, None]], axis=1)
    lam = damp * float(np.mean(np.diag(hk))) if hk.size else 0.0
    hk = hk + lam * np.eye(hk.shape[0])
    try:
        sol = scipy.linalg.solve(hk, rhs.T, assume_a="pos").T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        raise ValueError(f"the kept inputs' statistics of {name!r} are singular; raise damp (got {damp})") from None
    if bias:
        return sol[:, :-1].astype(w.dtype), sol[:, -1].astype(w.dtype)
    return sol.astype(w.dtype), None
