"""Activation statistics of a model's layers, framework-free.

A framework adapter runs its model over the data and hands over, per batch,
``{layer: (inputs, outputs, is_dense)}`` (NumPy arrays, or GPU arrays with
``__cuda_array_interface__``) with the labels; :func:`collect` turns that into
the engine's accumulators: per-unit MI against the labels, pairwise MI
between the units a weight connects, and the input feature norms Wanda
reads. On the device, maps are reduced, binned and counted by the GPU; only
per-unit ranges, feature norms and the small MI tables come back.
"""

from __future__ import annotations

import numpy as np

from ._mi import reduce_maps
from .mutual_info import PairwiseMIAccumulator, UnitMIAccumulator, fit_bins

__all__ = ["ActivationStats", "collect", "units"]


def units(a, channels_last=False, name="activations"):
    """(samples, units) of a host activation array; maps (N, C, ...) or, with
    ``channels_last``, (N, ..., C) reduce to one value per channel (the mean
    over positions)."""
    a = np.asarray(a)
    if a.ndim > 2:
        a = reduce_maps(a, "mean", channels_last, name)
    elif a.ndim == 1:
        a = a[:, None]
    return np.ascontiguousarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32)


class ActivationStats:
    """What ``collect_activations`` gathered, by layer (module) and weight name."""

    def __init__(self):
        self.unit = {}  # layer name -> UnitMIAccumulator
        self.pairwise = {}  # weight name -> PairwiseMIAccumulator
        self.sq = {}  # weight name -> sum over samples (and positions) of x_j**2
        self.weight_of = {}  # layer name -> weight name

    def unit_mi(self, **options) -> dict:
        """Per-unit MI against the labels, by layer name (options as ``UnitMIAccumulator.mi``)."""
        return {k: a.mi(**options) for k, a in self.unit.items()}

    def unit_scores(self, **options) -> dict:
        """Per-unit MI keyed by the layer's weight name, for ``prune(..., pattern=Units())``."""
        return {self.weight_of[k]: v for k, v in self.unit_mi(**options).items() if k in self.weight_of}

    def state(self) -> dict:
        """Per weight name, the state the ``mutual_info`` and ``wanda`` criteria read."""
        out = {}
        for k, a in self.pairwise.items():
            out.setdefault(k, {})["mi"] = a.mi()
        for k, s in self.sq.items():
            out.setdefault(k, {})["x_norm"] = np.sqrt(s)
        return out


def collect(run, weight_of, *, n_classes, bins, unit, pairwise, feature_norms, channels_last=False,
            device=False):
    """Two passes of ``run(pass_fn)``: ranges, then counts.

    ``run`` calls ``pass_fn(captured, labels)`` once per batch with
    ``captured = {layer: (inputs or None, outputs, is_dense)}``: NumPy
    arrays, or with ``device`` GPU arrays (anything with
    ``__cuda_array_interface__``), which are then reduced, binned and counted
    on the GPU by ``sparsecore.cuda`` (only per-unit ranges, feature norms
    and the small MI tables come back).
    """
    if unit and n_classes is None:
        raise ValueError("unit MI needs n_classes (labels are 0 .. n_classes - 1)")
    if device:
        from ._cuda import mi as device_mi
    stats = ActivationStats()
    stats.weight_of = dict(weight_of)
    lo, hi = {}, {}

    def as_units(a, dense):
        if dense and a.ndim > 2:  # a dense layer on (batch, tokens, features): every token is a sample
            a = a.reshape(-1, a.shape[-1])
        return device_mi.units(a, channels_last) if device else units(a, channels_last)

    def ranges(key, a):
        if device:
            if key not in lo:
                lo[key], hi[key] = device_mi.range_init(a.shape[1])
            device_mi.range_into(lo[key], hi[key], a)
            return
        mn, mx = a.min(axis=0), a.max(axis=0)
        if key in lo:
            np.minimum(lo[key], mn, out=lo[key])
            np.maximum(hi[key], mx, out=hi[key])
        else:
            lo[key], hi[key] = mn.astype(np.float64), mx.astype(np.float64)

    def first(cap, y):
        for n, (inp, out, dense) in cap.items():
            if unit and dense and out.ndim > 2:
                raise ValueError(f"unit MI of {n!r} needs one output per sample, but it gives {tuple(out.shape)} "
                                 f"(one per token); pass unit=False (pairwise MI and feature norms take tokens)")
            ranges(("out", n), as_units(out, dense))
            if pairwise and n in weight_of:
                ranges(("in", n), as_units(inp, dense))

    if unit or pairwise:  # the bins: a first pass for the ranges
        run(first)
    if device:
        lo = {k: v.copy_to_host() for k, v in lo.items()}
        hi = {k: v.copy_to_host() for k, v in hi.items()}
    fitted = {k: fit_bins(np.stack([lo[k], hi[k]]), bins) for k in lo}
    unit_acc = device_mi.UnitMICounts if device else UnitMIAccumulator
    pair_acc = device_mi.PairMICounts if device else PairwiseMIAccumulator

    def second(cap, y):
        for n, (inp, out, dense) in cap.items():
            a_out = as_units(out, dense) if unit or pairwise else None
            if unit:
                stats.unit.setdefault(n, unit_acc(fitted[("out", n)], n_classes)).update(a_out, y)
            wname = weight_of.get(n)
            if wname is None:
                continue
            if pairwise:
                acc = stats.pairwise.get(wname)
                if acc is None:
                    acc = stats.pairwise[wname] = pair_acc(fitted[("in", n)], fitted[("out", n)])
                acc.update(as_units(inp, dense), a_out)
            if feature_norms:
                if device:  # features on the last axis for dense layers and channels-last maps, as below
                    stats.sq[wname] = device_mi.feature_sq_into(stats.sq.get(wname), inp, dense or channels_last)
                    continue
                x = np.asarray(inp, np.float64) ** 2
                if dense or channels_last:  # features on the last axis
                    sq = x.reshape(-1, x.shape[-1]).sum(axis=0)
                else:
                    sq = x.reshape(x.shape[0], x.shape[1], -1).sum(axis=(0, 2))
                stats.sq[wname] = stats.sq.get(wname, 0.0) + sq

    run(second)
    if device:
        stats.sq = {k: v.copy_to_host() for k, v in stats.sq.items()}
    return stats
