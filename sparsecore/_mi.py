"""Host arithmetic of histogram mutual information, shared by the CPU and
GPU paths of ``sparsecore.mutual_info``: activations checked and reduced,
bin counts and edges, labels, k log k tables, and MI from count tables
(nats, bits, the Miller-Madow correction, normalised MI)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from . import _device
from ._kernels import cpu_mi, cpu_select
from ._validate import as_float_array, no_positions_error

STRATEGIES = ("uniform", "quantile")
RULES = ("sturges", "fd", "sqrt")
BASES = {"e": 1.0, "nats": 1.0, 2: 1.0 / math.log(2), "bits": 1.0 / math.log(2)}
MAX_BINS = 65535


def check_layout(shape, name, reduce):
    """Refuse activations MI does not take: (samples, units), (samples,) or
    (samples, channels, H, W) maps with ``reduce="mean"`` or ``"max"``."""
    shape = tuple(shape)
    if len(shape) == 4:
        if reduce not in ("mean", "max"):
            raise ValueError(f"activations {name!r} have shape {shape} (samples, channels, H, W); "
                             f"pass reduce='mean' or reduce='max' to get one value per channel")
    elif len(shape) not in (1, 2):
        raise ValueError(f"activations {name!r} must be (samples, units) or (samples, channels, H, W), "
                         f"got shape {shape}")


def check_samples(n, name):
    """MI needs at least two samples."""
    if n < 2:
        raise ValueError(f"activations {name!r} hold {n} sample(s); MI needs at least 2")


def activations(acts, name, reduce=None):
    """(samples, units) float array; conv (N, C, H, W) reduced per channel."""
    a = as_float_array(acts, name, "activations")
    check_layout(a.shape, name, reduce)
    if a.ndim == 4:
        a = reduce_maps(a, reduce, False, name)
    elif a.ndim == 1:
        a = a[:, None]
    check_samples(a.shape[0], name)
    if a.size:
        count, first = cpu_select.first_nonfinite(np.ascontiguousarray(a).reshape(-1))
        if count:
            s, u = divmod(int(first), a.shape[1])
            raise ValueError(f"activations {name!r} hold {count} NaN or Inf value(s) "
                             f"(first at sample {s}, unit {u})")
    return a


def reduce_maps(a, reduce, channels_last, name="activations"):
    """(N, C): the mean or the maximum of each channel of each sample of a
    host activation map ``(N, C, ...)`` or, ``channels_last``, ``(N, ..., C)``
    (twin of the device's ``channel_reduce``)."""
    n = a.shape[0]
    c = a.shape[-1] if channels_last else a.shape[1]
    if a.size == 0 and n * c:
        raise no_positions_error(name, a.shape)
    v = a.reshape(n, -1, c) if channels_last else a.reshape(n, c, -1)
    axis = 1 if channels_last else 2
    return v.mean(axis=axis) if reduce == "mean" else v.max(axis=axis)


def nbins(bins, a, name):
    if isinstance(bins, str):
        if bins not in RULES:
            raise ValueError(f"bins rule {bins!r} is unknown; valid: {list(RULES)} or an integer >= 2")
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
        return int(min(max(k, 2), MAX_BINS))
    if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins for {name!r} must be an integer >= 2 or one of {list(RULES)}, got {bins!r}")
    if bins < 2:
        raise ValueError(f"bins for {name!r} must be >= 2, got {bins}")
    if bins > MAX_BINS:
        raise ValueError(f"bins for {name!r} must be <= {MAX_BINS}, got {bins}")
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
        a = activations(acts, name, reduce)
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


def fit(a, bins, strategy, name):
    """``fit_bins`` on validated (samples, units) host activations."""
    k = nbins(bins, a, name)
    lo = np.empty(a.shape[1])
    hi = np.empty(a.shape[1])
    if a.shape[1]:
        cpu_mi.column_min_max(np.ascontiguousarray(a), lo, hi)
    if strategy == "uniform":
        return uniform_bins(lo, hi, k)
    edges = np.quantile(a.astype(np.float64), np.linspace(0, 1, k + 1), axis=0).T.copy()
    return Bins(np.ascontiguousarray(edges), k, strategy)


def uniform_bins(lo, hi, k):
    """Equal-width :class:`Bins` of ``k`` bins between per-unit ``lo`` and ``hi``."""
    edges = lo[:, None] + (hi - lo)[:, None] * (np.arange(k + 1) / k)[None, :]
    edges[:, -1] = hi
    return Bins(np.ascontiguousarray(edges), k, "uniform")


def check_labels(labels, n, name):
    """Host int64 class ids >= 0, one per sample."""
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
        host = _device.to_device(host).copy_to_host()
    y = check_labels(host, n, name)
    if y.size and y.max() >= n_classes:
        raise ValueError(f"label {int(y.max())} at sample {int(np.argmax(y))} is >= n_classes={n_classes}")
    return y


TABLE_MAX = 1 << 22  # counts up to this use a table of k log k instead of log()


def xlogx_table(n):
    """k * log(k) for k = 0 .. min(n, 2**22)."""
    k = np.arange(min(int(n), TABLE_MAX) + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, k * np.log(k), 0.0)


def finish(mi, hx, hy, mx, my, mxy, n, base, correction, normalized):
    """Corrected, normalised or converted MI from nats and its parts."""
    if correction:
        mi = mi + (mx + my - mxy - 1) / (2.0 * n)
    if normalized:
        denom = 0.5 * (hx + hy)
        return np.where(denom > 0, mi / np.where(denom > 0, denom, 1.0), 0.0)
    return mi * BASES[base]


def mi_of_tables(counts, base, correction, normalized):
    """MI of stacked joint count tables (tables x nx x ny)."""
    n = int(counts[0].sum()) if counts.shape[0] else 0
    res = np.empty((counts.shape[0], 6))
    cpu_mi.mi_from_counts(counts, xlogx_table(n), res)
    return finish(res[:, 0], res[:, 1], res[:, 2], res[:, 3], res[:, 4], res[:, 5], max(n, 1),
                   base, correction, normalized)


def check_opts(base, correction):
    """Refuse an unknown MI ``base`` or ``correction``."""
    if base not in BASES:
        raise ValueError(f"base must be 'e' (nats) or 2 (bits), got {base!r}")
    if correction not in (None, "miller-madow"):
        raise ValueError(f"correction must be None or 'miller-madow', got {correction!r}")


def marginals(codes, nbins, table, n):
    """Per unit: sum of N_a log N_a over its bins, entropy (nats), non-empty bins."""
    counts = np.stack([np.bincount(c, minlength=nbins) for c in codes]) if codes.shape[0] else \
        np.zeros((0, nbins), np.int64)
    return marginal_terms(counts, table, n)


def marginal_terms(counts, table, n):
    """``marginals`` from the (units, bins) marginal counts."""
    sx = np.where(counts > 0, table[np.minimum(counts, table.size - 1)], 0.0).sum(axis=1)
    big = counts >= table.size
    if big.any():
        sx = np.where(counts > 0, counts * np.log(np.maximum(counts, 1)), 0.0).sum(axis=1)
    return sx, math.log(n) - sx / n, (counts > 0).sum(axis=1)
