"""``prune``: importance -> selection -> CSR weights, masks and a summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from . import _device
from ._kernels.keys import MODE_ABS, MODE_IDENTITY, MODE_SQUARE, key_of
from ._validate import as_float_array, check_fraction, check_threshold, flat, per_name
from .csr import build_csr, matrix_shape, to_dense
from .importance import GradientAccumulator, get_criterion
from .patterns import (
    NM,
    Blocks,
    Units,
    as_pattern,
    block_source_scores,
    expand_blocks,
    group_source,
    nm_source_mask,
    unit_mask,
    unit_source_scores,
)
from .selection import (
    _NORMS,
    Rule,
    Source,
    _mask_from,
    norm_inverse,
    scores_source,
    select_rules,
    threshold_rule,
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
    """

    csr: dict
    masks: dict
    shapes: dict
    summary: list
    ignored: list
    groups: dict = field(default_factory=dict)

    def dense(self, name):
        """The pruned weight ``name`` as a dense host array of its own shape."""
        a = self.csr[name]
        return to_dense(a.to_scipy() if hasattr(a, "to_scipy") else a, self.shapes[name])

    def table(self):
        """The summary as a text table."""
        return format_table(self.summary, self.ignored)


def format_table(summary, ignored=()):
    """A text table of :class:`TensorSummary` lines, with totals."""
    head = f"{'tensor':<24} {'shape':<16} {'nnz':>10} {'sparsity':>9} {'dense B':>12} {'CSR B':>12} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    tot = [0, 0, 0, 0, 0]
    for s in summary:
        ratio = s.csr_bytes / s.dense_bytes if s.dense_bytes else 0.0
        lines.append(f"{s.name:<24} {str(s.shape):<16} {s.nnz:>10} {s.sparsity:>9.2%} "
                     f"{s.dense_bytes:>12} {s.csr_bytes:>12} {ratio:>6.2f}")
        for i, v in enumerate((s.size, s.pruned, s.nnz, s.dense_bytes, s.csr_bytes)):
            tot[i] += v
    sp_all = tot[1] / tot[0] if tot[0] else 0.0
    ratio = tot[4] / tot[3] if tot[3] else 0.0
    lines.append("-" * len(head))
    lines.append(f"{'total':<24} {'':<16} {tot[2]:>10} {sp_all:>9.2%} {tot[3]:>12} {tot[4]:>12} {ratio:>6.2f}")
    for name in ignored:
        lines.append(f"{name:<24} (ignored)")
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


def _sources(weights, names, scores, state, normalize, for_selection, unit_axis=None, device=False):
    """One :class:`Source` per tensor, and the weights as float arrays.

    With ``unit_axis`` (a :class:`Units` pattern), a score array may also be
    1-D with one score per unit. With ``device``, the weights are device
    arrays and the sources ``sparsecore.cuda.DeviceSource``: the built-in
    criteria are computed by device kernels, a user's criterion receives
    device arrays.
    """
    if device:
        from . import cuda

        as_float = cuda.float_array
    else:
        as_float = as_float_array
    warrs = {n: as_float(weights[n], n, "weights") for n in names}
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
            src = scores_source(scores[n], n, device="cuda" if device else "cpu")
            wshape = tuple(warrs[n].shape)
            if (unit_axis is not None and len(src.shape) == 1 and len(wshape) > 1
                    and -len(wshape) <= unit_axis < len(wshape) and src.shape[0] == wshape[unit_axis]):
                src.role = "unit scores"  # one score per unit, used as given
                if device:
                    src.wide = True  # the CPU takes them as float64
            elif src.shape != wshape:
                raise ValueError(f"scores {n!r} have shape {src.shape} but weights {n!r} have shape {wshape}")
            srcs.append(src)
    else:
        crit = get_criterion(scores)
        mode = getattr(crit, "mode", None)
        for n in names:
            w = warrs[n]
            if mode is not None:
                m = mode
                if m == MODE_SQUARE and for_selection and normalize == "none" and w.dtype == np.float32:
                    m = MODE_ABS  # exact squares of float32 keep |w|'s order and ties
                srcs.append(cuda.device_source(n, w, m, role="weights") if device else
                            Source(n, flat(w), w.shape, m, role="weights", original=w))
                continue
            if device and cuda.has_device_criterion(crit):
                srcs.append(cuda.criterion_source(crit, n, w, _state_for(state, n)))
                continue
            s = crit(w, _state_for(state, n))  # a user's criterion gets device arrays on the device
            cname = getattr(crit, "name", getattr(crit, "__name__", "criterion"))
            s = as_float(s, n, f"scores from criterion {cname!r} for")
            if tuple(s.shape) != tuple(w.shape):
                raise ValueError(f"criterion {cname!r} returned scores of shape {tuple(s.shape)} for weights "
                                 f"{n!r} of shape {tuple(w.shape)}")
            srcs.append(cuda.device_source(n, s, role=f"scores from criterion {cname!r} for") if device else
                        Source(n, flat(s), s.shape, MODE_IDENTITY, original=s))
    return warrs, srcs


