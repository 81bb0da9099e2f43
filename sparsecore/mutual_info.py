"""Histogram mutual information: I(X;Y) = sum p(x,y) log(p(x,y) / (p(x) p(y))).

Activations are binned once into integer codes (equal-width or quantile bins
per unit, edges reusable for later batches); joint counts are additive, so
the accumulators take data batch by batch, merge across shards and save as
plain dicts; MI comes from the counts at the end.

Layouts: activations are (samples, units); convolution activations
(samples, channels, H, W) are reduced per channel by ``reduce="mean"`` or
``"max"`` first. Pairwise MI between a layer's inputs (``in`` units) and its
outputs (``out`` units) is an (out, in) matrix, shaped like a PyTorch Linear
weight; a Keras Dense kernel is (in, out), its transpose.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import ArrayLike

from ._device import resolve
from ._kernels import cpu_mi
from ._mi import (
    STRATEGIES,
    Bins,
    activations,
    check_labels,
    check_opts,
    class_labels,
    finish,
    fit,
    marginals,
    mi_of_tables,
    xlogx_table,
)
from ._validate import as_float_array
from .importance import Criterion, register_criterion

__all__ = ["Bins", "PairwiseMIAccumulator", "UnitMIAccumulator", "fit_bins", "pairwise_mi", "unit_mi"]


def fit_bins(acts: ArrayLike, bins: int | str = 16, strategy: str = "uniform", *, name: str = "activations",
             reduce: str | None = None, device: str = "auto") -> Bins:
    """Fit per-unit bin edges on activations (samples, units).

    ``strategy="uniform"``: equal-width bins between each unit's minimum and
    maximum (a constant unit puts every sample in bin 0: its MI is 0).
    ``"quantile"``: equal-frequency bins from each unit's quantiles (equal
    quantiles, from ties, merge bins). ``bins`` is an integer >= 2 or a rule:
    ``"sturges"`` (ceil(log2 n) + 1), ``"sqrt"`` (ceil(sqrt n)), ``"fd"``
    (Freedman-Diaconis, the median over units of range / (2 IQR n^(-1/3))).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> b = sc.fit_bins(np.array([[0.0], [1.0], [2.0], [4.0]]), bins=2)
    >>> b.edges
    array([[0., 2., 4.]])
    >>> b.codes(np.array([[0.5], [3.0]]))
    array([[0, 1]], dtype=uint8)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if resolve(device, acts) == "cuda":  # GPU activations: ranges on the device, equal-width bins
        from ._cuda import mi as device_mi

        return device_mi.fit_bins(device_mi.activations(acts, name, reduce), bins, strategy, name)
    return fit(activations(acts, name, reduce), bins, strategy, name)


