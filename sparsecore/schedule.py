"""Sparsity schedules, gradual pruning and its replayable history.

A schedule is a plain function of the training step that returns the target
sparsity: :class:`ConstantSparsity`, :class:`PolynomialDecay` (Zhu & Gupta
2017), or any callable of your own. Schedule objects also say at which steps
they prune (``prunes_at``): from ``begin`` to ``end``, every ``frequency``
steps.

:class:`GradualPruner` prunes at those steps, each time only among the
entries still kept, so masks shrink monotonically. A schedule's sparsity is a
fraction of the whole tensor: 0.75 means 75% of the tensor is pruned after
that step, however much was pruned before. (``torch.nn.utils.prune`` counts
the other way: its ``amount`` applied again prunes a fraction of what is
left.) Each step is recorded in a :class:`PruningHistory`, plain data that
saves to a file and replays to the same masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ._atomic import AtomicPath
from ._validate import check_fraction
from .patterns import as_pattern, pattern_of
from .prune import PruneResult, prune

__all__ = ["ConstantSparsity", "GradualPruner", "PolynomialDecay", "PruningHistory", "PruningStep"]


def _step(value, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer step, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be a step >= 0, got {value}")
    return int(value)


def _window(begin, end, frequency, name):
    begin = _step(begin, f"{name} begin")
    if end is not None:
        end = _step(end, f"{name} end")
        if end < begin:
            raise ValueError(f"{name} ends at step {end}, before it begins at step {begin}")
    frequency = _step(frequency, f"{name} frequency")
    if frequency < 1:
        raise ValueError(f"{name} frequency must be at least 1 step, got {frequency}")
    return begin, end, frequency


def _prunes_at(step, begin, end, frequency):
    step = _step(step, "step")
    return step >= begin and (end is None or step <= end) and (step - begin) % frequency == 0


@dataclass(frozen=True)
class ConstantSparsity:
    """Prune to ``sparsity`` at every ``frequency`` steps from ``begin`` to
    ``end`` (``None``: no end); the target is 0 before ``begin``.

    Examples
    --------
    >>> import sparsecore as sc
    >>> s = sc.ConstantSparsity(0.5, begin=10, frequency=5)
    >>> s(0), s(10), s(99), s.prunes_at(15), s.prunes_at(16)
    (0.0, 0.5, 0.5, True, False)
    """

    sparsity: float
    begin: int = 0
    end: int | None = None
    frequency: int = 1

    def __post_init__(self):
        check_fraction(self.sparsity, "ConstantSparsity")
        _window(self.begin, self.end, self.frequency, "ConstantSparsity")

    def __call__(self, step: int) -> float:
        """The target sparsity at ``step``."""
        return float(self.sparsity) if _step(step, "step") >= self.begin else 0.0

    def prunes_at(self, step: int) -> bool:
        """Whether a pruner prunes at ``step``."""
        return _prunes_at(step, self.begin, self.end, self.frequency)


@dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity rising from ``initial`` to ``final`` between ``begin`` and ``end``:

    ``s_t = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power``,

    with ``t`` clipped to ``[begin, end]`` (Zhu & Gupta 2017, "To prune, or
    not to prune", eq. 1, where ``end - begin = n * dt``; ``power=3`` there).
    Pruning happens every ``frequency`` steps from ``begin`` to ``end``.

    Examples
    --------
    >>> import sparsecore as sc
    >>> s = sc.PolynomialDecay(0.2, 0.8, begin=100, end=110)
    >>> round(s(102), 6), round(s(105), 6), s(0), s(1000)
    (0.4928, 0.725, 0.2, 0.8)
    """

    initial: float
    final: float
    begin: int
    end: int
    power: float = 3.0
    frequency: int = 1

    def __post_init__(self):
        check_fraction(self.initial, "PolynomialDecay", "initial sparsity")
        check_fraction(self.final, "PolynomialDecay", "final sparsity")
        if self.initial > self.final:
            raise ValueError(f"PolynomialDecay from {self.initial} to {self.final} would lower the sparsity; "
                             f"a sparsity schedule never decreases")
        _window(self.begin, self.end, self.frequency, "PolynomialDecay")
        if self.end == self.begin:
            raise ValueError(f"PolynomialDecay needs end > begin, got both {self.begin}; "
                             f"for a single step use ConstantSparsity")
        if not (isinstance(self.power, (int, float, np.integer, np.floating)) and self.power > 0):
            raise ValueError(f"PolynomialDecay power must be a number > 0, got {self.power!r}")

    def __call__(self, step: int) -> float:
        """The target sparsity at ``step``."""
        t = min(max(_step(step, "step"), self.begin), self.end)
        if t == self.begin:  # the ends exactly, free of rounding
            return float(self.initial)
        if t == self.end:
            return float(self.final)
        p = (t - self.begin) / (self.end - self.begin)
        return float(self.final + (self.initial - self.final) * (1.0 - p) ** self.power)

    def prunes_at(self, step: int) -> bool:
        """Whether a pruner prunes at ``step``."""
        return _prunes_at(step, self.begin, self.end, self.frequency)


