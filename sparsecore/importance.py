"""Importance: magnitude, gradient statistics and the criterion registry.

A criterion maps ``(weights, state) -> scores`` for one tensor, where
``state`` is that tensor's accumulated statistics (a dict, possibly empty).
Built-ins resolve by name through one registry; any callable with that
signature works wherever a built-in does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from . import _device
from ._kernels import cpu_accumulate, cpu_select
from ._kernels.keys import MODE_ABS, MODE_SQUARE
from ._validate import as_float_array, nonfinite_error

__all__ = ["Accumulator", "Criterion", "GradientAccumulator", "get_criterion", "list_criteria", "magnitude",
           "register_criterion"]

STATS = ("g", "g2", "wg", "wg2")
_STAT_DOC = {
    "g": "sum of g",
    "g2": "sum of g**2 (empirical Fisher diagonal)",
    "wg": "sum of w*g",
    "wg2": "sum of (w*g)**2",
}
_EMPTY = np.zeros(0, np.float64)
_EMPTY32 = np.zeros(0, np.float32)
_BLOCK = 4096  # elements a thread keeps in cache across the samples of a batch
_PRECISIONS = {"mixed": 16, "float64": 0}  # terms a float32 partial holds before its flush


def magnitude(weights: ArrayLike, power: int = 1) -> np.ndarray:
    """Magnitude importance: ``|w|`` (``power=1``) or ``w**2`` (``power=2``).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.magnitude(np.array([-2.0, 0.5]), power=2)
    array([4.  , 0.25])
    """
    if power not in (1, 2):
        raise ValueError(f"magnitude power must be 1 or 2, got {power!r}")
    w = as_float_array(weights, "weights")
    return np.abs(w) if power == 1 else np.square(w)


@runtime_checkable
class Accumulator(Protocol):
    """What calibration statistics share, whatever they hold (gradients,
    Hessians, MI counts): ``update`` with a batch of data; ``merge`` another
    of the same kind, built from other data, in place (the result of one
    pass over both, exactly for counts, within the stated rounding for
    sums); ``state_dict`` / ``from_state_dict`` to cross processes and
    files. sparsecore's :class:`GradientAccumulator`,
    :class:`HessianAccumulator`, :class:`UnitMIAccumulator` and
    :class:`PairwiseMIAccumulator` are ones; so is any class of yours with
    these methods (``isinstance`` checks that they exist), and
    :func:`sparsecore.parallel.tree_merge` combines any of them.
    """

    def update(self, *args, **kwargs):
        """Add a batch's statistics; returns self."""

    def merge(self, other):
        """Add another accumulator's statistics (same kind and shape); returns self."""

    def state_dict(self) -> dict:
        """Everything needed to rebuild it, as arrays and plain values."""

    @classmethod
    def from_state_dict(cls, d, *args, **kwargs):
        """The accumulator a ``state_dict`` describes."""


class Criterion:
    """A named importance criterion ``(weights, state) -> scores``.

    Parameters
    ----------
    name : str
        Registry name.
    fn : callable
        ``fn(weights, state) -> scores`` with ``scores`` shaped like ``weights``.
    requires : tuple of str
        Statistics of :class:`GradientAccumulator` the criterion reads.
    doc : str
        One line shown by :func:`list_criteria`.
    """

    def __init__(self, name, fn, requires=(), doc="", *, _mode=None):
        if not callable(fn):
            raise TypeError(f"criterion {name!r}: fn must be callable, got {type(fn).__name__}")
        bad = [r for r in requires if r not in STATS]
        if bad:
            raise ValueError(f"criterion {name!r} requires unknown statistics {bad}; valid: {list(STATS)}")
        self.name = name
        self.fn = fn
        self.requires = tuple(requires)
        self.doc = doc
        self.mode = _mode  # set for magnitude: selection then reads the weights directly

    def __call__(self, weights, state=None):
        """The scores of ``weights`` given the statistics in ``state``."""
        return self.fn(weights, {} if state is None else state)

    def __repr__(self):
        return f"Criterion({self.name!r}, requires={self.requires})"


_REGISTRY: dict = {}