def _normalise(srcs, normalize):
    for src in srcs:
        inv = norm_inverse(src, normalize)
        if _NORMS[normalize]:
            src.inv, src.scaled = inv, True


# Score given to entries that current masks have already pruned: below every
# finite score, so that a selection takes them first. Real scores at or below
# it (|s| ~ 1.8e308) are lifted one ulp above.
_PRUNED = -np.finfo(np.float64).max


def _materialise(src, pruned):
    """A copy of ``src``'s transformed scores with ``pruned`` entries lowest."""
    x = src.data.astype(np.float64)
    if src.mode == MODE_ABS:
        np.abs(x, out=x)
    elif src.mode == MODE_SQUARE:
        np.multiply(x, x, out=x)
    if src.scaled:
        x *= src.inv
    np.maximum(x, np.nextafter(_PRUNED, 0.0), out=x)
    x[pruned] = _PRUNED
    return Source(src.name, x, src.shape, MODE_IDENTITY, role=src.role, original=src.original)


def _group_all_kept(mask, shape, pattern, name):
    """Per block or unit: whether the current element mask keeps all of it."""
    m = Source(name, flat(mask).astype(np.float32), tuple(shape), MODE_IDENTITY, role="mask")
    if isinstance(pattern, Blocks):
        pooled = block_source_scores(m, Blocks(pattern.shape, "mean"))
    else:
        pooled = unit_source_scores(m, Units(pattern.axis, "mean"))
    return pooled.reshape(-1) == 1.0