class UnitMIAccumulator:
    """Streaming per-unit relevance I(a_u; y) against discrete labels.

    Joint counts (units x bins x classes, int64) add up batch by batch with
    the fixed ``bins``; :meth:`mi` turns them into MI.

    Parameters
    ----------
    bins : Bins
        Edges fitted on a first batch (:func:`fit_bins`).
    n_classes : int
        Labels are 0 .. n_classes - 1.
    """

    def __init__(self, bins: Bins, n_classes: int):
        if not isinstance(bins, Bins):
            raise TypeError(f"bins must be a Bins from fit_bins, got {type(bins).__name__}")
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.bins = bins
        self.n_classes = int(n_classes)
        self.counts = np.zeros((bins.units, bins.nbins, self.n_classes), np.int64)

    def update(self, acts: ArrayLike, labels: ArrayLike, *, reduce: str | None = None) -> "UnitMIAccumulator":
        """Add a batch: activations (samples, units) and their class ids."""
        codes = self.bins.codes(acts, reduce=reduce)
        y = class_labels(labels, codes.shape[1], self.n_classes)
        cpu_mi.unit_label_counts(codes, y, self.counts)
        return self

    def mi(self, base="e", correction=None, normalized=False) -> np.ndarray:
        """MI per unit: nats (``base="e"``) or bits (``2``); ``correction=
        "miller-madow"`` adds (m_x + m_y - m_xy - 1) / (2n) with m the
        non-empty cells; ``normalized`` divides by the mean of the two
        entropies (scikit-learn's arithmetic NMI), 0 where both are 0."""
        check_opts(base, correction)
        return mi_of_tables(self.counts, base, correction, normalized)

    def merge(self, other: "UnitMIAccumulator") -> "UnitMIAccumulator":
        """Add another accumulator's counts (another data shard); returns ``self``."""
        if self.counts.shape != other.counts.shape or not np.array_equal(self.bins.edges, other.bins.edges):
            raise ValueError("can merge only accumulators with the same bins and classes")
        self.counts += other.counts
        return self

    def state_dict(self) -> dict:
        """A plain dict of arrays: the counts and the bins."""
        return {"counts": self.counts.copy(), "edges": self.bins.edges.copy(),
                "nbins": np.array(self.bins.nbins), "strategy": np.array(self.bins.strategy)}

    @classmethod
    def from_state_dict(cls, d) -> "UnitMIAccumulator":
        """Rebuild an accumulator saved by :meth:`state_dict`."""
        bins = Bins(np.asarray(d["edges"], np.float64), int(d["nbins"]), str(d["strategy"]))
        acc = cls(bins, np.asarray(d["counts"]).shape[2])
        acc.counts[...] = d["counts"]
        return acc


class PairwiseMIAccumulator:
    """Streaming pairwise MI I(a_in_j; a_out_i) between two layers.

    The counts take ``out * in * nbins_out * nbins_in * 4`` bytes (int32);
    a request above ``memory_limit`` bytes fails when the accumulator is
    built. For MI alone, :func:`pairwise_mi` tiles and needs far less.
    """

    def __init__(self, bins_in: Bins, bins_out: Bins, memory_limit: int = 1 << 30):
        for b in (bins_in, bins_out):
            if not isinstance(b, Bins):
                raise TypeError(f"bins must be Bins from fit_bins, got {type(b).__name__}")
        need = bins_out.units * bins_in.units * bins_out.nbins * bins_in.nbins * 4
        if need > memory_limit:
            raise ValueError(f"pairwise counts for {bins_out.units} x {bins_in.units} units with "
                             f"{bins_out.nbins} x {bins_in.nbins} bins need {need / 2**20:.1f} MiB, over "
                             f"memory_limit={memory_limit / 2**20:.1f} MiB; use fewer bins, raise the limit, "
                             f"or pairwise_mi() on the whole data (it tiles)")
        self.bins_in = bins_in
        self.bins_out = bins_out
        self.counts = np.zeros((bins_out.units, bins_in.units, bins_out.nbins, bins_in.nbins), np.int32)
        self.n = 0

    def update(self, acts_in: ArrayLike, acts_out: ArrayLike, *, reduce: str | None = None):
        """Add a batch of the layer's inputs and outputs (samples first)."""
        ci = self.bins_in.codes(acts_in, "inputs", reduce)
        co = self.bins_out.codes(acts_out, "outputs", reduce)
        if ci.shape[1] != co.shape[1]:
            raise ValueError(f"inputs hold {ci.shape[1]} samples but outputs {co.shape[1]}")
        if self.n + ci.shape[1] > np.iinfo(np.int32).max:
            raise ValueError("more than 2**31 - 1 samples would overflow the int32 pair counts")
        cpu_mi.pair_counts(co, ci, self.bins_in.nbins, self.counts)
        self.n += ci.shape[1]
        return self

    def mi(self, base="e", correction=None, normalized=False) -> np.ndarray:
        """MI of every pair as an (out, in) matrix (options as UnitMIAccumulator.mi)."""
        check_opts(base, correction)
        o, i, a, b = self.counts.shape
        return mi_of_tables(self.counts.reshape(o * i, a, b), base, correction, normalized).reshape(o, i)

    def merge(self, other: "PairwiseMIAccumulator") -> "PairwiseMIAccumulator":
        """Add another accumulator's counts (another data shard); returns ``self``."""
        if self.counts.shape != other.counts.shape:
            raise ValueError("can merge only accumulators with the same bins")
        self.counts += other.counts
        self.n += other.n
        return self

    def state(self) -> dict:
        """The state a weight-shaped criterion reads: ``{"mi": (out, in) MI}``."""
        return {"mi": self.mi()}

    def state_dict(self) -> dict:
        """A plain dict of arrays: the counts and both layers' bins."""
        out = {"counts": self.counts.copy(), "n": np.array(self.n)}
        for side, b in (("in", self.bins_in), ("out", self.bins_out)):
            out[f"{side}_edges"] = b.edges.copy()
            out[f"{side}_nbins"] = np.array(b.nbins)
            out[f"{side}_strategy"] = np.array(b.strategy)
        return out

    @classmethod
    def from_state_dict(cls, d, memory_limit: int = 1 << 30) -> "PairwiseMIAccumulator":
        """Rebuild an accumulator saved by :meth:`state_dict`."""
        bins = {side: Bins(np.asarray(d[f"{side}_edges"], np.float64), int(d[f"{side}_nbins"]),
                           str(d[f"{side}_strategy"])) for side in ("in", "out")}
        acc = cls(bins["in"], bins["out"], memory_limit)
        acc.counts[...] = d["counts"]
        acc.n = int(d["n"])
        return acc


