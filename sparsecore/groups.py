"""Coupled groups: slices of several tensors kept or removed together.

Removing attention head *h* means removing its rows in q, k and v and its
columns in the output projection; under grouped-query attention a k/v head
goes with all the query heads that read it. Removing channel *c* of an MLP
removes row *c* of gate and up and column *c* of down; a residual stream's
channel runs through every block of a stage. A :class:`Group` names such a
set: ``units`` units, and for each member tensor the entries along one axis
that each unit owns. :func:`sparsecore.prune` (``groups=``) selects whole
units with any criterion, reduced over every member (:func:`group_scores`),
locally or across groups; :func:`sparsecore.shrink` (``groups=``) cuts the
removed units out of every member, giving smaller dense arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from ._validate import as_float_array, is_integer

__all__ = ["Group", "group_scores", "kept_entries"]

_REDUCE = ("l1", "l2", "mean", "max")


class Group:
    """Units of several tensors kept or removed together.

    Parameters
    ----------
    name : str
        The group's name (its key in ``PruneResult.groups``).
    members : iterable of ``(tensor, axis)`` or ``(tensor, axis, index)``
        ``(tensor, axis)``: the tensor's entries along ``axis`` split into
        ``units`` equal consecutive blocks, block *u* owned by unit *u*
        (a head's ``head_dim`` rows, a query-head group's rows, one channel).
        ``(tensor, axis, index)``: an int array ``(units, k)`` (or
        ``(units,)``) of the entries along ``axis`` that each unit owns.
    units : int, optional
        The number of units; needed when a member has no index.
    reduce : {"l1", "l2", "mean", "max"}
        How a unit's entry scores over all members combine (see
        :func:`group_scores`).
    min_keep : int
        Units kept at least, whatever the selection.

    Examples
    --------
    >>> import sparsecore as sc
    >>> mlp = sc.Group("mlp0", [("gate", 0), ("up", 0), ("down", 1)], units=4)
    >>> [(t, a, i.tolist()) for t, a, i in mlp.resolve({"gate": (4, 3), "up": (4, 3), "down": (3, 4)})][2]
    ('down', 1, [[0], [1], [2], [3]])
    """

    def __init__(self, name: str, members: Iterable, units: int | None = None, *, reduce: str = "l2",
                 min_keep: int = 1):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a group needs a non-empty name, got {name!r}")
        self.name = name
        if reduce not in _REDUCE:
            raise ValueError(f"group {name!r}: reduce must be one of {list(_REDUCE)}, got {reduce!r}")
        self.reduce = reduce
        if not is_integer(min_keep) or min_keep < 0:
            raise ValueError(f"group {name!r}: min_keep must be an integer >= 0, got {min_keep!r}")
        self.min_keep = int(min_keep)
        self.members = []
        for m in members:
            if not isinstance(m, (tuple, list)) or len(m) not in (2, 3) or not isinstance(m[0], str) \
                    or not is_integer(m[1]):
                raise ValueError(f"group {name!r}: a member is (tensor name, axis) or (tensor name, axis, index), "
                                 f"got {m!r}")
            index = None
            if len(m) == 3:
                index = np.asarray(m[2])
                if index.dtype.kind not in "iu" or index.ndim not in (1, 2):
                    raise ValueError(f"group {name!r}: the index of member {m[0]!r} must be an int array "
                                     f"(units,) or (units, k), got {index.dtype} of shape {index.shape}")
                index = index.reshape(index.shape[0], -1).astype(np.int64)
                if units is not None and index.shape[0] != units:
                    raise ValueError(f"group {name!r}: the index of member {m[0]!r} has {index.shape[0]} rows for "
                                     f"{units} units")
                units = index.shape[0] if units is None else units
            self.members.append((m[0], int(m[1]), index))
        if not self.members:
            raise ValueError(f"group {name!r} has no members")
        if units is None or not is_integer(units) or units < 1:
            raise ValueError(f"group {name!r}: units must be a positive integer (or given by an index), "
                             f"got {units!r}")
        self.units = int(units)
        if self.min_keep > self.units:
            raise ValueError(f"group {name!r}: min_keep={self.min_keep} exceeds its {self.units} units")
        if len({(t, a) for t, a, _ in self.members}) != len(self.members):
            raise ValueError(f"group {name!r} names a tensor axis twice")

    def __repr__(self):
        return f"Group({self.name!r}, units={self.units}, members={[(t, a) for t, a, _ in self.members]})"

    def tensors(self) -> list[str]:
        """The member tensors' names, each once, in order."""
        return list(dict.fromkeys(t for t, _, _ in self.members))

    def resolve(self, shapes: Mapping[str, tuple], *, only_present: bool = False
                ) -> list[tuple[str, int, np.ndarray]]:
        """``(tensor, axis, index)`` of each member against the tensors'
        ``shapes``: the axis made non-negative, ``index`` ``(units, k)``
        checked to lie on the axis with no entry owned twice.
        ``only_present``: members whose tensor ``shapes`` lacks are skipped
        (otherwise refused)."""
        out = []
        for t, axis, index in self.members:
            if t not in shapes:
                if only_present:
                    continue
                raise ValueError(f"group {self.name!r} names tensor {t!r}, which is not among the weights")
            shape = tuple(shapes[t])
            if not -len(shape) <= axis < len(shape):
                raise ValueError(f"group {self.name!r}: axis {axis} of tensor {t!r} is out of range for its "
                                 f"shape {shape}")
            axis %= len(shape)
            n = shape[axis]
            if index is None:
                if n % self.units:
                    raise ValueError(f"group {self.name!r}: tensor {t!r} has {n} entries along axis {axis}, not a "
                                     f"multiple of the group's {self.units} units")
                index = np.arange(n, dtype=np.int64).reshape(self.units, n // self.units)
            elif index.size and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"group {self.name!r}: the index of tensor {t!r} reaches outside axis {axis} "
                                 f"({n} entries): {int(index.min())}..{int(index.max())}")
            if np.unique(index).size != index.size:
                raise ValueError(f"group {self.name!r}: the index of tensor {t!r} owns an entry twice")
            out.append((t, axis, index))
        return out

    def keep_masks(self, unit_keep: ArrayLike, shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
        """Element keep-masks of the member tensors for the units kept
        (``unit_keep``: bool, one per unit): False on every entry of a
        removed unit, True elsewhere."""
        keep = self._unit_keep(unit_keep)
        out = {}
        for t, axis, index in self.resolve(shapes):
            m = out.setdefault(t, np.ones(shapes[t], np.bool_))
            gone = index[~keep].reshape(-1)
            sl = [slice(None)] * m.ndim
            sl[axis] = gone
            m[tuple(sl)] = False
        return out

    def kept_indices(self, unit_keep: ArrayLike, shapes: Mapping[str, tuple]) -> list[tuple[str, int, np.ndarray]]:
        """``(tensor, axis, indices kept along axis, sorted)`` of each member."""
        keep = self._unit_keep(unit_keep)
        out = []
        for t, axis, index in self.resolve(shapes):
            gone = np.zeros(shapes[t][axis], np.bool_)
            gone[index[~keep].reshape(-1)] = True
            out.append((t, axis, np.flatnonzero(~gone)))
        return out

    def _unit_keep(self, unit_keep):
        k = np.asarray(unit_keep)
        if k.dtype != np.bool_ or k.shape != (self.units,):
            raise ValueError(f"the keep vector of group {self.name!r} must be bool of shape ({self.units},), got "
                             f"{k.dtype} of shape {k.shape}")
        return k


def group_scores(group: Group, scores: Mapping[str, ArrayLike], *, reduce: str | None = None) -> np.ndarray:
    """One score per unit of ``group``: the ``reduce`` (the group's by
    default: ``"l1"`` sum of magnitudes, ``"l2"`` root of the sum of
    squares, ``"mean"``, ``"max"``) of the scores of every entry the unit
    owns, over all member tensors named in ``scores`` (element scores shaped
    like the tensor: any criterion's). Members without scores are left out;
    at least one must have them. Float64.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> g = sc.Group("ch", [("a", 0), ("b", 1)], units=2)
    >>> sc.group_scores(g, {"a": np.array([[1.0], [2.0]]), "b": np.array([[3.0, 4.0]])}, reduce="l1")
    array([4., 6.])
    """
    reduce = group.reduce if reduce is None else reduce
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {list(_REDUCE)}, got {reduce!r}")
    shapes = {t: np.shape(scores[t]) for t in group.tensors() if t in scores}
    parts = []
    for t, axis, index in group.resolve(shapes, only_present=True):
        s = as_float_array(scores[t], t, "scores of tensor").astype(np.float64, copy=False)
        s = np.moveaxis(s, axis, 0)[index]  # (units, k, rest...)
        parts.append(s.reshape(group.units, -1))
    if not parts:
        raise ValueError(f"no scores for any member of group {group.name!r} ({group.tensors()})")
    a = np.concatenate(parts, axis=1)
    if a.shape[1] == 0:
        return np.zeros(group.units)
    if reduce == "l1":
        return np.abs(a).sum(axis=1)
    if reduce == "l2":
        return np.sqrt(np.square(a).sum(axis=1))
    if reduce == "mean":
        return a.mean(axis=1)
    return a.max(axis=1)


def kept_entries(groups: Iterable[Group], keep: Mapping[str, ArrayLike], shapes: Mapping[str, tuple]
                 ) -> dict[tuple[str, int], np.ndarray]:
    """What removing units leaves of each member tensor: ``(tensor, axis) ->``
    the sorted indices kept along that axis, for every axis a group of
    ``groups`` named in ``keep`` (group name -> bool per unit) cuts; a
    tensor axis that several groups cut keeps what none of them removes.
    Refuses a keep vector that leaves fewer than the group's ``min_keep``
    units (at least one), and names of no group.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> g = sc.Group("mlp", [("up", 0), ("down", 1)], units=3)
    >>> got = sc.kept_entries([g], {"mlp": np.array([True, False, True])}, {"up": (3, 2), "down": (2, 3)})
    >>> {k: v.tolist() for k, v in got.items()}
    {('up', 0): [0, 2], ('down', 1): [0, 2]}
    """
    by_name = {}
    for g in groups:
        if not isinstance(g, Group):
            raise TypeError(f"groups must hold sparsecore.Group objects, got {type(g).__name__}")
        by_name[g.name] = g
    unknown = [k for k in keep if k not in by_name]
    if unknown:
        raise ValueError(f"keep names unknown groups {unknown}; the groups are {list(by_name)}")
    gone = {}  # (tensor, axis) -> bool, True where a removed unit's entry lies
    for name, k in keep.items():
        g = by_name[name]
        k = np.asarray(k)
        if k.dtype == np.bool_ and k.shape == (g.units,) and k.sum() < max(g.min_keep, 1):
            raise ValueError(f"keep for group {name!r} keeps {int(k.sum())} of its {g.units} units; at least "
                             f"{max(g.min_keep, 1)} must stay")
        for t, axis, idx in g.kept_indices(k, shapes):
            drop = np.ones(shapes[t][axis], np.bool_)
            drop[idx] = False
            gone[(t, axis)] = drop | gone.get((t, axis), False)
    return {key: np.flatnonzero(~drop) for key, drop in gone.items()}
