"""How sparse each tensor should be: allocations across layers made before
the selection, handed to :func:`sparsecore.prune` or a sequential pruner as a
``sparsity`` mapping."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from ._validate import as_float_array, check_fraction

__all__ = ["outlier_allocation"]


def outlier_allocation(scores: Mapping[str, ArrayLike], sparsity: float, *,
                       groups: Mapping[str, Hashable] | None = None, m: float = 5.0,
                       lam: float = 0.08) -> dict[str, float]:
    """Per-tensor sparsities that prune the groups with more outliers less
    (OWL: Yin et al., Outlier Weighed Layerwise Sparsity, ICML 2024).

    A group's outlier ratio is the fraction of its scores above ``m`` times
    their mean; the ratios, scaled to ``[0, 2·lam]``, are taken from the
    target: ``sparsity_g = sparsity − (r_g − mean r)``. Every tensor of a
    group gets its group's sparsity; the mean over groups (unweighted, as
    OWL's transformer blocks are of one size) is ``sparsity``.

    Parameters
    ----------
    scores : mapping name -> array
        Non-negative importance scores of each tensor, e.g. Wanda's
        ``|w|·‖x‖`` (OWL's choice) or magnitudes.
    sparsity : float
        The mean target.
    groups : mapping name -> label, optional
        Which tensors form one group (OWL: the layers of a transformer
        block). Default: every tensor its own group.
    m, lam
        The outlier threshold in means of the group's scores, and half the
        spread of the sparsities (OWL's M = 5, λ = 0.08 for LLaMA).

    Returns
    -------
    dict name -> float

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> flat, spiky = np.ones(100), np.r_[np.ones(90), np.full(10, 50.0)]
    >>> sc.outlier_allocation({"a": flat, "b": spiky}, 0.7)
    {'a': 0.78, 'b': 0.62}
    """
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping name -> array")
    sparsity = check_fraction(sparsity, "the allocation")
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ValueError(f"m must be a number > 0 (outliers: scores above m times the mean), got {m!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    groups = {n: n for n in scores} if groups is None else groups
    missing = [n for n in scores if n not in groups]
    if missing:
        raise ValueError(f"groups name no group for {missing[:3]}; give every tensor of scores a group")
    members: dict = {}
    for n in scores:
        members.setdefault(groups[n], []).append(n)
    ratio = {}
    for g, names in members.items():
        parts = []
        for n in names:
            s = as_float_array(scores[n], n, "scores").reshape(-1)
            if not np.isfinite(s).all() or (s < 0).any():
                raise ValueError(f"scores {n!r} must be finite and >= 0 (magnitudes, Wanda's |w|*||x||)")
            parts.append(s)
        s = np.concatenate(parts)
        ratio[g] = float(np.count_nonzero(s > m * s.mean())) / s.size if s.size else 0.0
    r = np.array(list(ratio.values()))
    spread = r.max() - r.min()
    r = (r - r.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(r)
    per_group = dict(zip(ratio, sparsity - (r - r.mean())))
    out = {n: round(float(per_group[groups[n]]), 12) for n in scores}
    bad = {n: v for n, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        n, v = next(iter(bad.items()))
        raise ValueError(f"lam={lam} takes {len(bad)} tensor(s) outside [0, 1] (e.g. {n!r}: {v:.4f}) at "
                         f"sparsity={sparsity}; lower lam")
    return out
