"""``prune``: importance -> selection -> CSR weights, masks and a summary."""

from __future__ import annotations


from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._kernels.keys import MODE_ABS, MODE_IDENTITY, MODE_SQUARE
from ._validate import as_float_array, check_fraction, check_threshold, flat, per_name
from .csr import build_csr, matrix_shape, to_dense
from .importance import GradientAccumulator, get_criterion
from .selection import _NORMS, Source, norm_inverse, scores_source, select_rules, threshold_rule

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
    """

    csr: dict
    masks: dict
    shapes: dict
    summary: list
    ignored: list

    def dense(self, name):
        """The pruned weight ``name`` as a dense array of its own shape."""
        return to_dense(self.csr[name], self.shapes[name])

    def table(self):
        """The summary as a text table."""
        head = f"{'tensor':<24} {'shape':<16} {'nnz':>10} {'sparsity':>9} {'dense B':>12} {'CSR B':>12} {'ratio':>6}"
        lines = [head, "-" * len(head)]
        tot = [0, 0, 0, 0, 0]
        for s in self.summary:
            ratio = s.csr_bytes / s.dense_bytes if s.dense_bytes else 0.0
            lines.append(f"{s.name:<24} {str(s.shape):<16} {s.nnz:>10} {s.sparsity:>9.2%} "
                         f"{s.dense_bytes:>12} {s.csr_bytes:>12} {ratio:>6.2f}")
            for i, v in enumerate((s.size, s.pruned, s.nnz, s.dense_bytes, s.csr_bytes)):
                tot[i] += v
        sp_all = tot[1] / tot[0] if tot[0] else 0.0
        ratio = tot[4] / tot[3] if tot[3] else 0.0
        lines.append("-" * len(head))
        lines.append(f"{'total':<24} {'':<16} {tot[2]:>10} {sp_all:>9.2%} {tot[3]:>12} {tot[4]:>12} {ratio:>6.2f}")
        for name in self.ignored:
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


def _sources(weights, names, scores, state, normalize, for_selection):
    """One :class:`Source` per tensor, and the weights as float arrays."""
    warrs = {n: as_float_array(weights[n], n, "weights") for n in names}
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
            src = scores_source(scores[n], n)
            if src.shape != warrs[n].shape:
                raise ValueError(f"scores {n!r} have shape {src.shape} but weights {n!r} have shape "
                                 f"{warrs[n].shape}")
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
                srcs.append(Source(n, flat(w), w.shape, m, role="weights", original=w))
                continue
            s = crit(w, _state_for(state, n))
            cname = getattr(crit, "name", getattr(crit, "__name__", "criterion"))
            s = as_float_array(s, n, f"scores from criterion {cname!r} for")
            if s.shape != w.shape:
                raise ValueError(f"criterion {cname!r} returned scores of shape {s.shape} for weights "
                                 f"{n!r} of shape {w.shape}")
            srcs.append(Source(n, flat(s), s.shape, MODE_IDENTITY, original=s))
    for src in srcs:
        inv = norm_inverse(src, normalize)
        if _NORMS[normalize]:
            src.inv, src.scaled = inv, True
    return warrs, srcs


def prune(weights: Mapping[str, ArrayLike], scores=None, *,
          sparsity: float | Mapping[str, float] | None = None,
          threshold: float | Mapping[str, float] | None = None, scope: str = "local", state=None,
          min_sparsity: float | Mapping[str, float] = 0.0, max_sparsity: float | Mapping[str, float] = 1.0,
          normalize: str = "none", ignore: Iterable[str] = ()) -> PruneResult:
    """Prune a set of weights and return CSR weights, masks and a summary.

    Parameters
    ----------
    weights : mapping name -> array_like of float
        The tensors, any shapes (float16 is computed in float32).
    scores : None, str, Criterion, callable or mapping name -> array
        Importance. ``None`` is magnitude ``|w|``; a registered criterion
        name (see :func:`list_criteria`) or a callable ``(weights, state) ->
        scores`` is evaluated per tensor with ``state``; a mapping gives the
        scores directly.
    sparsity : float or mapping name -> float, optional
        Fraction to prune: exactly ``round(sparsity * n)`` entries per tensor
        (local), or ``round(sparsity * N)`` of all N entries (global).
    threshold : float or mapping name -> float, optional
        Prune where the (normalised) score is below it. Exactly one of
        ``sparsity`` and ``threshold``.
    scope : {"local", "global"}
        Global selection ranks all tensors' scores together with one exact
        threshold.
    state : GradientAccumulator or mapping name -> dict, optional
        Statistics for gradient criteria.
    min_sparsity, max_sparsity : float or mapping name -> float
        Per-tensor caps, so that no layer collapses (global scope and
        thresholds; a local sparsity is exact by definition).
    normalize : {"none", "l1", "l2", "max"}
        Divide each tensor's scores by their norm before comparing across
        tensors (raw scores of different layers are not comparable).
    ignore : iterable of str
        Names left unpruned; they are listed in ``result.ignored``.

    Returns
    -------
    PruneResult

    Raises
    ------
    TypeError
        Non-float arrays, a wrong kind of argument.
    ValueError
        NaN/Inf, shape or name mismatches, fractions outside [0, 1], NaN
        thresholds, caps that make the target impossible, unknown options.

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
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}; "
                        f"for one array pass {{'weight': array}}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if normalize not in _NORMS:
        raise ValueError(f"normalize must be one of {list(_NORMS)}, got {normalize!r}")
    if (sparsity is None) == (threshold is None):
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

    warrs, srcs = _sources(weights, names, scores, state, normalize, sparsity is not None)
    sizes = np.array([s.size for s in srcs], np.int64)
    lo = per_name(min_sparsity, names, "min_sparsity", lambda v, n: check_fraction(v, n, "min_sparsity"))
    hi = per_name(max_sparsity, names, "max_sparsity", lambda v, n: check_fraction(v, n, "max_sparsity"))
    for n in names:
        if lo[n] > hi[n]:
            raise ValueError(f"min_sparsity {lo[n]} exceeds max_sparsity {hi[n]} for {n!r}")
    lo_c = np.array([round(lo[n] * s) for n, s in zip(names, sizes)], np.int64)
    hi_c = np.array([round(hi[n] * s) for n, s in zip(names, sizes)], np.int64)

    if sparsity is not None:
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
            rules = select_rules(srcs, counts=[round(sp_t[n] * s) for n, s in zip(names, sizes)])
    else:
        th = per_name(threshold, names, "threshold", check_threshold)
        rules = [threshold_rule(src, th[src.name]) for src in srcs]

    csr, masks, shapes, summary = {}, {}, {}, []
    for src, rule, lo_t, hi_t in zip(srcs, rules, lo_c, hi_c):
        n = src.name
        w = warrs[n]
        mshape = matrix_shape(w.shape)
        wf = flat(w)
        a, mask = build_csr(wf, mshape, src, rule, want_mask=True, weights_name=n, weights_original=w)
        pruned = int(mask.size - np.count_nonzero(mask))
        if threshold is not None and not (lo_t <= pruned <= hi_t):
            # A cap binds: prune exactly the capped count of this tensor's lowest scores.
            (rule,) = select_rules([src], counts=[min(max(pruned, lo_t), hi_t)])
            a, mask = build_csr(wf, mshape, src, rule, want_mask=True, weights_name=n, weights_original=w)
            pruned = int(mask.size - np.count_nonzero(mask))
        csr[n] = a
        masks[n] = mask.reshape(w.shape)
        shapes[n] = w.shape
        summary.append(TensorSummary(
            n, tuple(w.shape), int(w.size), pruned, int(a.nnz), int(w.size * w.dtype.itemsize),
            int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)))
    return PruneResult(csr, masks, shapes, summary, ignore)
