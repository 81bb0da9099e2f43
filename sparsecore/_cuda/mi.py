"""Device mutual information: activation maps reduced per channel, per-unit
ranges and equal-width bins, codes, label and marginal counts, the pair
tables, and the streaming counts. The MI arithmetic from the small tables
(marginal terms, corrections, bases) is the CPU's, in ``sparsecore._mi``."""

from __future__ import annotations

import numpy as np

from .. import _device
from .. import _mi as host
from .._kernels import cuda_mi
from .._validate import no_positions_error
from .arrays import bad_counter, float_array, launch

MAX_CELLS = cuda_mi.MAX_CELLS  # nb_out * nb_in of a pair: the thread's local table


def map_view(d, channels_last):
    """``(N, C, S)`` of an activation map (C last with ``channels_last``)."""
    n = d.shape[0]
    ch = d.shape[d.ndim - 1] if channels_last else d.shape[1]  # (the simulator's shapes take no negative index)
    return n, ch, d.size // max(n * ch, 1)


# Twin of _mi.reduce_maps: the GPU must reproduce the CPU's reductions (means within rounding).
def channel_reduce(d, channels_last, reduce, name="activations"):
    """(N, C) per-channel means or maxima of a device activation map (twin of ``_mi.reduce_maps``)."""
    n, ch, sp = map_view(d, channels_last)
    if sp == 0 and n * ch:
        raise no_positions_error(name, d.shape)
    out = _device.cuda().device_array((n, ch), d.dtype)
    if out.size:
        cuda_mi.channel_reduce[launch(out.size)](d.reshape(d.size), ch, sp, channels_last,
                                                 0 if reduce == "mean" else 1, out)
    return out


def activations(acts, name="activations", reduce=None):
    """Device (samples, units) float activations, checked as on the CPU
    (1-D: one unit; (samples, channels, H, W) maps reduced per channel on the
    device by ``reduce="mean"`` or ``"max"``; at least 2 samples)."""
    a = float_array(acts, name, "activations")
    host.check_layout(a.shape, name, reduce)
    if a.ndim == 4:
        a = channel_reduce(a, False, reduce, name)
    elif a.ndim == 1:
        a = a.reshape(a.shape[0], 1)
    host.check_samples(a.shape[0], name)
    return a


def units(a, channels_last=False, name="activations"):
    """A device (samples, units) array of an activation: maps ``(N, C, ...)``
    (or ``(N, ..., C)``) reduced on the device to one mean per channel."""
    d = float_array(a, name, "activations")
    if d.ndim == 1:
        return d.reshape(d.shape[0], 1)
    if d.ndim == 2:
        return d
    return channel_reduce(d, channels_last, "mean", name)


def feature_sq_into(out, a, channels_last, name="inputs"):
    """``out += Σ x²`` per input feature (last axis with ``channels_last``, else axis 1) of device ``a``."""
    d = float_array(a, name, "activations")
    n, ch, sp = map_view(d, channels_last) if d.ndim > 1 else (d.shape[0], 1, 1)
    if out is None:
        out = _device.cuda().to_device(np.zeros(ch))
    if ch:
        cuda_mi.feature_sq[launch(ch)](d.reshape(d.size), n, ch, sp, channels_last, out)
    return out


def range_init(units):
    """Device ``(lo, hi)`` at ``(+inf, -inf)`` for :func:`range_into`."""
    c = _device.cuda()
    return c.to_device(np.full(units, np.inf)), c.to_device(np.full(units, -np.inf))


def range_into(lo, hi, a, name="activations"):
    """Fold the per-unit range of device (samples, units) ``a`` into ``lo``/``hi``."""
    bad = bad_counter(a.size)
    if a.shape[1]:
        cuda_mi.column_min_max[launch(a.shape[1])](a, lo, hi, bad)
    got = bad.copy_to_host()
    if got[0]:
        su = divmod(int(got[1]), a.shape[1])
        raise ValueError(f"activations {name!r} hold {int(got[0])} NaN or Inf value(s) "
                         f"(first at sample {su[0]}, unit {su[1]})")


