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

import math
from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import ArrayLike

from ._device import resolve
from ._kernels import cpu_mi, cpu_select
from ._validate import as_float_array, no_positions_error
from .importance import Criterion, register_criterion

__all__ = ["Bins", "PairwiseMIAccumulator", "UnitMIAccumulator", "fit_bins", "pairwise_mi", "unit_mi"]

_STRATEGIES = ("uniform", "quantile")
_RULES = ("sturges", "fd", "sqrt")
_BASES = {"e": 1.0, "nats": 1.0, 2: 1.0 / math.log(2), "bits": 1.0 / math.log(2)}
_MAX_BINS = 65535


def _activations(acts, name, reduce=None):
    """(samples, units) float array; conv (N, C, H, W) reduced per channel."""
    a = as_float_array(acts, name, "activations")
    if a.ndim == 4:
        if reduce not in ("mean", "max"):
            raise ValueError(f"activations {name!r} have shape {a.shape} (samples, channels, H, W); "
                             f"pass reduce='mean' or reduce='max' to get one value per channel")
        if a.shape[2] * a.shape[3] == 0 and a.shape[0] * a.shape[1]:
            raise no_positions_error(name, a.shape)
        a = a.mean(axis=(2, 3)) if reduce == "mean" else a.max(axis=(2, 3))
    elif a.ndim == 1:
        a = a[:, None]
    elif a.ndim != 2:
        raise ValueError(f"activations {name!r} must be (samples, units) or (samples, channels, H, W), "
                         f"got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"activations {name!r} hold {a.shape[0]} sample(s); MI needs at least 2")
    if a.size:
        count, first = cpu_select.first_nonfinite(np.ascontiguousarray(a).reshape(-1))
        if count:
            s, u = divmod(int(first), a.shape[1])
            raise ValueError(f"activations {name!r} hold {count} NaN or Inf value(s) "
                             f"(first at sample {s}, unit {u})")
    return a


def _nbins(bins, a, name):
    if isinstance(bins, str):
        if bins not in _RULES:
            raise ValueError(f"bins rule {bins!r} is unknown; valid: {list(_RULES)} or an integer >= 2")
        n = a.shape[0]
        if bins == "sturges":
            k = math.ceil(math.log2(n)) + 1
        elif bins == "sqrt":
            k = math.ceil(math.sqrt(n))
        else:  # Freedman-Diaconis per unit, the median over units
            q75, q25 = np.percentile(a, [75, 25], axis=0)
            width = 2.0 * (q75 - q25) / n ** (1 / 3)
            span = a.max(axis=0) - a.min(axis=0)
            ok = width > 0
            k = int(np.median(np.ceil(span[ok] / width[ok]))) if ok.any() else 2
        return int(min(max(k, 2), _MAX_BINS))
    if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins for {name!r} must be an integer >= 2 or one of {list(_RULES)}, got {bins!r}")
    if bins < 2:
        raise ValueError(f"bins for {name!r} must be >= 2, got {bins}")
    if bins > _MAX_BINS:
        raise ValueError(f"bins for {name!r} must be <= {_MAX_BINS}, got {bins}")
    return int(bins)


@dataclass(frozen=True)
class Bins:
    """Fitted bin edges of one layer's units, reusable for later batches.

    Attributes
    ----------
    edges : ndarray, (units, nbins + 1)
        Per-unit edges; the first and last are the fitted minimum and maximum.
    nbins : int
    strategy : {"uniform", "quantile"}
    """

    edges: np.ndarray
    nbins: int
    strategy: str

    @property
    def units(self):
        return self.edges.shape[0]

    def codes(self, acts: ArrayLike, name: str = "activations", reduce: str | None = None) -> np.ndarray:
        """Integer codes of ``acts`` (samples, units), returned as (units, samples).

        Values outside the fitted range go to the first or last bin.
        """
        a = _activations(acts, name, reduce)
        if a.shape[1] != self.units:
            raise ValueError(f"activations {name!r} have {a.shape[1]} units, the bins were fitted on {self.units}")
        return self._codes(a)

    def _codes(self, a):
        """Codes of validated (samples, units) activations."""
        out = np.empty((self.units, a.shape[0]), np.uint8 if self.nbins <= 256 else np.uint16)
        ac = np.ascontiguousarray(a)
        if self.strategy == "uniform":
            lo = self.edges[:, 0]
            width = (self.edges[:, -1] - lo) / self.nbins
            cpu_mi.uniform_codes(ac, lo, width, self.nbins, out)
        else:
            cpu_mi.edge_codes(ac, self.edges, self.nbins, out)
        return out


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
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    if resolve(device, acts) == "cuda":  # GPU activations: ranges on the device, equal-width bins
        from . import cuda

        return cuda.fit_bins(cuda.activations(acts, name, reduce), bins, strategy, name)
    return _fit(_activations(acts, name, reduce), bins, strategy, name)


def _fit(a, bins, strategy, name):
    """fit_bins on validated (samples, units) activations."""
    k = _nbins(bins, a, name)
    lo = np.empty(a.shape[1])
    hi = np.empty(a.shape[1])
    if a.shape[1]:
        cpu_mi.column_min_max(np.ascontiguousarray(a), lo, hi)
    if strategy == "uniform":
        edges = lo[:, None] + (hi - lo)[:, None] * (np.arange(k + 1) / k)[None, :]
        edges[:, -1] = hi
    else:
        edges = np.quantile(a.astype(np.float64), np.linspace(0, 1, k + 1), axis=0).T.copy()
    return Bins(np.ascontiguousarray(edges), k, strategy)


def _labels(labels, n, name):
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels for {name!r} must be one value per sample, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"labels for {name!r} hold {y.shape[0]} values but the activations {n} samples")
    if y.dtype.kind == "f":
        if np.isnan(y).any():
            raise ValueError(f"labels for {name!r} hold NaN (first at sample {int(np.argmax(np.isnan(y)))})")
        raise TypeError(f"labels for {name!r} are floats ({y.dtype}); pass integer class ids, or "
                        f"target='continuous' to bin a continuous target")
    if y.dtype.kind not in "iub":
        raise TypeError(f"labels for {name!r} have dtype {y.dtype}; pass integer class ids")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels for {name!r} must be >= 0, got {int(y.min())} at sample {int(np.argmin(y))}")
    return y