def prune(weights: Mapping[str, ArrayLike], scores=None, *,
          sparsity: float | Mapping[str, float] | None = None,
          threshold: float | Mapping[str, float] | None = None, scope: str = "local", state=None,
          min_sparsity: float | Mapping[str, float] = 0.0, max_sparsity: float | Mapping[str, float] = 1.0,
          normalize: str = "none", ignore: Iterable[str] = (), pattern=None,
          masks: Mapping[str, ArrayLike] | None = None, device: str = "auto") -> PruneResult:
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
    scope : {"local", "global"}
        Global selection ranks all tensors' scores together with one exact
        threshold.
    state : GradientAccumulator or mapping name -> dict, optional
        Statistics for gradient criteria.
    min_sparsity, max_sparsity : float or mapping name -> float
        Per-tensor caps, so that no layer collapses (global scope and
        thresholds; a local sparsity is exact by definition).
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
    given = list(weights.values()) + (list(scores.values()) if isinstance(scores, Mapping) else [])
    if _device.resolve(device, *given) == "cuda":  # "auto": any weight or score on a GPU
        from .cuda import prune as prune_on_device

        return prune_on_device(weights, scores, sparsity=sparsity, threshold=threshold, scope=scope, state=state,
                               min_sparsity=min_sparsity, max_sparsity=max_sparsity, normalize=normalize,
                               ignore=ignore, pattern=pattern, masks=masks)
    pattern, ignore, names = check_call(weights, sparsity, threshold, scope, normalize, ignore, pattern)
    old = _check_masks(masks, weights, names)

    unit_axis = pattern.axis if isinstance(pattern, Units) else None
    warrs, srcs = _sources(weights, names, scores, state, normalize,
                           sparsity is not None and pattern is None and old is None, unit_axis)
    groups = {}
    if isinstance(pattern, (Blocks, Units)):
        srcs = [_group_scores(src, warrs[src.name], pattern) for src in srcs]
    if not isinstance(pattern, NM):
        _normalise(srcs, normalize)
    done = None
    if old is not None and not isinstance(pattern, NM):
        srcs = [_materialise(src, _pruned_groups(old[src.name], warrs[src.name].shape, pattern, src.name))
                for src in srcs]
        done = np.array([int(np.count_nonzero(src.data == _PRUNED)) for src in srcs], np.int64)
    lo_c, hi_c, rules = select_all(srcs, names, sparsity, threshold, scope, min_sparsity, max_sparsity, pattern,
                                   done)

    csr, out_masks, shapes, summary = {}, {}, {}, []
    for src, rule, lo_t, hi_t in zip(srcs, rules, lo_c, hi_c):
        n = src.name
        w = warrs[n]
        mshape = matrix_shape(w.shape)
        wf = flat(w)
        if pattern is None and old is None:
            a, mask = build_csr(wf, mshape, src, rule, want_mask=True, weights_name=n, weights_original=w)
            pruned = int(mask.size - np.count_nonzero(mask))
            if threshold is not None and not (lo_t <= pruned <= hi_t):
                # A cap binds: prune exactly the capped count of this tensor's lowest scores.
                (rule,) = select_rules([src], counts=[min(max(pruned, lo_t), hi_t)])
                a, mask = build_csr(wf, mshape, src, rule, want_mask=True, weights_name=n, weights_original=w)
        else:
            if isinstance(pattern, NM):
                mask = nm_source_mask(src, pattern.n, pattern.m, pattern.axis)
            else:
                keep = _mask_from(src, rule).reshape(-1)
                pruned = int(keep.size - np.count_nonzero(keep))
                if threshold is not None and not (lo_t <= pruned <= hi_t):
                    (rule,) = select_rules([src], counts=[min(max(pruned, lo_t), hi_t)])
                    keep = _mask_from(src, rule).reshape(-1)
                mask = flat(_expand(keep, w.shape, pattern))
                if pattern is not None:
                    groups[n] = keep.reshape(src.shape)
            if old is not None:
                mask &= flat(old[n])
            mask_src = Source(n, mask.view(np.uint8), w.shape, MODE_IDENTITY, role="mask")
            a, _ = build_csr(wf, mshape, mask_src, Rule(key_of(0.5, False), 0, False), weights_name=n, weights_original=w)
        pruned = int(mask.size - np.count_nonzero(mask))
        csr[n] = a
        out_masks[n] = mask.reshape(w.shape)
        shapes[n] = w.shape
        summary.append(TensorSummary(
            n, tuple(w.shape), int(w.size), pruned, int(a.nnz), int(w.size * w.dtype.itemsize),
            int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)))
    return PruneResult(csr, out_masks, shapes, summary, ignore, groups)


