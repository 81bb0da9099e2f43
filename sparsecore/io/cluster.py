"""Offline pruning of a sharded checkpoint on a Dask cluster.

``prune_file(src, dst, ..., client=client)`` (or ``sparsecore prune --dask
ADDRESS`` / ``--workers N``) runs the single-process algorithm with its data
passes moved to the workers:

- The client opens the checkpoint's index and headers only, and holds the
  plan: names, shapes, caps.
- Every pass the selection makes over the data (the norms for
  ``normalize``, the strided sample and the bracket count of a global
  threshold, the radix histograms where caps bind, a capped tensor's own
  count) goes through :func:`sparsecore.selection.each_source`. Here it is
  one task per shard: the worker opens its shard, makes the pass over its
  tensors and returns per-tensor results (sampled keys, at most 2**20 for
  the whole model; counts; the keys inside the bracket; histograms; rules).
- The writing pass is one task per shard. The worker reads, masks and writes
  its shard into the output's temporary folder (beside the output, so on the
  file system the workers share) and returns the summaries. The client then
  copies the index and the other files and renames the folder into place.

The answer is the same, bit for bit. The per-tensor results are exact
(integer counts and keys), and the client combines them with the very code
that combines them in one process. The workers run the same per-tensor
code (:mod:`sparsecore.io.tensorwise`).

Failures:
- Dask retries a task whose worker died (``distributed.scheduler.
  allowed-failures``). A shard written twice is written whole each time,
  under a temporary name that is then renamed.
- When Dask gives up (or the cluster goes away), the run ends with a
  :class:`UserError` naming the cause, and the temporary folder is removed:
  no partial output is left.
- Errors in the data (a NaN score, a shape that an N:M pattern cannot
  divide) arrive as the same ``ValueError`` that one process gives.

``distributed`` is imported only when a cluster is used
(``pip install 'sparsecore[dask]'``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import uuid

import numpy as np

from .files import open_weights
from .formats import SafeTensorsFile, TorchFile
from .tensorwise import UserError, copy_folder_files, lazy_sources, prune_one, write_shard

__all__ = ["ShardSources", "connect", "require"]

INSTALL = "pip install 'sparsecore[dask]'"


def require():
    """The ``distributed`` module, or a :class:`UserError` that says what to install."""
    try:
        import distributed
    except ImportError:
        raise UserError(f"running on a Dask cluster needs dask.distributed, which is not installed: "
                        f"{INSTALL}") from None
    return distributed


@contextlib.contextmanager
def connect(address=None, workers=None):
    """A ``distributed.Client`` of the scheduler at ``address``, or of a new
    local cluster of ``workers`` worker processes (one thread each; the
    kernels thread themselves), closed on exit."""
    distributed = require()
    if (address is None) == (workers is None):
        raise UserError("give one of --dask ADDRESS (a running scheduler) and --workers N (a local cluster)")
    if address is not None:
        try:
            client = distributed.Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"--dask {address}: no Dask scheduler answers there ({exc})") from None
        with client:
            yield client
        return
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise UserError(f"--workers must be a whole number >= 1, got {workers!r}")
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        yield client


def _failure_types(distributed):
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, CommClosedError, OSError, TimeoutError, distributed.client.FutureCancelledError)


class ShardSources(list):
    """The selection sources of a checkpoint's tensors, in order, whose data
    passes run on the cluster's workers: one task per shard and pass. The
    client keeps only what a source knows without its data (name, shape,
    dtype, mode, normalisation). ``moved``: the bytes of arguments and
    results that crossed between the client and the workers (pickled)."""

    def __init__(self, client, reader, names, sources, scores=None):
        super().__init__(sources)  # in the order of names
        self.client, self.reader, self.names = client, reader, list(names)
        self.shard_of = [reader.shard_of[n] for n in names]
        self.spec = (reader.folder, None if scores is None else os.path.abspath(os.fspath(scores)))
        self.moved = 0

    def _run(self, jobs):
        """Submit ``(function, args)`` jobs, one task each; their results in
        order. A cluster failure becomes a :class:`UserError`."""
        distributed = require()
        futures = [self.client.submit(fn, *args, pure=False) for fn, args in jobs]
        self.moved += sum(len(pickle.dumps(args, protocol=5)) for _, args in jobs)
        try:
            results = self.client.gather(futures)
        except _failure_types(distributed) as exc:
            self.client.cancel(futures)
            raise UserError(f"the Dask cluster could not finish the run ({type(exc).__name__}: {exc}); "
                            f"nothing was written") from None
        except BaseException:
            self.client.cancel(futures)
            raise
        self.moved += sum(len(pickle.dumps(r, protocol=5)) for r in results)
        return results

    def map(self, fn, per):
        """``fn(source, *per[t])`` for each source ``t`` whose ``per[t]`` is
        not None, run on the workers, one task per shard; results in order."""
        by_shard = {}
        for t, a in enumerate(per):
            if a is not None:
                by_shard.setdefault(self.shard_of[t], []).append(t)
        jobs = [(_on_shard, (self.spec, shard, [(self[t].name, self[t].inv, self[t].scaled, per[t]) for t in ts],
                             fn)) for shard, ts in by_shard.items()]
        out = [None] * len(self)
        for ts, results in zip(by_shard.values(), self._run(jobs)):
            for t, r in zip(ts, results):
                out[t] = _unpack(r)
        return out

    def write(self, tmp, plan, result, progress=None):
        """The writing pass: each shard pruned and written into ``tmp`` by a
        worker; the summaries in the order one process gives them; the
        index and the other files copied."""
        _, selection, pattern = plan
        shards = self.reader.shards
        items = {shard: [] for shard in shards}
        for i, (src, shard) in enumerate(zip(self, self.shard_of)):
            items[shard].append((src.name, src.inv, src.scaled, i))
        jobs = [(_write_shard, (self.spec, shard, tmp, items[shard], selection, pattern)) for shard in shards]
        total = len(self)
        for summaries in self._run(jobs):
            result.summary.extend(summaries)
            if progress is not None and summaries:
                progress(len(result.summary), total, summaries[-1].name)
        pruned = set(self.names)
        result.copied = [n for n in self.reader.entries if n not in pruned]
        copy_folder_files(self.reader, tmp)


# --- on the workers ---------------------------------------------------------------

@contextlib.contextmanager
def _opened(spec, shard):
    """The reader of one shard and the scores file (or None), closed on exit."""
    folder, scores = spec
    path = os.path.join(folder, shard)
    reader = TorchFile(path) if shard.endswith(".bin") else SafeTensorsFile(path)
    try:
        score_file = open_weights(scores) if scores is not None else None
        try:
            yield reader, score_file
        finally:
            if score_file is not None:
                score_file.close()
    finally:
        reader.close()


def _shard_sources(reader, score_file, items):
    srcs = lazy_sources(reader, [it[0] for it in items], score_file)
    for name, inv, scaled, _ in items:
        srcs[name].inv, srcs[name].scaled = inv, scaled
    return srcs


def _on_shard(spec, shard, items, fn):
    """A data pass over some tensors of one shard: ``[fn(source, *args)]``."""
    with _opened(spec, shard) as (reader, score_file):
        srcs = _shard_sources(reader, score_file, items)
        return [_pack(fn(srcs[name], *args)) for name, _, _, args in items]


class _Sparse:
    """A mostly-zero integer array (a histogram of keys that cluster in a few bins) as its non-zeros."""

    def __init__(self, a):
        self.size, self.dtype = a.size, a.dtype
        self.at = np.flatnonzero(a)
        self.values = a[self.at]

    def dense(self):
        out = np.zeros(self.size, self.dtype)
        out[self.at] = self.values
        return out


def _pack(r):
    if isinstance(r, np.ndarray) and r.dtype.kind == "i" and r.ndim == 1 and np.count_nonzero(r) * 4 < r.size:
        return _Sparse(r)
    return r


def _unpack(r):
    return r.dense() if isinstance(r, _Sparse) else r


def _write_shard(spec, shard, tmp, items, selection, pattern):
    """One shard pruned (``items``: its pruned tensors and their places in
    the plan) and written into the folder ``tmp``; returns the summaries."""
    with _opened(spec, shard) as (reader, score_file):
        srcs = _shard_sources(reader, score_file, items)
        index = {name: i for name, _, _, i in items}
        summaries = []

        def tensor(name):
            if name not in index:
                return reader.raw(name)
            raw, _, _, summary = prune_one(reader, srcs, selection, index[name], name, False, pattern)
            summaries.append(summary)
            return raw

        # a folder of its own, the file under its final name (torch.save records the name in the archive),
        # renamed into place whole: a retried task never meets a half-written file
        part = os.path.join(tmp, f".part-{uuid.uuid4().hex}")
        os.mkdir(part)
        try:
            write_shard(reader, os.path.join(part, shard), tensor)
            os.replace(os.path.join(part, shard), os.path.join(tmp, shard))
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return summaries