def fit_bins(a, bins=16, strategy="uniform", name="activations"):
    """Equal-width :class:`~sparsecore.Bins` of device activations: the
    per-unit minimum and maximum on the device, the edges on the host
    (the CPU's arithmetic)."""
    if strategy != "uniform":
        raise ValueError(f"strategy {strategy!r}: the device takes equal-width bins ('uniform'); "
                         f"use device='cpu' for quantile bins")
    if bins == "fd":
        raise ValueError("the 'fd' bins rule needs quantiles; on the device give an integer, 'sturges' or 'sqrt'")
    k = host.nbins(bins, a, name)
    lo, hi = range_init(a.shape[1])
    range_into(lo, hi, a, name)
    return host.uniform_bins(lo.copy_to_host(), hi.copy_to_host(), k)


def codes(acts, bins, name="activations"):
    """Equal-width codes (units, samples) on the device for fitted ``bins``
    (activations checked as the CPU's ``Bins.codes`` checks them)."""
    c = _device.cuda()
    a = activations(acts, name)
    if a.shape[1] != bins.units:
        raise ValueError(f"activations {name!r} have {a.shape[1]} units, the bins were fitted on {bins.units}")
    if bins.nbins > 256:
        raise ValueError(f"{bins.nbins} bins: the device codes hold at most 256 bins; use device='cpu'")
    lo = np.ascontiguousarray(bins.edges[:, 0])
    width = (bins.edges[:, -1] - lo) / bins.nbins
    inv = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    out = c.device_array((a.shape[1], a.shape[0]), np.uint8)
    if out.size:
        cuda_mi.uniform_codes[launch(out.size)](a, c.to_device(lo), c.to_device(inv), float(bins.nbins - 1), out)
    return out


def label_counts_into(counts, codes_d, y):
    """``counts[u, code, label] += 1`` over the samples of device codes and labels."""
    if codes_d.size:
        cuda_mi.unit_label_counts[launch(codes_d.size)](codes_d, y, counts)
    return counts


def marginal_counts(codes_d, nbins):
    """Host (units, bins) counts of device codes."""
    counts = _device.cuda().to_device(np.zeros((codes_d.shape[0], nbins), np.int64))
    if codes_d.size:
        cuda_mi.unit_bin_counts[launch(codes_d.size)](codes_d, counts)
    return counts.copy_to_host()


def pairwise_mi(acts_in, acts_out, bins_in, bins_out, *, base="e", correction=None, normalized=False):
    """The (out, in) pairwise MI matrix (host float64) of device activations
    for fitted equal-width bins: codes, marginal counts and a thread per
    pair counting and finishing its table, all on the device; the marginal
    terms and the corrections on the host from the small tables."""
    host.check_opts(base, correction)
    if bins_in.nbins * bins_out.nbins > MAX_CELLS:
        raise ValueError(f"{bins_out.nbins} x {bins_in.nbins} bins exceed the {MAX_CELLS} cells a thread "
                         f"holds on the device; use fewer bins or device='cpu'")
    c = _device.cuda()
    ci = codes(acts_in, bins_in, "inputs")
    co = codes(acts_out, bins_out, "outputs")
    n = ci.shape[1]
    if co.shape[1] != n:
        raise ValueError(f"inputs hold {n} samples but outputs {co.shape[1]}")
    table = host.xlogx_table(n)
    sx_i, h_i, m_i = host.marginal_terms(marginal_counts(ci, bins_in.nbins), table, n)
    sx_o, h_o, m_o = host.marginal_terms(marginal_counts(co, bins_out.nbins), table, n)
    mi = c.device_array((co.shape[0], ci.shape[0]), np.float64)
    mxy = c.device_array((co.shape[0], ci.shape[0]), np.int64)
    if mi.size:
        cuda_mi.pair_mi[_device.blocks_2d(ci.shape[0], co.shape[0])](
            co, ci, bins_out.nbins, bins_in.nbins, c.to_device(table), c.to_device(sx_o), c.to_device(sx_i), n, mi,
            mxy)
    return host.finish(mi.copy_to_host(), h_o[:, None], h_i[None, :], m_o[:, None], m_i[None, :],
                       mxy.copy_to_host(), n, base, correction, normalized)