def check_call(weights, sparsity, threshold, scope, normalize, ignore, pattern):
    """``prune``'s argument checks: ``(pattern, ignore list, pruned names)``."""
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if normalize not in _NORMS:
        raise ValueError(f"normalize must be one of {list(_NORMS)}, got {normalize!r}")
    pattern = as_pattern(pattern)
    if isinstance(pattern, NM):
        if sparsity is not None or threshold is not None:
            raise ValueError(f"an N:M pattern fixes the sparsity at 1 - {pattern.n}/{pattern.m}; "
                             f"give neither sparsity= nor threshold=")
    elif (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity= and threshold=")
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


def select_all(srcs, names, sparsity, threshold, scope, min_sparsity, max_sparsity, pattern, done):
    """The caps and the selection rules of all sources (host or device):
    ``(lo counts, hi counts, rules)``; ``done``: per source, the entries
    (blocks, units) that current masks already prune, or None."""
    sizes = np.array([s.size for s in srcs], np.int64)
    lo = per_name(min_sparsity, names, "min_sparsity", lambda v, n: check_fraction(v, n, "min_sparsity"))
    hi = per_name(max_sparsity, names, "max_sparsity", lambda v, n: check_fraction(v, n, "max_sparsity"))
    for n in names:
        if lo[n] > hi[n]:
            raise ValueError(f"min_sparsity {lo[n]} exceeds max_sparsity {hi[n]} for {n!r}")
    lo_c = np.array([round(lo[n] * s) for n, s in zip(names, sizes)], np.int64)
    hi_c = np.array([round(hi[n] * s) for n, s in zip(names, sizes)], np.int64)
    if isinstance(pattern, Units):
        hi_c = np.minimum(hi_c, np.maximum(sizes - pattern.min_keep, 0))
        lo_c = np.minimum(lo_c, hi_c)
    if done is not None:
        _check_growth(names, done, sizes, hi_c, sparsity, scope, pattern)
        lo_c = np.maximum(lo_c, done)

    if isinstance(pattern, NM):
        rules = [None] * len(srcs)
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
            rules = select_rules(srcs, target=target, lo=lo_c, hi=hi_c) if srcs else []
        else:
            sp_t = per_name(sparsity, names, "sparsity", check_fraction)
            counts = [round(sp_t[n] * s) for n, s in zip(names, sizes)]
            if isinstance(pattern, Units) or done is not None:
                counts = [min(max(k, int(a)), int(b)) for k, a, b in zip(counts, lo_c, hi_c)]
            rules = select_rules(srcs, counts=counts)
    else:
        th = per_name(threshold, names, "threshold", check_threshold)
        rules = [threshold_rule(src, th[src.name]) for src in srcs]
    return lo_c, hi_c, rules


def _check_masks(masks, weights, names, device=False):
    """The current masks by name, checked; a tensor without one gets all
    True (on the device: left out, the caller keeps all of it)."""
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
        if n not in masks:
            if not device:
                out[n] = np.ones(shape, np.bool_)
            continue
        m = _device.to_device(masks[n]) if device and _device.is_device_array(masks[n]) else np.asarray(masks[n])
        if m.dtype != np.bool_:
            raise TypeError(f"mask {n!r} has dtype {m.dtype}; pass a bool array (True = kept)")
        if tuple(m.shape) != shape:
            raise ValueError(f"mask {n!r} has shape {tuple(m.shape)} but weights {n!r} have shape {shape}")
        out[n] = _device.to_device(m).reshape(int(np.prod(shape, dtype=np.int64))) if device else m
    return out


def _group_scores(src, w, pattern):
    """The block or unit scores of one tensor as a :class:`Source`."""
    if src.role == "unit scores":
        return group_source(src.name, src.data, src.shape, src.original)
    if isinstance(pattern, Blocks):
        pooled = block_source_scores(src, pattern)
        return group_source(src.name, pooled, pooled.shape)
    units = unit_source_scores(src, pattern)
    return group_source(src.name, units, units.shape)


def _pruned_groups(mask, shape, pattern, name):
    """Flat indices of the entries, blocks or units that ``mask`` prunes."""
    if pattern is None:
        return np.flatnonzero(~mask)
    return np.flatnonzero(~_group_all_kept(mask, shape, pattern, name))


def _expand(keep, shape, pattern):
    if pattern is None:
        return keep
    if isinstance(pattern, Blocks):
        R, C = matrix_shape(shape)
        r, c = pattern.shape
        return expand_blocks(keep.reshape(-(-R // r), -(-C // c)), shape, pattern.shape)
    return unit_mask(keep, shape, pattern.axis)


def _check_growth(names, done, sizes, hi_c, sparsity, scope, pattern):
    """Current masks only grow: refuse targets and caps below what they prune."""
    what = {None: "entries", Blocks: "blocks", Units: "units"}[type(pattern) if pattern is not None else None]
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