def class_labels(labels, n, n_classes, name="activations"):
    """Host int64 class ids ``0 .. n_classes - 1``, one per sample (the labels
    of a device array are copied to the host: one integer per sample)."""
    host = labels.copy_to_host() if hasattr(labels, "copy_to_host") else labels
    if hasattr(host, "__cuda_array_interface__"):
        from . import _device

        host = _device.to_device(host).copy_to_host()
    y = _labels(host, n, name)
    if y.size and y.max() >= n_classes:
        raise ValueError(f"label {int(y.max())} at sample {int(np.argmax(y))} is >= n_classes={n_classes}")
    return y


_TABLE_MAX = 1 << 22  # counts up to this use a table of k log k instead of log()


def xlogx_table(n):
    """k * log(k) for k = 0 .. min(n, 2**22)."""
    k = np.arange(min(int(n), _TABLE_MAX) + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, k * np.log(k), 0.0)


def _finish(mi, hx, hy, mx, my, mxy, n, base, correction, normalized):
    """Corrected, normalised or converted MI from nats and its parts."""
    if correction:
        mi = mi + (mx + my - mxy - 1) / (2.0 * n)
    if normalized:
        denom = 0.5 * (hx + hy)
        return np.where(denom > 0, mi / np.where(denom > 0, denom, 1.0), 0.0)
    return mi * _BASES[base]


def _mi_of_tables(counts, base, correction, normalized):
    """MI of stacked joint count tables (tables x nx x ny)."""
    n = int(counts[0].sum()) if counts.shape[0] else 0
    res = np.empty((counts.shape[0], 6))
    cpu_mi.mi_from_counts(counts, xlogx_table(n), res)
    return _finish(res[:, 0], res[:, 1], res[:, 2], res[:, 3], res[:, 4], res[:, 5], max(n, 1),
                   base, correction, normalized)


