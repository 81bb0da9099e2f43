"""``prune``: importance -> selection -> CSR weights, masks and a summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from . import _device
from ._kernels.keys import MODE_ABS, MODE_SQUARE
from ._source import NORM_KINDS, NORM_NONE
from ._validate import check_fraction, check_threshold, is_integer, per_name
from .csr import build_csr, csr_of_mask, to_dense
from .groups import Group, group_scores
from .importance import (
    GradientAccumulator,
    device_scores,
    get_criterion,
    has_device_scores,
)
from .patterns import ELEMENTS, flat_mask, pattern_of
from .selection import (
    kept_count,
    masked_count,
    norm_inverse,
    row_mask,
    scores_source,
    select_one,
    select_rules,
    threshold_rule,
    weights_array,
    weights_source,
)

__all__ = ["PruneResult", "TensorSummary", "prune"]


@dataclass(frozen=True)
class TensorSummary:
    """One tensor's line of the summary."""

    name: str
    shape: tuple
    size: int
    pruned: int
    nnz: int
    dense_bytes: int
    csr_bytes: int

    @property
    def sparsity(self):
        """Fraction of the entries that the selection pruned."""
        return self.pruned / self.size if self.size else 0.0

    @classmethod
    def of(cls, name, shape, itemsize, kept, a) -> "TensorSummary":
        """The line of a tensor of ``shape`` (dense entries of ``itemsize``
        bytes) of which ``kept`` entries were kept, stored as CSR ``a``."""
        size = int(np.prod(shape, dtype=np.int64))
        return cls(name, tuple(shape), size, size - int(kept), int(a.nnz), size * int(itemsize),
                   int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes))


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes
    ----------
    csr : dict name -> scipy.sparse.csr_array
        Canonical CSR of each pruned weight, 2-D (see :func:`matrix_shape`).
    masks : dict name -> ndarray of bool
        Keep-masks shaped like the weights (True = kept).
    shapes : dict name -> tuple
        The weights' own shapes, to restore with :meth:`dense`.
    summary : list of TensorSummary
        One line per pruned tensor, in the input order.
    ignored : list of str
        Names left alone by ``ignore=``.
    groups : dict name -> ndarray of bool
        For a :class:`Blocks` or :class:`Units` pattern, the keep-mask of the
        blocks ``(ceil(R / r), ceil(C / c))`` or of the units (1-D) of each
        tensor; empty otherwise.
    arrays : dict name -> ndarray
        The dense arrays a repair computed (:func:`reconstruct`,
        :func:`sparsegpt`), which :meth:`dense` copies instead of rebuilding
        them from the CSR; empty otherwise. A caller done with one may drop it.
    """

    csr: dict
    masks: dict
    shapes: dict
    summary: list
    ignored: list
    groups: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    def dense(self, name):
        """The pruned weight ``name`` as a new dense host array of its own shape."""
        if name in self.arrays:
            return self.arrays[name].copy()
        a = self.csr[name]
        return to_dense(a.to_scipy() if hasattr(a, "to_scipy") else a, self.shapes[name])

    def table(self):
        """The summary as a text table."""
        return format_table(self.summary, self.ignored)

    @classmethod
    def of_masks(cls, values: Mapping[str, ArrayLike], masks: Mapping[str, ArrayLike], *,
                 itemsizes: Mapping[str, int] | None = None, ignored=(), groups=None,
                 keep_arrays: bool = False) -> "PruneResult":
        """The result of weights ``values`` kept where ``masks`` (host arrays):
        CSR of the kept entries (float16 computed in float32), the summary
        (dense sizes from ``itemsizes``, by default the values' own);
        ``keep_arrays``: hold the values as :attr:`arrays` (they must be zero
        where pruned)."""
        csr, shapes, summary, arrays = {}, {}, [], {}
        for n, w in values.items():
            w = np.asarray(w)
            compute = w.astype(np.float32) if w.dtype == np.float16 else w
            a = csr_of_mask(compute, masks[n], name=n)
            csr[n] = a
            shapes[n] = tuple(w.shape)
            if keep_arrays:
                arrays[n] = compute  # what dense() gives, without going through the CSR
            size = w.dtype.itemsize if itemsizes is None else itemsizes[n]
            summary.append(TensorSummary.of(n, w.shape, size, np.count_nonzero(masks[n]), a))
        return cls(csr, dict(masks), shapes, summary, list(ignored), dict(groups or {}), arrays)

    @classmethod
    def combine(cls, results, ignored=()) -> "PruneResult":
        """One result of the results of several separate prunings (e.g. layer by layer), in their order."""
        out = cls({}, {}, {}, [], list(ignored), {}, {})
        for r in results:
            out.csr.update(r.csr)
            out.masks.update(r.masks)
            out.shapes.update(r.shapes)
            out.summary.extend(r.summary)
            out.groups.update(r.groups)
            out.arrays.update(r.arrays)
        return out


def format_table(summary, ignored=()):
    """A text table of :class:`TensorSummary` lines, with totals; the name and
    shape columns as wide as their longest entry."""
    nw = max([24] + [len(s.name) for s in summary] + [len(n) for n in ignored])
    sw = max([16] + [len(str(s.shape)) for s in summary])
    head = (f"{'tensor':<{nw}} {'shape':<{sw}} {'nnz':>10} {'sparsity':>9} {'dense B':>12} {'CSR B':>12} "
            f"{'ratio':>6}")
    lines = [head, "-" * len(head)]
    tot = [0, 0, 0, 0, 0]
    for s in summary:
        ratio = s.csr_bytes / s.dense_bytes if s.dense_bytes else 0.0
        lines.append(f"{s.name:<{nw}} {str(s.shape):<{sw}} {s.nnz:>10} {s.sparsity:>9.2%} "
                     f"{s.dense_bytes:>12} {s.csr_bytes:>12} {ratio:>6.2f}")
        for i, v in enumerate((s.size, s.pruned, s.nnz, s.dense_bytes, s.csr_bytes)):
            tot[i] += v
    sp_all = tot[1] / tot[0] if tot[0] else 0.0
    ratio = tot[4] / tot[3] if tot[3] else 0.0
    lines.append("-" * len(head))
    lines.append(f"{'total':<{nw}} {'':<{sw}} {tot[2]:>10} {sp_all:>9.2%} {tot[3]:>12} {tot[4]:>12} {ratio:>6.2f}")
    for name in ignored:
        lines.append(f"{name:<{nw}} (ignored)")
    return "\n".join(lines)


def _state_for(state, name):
    if state is None:
        return {}
    if isinstance(state, GradientAccumulator):
        return state.state(name)
    if isinstance(state, Mapping):
        if name not in state:
            raise ValueError(f"state has no entry for tensor {name!r}; it has {sorted(state)}")
        return state[name]
    raise TypeError(f"state must be a GradientAccumulator or a mapping name -> dict, got {type(state).__name__}")


def _sources(weights, names, scores, state, normalize, for_selection, pattern, on_device):
    """One :class:`~sparsecore._source.Source` per tensor, and the weights as
    float arrays (device arrays and device sources ``on_device``: the
    built-in criteria are computed by device kernels, a user's criterion
    receives device arrays). Where ``pattern`` takes them, a score array may
    also be 1-D with one score per unit."""
    warrs = {n: weights_array(weights[n], n, on_device) for n in names}
    device = "cuda" if on_device else "cpu"
    srcs = []
    if scores is None:
        scores = "magnitude"
    if isinstance(scores, Mapping):
        unknown = [k for k in scores if k not in weights]
        if unknown:
            raise ValueError(f"scores name unknown tensors {unknown}; weights have {list(weights)}")
        for n in names:
            if n not in scores:
                raise ValueError(f"scores lack tensor {n!r}; give scores for every pruned tensor "
                                 f"or list it in ignore=")
            src = scores_source(scores[n], n, device=device)
            wshape = tuple(warrs[n].shape)
            if pattern.takes_unit_scores(src.shape, wshape):
                src.per_unit = True  # one score per unit, used as given
            elif src.shape != wshape:
                raise ValueError(f"scores {n!r} have shape {src.shape} but weights {n!r} have shape {wshape}")
            srcs.append(src)
        return warrs, srcs
    crit = get_criterion(scores)
    mode = getattr(crit, "mode", None)
    for n in names:
        w = warrs[n]
        if mode is not None:
            m = mode
            if m == MODE_SQUARE and for_selection and normalize == "none" and w.dtype == np.float32:
                m = MODE_ABS  # exact squares of float32 keep |w|'s order and ties
            srcs.append(weights_source(w, n, m))
            continue
        if on_device and has_device_scores(crit):
            srcs.append(device_scores(crit, n, w, _state_for(state, n)))
            continue
        s = crit(w, _state_for(state, n))  # a user's criterion gets device arrays on the device
        cname = getattr(crit, "name", getattr(crit, "__name__", "criterion"))
        role = f"scores from criterion {cname!r} for"
        s = weights_array(s, n, on_device, role)
        if tuple(s.shape) != tuple(w.shape):
            raise ValueError(f"criterion {cname!r} returned scores of shape {tuple(s.shape)} for weights "
                             f"{n!r} of shape {tuple(w.shape)}")
        srcs.append(scores_source(s, n, role=role, device=device))
    return warrs, srcs


def _normalise(srcs, normalize):
    for src in srcs:
        inv = norm_inverse(src, normalize)
        if NORM_KINDS[normalize] != NORM_NONE:
            src.inv, src.scaled = inv, True


def prune(weights: Mapping[str, ArrayLike], scores=None, *,
          sparsity: float | Mapping[str, float] | None = None,
          threshold: float | Mapping[str, float] | None = None, scope: str = "local", state=None,
          min_sparsity: float | Mapping[str, float] = 0.0, max_sparsity: float | Mapping[str, float] = 1.0,
          normalize: str = "none", ignore: Iterable[str] = (), pattern=None,
          masks: Mapping[str, ArrayLike] | None = None, device: str = "auto",
          column_block: int | None = None, groups: Iterable[Group] | None = None) -> PruneResult:
    """Prune a set of weights and return CSR weights, masks and a summary.

    Parameters
    ----------
    weights : mapping name -> array_like of float
        The tensors, any shapes (float16 is computed in float32).
    scores : None, str, Criterion, callable or mapping name -> array
        Importance. ``None`` is magnitude ``|w|``; a registered criterion
        name (see :func:`list_criteria`) or a callable ``(weights, state) ->
        scores`` is evaluated per tensor with ``state``; a mapping gives the
        scores directly (with a :class:`Units` pattern, also one score per
        unit, e.g. per-unit mutual information).
    sparsity : float or mapping name -> float, optional
        Fraction to prune: exactly ``round(sparsity * n)`` entries per tensor
        (local), or ``round(sparsity * N)`` of all N entries (global). With a
        :class:`Blocks` or :class:`Units` pattern, n counts blocks or units.
    threshold : float or mapping name -> float, optional
        Prune where the (normalised) score is below it. Exactly one of
        ``sparsity`` and ``threshold``, or neither for an N:M pattern.
    scope : {"local", "global", "row"}
        Global selection ranks all tensors' scores together with one exact
        threshold. ``"row"`` ranks within each output row of a tensor's 2-D
        view (as Wanda and SparseGPT compare weights): exactly
        ``round(sparsity * cols)`` entries of every row are pruned (the
        reference code of both prunes ``int(sparsity * cols)``, which rounds
        down); with ``column_block``, within each block of that many
        consecutive columns of a row. Unstructured, on the CPU.
    state : GradientAccumulator or mapping name -> dict, optional
        Statistics for gradient criteria.
    min_sparsity, max_sparsity : float or mapping name -> float
        Per-tensor caps, so that no layer collapses (global scope and
        thresholds; a local or per-row sparsity is exact by definition, and
        one outside its caps is refused).
    normalize : {"none", "l1", "l2", "max"}
        Divide each tensor's scores (block or unit scores under a pattern) by
        their norm before comparing across tensors (raw scores of different
        layers are not comparable).
    ignore : iterable of str
        Names left unpruned; they are listed in ``result.ignored``.
    pattern : None, "N:M", NM, Blocks or Units
        Unstructured (None), N:M semi-structured, blocks, or whole units;
        see :mod:`sparsecore.patterns`.
    masks : mapping name -> array of bool, optional
        Current keep-masks (iterative pruning): entries they prune stay
        pruned and are counted first, so the new masks are subsets of them.
        A sparsity is still a fraction of the whole tensor, not of what is
        left (``torch.nn.utils.prune`` counts the other way).
    column_block : int, optional
        With ``scope="row"``: the width of the column blocks ranked apart.
    groups : iterable of Group, optional
        Coupled groups (:class:`sparsecore.Group`): whole units, each a slice
        of several tensors, kept or removed together. Each unit's score is
        the group's reduction of the criterion's scores over every entry it
        owns (or ``scores[group.name]``, one per unit, given directly); a
        ``sparsity`` or ``threshold`` applies to units, per group
        (``"local"``, exact) or across groups (``"global"``, with the caps
        per group name and at least ``min_keep`` units of each group kept).
        Only member tensors are pruned (the others are listed in
        ``ignored``); a tensor in several groups gets the intersection of
        their masks; ``result.groups`` holds each group's unit keep-mask. On
        the CPU, without ``pattern``, ``masks`` or ``column_block``.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` when a weight or a score array lives on a
        GPU: anything with ``__cuda_array_interface__``) runs everything on the GPU with
        the same rules and the same masks and CSR structure: ``csr`` holds
        :class:`sparsecore.cuda.DeviceCSR` and ``masks``/``groups`` numba
        device arrays. See :func:`sparsecore.cuda.prune`.

    Returns
    -------
    PruneResult

    Raises
    ------
    TypeError
        Non-float arrays, a wrong kind of argument.
    ValueError
        NaN/Inf, shape or name mismatches, fractions outside [0, 1], NaN
        thresholds, caps that make the target impossible, unknown options,
        a pattern that does not fit a tensor, a sparsity below what
        ``masks`` already prune.

    Notes
    -----
    Ties are pruned lower flat index first, and, in global scope, earlier
    tensors (in the mapping's order) first. The k-th score is found by a
    radix select over integer keys of the scores (see ``sparsecore.selection``).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> w = {"fc1": rng.standard_normal((8, 4)), "fc2": rng.standard_normal((2, 8))}
    >>> r = sc.prune(w, sparsity=0.5, scope="global")
    >>> sum(s.pruned for s in r.summary)
    24
    >>> r.csr["fc1"].shape
    (8, 4)
    >>> sc.prune(w, pattern="2:4").masks["fc2"].sum(axis=1)
    array([4, 4])
    >>> sc.prune(w, pattern=sc.Units(), sparsity=0.25).groups["fc1"]
    array([False,  True,  True,  True,  True,  True,  True, False])
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}; "
                        f"for one array pass {{'weight': array}}")
    if groups is not None:
        if pattern is not None or masks is not None or column_block is not None or list(ignore):
            raise ValueError("groups= selects whole units itself: pattern=, masks=, column_block= and ignore= do "
                             "not combine with it")
        if device == "cuda" or _device.resolve(device, *weights.values()) == "cuda":
            raise ValueError("groups= runs on the CPU; pass host arrays (device='cpu')")
        return _prune_groups(weights, scores, list(groups), sparsity=sparsity, threshold=threshold, scope=scope,
                             state=state, min_sparsity=min_sparsity, max_sparsity=max_sparsity, normalize=normalize)
    given = list(weights.values()) + (list(scores.values()) if isinstance(scores, Mapping) else [])
    on_device = _device.resolve(device, *given) == "cuda"  # "auto": any weight or score on a GPU
    pattern, ignore, names = check_call(weights, sparsity, threshold, scope, normalize, ignore, pattern,
                                        column_block, masks)
    current = _check_masks(masks, weights, names, on_device)
    warrs, srcs = _sources(weights, names, scores, state, normalize,
                           sparsity is not None and pattern is ELEMENTS and current is None, pattern, on_device)
    srcs = [pattern.group_source(src) for src in srcs]
    if not pattern.fixes_sparsity:
        _normalise(srcs, normalize)
    done = None
    if current is not None and not pattern.fixes_sparsity:
        # What the current masks prune is lowered below every score: selected first, and counted.
        done = np.zeros(len(srcs), np.int64)
        for i, src in enumerate(srcs):
            srcs[i], done[i] = src.with_pruned(pattern.all_kept(current[src.name], warrs[src.name].shape))
    plan = plan_selection(srcs, names, sparsity=sparsity, threshold=threshold, scope=scope,
                          min_sparsity=min_sparsity, max_sparsity=max_sparsity, pattern=pattern, done=done,
                          column_block=column_block)

    csr, out_masks, shapes, summary, groups = {}, {}, {}, [], {}
    for i, src in enumerate(srcs):
        n = src.name
        w = warrs[n]
        a, mask, group, kept = select_tensor(src, w, plan, i, pattern, current[n] if current else None)
        if group is not None:
            groups[n] = group
        csr[n] = a
        out_masks[n] = mask.reshape(w.shape)
        shapes[n] = tuple(w.shape)
        summary.append(TensorSummary.of(n, w.shape, w.dtype.itemsize, kept, a))
    return PruneResult(csr, out_masks, shapes, summary, ignore, groups)


def check_options(sparsity, threshold, scope, normalize, pattern, column_block=None, masks=None):
    """The checks of ``prune``'s options that need no tensor: returns the
    pattern object (:data:`~sparsecore.patterns.ELEMENTS` for none). Offline
    pruning and the command line make the same checks, with the same
    messages."""
    if scope not in ("local", "global", "row"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r} (or 'row', to rank within each "
                         f"output row)")
    if column_block is not None:
        if not is_integer(column_block) or column_block < 1:
            raise ValueError(f"column_block must be a positive integer, got {column_block!r}")
        if scope != "row":
            raise ValueError("column_block ranks blocks of a row apart: it needs scope='row'")
    if normalize not in NORM_KINDS:
        raise ValueError(f"normalize must be one of {list(NORM_KINDS)}, got {normalize!r}")
    pattern = pattern_of(pattern)
    if pattern.fixes_sparsity:
        if sparsity is not None or threshold is not None:
            raise ValueError(f"an N:M pattern fixes the sparsity at 1 - {pattern.n}/{pattern.m}; "
                             f"give neither sparsity= nor threshold=")
    elif (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity= and threshold=")
    if scope == "row":
        if threshold is not None:
            raise ValueError("scope='row' ranks within rows for a sparsity; a threshold compares each entry "
                             "alone: use scope='local'")
        if pattern is not ELEMENTS:
            raise ValueError(f"scope='row' selects single entries; a {type(pattern).__name__} pattern has its "
                             f"own groups: use scope='local' or 'global'")
        if masks is not None:
            raise ValueError("scope='row' does not take current masks (masks=): an exact count per row and "
                             "masks that only grow can contradict each other")
    return pattern


def check_call(weights, sparsity, threshold, scope, normalize, ignore, pattern, column_block=None, masks=None):
    """``prune``'s argument checks: ``(pattern, ignore list, pruned names)``."""
    pattern = check_options(sparsity, threshold, scope, normalize, pattern, column_block, masks)
    if isinstance(ignore, str):
        ignore = (ignore,)
    ignore = list(ignore)
    unknown = [n for n in ignore if n not in weights]
    if unknown:
        raise ValueError(f"ignore names unknown tensors {unknown}; weights have {list(weights)}")
    names = [n for n in weights if n not in ignore]
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"tensor names must be strings, got {n!r}")
    return pattern, ignore, names


@dataclass
class SelectionPlan:
    """How each tensor is selected: its rule (``None``: the ``count`` lowest
    scores, found when the tensor is selected, so that a file is read once),
    and its caps ``[lo, hi]`` in entries (blocks, units), which a threshold
    rule must respect (``capped``)."""

    rules: list
    counts: list
    lo: np.ndarray
    hi: np.ndarray
    capped: bool
    row_fractions: list | None = None  # scope="row": per tensor, the fraction of every row to prune
    column_block: int | None = None

    def rule(self, i, src):
        """Tensor ``i``'s rule, on its in-memory source."""
        return self.rules[i] if self.rules[i] is not None else select_one(src, self.counts[i])

    def recapped(self, i, src, pruned):
        """``None``, or when the rule's ``pruned`` count leaves the caps (a
        threshold), the rule pruning exactly the capped count of the tensor's
        own lowest scores."""
        if not self.capped or self.lo[i] <= pruned <= self.hi[i]:
            return None
        return select_one(src, min(max(pruned, int(self.lo[i])), int(self.hi[i])))


def plan_selection(srcs, names, *, sparsity, threshold, scope, min_sparsity, max_sparsity, pattern=ELEMENTS,
                   done=None, column_block=None, executor=None) -> SelectionPlan:
    """The caps and rules of all sources (host, device, or read lazily from a
    file); ``done``: per source, the entries (blocks, units) that current
    masks already prune, or None; ``executor``: where the passes over the
    sources' data run (see :func:`sparsecore.selection.each_source`)."""
    names = list(names)
    sizes = np.array([s.size for s in srcs], np.int64)
    lo = per_name(min_sparsity, names, "min_sparsity", lambda v, n: check_fraction(v, n, "min_sparsity"))
    hi = per_name(max_sparsity, names, "max_sparsity", lambda v, n: check_fraction(v, n, "max_sparsity"))
    lo_f = np.array([lo[n] for n in names], np.float64)
    hi_f = np.array([hi[n] for n in names], np.float64)
    for t in np.flatnonzero(lo_f > hi_f)[:1]:
        n = names[t]
        raise ValueError(f"min_sparsity {lo[n]} exceeds max_sparsity {hi[n]} for {n!r}")
    # round(f * size) for every tensor at once (np.rint rounds half to even, as round does)
    lo_c = np.rint(lo_f * sizes).astype(np.int64)
    hi_c = np.rint(hi_f * sizes).astype(np.int64)
    # a cap below 1 keeps at least one entry, however small the tensor (round(0.99 * n) == n for n <= 50)
    hi_c = np.where((hi_f < 1) & (sizes > 0), np.minimum(hi_c, sizes - 1), hi_c)
    lo_c = np.minimum(lo_c, hi_c)
    lo_c, hi_c = pattern.cap_counts(lo_c, hi_c, sizes)
    if done is not None:
        _check_growth(names, done, sizes, hi_c, sparsity, scope, pattern)
        lo_c = np.maximum(lo_c, done)

    rules, counts = [None] * len(srcs), [0] * len(srcs)
    if pattern.fixes_sparsity:
        pass
    elif scope == "row":
        sp_t = per_name(sparsity, names, "sparsity", check_fraction)
        _check_within_caps(sp_t, lo, hi, scope)
        return SelectionPlan(rules, counts, lo_c, hi_c, False, [sp_t[n] for n in names], column_block)
    elif sparsity is not None:
        if scope == "global":
            if isinstance(sparsity, Mapping):
                raise TypeError("a global sparsity is one number; per-tensor targets need scope='local'")
            s = check_fraction(sparsity, "all tensors")
            target = round(s * int(sizes.sum()))
            if not (lo_c.sum() <= target <= hi_c.sum()):
                raise ValueError(f"global sparsity {s} prunes {target} of {int(sizes.sum())} entries, but the "
                                 f"caps allow {int(lo_c.sum())} to {int(hi_c.sum())}; change sparsity or the "
                                 f"min_sparsity/max_sparsity caps")
            if srcs:
                rules = select_rules(srcs, target=target, lo=lo_c, hi=hi_c, executor=executor)
        else:
            sp_t = per_name(sparsity, names, "sparsity", check_fraction)
            counts = np.rint(np.array([sp_t[n] for n in names], np.float64) * sizes).astype(np.int64).tolist()
            if pattern.clips_counts or done is not None:
                counts = [min(max(k, int(a)), int(b)) for k, a, b in zip(counts, lo_c, hi_c)]
            else:
                _check_within_caps(sp_t, lo, hi, scope)
    else:
        th = per_name(threshold, names, "threshold", check_threshold)
        rules = [threshold_rule(src, th[src.name]) for src in srcs]
    return SelectionPlan(rules, counts, lo_c, hi_c, threshold is not None)


def _check_within_caps(sp_t, lo, hi, scope):
    """A local (or per-row) sparsity is exact: caps that it breaks are refused, not ignored."""
    for n, v in sp_t.items():
        if not lo[n] <= v <= hi[n]:
            raise ValueError(f"sparsity {v} for {n!r} lies outside its caps min_sparsity={lo[n]}, "
                             f"max_sparsity={hi[n]}; scope={scope!r} prunes each tensor to exactly its sparsity "
                             f"(the caps bind in scope='global' and with thresholds)")


def select_tensor(src, w, plan, i, pattern=ELEMENTS, current=None, want_csr=True):
    """Select tensor ``i`` of ``plan``: ``(csr or None, flat keep-mask, group
    keep-mask or None, kept entries)``. ``src`` holds its (group) scores and
    ``w`` its weights, both on the host or both on the device; ``current``:
    its flat current mask, which the new mask stays within."""
    if pattern.fixes_sparsity:
        mask, group = pattern.keep_mask(src), None
    elif plan.row_fractions is not None:
        mask, group = row_mask(src, plan.row_fractions[i], plan.column_block), None
    elif pattern is ELEMENTS and current is None:  # one fused pass: selection, mask and CSR
        a, mask, pruned = build_csr(w, src, plan.rule(i, src), want_mask=True, want_csr=want_csr, name=src.name)
        rule = plan.recapped(i, src, pruned)
        if rule is not None:
            a, mask, pruned = build_csr(w, src, rule, want_mask=True, want_csr=want_csr, name=src.name)
        return a, mask, None, mask.size - pruned
    else:
        keep, pruned = masked_count(src, plan.rule(i, src))
        rule = plan.recapped(i, src, pruned)
        if rule is not None:
            keep, _ = masked_count(src, rule)
        keep = flat_mask(keep)
        group = keep.reshape(src.shape) if pattern.groups else None
        mask = pattern.expand(keep, w.shape)
    kept = kept_count(mask, current)
    return (csr_of_mask(w, mask, name=src.name) if want_csr else None), mask, group, kept


def _check_masks(masks, weights, names, on_device=False):
    """The current masks by name, checked and flat (on the device with
    ``on_device``); a tensor without one keeps all of it."""
    if masks is None:
        return None
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool array, got {type(masks).__name__}")
    unknown = [k for k in masks if k not in weights]
    if unknown:
        raise ValueError(f"masks name unknown tensors {unknown}; weights have {list(weights)}")
    out = {}
    for n in names:
        shape = tuple(np.shape(weights[n]))
        size = int(np.prod(shape, dtype=np.int64))
        if n not in masks:
            out[n] = np.ones(size, np.bool_)
        else:
            m = _device.to_device(masks[n]) if on_device and _device.is_device_array(masks[n]) else \
                np.asarray(masks[n])
            if m.dtype != np.bool_:
                raise TypeError(f"mask {n!r} has dtype {m.dtype}; pass a bool array (True = kept)")
            if tuple(m.shape) != shape:
                raise ValueError(f"mask {n!r} has shape {tuple(m.shape)} but weights {n!r} have shape {shape}")
            out[n] = flat_mask(m) if _device.is_device_array(m) else m.reshape(-1)
        if on_device and not _device.is_device_array(out[n]):
            out[n] = _device.to_device(out[n])
    return out


def _check_growth(names, done, sizes, hi_c, sparsity, scope, pattern):
    """Current masks only grow: refuse targets and caps below what they prune."""
    what = pattern.counted
    for n, d, size, h in zip(names, done, sizes, hi_c):
        if d > h:
            raise ValueError(f"masks already prune {d} of {size} {what} of {n!r}, more than the "
                             f"{int(h)} that max_sparsity (or min_keep) allows; masks only grow")
    if sparsity is None:
        return
    if scope == "global":
        if not isinstance(sparsity, Mapping) and round(float(sparsity) * int(sizes.sum())) < int(done.sum()):
            raise ValueError(f"masks already prune {int(done.sum())} of {int(sizes.sum())} {what}, more than "
                             f"global sparsity {sparsity}; a sparsity counts the whole tensors and "
                             f"masks only grow")
        return
    for n, d, size in zip(names, done, sizes):
        sp_n = sparsity[n] if isinstance(sparsity, Mapping) else sparsity
        if isinstance(sp_n, (int, float, np.integer, np.floating)) and round(float(sp_n) * int(size)) < d:
            raise ValueError(f"masks already prune {d} of {size} {what} of {n!r} "
                             f"({d / size:.4g}), more than sparsity {sp_n}; a sparsity counts the "
                             f"whole tensor and masks only grow")


def _prune_groups(weights, scores, groups, *, sparsity, threshold, scope, state, min_sparsity, max_sparsity,
                  normalize):
    """:func:`prune` with ``groups``: units scored over their members, selected as 1-D tensors of unit
    scores (every rule of the selection: exact counts, thresholds, global ranks with caps), then expanded to
    element masks of the members."""
    if not groups:
        raise ValueError("groups= is empty; give at least one sparsecore.Group")
    for g in groups:
        if not isinstance(g, Group):
            raise TypeError(f"groups must hold sparsecore.Group objects, got {type(g).__name__}")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope with groups must be 'local' or 'global', got {scope!r}")
    arrays = {}
    for t in dict.fromkeys(t for g in groups for t in g.tensors()):
        if t not in weights:
            raise ValueError(f"group {next(g.name for g in groups if t in g.tensors())!r} names tensor {t!r}, "
                             f"which is not among the weights")
        w = np.asarray(weights[t])
        if w.dtype.kind != "f":
            raise TypeError(f"weights {t!r} have dtype {w.dtype}; pass floating-point weights")
        arrays[t] = w
    shapes = {t: w.shape for t, w in arrays.items()}
    for g in groups:
        g.resolve(shapes)  # every member checked before any score is computed
    elem = {}

    def element_scores(t):
        if t not in elem:
            w = np.asarray(arrays[t], np.float64)
            if scores is None:
                elem[t] = np.abs(w)
            elif isinstance(scores, Mapping):
                elem[t] = scores.get(t)
            else:
                crit = get_criterion(scores)
                elem[t] = np.asarray(crit(w, _state_for(state, t)), np.float64)
                if elem[t].shape != w.shape:
                    raise ValueError(f"criterion returned scores of shape {elem[t].shape} for weights {t!r} of "
                                     f"shape {w.shape}")
        return elem[t]

    units = {}
    for g in groups:
        if isinstance(scores, Mapping) and g.name in scores:
            u = np.asarray(scores[g.name], np.float64)
            if u.shape != (g.units,):
                raise ValueError(f"scores of group {g.name!r} must hold one per unit ({g.units},), got shape "
                                 f"{u.shape}")
        else:
            u = group_scores(g, {t: s for t in g.tensors() if (s := element_scores(t)) is not None})
        if not np.all(np.isfinite(u)):
            raise ValueError(f"scores of group {g.name!r} hold NaN or Inf")
        units[g.name] = u
    if scope == "global":  # at least min_keep units of every group stay
        given = per_name(max_sparsity, names, "max_sparsity", check_fraction)
        caps = {g.name: min(given[g.name], (g.units - g.min_keep) / g.units) for g in groups}
    else:
        caps = max_sparsity
    chosen = prune(units, units, sparsity=sparsity, threshold=threshold, scope=scope, min_sparsity=min_sparsity,
                   max_sparsity=caps, normalize=normalize)
    keep = {g.name: np.asarray(chosen.masks[g.name]) for g in groups}
    for g in groups:
        if int(keep[g.name].sum()) < g.min_keep:
            raise ValueError(f"group {g.name!r} would keep {int(keep[g.name].sum())} of its {g.units} units, fewer "
                             f"than its min_keep={g.min_keep}; lower the sparsity")
    masks = {}
    for g in groups:
        for t, m in g.keep_masks(keep[g.name], shapes).items():
            masks[t] = m if t not in masks else masks[t] & m
    return PruneResult.of_masks({t: arrays[t] for t in masks}, masks,
                                ignored=[n for n in weights if n not in masks], groups=keep)