def register_criterion(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Add a :class:`Criterion` to the registry under its name."""
    if not isinstance(criterion, Criterion):
        raise TypeError(f"register_criterion takes a Criterion, got {type(criterion).__name__}")
    if criterion.name in _REGISTRY and not overwrite:
        raise ValueError(f"a criterion named {criterion.name!r} is registered already; pass overwrite=True")
    _REGISTRY[criterion.name] = criterion
    return criterion


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return sorted(_REGISTRY)


def get_criterion(spec: str | Callable) -> Callable:
    """Resolve a criterion: a registered name, a :class:`Criterion` or a callable.

    Raises
    ------
    ValueError
        For an unknown name, listing the valid ones.

    Examples
    --------
    >>> import sparsecore as sc
    >>> sc.get_criterion("fisher").requires
    ('g2',)
    """
    if isinstance(spec, str):
        try:
            return _REGISTRY[spec]
        except KeyError:
            raise ValueError(f"unknown criterion {spec!r}; valid: {', '.join(list_criteria())}") from None
    if callable(spec):
        return spec
    raise TypeError(f"a criterion is a name, a Criterion or a callable (weights, state) -> scores; "
                    f"got {type(spec).__name__}")


def _need(state, key, crit, alt=None):
    if key in state:
        return state[key]
    if alt is not None and alt in state:
        return None
    want = key if alt is None else f"{key}' or '{alt}"
    raise ValueError(f"criterion {crit!r} needs the statistic '{want}', which the state lacks "
                     f"(it has {sorted(k for k in state if k in STATS)}); accumulate it with "
                     f"GradientAccumulator(stats=(...'{key}'...))")


def _fisher(w, state):
    return np.array(_need(state, "g2", "fisher"), copy=True)


def _taylor(w, state):
    wg = _need(state, "wg", "taylor", alt="g")
    if wg is None:  # weights fixed while accumulating: sum(w*g) = w * sum(g)
        return np.abs(np.asarray(w, np.float64) * state["g"])
    return np.abs(wg)


def _taylor_squared(w, state):
    wg2 = _need(state, "wg2", "taylor_squared", alt="g2")
    if wg2 is None:  # weights fixed: sum((w*g)**2) = w**2 * sum(g**2)
        return np.square(np.asarray(w, np.float64)) * state["g2"]
    return np.array(wg2, copy=True)


def _obd(w, state):
    return 0.5 * np.square(np.asarray(w, np.float64)) * _need(state, "g2", "obd")


def _wanda(w, state):
    """|w| times the L2 norm of the input feature each weight reads."""
    if "x_norm" not in state:
        raise ValueError("criterion 'wanda' needs state['x_norm'], the L2 norm over samples of each input "
                         "feature of the layer (the PyTorch adapter's collect_activations(feature_norms=True))")
    w = np.abs(np.asarray(w, np.float64))
    nrm = np.asarray(state["x_norm"], np.float64)
    if w.ndim >= 2 and nrm.shape == (w.shape[1],):  # (out, in, ...): the input axis is 1
        return w * nrm.reshape((1, -1) + (1,) * (w.ndim - 2))
    if w.ndim == 2 and nrm.shape == (w.shape[0],):  # a Keras (in, out) kernel
        return w * nrm[:, None]
    raise ValueError(f"state['x_norm'] of shape {nrm.shape} fits neither axis 1 nor (for a 2-D (in, out) "
                     f"kernel) axis 0 of weights of shape {w.shape}")


for _c in (
    Criterion("magnitude", lambda w, s: magnitude(w, 1), (), "|w|", _mode=MODE_ABS),
    Criterion("magnitude_squared", lambda w, s: magnitude(w, 2), (), "w**2", _mode=MODE_SQUARE),
    Criterion("fisher", _fisher, ("g2",), "sum of g**2 over samples (empirical Fisher)"),
    Criterion("taylor", _taylor, ("wg",), "|sum of w*g| (Molchanov et al. 2017/2019)"),
    Criterion("taylor_squared", _taylor_squared, ("wg2",), "sum of (w*g)**2"),
    Criterion("obd", _obd, ("g2",), "0.5 * w**2 * sum of g**2 (LeCun et al. 1990, Optimal Brain Damage)"),
    Criterion("wanda", _wanda, (), "|w| * ||x_j||_2 of the input feature (Sun et al. 2023, Wanda)"),
):
    register_criterion(_c)
del _c


_DEVICE_CRITERIA = ("fisher", "taylor", "taylor_squared", "obd", "wanda", "mutual_info")


def has_device_scores(crit) -> bool:
    """Whether ``crit`` is a registered built-in that :func:`device_scores` computes on the GPU."""
    name = getattr(crit, "name", None)
    return name in _DEVICE_CRITERIA and _REGISTRY.get(name) is crit


def device_scores(crit, name, w, st):
    """The scores of a built-in criterion for device weights ``w`` as a device
    source, with the CPU's float64 arithmetic (see
    ``sparsecore/_kernels/cuda_importance.py``)."""
    from ._cuda import arrays as device_arrays
    from ._cuda import importance as device_importance
    from ._cuda import pattern as device_pattern
    from ._cuda import select as device_select

    cname = crit.name
    role = f"scores from criterion {cname!r} for"
    if cname in ("fisher", "mutual_info") or (cname == "taylor_squared" and "wg2" in st):
        key = {"fisher": "g2", "mutual_info": "mi", "taylor_squared": "wg2"}[cname]
        if key not in st:
            _need(st, key, cname)
        a = device_arrays.float_device(st[key], f"state[{key!r}] of {name!r}")
        if cname == "mutual_info" and a.ndim == 2 and a.shape != w.shape and a.shape[::-1] == w.shape:
            a = device_pattern.transpose(a)  # a Keras (in, out) kernel
        if a.shape != w.shape:
            raise ValueError(f"criterion {cname!r}: state[{key!r}] of shape {a.shape} does not fit weights "
                             f"{name!r} of shape {w.shape}")
        return device_select.device_source(name, a, role=role)
    L, B = 1, 1
    di = device_importance
    if cname == "taylor":
        _need(st, "wg", cname, alt="g")
        kind, a = (di.ABS, st["wg"]) if "wg" in st else (di.TAYLOR_G, st["g"])
    elif cname == "taylor_squared":  # without wg2 (that case is above): weights fixed, w**2 * sum g**2
        _need(st, "wg2", cname, alt="g2")
        kind, a = di.TAYLOR_SQUARED_G2, st["g2"]
    elif cname == "obd":
        kind, a = di.OBD, _need(st, "g2", cname)
    else:  # wanda
        if "x_norm" not in st:
            raise ValueError("criterion 'wanda' needs state['x_norm'], the L2 norm over samples of each input "
                             "feature of the layer (the PyTorch adapter's collect_activations(feature_norms=True))")
        kind, a = di.WANDA, st["x_norm"]
    a = device_arrays.flat(device_arrays.float_device(a, f"state of {name!r}"))
    if kind == di.WANDA:
        if len(w.shape) >= 2 and a.size == w.shape[1]:
            L, B = w.shape[1], int(np.prod(w.shape[2:], dtype=np.int64))
        elif len(w.shape) == 2 and a.size == w.shape[0]:
            L, B = w.shape[0], w.shape[1]
        else:
            raise ValueError(f"state['x_norm'] of shape {(a.size,)} fits neither axis 1 nor (for a 2-D (in, out) "
                             f"kernel) axis 0 of weights of shape {w.shape}")
    elif a.size != w.size:
        raise ValueError(f"criterion {cname!r}: statistics of {a.size} entries do not fit weights {name!r} of "
                         f"shape {w.shape}")
    out = device_importance.criterion_scores(kind, device_arrays.flat(w), a, L, B)
    return device_select.device_source(name, out.reshape(w.shape), role=role)


def _check_finite(arr, name, role, original):
    if arr.size:
        count, first = cpu_select.first_nonfinite(arr.reshape(-1))
        if count:
            raise nonfinite_error(name, role, original, count, first)


class GradientAccumulator:
    """Streaming sums of gradient statistics, fused in one parallel pass.

    Feed it per-batch gradients from any framework: one array, or a mapping
    name -> array, for any number of batches. With ``per_sample=True`` the
    gradients carry a leading sample axis and each sample counts on its own
    (the empirical Fisher sum over samples of g**2, the reference article's
    R_i = sum_{x,y} (dL/dz_ij)**2); without it, each update is one batch
    gradient (the square of a batch mean is not the mean of squares).

    Parameters
    ----------
    stats : sequence of str
        Any of ``"g"`` (sum g), ``"g2"`` (sum g**2), ``"wg"`` (sum w*g),
        ``"wg2"`` (sum (w*g)**2). ``"wg"`` and ``"wg2"`` need the weights at
        each update (they may change between batches, as in training).

    precision : {"mixed", "float64"}
        How the sums are kept (see Notes).
    device : {"cpu", "cuda", "auto"}
        ``"cuda"`` keeps the sums on the GPU (float64 terms straight into
        float64 sums, whatever ``precision``): gradients given as device
        arrays (anything with ``__cuda_array_interface__``: PyTorch CUDA
        tensors, CuPy) are never copied to the host, and :meth:`state`
        returns numba device arrays. ``"auto"`` decides at the first update
        from where the gradients live.

    Notes
    -----
    Precision. ``"mixed"`` (the default) computes each term in float32 and
    adds it to a float32 partial sum; every 16 terms the partials are added
    into float64 totals and cleared. A partial holds at most 16 terms, so its
    rounding error is at most about 16 * 2**-24 (about 1e-6) of the sum of
    the absolute values of its terms, and the float64 totals add next to
    nothing: for the non-negative g2 and wg2 the relative error stays below
    1e-6 *whatever the number of batches* (a float32 running sum drifts
    without bound), and g and wg are within 1e-6 of the sum of |terms|. Per
    batch it moves 24 bytes per element for two statistics instead of 40 for
    float64 sums. ``"float64"`` computes the terms in float64 and adds them
    straight into float64 sums: relative error about n * 2**-53 after n
    terms. A test checks 10,000 float32 batches against exactly rounded sums
    for both.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> acc = sc.GradientAccumulator(stats=("g2",))
    >>> for g in (np.array([1.0, -2.0]), np.array([3.0, 0.0])):
    ...     _ = acc.update(g)
    >>> acc.state()["g2"]
    array([10.,  4.])
    """

    def __init__(self, stats=("g2",), precision="mixed", device="cpu"):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {list(_PRECISIONS)}, got {precision!r}")
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        self.device = device
        self.precision = "float64" if device == "cuda" else precision
        if isinstance(stats, str):
            stats = (stats,)
        stats = tuple(stats)
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise ValueError(f"unknown statistics {bad or stats}; valid: {list(STATS)}")
        self.stats = tuple(s for s in STATS if s in stats)
        self._single = None
        self._shapes = {}
        self._acc = {}  # name -> {stat: float64 total}
        self._part = {}  # name -> {stat: float32 partial} ("mixed" only)
        self._spare = {}  # name -> {stat: device array}: where the next GPU update writes
        self._pending = 0  # terms held in the partials
        self.count = 0
        self.n_batches = 0

    @classmethod
    def for_criteria(cls, *criteria):
        """An accumulator with the statistics that the named criteria need."""
        need = set()
        for c in criteria:
            need.update(getattr(get_criterion(c), "requires", ()))
        return cls(stats=tuple(need) or ("g2",))

    @property
    def names(self):
        """Tensor names seen so far (``[None]`` for single-array use)."""
        return [None] if self._single else list(self._shapes)

    def _as_mapping(self, grads, what):
        if isinstance(grads, Mapping):
            if self._single is True:
                raise ValueError(f"this accumulator was fed single arrays; {what} is a mapping")
            if any(not isinstance(k, str) or not k for k in grads):
                raise TypeError(f"{what} names must be non-empty strings")
            return dict(grads), False
        if self._single is False:
            raise ValueError(f"this accumulator was fed mappings name -> array; {what} is a single array")
        return {"": grads}, True

    def update(self, grads: ArrayLike | Mapping[str, ArrayLike],
               weights: ArrayLike | Mapping[str, ArrayLike] | None = None, *,
               per_sample: bool = False) -> "GradientAccumulator":
        """Add one batch of gradients; returns ``self``.

        Parameters
        ----------
        grads : array_like or mapping name -> array_like
            Gradients shaped like the weights, or with a leading sample axis
            when ``per_sample`` is true.
        weights : array_like or mapping, optional
            The weights at this step; needed for ``"wg"`` and ``"wg2"``.
        per_sample : bool
            The first axis indexes samples.

        Raises
        ------
        TypeError
            Non-float gradients or weights.
        ValueError
            NaN/Inf, shapes that differ from earlier batches or from the
            weights (both shapes named), names that differ from earlier.
            Nothing is added when an error is raised.
        """
        gmap, single = self._as_mapping(grads, "grads")
        if self.device == "auto":
            self.device = _device.resolve("auto", *gmap.values())
            if self.device == "cuda":
                self.precision = "float64"
        need_w = "wg" in self.stats or "wg2" in self.stats
        if need_w and weights is None:
            raise ValueError(f"statistics {[s for s in self.stats if s.startswith('w')]} need the "
                             f"weights at each update; pass weights=")
        if weights is not None:
            wmap, wsingle = (dict(weights), False) if isinstance(weights, Mapping) else ({"": weights}, True)
            if wsingle != single:
                raise ValueError("grads and weights must both be arrays or both be mappings")
            missing = [k for k in gmap if k not in wmap]
            if missing:
                raise ValueError(f"weights miss tensors {missing} that grads have")
        if self._shapes and set(gmap) != set(self._shapes):
            new = sorted(set(gmap) - set(self._shapes))
            gone = sorted(set(self._shapes) - set(gmap))
            raise ValueError(f"grads name other tensors than earlier batches: new {new}, missing {gone}")
        on_gpu = self.device == "cuda"
        if on_gpu:
            from ._cuda import arrays as device_arrays
        prepared = []
        nsamp_seen = None
        for name, g in gmap.items():
            label = name or "grads"
            ga = device_arrays.float_array(g, label, "gradients") if on_gpu else as_float_array(g, label, "gradients")
            if per_sample:
                if ga.ndim == 0:
                    raise ValueError(f"per-sample gradients {label!r} need a leading sample axis, got a scalar")
                shape, nsamp = tuple(ga.shape[1:]), ga.shape[0]
                if nsamp_seen is not None and nsamp != nsamp_seen:
                    raise ValueError(f"per-sample gradients {label!r} hold {nsamp} samples, others {nsamp_seen}")
                nsamp_seen = nsamp
            else:
                shape, nsamp = tuple(ga.shape), 1
            known = self._shapes.get(name)
            if known is not None and known != shape:
                if per_sample and tuple(ga.shape) == known:
                    raise ValueError(f"per-sample gradients {label!r} of shape {tuple(ga.shape)} lack the leading "
                                     f"sample axis: with per_sample=True the first axis counts samples, so these "
                                     f"read as {nsamp} samples of shape {shape}, but the weight's gradients have "
                                     f"shape {known} (for one sample, pass g[None])")
                raise ValueError(f"gradients {label!r} have shape {shape}" + (
                    f" per sample (first axis: {nsamp} samples)" if per_sample else "") + f", earlier batches {known}")
            n = int(np.prod(shape, dtype=np.int64))
            if on_gpu:  # checked in the fused pass below
                wa = device_arrays.float_array(wmap[name], label, "weights") if need_w else None
                if need_w and tuple(wa.shape) != shape:
                    raise ValueError(f"gradients {label!r} have shape {shape} but weights {label!r} "
                                     f"have shape {tuple(wa.shape)}")
                prepared.append((name, shape, n, ga.reshape(nsamp, n),
                                 wa.reshape(n) if need_w else device_arrays.empty(), ga, wa))
                continue
            w2 = _EMPTY
            if need_w:
                wa = as_float_array(wmap[name], label, "weights")
                if wa.shape != shape:
                    raise ValueError(f"gradients {label!r} have shape {shape} but weights {label!r} "
                                     f"have shape {wa.shape}")
                w2 = np.ascontiguousarray(wa).reshape(-1)
                _check_finite(w2, label, "weights", wa)
            g2d = np.ascontiguousarray(ga).reshape(nsamp, n)
            _check_finite(g2d, label, "gradients", ga)
            prepared.append((name, shape, n, g2d, w2))
        if on_gpu:
            self._update_on_device(prepared, single, per_sample, nsamp_seen)
            return self
        # All checks passed: only now is any state touched.
        if self._single is None:
            self._single = single
        period = _PRECISIONS[self.precision]
        rows = prepared[0][3].shape[0] if prepared else 0
        for name, shape, n, g2d, w2 in prepared:
            if name not in self._shapes:
                self._shapes[name] = shape
                self._acc[name] = {s: np.zeros(n, np.float64) for s in self.stats}
                self._part[name] = {s: np.zeros(n if period else 0, np.float32) for s in self.stats}
            tot, part = self._acc[name], self._part[name]
            if n and g2d.shape[0]:
                cpu_accumulate.accumulate(
                    g2d, w2, _BLOCK, self._pending, period,
                    *(tot.get(s, _EMPTY) for s in STATS),
                    *(part.get(s, _EMPTY32) if period else _EMPTY32 for s in STATS))
        if period:
            self._pending = (self._pending + rows) % period
        self.count += nsamp_seen if per_sample and nsamp_seen is not None else 1
        self.n_batches += 1
        return self

    def _update_on_device(self, prepared, single, per_sample, nsamp_seen):
        """The GPU update: new totals written beside the current ones and
        swapped in only when every gradient and weight was finite."""
        from ._cuda import arrays as device_arrays
        from ._cuda import importance as device_importance

        spares = self._spare
        totals = {}
        for name, _, n, *_ in prepared:
            totals[name] = self._acc.get(name) or {s: device_arrays.zeros(n) for s in self.stats}
            if name not in spares:
                spares[name] = {s: device_arrays.zeros(n) for s in self.stats}
        device_importance.accumulate(prepared, totals, spares, STATS)  # raises before anything is swapped in
        if self._single is None:
            self._single = single
        for name, shape, *_ in prepared:
            self._shapes.setdefault(name, shape)
            self._part.setdefault(name, {s: np.zeros(0, np.float32) for s in self.stats})
            self._acc[name], spares[name] = spares[name], totals[name]
        self.count += nsamp_seen if per_sample and nsamp_seen is not None else 1
        self.n_batches += 1

    def state(self, name: str | None = None) -> dict:
        """One tensor's statistics: ``{stat: array shaped like the weight}``
        plus ``"count"`` (samples or batches added). Arrays are copies."""
        key = "" if name is None else name
        if name is None and key not in self._acc and len(self._acc) == 1:
            key = next(iter(self._acc))  # one tensor: no name needed
        if key not in self._acc:
            if not self._acc:
                raise ValueError("the accumulator is empty: call update() first")
            if name is None:
                raise ValueError(f"state() needs the tensor's name: the accumulator holds {len(self._acc)} tensors "
                                 f"{self.names}; call state(name)")
            raise ValueError(f"no statistics for tensor {name!r}; known: {self.names}")
        out = self._sums(key)
        out["count"] = self.count
        return out

    def _sums(self, key):
        """Totals plus partials, as new float64 arrays of the weight's shape
        (device arrays for an accumulator on the GPU)."""
        shape = self._shapes[key]
        if self.device == "cuda":
            from ._cuda import arrays as device_arrays

            return {s: device_arrays.copy(a).reshape(shape) for s, a in self._acc[key].items()}
        part = self._part.get(key, {})
        return {s: (a + part[s] if s in part and part[s].size else a.copy()).reshape(shape)
                for s, a in self._acc[key].items()}

    def _flush(self):
        for key, part in self._part.items():
            for s, p in part.items():
                if p.size:
                    self._acc[key][s] += p
                    p[:] = 0
        self._pending = 0

    def scores(self, criterion: str | Callable, weights=None):
        """Scores of a criterion from the accumulated state: an array, or a
        dict by name for mapping use. ``weights`` as given to ``update``."""
        crit = get_criterion(criterion)
        if self._single:
            return crit(weights, self.state())
        wmap = weights or {}
        return {k: crit(wmap.get(k), self.state(k)) for k in self._shapes}

    def merge(self, other: "GradientAccumulator") -> "GradientAccumulator":
        """Add another accumulator's sums (another data shard); returns ``self``."""
        if not isinstance(other, GradientAccumulator):
            raise TypeError(f"merge takes a GradientAccumulator, got {type(other).__name__}")
        if other.stats != self.stats:
            raise ValueError(f"cannot merge statistics {other.stats} into {self.stats}")
        if other._shapes and self._shapes and (other.device == "cuda") != (self.device == "cuda"):
            raise ValueError(f"cannot merge an accumulator on {other.device!r} into one on {self.device!r}; "
                             f"state_dict() and from_state_dict(device=) move one over")
        self._flush()
        if self._shapes and other._shapes:
            if other._single != self._single or other._shapes != self._shapes:
                raise ValueError(f"cannot merge tensors {other._shapes} into {self._shapes}")
        if not other._shapes:
            return self
        if not self._shapes:
            self.device = other.device
            self.precision = other.precision if self.device == "cuda" else self.precision
            self._single = other._single
            self._shapes = dict(other._shapes)
            self._acc = {k: {s: a.reshape(a.size) for s, a in other._sums(k).items()} for k in other._shapes}
            period = _PRECISIONS[self.precision]
            self._part = {k: {s: np.zeros(a.size if period else 0, np.float32) for s, a in v.items()}
                          for k, v in self._acc.items()}
        else:
            for k in other._shapes:
                for s, a in other._sums(k).items():
                    if self.device == "cuda":
                        from ._cuda import importance as device_importance

                        device_importance.add_into(self._acc[k][s], a.reshape(a.size))
                    else:
                        self._acc[k][s] += a.reshape(-1)
        self.count += other.count
        self.n_batches += other.n_batches
        return self

    def reset(self) -> "GradientAccumulator":
        """Zero every statistic and counter, keeping names and shapes."""
        for d in (self._acc, self._part):
            for v in d.values():
                for k, a in v.items():
                    if self.device == "cuda" and d is self._acc:  # device arrays: new zeros
                        from ._cuda import arrays as device_arrays

                        v[k] = device_arrays.zeros(a.size)
                    else:
                        a[:] = 0
        self._pending = 0
        self.count = 0
        self.n_batches = 0
        return self

    def state_dict(self) -> dict:
        """A plain dict of arrays, for ``np.savez`` or any format.

        Keys are ``"<stat>:<tensor name>"`` (the name is empty for
        single-array use) plus ``"_meta:count"``, ``"_meta:n_batches"`` and
        ``"_meta:stats"``. Arrays are copies.
        """
        out = {"_meta:count": np.array(self.count, np.int64),
               "_meta:n_batches": np.array(self.n_batches, np.int64),
               "_meta:stats": np.array(self.stats),
               "_meta:precision": np.array(self.precision)}
        for k in self._shapes:
            for s, a in self._sums(k).items():
                out[f"{s}:{k}"] = a.copy_to_host() if self.device == "cuda" else a
        return out

    @classmethod
    def from_state_dict(cls, d: Mapping, device: str = "cpu") -> "GradientAccumulator":
        """Rebuild an accumulator saved by :meth:`state_dict` (``device="cuda"``: its sums on the GPU)."""
        try:
            stats = tuple(str(s) for s in np.asarray(d["_meta:stats"]).reshape(-1))
            count = int(d["_meta:count"])
            n_batches = int(d["_meta:n_batches"])
        except KeyError as exc:
            raise ValueError(f"not a GradientAccumulator state dict: missing {exc}") from None
        precision = str(d["_meta:precision"]) if "_meta:precision" in d else "float64"
        acc = cls(stats=stats, precision=precision)
        names = []
        for key, arr in d.items():
            if key.startswith("_meta:"):
                continue
            stat, _, name = key.partition(":")
            if stat not in stats:
                raise ValueError(f"state dict entry {key!r} names statistic {stat!r}, not among {stats}")
            a = np.asarray(arr, np.float64)
            if name not in acc._shapes:
                acc._shapes[name] = a.shape
                acc._acc[name] = {}
                names.append(name)
            elif acc._shapes[name] != a.shape:
                raise ValueError(f"state dict entries for {name!r} disagree on shape")
            acc._acc[name][stat] = a.reshape(-1).copy()
        period = _PRECISIONS[precision]
        for name in names:
            missing = [s for s in stats if s not in acc._acc[name]]
            if missing:
                raise ValueError(f"state dict lacks statistics {missing} for tensor {name!r}")
            acc._part[name] = {s: np.zeros(a.size if period else 0, np.float32)
                               for s, a in acc._acc[name].items()}
        if names:
            acc._single = names == [""]
        acc.count = count
        acc.n_batches = n_batches
        if device == "cuda":
            acc._flush()
            acc.device, acc.precision = "cuda", "float64"
            acc._acc = {k: {s: _device.cuda().to_device(a) for s, a in v.items()} for k, v in acc._acc.items()}
            acc._part = {k: {s: np.zeros(0, np.float32) for s in v} for k, v in acc._acc.items()}
        return acc