def unit_mi(acts, labels, bins=16, strategy="uniform", *, target="discrete", base="e", correction=None,
            normalized=False, reduce=None):
    """Per-unit MI of device activations: bins fitted, codes and the (units,
    bins, classes) counts formed on the device; the labels are checked on a
    host copy (one integer per sample)."""
    a = activations(acts, "activations", reduce)
    b = fit_bins(a, bins, strategy, "activations")
    c = _device.cuda()
    if target == "continuous":
        t = activations(labels, "target")
        if t.shape[1] != 1:
            raise ValueError(f"a continuous target is one value per sample, got shape {t.shape}")
        if t.shape[0] != a.shape[0]:
            raise ValueError(f"target holds {t.shape[0]} values but the activations {a.shape[0]} samples")
        tb = fit_bins(t, bins, strategy, "target")
        y, k = codes(t, tb, "target")[0], tb.nbins
    elif target == "discrete":
        held = _device.to_device(labels).copy_to_host() if _device.is_device_array(labels) else labels
        yh = host.check_labels(held, a.shape[0], "activations")
        y, k = c.to_device(yh), int(yh.max()) + 1 if yh.size else 1
    else:
        raise ValueError(f"target must be 'discrete' or 'continuous', got {target!r}")
    counts = c.to_device(np.zeros((b.units, b.nbins, k), np.int64))
    label_counts_into(counts, codes(a, b), y)
    return host.mi_of_tables(counts.copy_to_host(), base, correction, normalized)


class UnitMICounts:
    """Streaming per-unit joint counts against labels on the device, for
    equal-width ``bins``; :meth:`mi` finishes on the host from the small
    (units, bins, classes) table (same numbers as :class:`sparsecore.UnitMIAccumulator`)."""

    def __init__(self, bins, n_classes):
        if bins.strategy != "uniform":
            raise ValueError("the device counts take equal-width bins (strategy='uniform')")
        self.bins, self.n_classes = bins, int(n_classes)
        self.counts = _device.cuda().to_device(np.zeros((bins.units, bins.nbins, self.n_classes), np.int64))

    def update(self, acts, labels):
        """Add a batch: device (or host) activations and their class ids."""
        codes_d = codes(acts, self.bins)
        y = _device.cuda().to_device(host.class_labels(labels, codes_d.shape[1], self.n_classes))
        label_counts_into(self.counts, codes_d, y)
        return self

    def mi(self, base="e", correction=None, normalized=False):
        """MI per unit (options as :meth:`sparsecore.UnitMIAccumulator.mi`)."""
        host.check_opts(base, correction)
        return host.mi_of_tables(self.counts.copy_to_host(), base, correction, normalized)


class PairMICounts:
    """Streaming joint counts of every (out, in) unit pair on the device
    (int32, ``out * in * bins_out * bins_in`` of them), for the
    ``mutual_info`` criterion; :meth:`mi` returns the host (out, in) matrix."""

    def __init__(self, bins_in, bins_out, memory_limit=8 << 30):
        need = bins_out.units * bins_in.units * bins_out.nbins * bins_in.nbins * 4
        if need > memory_limit:
            raise ValueError(f"pair counts need {need / 2**30:.1f} GiB, over memory_limit; use pairwise_mi")
        self.bins_in, self.bins_out = bins_in, bins_out
        self.counts = _device.cuda().to_device(
            np.zeros((bins_out.units, bins_in.units, bins_out.nbins, bins_in.nbins), np.int32))
        self.n = 0

    def update(self, acts_in, acts_out):
        """Add a batch of a layer's device (or host) inputs and outputs."""
        ci = codes(acts_in, self.bins_in, "inputs")
        co = codes(acts_out, self.bins_out, "outputs")
        if ci.shape[1] != co.shape[1]:
            raise ValueError(f"inputs hold {ci.shape[1]} samples but outputs {co.shape[1]}")
        if ci.shape[1] and self.counts.size:
            cuda_mi.pair_counts[_device.blocks_2d(ci.shape[0], co.shape[0])](co, ci, self.bins_in.nbins,
                                                                             self.counts)
        self.n += ci.shape[1]
        return self

    def mi(self, base="e", correction=None, normalized=False):
        """The (out, in) MI matrix (options as :meth:`sparsecore.PairwiseMIAccumulator.mi`)."""
        host.check_opts(base, correction)
        o, i, a, b = self.counts.shape
        tables = self.counts.copy_to_host().reshape(o * i, a, b)
        return host.mi_of_tables(tables, base, correction, normalized).reshape(o, i)