def _check_opts(base, correction):
    if base not in _BASES:
        raise ValueError(f"base must be 'e' (nats) or 2 (bits), got {base!r}")
    if correction not in (None, "miller-madow"):
        raise ValueError(f"correction must be None or 'miller-madow', got {correction!r}")


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
        codes = self.bins.codes(acts, reduce=reduce)
        y = class_labels(labels, codes.shape[1], self.n_classes)
        cpu_mi.unit_label_counts(codes, y, self.counts)
        return self

    def mi(self, base="e", correction=None, normalized=False) -> np.ndarray:
        """MI per unit: nats (``base="e"``) or bits (``2``); ``correction=
        "miller-madow"`` adds (m_x + m_y - m_xy - 1) / (2n) with m the
        non-empty cells; ``normalized`` divides by the mean of the two
        entropies (scikit-learn's arithmetic NMI), 0 where both are 0."""
        _check_opts(base, correction)
        return _mi_of_tables(self.counts, base, correction, normalized)

    def merge(self, other: "UnitMIAccumulator") -> "UnitMIAccumulator":
        if self.counts.shape != other.counts.shape or not np.array_equal(self.bins.edges, other.bins.edges):
            raise ValueError("can merge only accumulators with the same bins and classes")
        self.counts += other.counts
        return self

    def state_dict(self) -> dict:
        return {"counts": self.counts.copy(), "edges": self.bins.edges.copy(),
                "nbins": np.array(self.bins.nbins), "strategy": np.array(self.bins.strategy)}

    @classmethod
    def from_state_dict(cls, d) -> "UnitMIAccumulator":
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
        _check_opts(base, correction)
        o, i, a, b = self.counts.shape
        return _mi_of_tables(self.counts.reshape(o * i, a, b), base, correction, normalized).reshape(o, i)

    def merge(self, other: "PairwiseMIAccumulator") -> "PairwiseMIAccumulator":
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
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    _check_opts(base, correction)
    if resolve(device, acts) == "cuda":
        from .cuda import unit_mi as unit_mi_on_device

        return unit_mi_on_device(acts, labels, bins, strategy, target=target, base=base, correction=correction,
                                 normalized=normalized, reduce=reduce)
    a = _activations(acts, "activations", reduce)
    b = _fit(a, bins, strategy, "activations")
    if target == "continuous":
        t = as_float_array(labels, "target", "labels")
        tb = fit_bins(t.reshape(-1, 1), bins, strategy, name="target")
        y = tb.codes(t.reshape(-1, 1), "target")[0].astype(np.int64)
        if y.shape[0] != a.shape[0]:
            raise ValueError(f"target holds {y.shape[0]} values but the activations {a.shape[0]} samples")
        k = tb.nbins
    else:
        y = _labels(labels, a.shape[0], "activations")
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


def _marginals(codes, nbins, table, n):
    """Per unit: sum of N_a log N_a over its bins, entropy (nats), non-empty bins."""
    counts = np.stack([np.bincount(c, minlength=nbins) for c in codes]) if codes.shape[0] else \
        np.zeros((0, nbins), np.int64)
    return marginal_terms(counts, table, n)


def marginal_terms(counts, table, n):
    """``_marginals`` from the (units, bins) marginal counts."""
    sx = np.where(counts > 0, table[np.minimum(counts, table.size - 1)], 0.0).sum(axis=1)
    big = counts >= table.size
    if big.any():
        sx = np.where(counts > 0, counts * np.log(np.maximum(counts, 1)), 0.0).sum(axis=1)
    return sx, math.log(n) - sx / n, (counts > 0).sum(axis=1)


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
    _check_opts(base, correction)
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    if resolve(device, acts_in, acts_out) == "cuda":
        from . import cuda

        ai, ao = cuda.activations(acts_in, "inputs", reduce), cuda.activations(acts_out, "outputs", reduce)
        if ai.shape[0] != ao.shape[0]:
            raise ValueError(f"inputs hold {ai.shape[0]} samples but outputs {ao.shape[0]}")
        return cuda.pairwise_mi(ai, ao, cuda.fit_bins(ai, bins, strategy, "inputs"),
                                cuda.fit_bins(ao, bins, strategy, "outputs"), base=base, correction=correction,
                                normalized=normalized)
    ai = _activations(acts_in, "inputs", reduce)
    ao = _activations(acts_out, "outputs", reduce)
    if ai.shape[0] != ao.shape[0]:
        raise ValueError(f"inputs hold {ai.shape[0]} samples but outputs {ao.shape[0]}")
    bi, bo = _fit(ai, bins, strategy, "inputs"), _fit(ao, bins, strategy, "outputs")
    ci, co = bi._codes(ai), bo._codes(ao)
    n = ai.shape[0]
    table = xlogx_table(n)
    sx_i, h_i, m_i = _marginals(ci, bi.nbins, table, n)
    sx_o, h_o, m_o = _marginals(co, bo.nbins, table, n)
    mi = np.empty((bo.units, bi.units))
    mxy = np.empty((bo.units, bi.units), np.int64)
    cpu_mi.pair_mi(co, ci, bo.nbins, bi.nbins, table, sx_o, sx_i, n, mi, mxy)
    return _finish(mi, h_o[:, None], h_i[None, :], m_o[:, None], m_i[None, :], mxy, n,
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