def unit_mi(acts: ArrayLike, labels: ArrayLike, bins: int | str = 16, strategy: str = "uniform", *,
            target: str = "discrete", base="e", correction=None, normalized=False,
            reduce: str | None = None, device: str = "auto") -> np.ndarray:
    """Per-unit relevance I(a_u; y) of activations (samples, units).

    ``target="discrete"``: ``labels`` are class ids >= 0. ``"continuous"``:
    a float target binned with the same ``bins`` and ``strategy``.
    ``device="cuda"`` (or ``"auto"`` with GPU activations) bins and counts on
    the GPU (equal-width bins; see :func:`sparsecore.cuda.unit_mi`); the
    result is the same host array.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    >>> a = np.stack([y * 1.0, np.zeros(8)], axis=1)   # unit 0 equals the label, unit 1 is constant
    >>> np.round(sc.unit_mi(a, y, bins=2, base=2), 12)
    array([1., 0.])
    """
    if target not in ("discrete", "continuous"):
        raise ValueError(f"target must be 'discrete' or 'continuous', got {target!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    check_opts(base, correction)
    if resolve(device, acts) == "cuda":
        from ._cuda import mi as device_mi

        return device_mi.unit_mi(acts, labels, bins, strategy, target=target, base=base, correction=correction,
                                 normalized=normalized, reduce=reduce)
    a = activations(acts, "activations", reduce)
    b = fit(a, bins, strategy, "activations")
    if target == "continuous":
        t = as_float_array(labels, "target", "labels")
        tb = fit_bins(t.reshape(-1, 1), bins, strategy, name="target")
        y = tb.codes(t.reshape(-1, 1), "target")[0].astype(np.int64)
        if y.shape[0] != a.shape[0]:
            raise ValueError(f"target holds {y.shape[0]} values but the activations {a.shape[0]} samples")
        k = tb.nbins
    else:
        y = check_labels(labels, a.shape[0], "activations")
        k = int(y.max()) + 1 if y.size else 1
    acc = UnitMIAccumulator(b, k)
    if b.strategy == "uniform":  # counted block by block from the activations: no codes array
        parts = np.zeros((max(1, min(numba.get_num_threads(), a.shape[0] // 1024)),) + acc.counts.shape, np.int64)
        lo = b.edges[:, 0]
        cpu_mi.uniform_label_counts(np.ascontiguousarray(a), lo, (b.edges[:, -1] - lo) / b.nbins, b.nbins, y, parts)
        parts.sum(axis=0, out=acc.counts)
    else:
        cpu_mi.unit_label_counts(b._codes(a), y, acc.counts)
    return acc.mi(base, correction, normalized)


def pairwise_mi(acts_in: ArrayLike, acts_out: ArrayLike, bins: int | str = 16, strategy: str = "uniform", *,
                base="e", correction=None, normalized=False, reduce: str | None = None,
                device: str = "auto") -> np.ndarray:
    """MI between every input unit and every output unit: an (out, in) matrix.

    ``device="cuda"`` (or ``"auto"`` with GPU activations) bins, counts and
    finishes every pair on the GPU (equal-width bins, at most 32 x 32 per
    pair; see :func:`sparsecore.cuda.pairwise_mi`); the result is the same
    host array.

    Each pair is counted and finished in a per-thread histogram, so the
    extra memory is the codes (one byte per sample and unit for up to 256
    bins) plus ``threads * bins**2`` counters, never the counts of all pairs
    (for those, streamed batch by batch, see :class:`PairwiseMIAccumulator`).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> x = np.array([[0.], [1.], [1.], [0.], [0.]]); y = np.array([[1.], [0.], [0.], [0.], [1.]])
    >>> round(float(sc.pairwise_mi(x, y, bins=2)[0, 0]), 12)   # scikit-learn's reference value
    0.291103166032
    """
    check_opts(base, correction)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if resolve(device, acts_in, acts_out) == "cuda":
        from ._cuda import mi as device_mi

        ai, ao = device_mi.activations(acts_in, "inputs", reduce), device_mi.activations(acts_out, "outputs", reduce)
        if ai.shape[0] != ao.shape[0]:
            raise ValueError(f"inputs hold {ai.shape[0]} samples but outputs {ao.shape[0]}")
        return device_mi.pairwise_mi(ai, ao, device_mi.fit_bins(ai, bins, strategy, "inputs"),
                                     device_mi.fit_bins(ao, bins, strategy, "outputs"), base=base,
                                     correction=correction, normalized=normalized)
    ai = activations(acts_in, "inputs", reduce)
    ao = activations(acts_out, "outputs", reduce)
    if ai.shape[0] != ao.shape[0]:
        raise ValueError(f"inputs hold {ai.shape[0]} samples but outputs {ao.shape[0]}")
    bi, bo = fit(ai, bins, strategy, "inputs"), fit(ao, bins, strategy, "outputs")
    ci, co = bi._codes(ai), bo._codes(ao)
    n = ai.shape[0]
    table = xlogx_table(n)
    sx_i, h_i, m_i = marginals(ci, bi.nbins, table, n)
    sx_o, h_o, m_o = marginals(co, bo.nbins, table, n)
    mi = np.empty((bo.units, bi.units))
    mxy = np.empty((bo.units, bi.units), np.int64)
    cpu_mi.pair_mi(co, ci, bo.nbins, bi.nbins, table, sx_o, sx_i, n, mi, mxy)
    return finish(mi, h_o[:, None], h_i[None, :], m_o[:, None], m_i[None, :], mxy, n,
                   base, correction, normalized)


def _mi_criterion(weights, state):
    if "mi" not in state:
        raise ValueError("criterion 'mutual_info' needs state['mi'], the (out, in) pairwise MI matrix "
                         "(PairwiseMIAccumulator.state())")
    mi = np.asarray(state["mi"])
    w = np.asarray(weights)
    if mi.shape != w.shape:
        if mi.T.shape == w.shape:  # a Keras (in, out) kernel
            return mi.T.copy()
        raise ValueError(f"pairwise MI of shape {mi.shape} does not fit weights of shape {w.shape}")
    return mi.copy()


register_criterion(Criterion("mutual_info", _mi_criterion, (),
                             "pairwise MI between the units a weight connects (state['mi'])"))