@dataclass
class PruningStep:
    """One pruning step: the target, how it was chosen, and what it pruned.

    ``pruned`` maps each tensor to the flat (C-order) indices this step
    pruned; ``sparsity`` to the fraction of the tensor pruned after it.
    """

    step: int
    target: float
    criterion: str
    scope: str
    pattern: str
    sparsity: dict = field(default_factory=dict)
    pruned: dict = field(default_factory=dict)


@dataclass
class PruningHistory:
    """The steps of a gradual pruning run, as plain data.

    Replays to the masks of any step without the weights or the scores that
    chose them (:meth:`masks`); saves to ``.npz`` (:meth:`save`, :meth:`load`)
    and converts to JSON-ready dicts (:meth:`to_dict`, :meth:`from_dict`).
    """

    shapes: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def masks(self, upto: int | None = None) -> dict:
        """Keep-masks after the last recorded step ``<= upto`` (all steps if None)."""
        out = {n: np.ones(int(np.prod(s)), np.bool_) for n, s in self.shapes.items()}
        for st in self.steps:
            if upto is not None and st.step > upto:
                break
            for n, idx in st.pruned.items():
                out[n][idx] = False
        return {n: m.reshape(self.shapes[n]) for n, m in out.items()}

    def to_dict(self) -> dict:
        """JSON-ready: lists and numbers only."""
        return {
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "steps": [{"step": s.step, "target": s.target, "criterion": s.criterion, "scope": s.scope,
                       "pattern": s.pattern, "sparsity": dict(s.sparsity),
                       "pruned": {n: np.asarray(i).tolist() for n, i in s.pruned.items()}} for s in self.steps],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PruningHistory:
        """Inverse of :meth:`to_dict`."""
        shapes = {n: tuple(int(v) for v in s) for n, s in d["shapes"].items()}
        steps = [PruningStep(int(s["step"]), float(s["target"]), str(s["criterion"]), str(s["scope"]),
                             str(s["pattern"]), {n: float(v) for n, v in s["sparsity"].items()},
                             {n: np.asarray(i, np.int64) for n, i in s["pruned"].items()})
                 for s in d["steps"]]
        return cls(shapes, steps)

    def save(self, path: str | os.PathLike) -> None:
        """Write the history to ``path`` (``.npz``: a JSON header and one int64
        array per step and tensor), atomically: a temporary file beside it,
        then a rename."""
        meta = self.to_dict()
        arrays = {}
        for i, st in enumerate(meta["steps"]):
            names = list(st["pruned"])
            for j, n in enumerate(names):
                arrays[f"s{i}_t{j}"] = np.asarray(self.steps[i].pruned[n], np.int64)
            st["pruned"] = names
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        with AtomicPath(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningHistory:
        """Read a history written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            for i, st in enumerate(meta["steps"]):
                st["pruned"] = {n: z[f"s{i}_t{j}"] for j, n in enumerate(st["pruned"])}
        return cls.from_dict(meta)


def _criterion_name(scores):
    if scores is None:
        return "magnitude"
    if isinstance(scores, str):
        return scores
    if isinstance(scores, Mapping):
        return "given scores"
    return str(getattr(scores, "name", getattr(scores, "__name__", type(scores).__name__)))


class GradualPruner:
    """Prune along a schedule, among the entries still kept at each step.

    Parameters
    ----------
    schedule : callable step -> sparsity
        :class:`ConstantSparsity`, :class:`PolynomialDecay` or a function.
        Objects with ``prunes_at(step)`` prune only at those steps; a plain
        function prunes at every call of :meth:`step`. The target is a
        fraction of the whole tensor (of all tensors in global scope) and
        must never decrease.
    scores : None, str, callable or mapping
        The default importance for each step (see :func:`sparsecore.prune`).
    scope, min_sparsity, max_sparsity, normalize, ignore, pattern
        As for :func:`sparsecore.prune`. An N:M pattern has a fixed sparsity
        and nothing to schedule.

    Attributes
    ----------
    masks : dict name -> ndarray of bool, or None before the first step
        (numba device arrays when the weights live on a GPU: every step then
        prunes on the device)
    history : PruningHistory

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> w = {"fc": np.random.default_rng(0).standard_normal((8, 8))}
    >>> p = sc.GradualPruner(sc.PolynomialDecay(0.0, 0.75, begin=0, end=4, frequency=2))
    >>> [round(float(1 - p.step(t, w).masks["fc"].mean()), 4) for t in (0, 2, 4)]
    [0.0, 0.6562, 0.75]
    >>> np.array_equal(p.history.masks()["fc"], p.masks["fc"])
    True
    """

    def __init__(self, schedule: Callable[[int], float], scores=None, *, scope: str = "local",
                 min_sparsity=0.0, max_sparsity=1.0, normalize: str = "none", ignore: Iterable[str] = (),
                 pattern=None):
        if not callable(schedule):
            raise TypeError(f"schedule must be a function of the step, got {type(schedule).__name__}")
        pattern = as_pattern(pattern)
        if pattern_of(pattern).fixes_sparsity:
            raise ValueError(f"an N:M pattern fixes the sparsity at {pattern.sparsity:g}; there is nothing "
                             f"to schedule: call prune(weights, pattern=...) once")
        self.schedule = schedule
        self.scores = scores
        self.options = dict(scope=scope, min_sparsity=min_sparsity, max_sparsity=max_sparsity,
                            normalize=normalize, ignore=tuple([ignore] if isinstance(ignore, str) else ignore),
                            pattern=pattern)
        self.masks = None
        self._host_masks = None
        self.history = PruningHistory()
        self._last = None

    def step(self, step: int, weights: Mapping, *, scores=None, state=None) -> PruneResult | None:
        """Prune at ``step`` if the schedule says so; return the result, or
        None when this is not a pruning step.

        ``scores`` overrides the default importance for this step; ``state``
        feeds gradient criteria. Entries already pruned stay pruned.
        """
        prunes_at = getattr(self.schedule, "prunes_at", None)
        if prunes_at is not None and not prunes_at(step):
            return None
        target = check_fraction(self.schedule(step), f"schedule at step {step}")
        if self._last is not None and target < self._last[1]:
            raise ValueError(f"the schedule lowers the sparsity from {self._last[1]} (step {self._last[0]}) "
                             f"to {target} (step {step}); a sparsity schedule never decreases")
        scores = self.scores if scores is None else scores
        r = prune(weights, scores, sparsity=target, state=state, masks=self.masks, **self.options)
        old = self._host_masks
        if not self.history.shapes:
            self.history.shapes = {n: tuple(s) for n, s in r.shapes.items()}
        # The history holds host indices; on a GPU the masks stay there for the next step.
        new = {n: m.copy_to_host() if hasattr(m, "copy_to_host") else m for n, m in r.masks.items()}
        pruned = {n: np.flatnonzero((old[n] if old is not None else True) & ~m) for n, m in new.items()}
        self._host_masks = new
        self.history.steps.append(PruningStep(
            int(step), float(target), _criterion_name(scores), self.options["scope"],
            repr(self.options["pattern"]) if self.options["pattern"] is not None else "unstructured",
            {s.name: s.sparsity for s in r.summary}, pruned))
        self.masks = r.masks
        self._last = (step, target)
        return r
