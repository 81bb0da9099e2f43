"""Calibration statistics and pairwise MI on a Dask cluster.

The accumulators (:class:`GradientAccumulator`, :class:`HessianAccumulator`,
:class:`UnitMIAccumulator`, :class:`PairwiseMIAccumulator`) are built where
the data is. Each worker builds one from its own data shard, with any
framework; :func:`tree_merge` combines them by a tree of ``merge`` tasks on
the workers. Only the accumulators cross the network, never the data, and
each at most once per level of the tree.
- Counts (MI) equal one pass over all the data exactly.
- Sums (gradients, Hessians) equal it within the accumulator's stated
  rounding bound: the same terms, added in another order.

:func:`pairwise_mi` splits the pairs of a wide layer into blocks of output
and input units, one task each. Every pair is counted and finished alone,
on per-unit bins, so the blocks give the very numbers of
:func:`sparsecore.pairwise_mi`.

``distributed`` is imported only when these are called (``pip install
'sparsecore[dask]'``). See ``examples/dask_calibration.py`` for the whole
flow with the PyTorch adapter on a local cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
from numpy.typing import ArrayLike

from ._validate import is_integer
from .importance import Accumulator
from .io.cluster import submit_in_share, tasks_per_host
from .mutual_info import pairwise_mi as _pairwise_mi_here

__all__ = ["accumulate", "pairwise_mi", "tree_merge"]


def _futures():
    try:
        from distributed import Future
    except ImportError:
        raise ImportError("sparsecore.parallel needs dask.distributed: pip install 'sparsecore[dask]'") from None
    return Future


def _check_split(split_every):
    if not is_integer(split_every) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")


def _merged(*parts):
    """One accumulator: the first part (a copy: a worker may hold it for another task) with the others
    merged into it, in order."""
    for p in parts:
        if not isinstance(p, Accumulator):
            raise TypeError(f"tree_merge combines accumulators (sparsecore.Accumulator: update, merge, state_dict, "
                            f"from_state_dict; GradientAccumulator, HessianAccumulator and the MI ones are), got "
                            f"{type(p).__name__}")
        if type(p) is not type(parts[0]):
            raise TypeError(f"tree_merge combines accumulators of one kind, got {type(parts[0]).__name__} and "
                            f"{type(p).__name__}")
    out = copy.deepcopy(parts[0])
    for p in parts[1:]:
        out.merge(p)
    return out


def tree_merge(client, parts: Iterable, *, split_every: int = 8):
    """Combine accumulators into one by a tree of ``merge`` tasks.

    ``parts``: futures of accumulators (each built on a worker from its own
    data), or the accumulators themselves. Groups of ``split_every`` are
    merged by one task each, level by level, always in the order given, so
    the result does not depend on which task finishes first. Returns the
    merged accumulator (on the client).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> from distributed import Client
    >>> from sparsecore.parallel import tree_merge
    >>> def shard(seed):
    ...     x = np.random.default_rng(seed).standard_normal((100, 4))
    ...     return sc.HessianAccumulator(4).update(x)
    >>> with Client(processes=False, n_workers=2, dashboard_address=":0") as client:
    ...     acc = tree_merge(client, [client.submit(shard, s) for s in range(8)], split_every=3)
    >>> acc.count
    800
    """
    _check_split(split_every)
    level = list(parts)
    if not level:
        raise ValueError("tree_merge needs at least one accumulator")
    Future = _futures()
    if len(level) == 1:  # nothing to merge: a checked copy
        return _merged(level[0].result() if isinstance(level[0], Future) else level[0])
    if not any(isinstance(p, Future) for p in level):
        level = client.scatter(level, hash=False)
    hosts = tasks_per_host(client)
    while len(level) > 1:
        level = [submit_in_share(client, hosts, _merged, *level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0].result()  # made by a merge task, its own copy


def accumulate(client, build: Callable, shards: Iterable, *, split_every: int = 8):
    """``build(shard)`` (returns an accumulator) on the workers for every
    data ``shard`` (a path, a seed, an index range: whatever tells a worker
    which data to read), then :func:`tree_merge`. ``build`` is pickled and
    sent: a function of a module the workers import, or a closure."""
    _check_split(split_every)
    hosts = tasks_per_host(client)  # each task's Numba kernels on its share of its machine's cores
    futures = [submit_in_share(client, hosts, build, s) for s in shards]
    return tree_merge(client, futures, split_every=split_every)


def _pairwise_block(acts_in, acts_out, i0, i1, o0, o1, kw):
    return _pairwise_mi_here(acts_in[:, i0:i1], acts_out[:, o0:o1], **kw)


def pairwise_mi(client, acts_in: ArrayLike, acts_out: ArrayLike, bins: int | str = 16, strategy: str = "uniform",
                *, block: int | tuple[int, int] = 1024, base="e", correction=None,
                normalized=False) -> np.ndarray:
    """:func:`sparsecore.pairwise_mi` with its pairs split into blocks of
    ``block`` output units by ``block`` input units (or a pair ``(out,
    in)``), one task each. The activations, ``(samples, units)``, are
    scattered to the workers once. Returns the same ``(out, in)`` matrix.
    For convolution maps, reduce them to one value per channel first (the
    ``reduce`` of :func:`sparsecore.pairwise_mi`)."""
    bo, bi = (block, block) if is_integer(block) else tuple(block)
    for b in (bo, bi):
        if not is_integer(b) or b < 1:
            raise ValueError(f"block must be a positive integer or a pair of them, got {block!r}")
    ai, ao = np.asarray(acts_in), np.asarray(acts_out)
    for a, what in ((ai, "inputs"), (ao, "outputs")):
        if a.ndim != 2:
            raise ValueError(f"{what} must be (samples, units) here, got shape {a.shape}; reduce convolution "
                             f"maps to one value per channel first")
    if ai.shape[0] != ao.shape[0]:
        raise ValueError(f"inputs hold {ai.shape[0]} samples but outputs {ao.shape[0]}")
    _futures()
    kw = dict(bins=bins, strategy=strategy, base=base, correction=correction, normalized=normalized, device="cpu")
    fi, fo = client.scatter([ai, ao], broadcast=True, hash=False)  # fresh keys: a repeated call never
    # meets the data of the last, released under it
    cells = [(o0, min(o0 + bo, ao.shape[1]), i0, min(i0 + bi, ai.shape[1]))
             for o0 in range(0, ao.shape[1], bo) for i0 in range(0, ai.shape[1], bi)]
    hosts = tasks_per_host(client)
    futures = [submit_in_share(client, hosts, _pairwise_block, fi, fo, i0, i1, o0, o1, kw) for o0, o1, i0, i1 in cells]
    out = np.empty((ao.shape[1], ai.shape[1]))
    for (o0, o1, i0, i1), part in zip(cells, client.gather(futures)):
        out[o0:o1, i0:i1] = part
    return out
