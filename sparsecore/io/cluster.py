"""Offline pruning of a sharded checkpoint on a Dask cluster.

``prune_file(src, dst, ..., client=client)`` (or ``sparsecore prune --dask
ADDRESS`` / ``--workers N``) runs the single-process algorithm with its data
passes moved to the workers:

- The client opens the checkpoint's index and headers only, and holds the
  plan: names, shapes, caps.
- Every pass the selection makes over the data (the norms for
  ``normalize``, the strided sample and the bracket count of a global
  threshold, the radix histograms where caps bind, a capped tensor's own
  count) goes through :func:`sparsecore.selection.each_source`, given a
  :class:`ShardExecutor` as its executor: one task per shard. The worker
  opens its shard, makes the pass over its tensors and returns per-tensor
  results (sampled keys, at most 2**20 for the whole model; counts; the keys
  inside the bracket; histograms; rules).
- The writing pass is one task per shard. The worker reads, masks and writes
  its shard into a new folder of its own inside a parts folder, a sibling of
  the output's temporary folder (both beside the output, so on the file
  system the workers share), and returns the summaries and the file's path.
  The client moves each file it got a result for into the temporary folder,
  copies the index and the other files, removes anything else found there,
  removes the parts folder and renames the temporary folder into place.
- Each task sets its Numba threads to its share of the worker machine's
  cores: ``max(1, C // T)``, with ``C`` the cores the worker process may use
  and ``T`` the tasks that run at once on that machine (the threads of its
  workers, as the scheduler lists them when the pass starts). A local
  cluster's workers also start with ``NUMBA_NUM_THREADS`` set to that share.

The answer is the same, bit for bit. The per-tensor results are exact
(integer counts and keys), and the client combines them with the very code
that combines them in one process. The workers run the same per-tensor
code (:mod:`sparsecore.io.tensorwise`).

Failures:
- Dask retries a task whose worker died (``distributed.scheduler.
  allowed-failures``). A worker killed mid-write leaves its partial file in
  its folder inside the parts folder, which the client removes: only the
  files of tasks whose results arrived are moved into the output. A worker
  still writing after the client has finished (a "zombie") writes into the
  parts folder or into nothing, never into the output.
- When Dask gives up (or the cluster goes away), the run ends with a
  :class:`UserError` naming the cause, and the temporary folders are
  removed: no partial output is left.
- A cluster that has had no worker for :data:`NO_WORKER_GRACE` seconds (all
  killed, nannies included) cannot finish: its tasks are cancelled and the
  run ends with a :class:`UserError`, instead of waiting forever.
- A local cluster that fails to start (a worker killed while it starts)
  ends with a :class:`UserError`, as does ``--workers`` above what the
  machine can hold (see :func:`connect`).
- Errors in the data (a NaN score, a shape that an N:M pattern cannot
  divide) arrive as the same ``ValueError`` that one process gives.

``distributed`` is imported only when a cluster is used
(``pip install 'sparsecore[dask]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import time
import uuid

import numpy as np

from .errors import UserError
from .files import open_weights
from .formats import SafeTensorsFile, TorchFile
from .tensorwise import lazy_sources, prune_one

__all__ = ["NO_WORKER_GRACE", "ShardExecutor", "WORKER_MEMORY", "connect", "max_workers", "require",
           "submit_in_share", "tasks_per_host"]

INSTALL = "pip install 'sparsecore[dask]'"

#: Seconds a run waits for a cluster without any worker (to see one come back, or be added) before it
#: cancels its tasks and fails. Read at each pass.
NO_WORKER_GRACE = 60.0

#: Memory that ``--workers`` counts for each local worker process: measured 259 MiB resident (148 MiB of
#: it its own) for a Dask 2026.8 worker with NumPy, Numba 0.68 and sparsecore imported and a first small
#: prune run (Python 3.11, Linux x86-64); rounded up to leave room for a small checkpoint's tensors.
WORKER_MEMORY = 320 << 20


def require():
    """The ``distributed`` module, or a :class:`UserError` that says what to install."""
    try:
        import distributed
    except ImportError:
        raise UserError(f"running on a Dask cluster needs dask.distributed, which is not installed: "
                        f"{INSTALL}") from None
    return distributed


def _usable_cores():
    """The cores this process may run on (its affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # absent, or "max"
        return None


def _cgroup_stat(path, key):
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _available_memory():
    """Bytes this process's machine (or its memory cgroup) can still give: the system's available
    memory, and a cgroup's limit less its usage (not counting its inactive file cache)."""
    import psutil

    avail = psutil.virtual_memory().available
    for limit, usage, stat, inactive in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None:
            avail = min(avail, max(0, cap - max(0, used - _cgroup_stat(stat, inactive))))
    return avail


def max_workers():
    """``(limit, cores, memory)``: the most local worker processes this machine can hold, the usable
    cores and the available memory in bytes. The limit is at most one worker per usable core and one
    per :data:`WORKER_MEMORY` bytes of available memory, and at least 1."""
    cores, memory = _usable_cores(), _available_memory()
    return max(1, min(cores, memory // WORKER_MEMORY)), cores, memory


def _numba_share(cores, tasks):
    return max(1, cores // max(1, tasks))


class _LogFile(logging.Handler):
    """Records appended to a file. Not a ``StreamHandler``: the local cluster's ``silence_logs`` turns every
    StreamHandler of the ``distributed`` logger down, a ``FileHandler`` too."""

    def __init__(self, path):
        super().__init__(logging.INFO)
        self.file = open(path, "a", encoding="utf-8")

    def emit(self, record):
        try:
            self.file.write(self.format(record) + "\n")
            self.file.flush()
        except Exception:  # noqa: BLE001 - logging never breaks the run
            self.handleError(record)

    def close(self):
        self.file.close()
        super().close()


@contextlib.contextmanager
def _quiet(log=None):
    """Dask's own logging kept off the terminal while a cluster runs: every ``distributed`` logger's
    handlers set aside (a successful run's nanny warned on close), and with ``log`` (a path) written
    there instead, from INFO up; put back as they were after."""
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    saved = []
    for n in names:
        lg = logging.getLogger(n)
        saved.append((lg, lg.handlers[:], lg.level, lg.propagate))
        lg.handlers = []
    top = logging.getLogger("distributed")
    top.propagate = False
    handler = None
    if log is not None:
        try:
            handler = _LogFile(log)
        except OSError as exc:
            raise UserError(f"--dask-log {log}: cannot write there ({exc.strerror})") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
        top.addHandler(handler)
        top.setLevel(logging.INFO)
    else:
        top.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        if handler is not None:
            handler.close()
        for lg, handlers, level, propagate in saved:
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate


@contextlib.contextmanager
def _workers_ignore_interrupts():
    """Worker processes started meanwhile ignore SIGINT (a disposition they inherit, and Python keeps):
    Ctrl-C at the terminal reaches the whole process group, and each worker printed its traceback; the
    client alone stops the run, closing the cluster."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def connect(address=None, workers=None, log=None):
    """A ``distributed.Client`` of the scheduler at ``address``, or of a new
    local cluster of ``workers`` worker processes, closed on exit.

    A local worker runs one task at a time, with ``max(1, C // workers)``
    Numba threads (``C``: the usable cores). ``workers`` may not exceed what
    the machine can hold (:func:`max_workers`): one worker per usable core
    (``os.sched_getaffinity``, else ``os.cpu_count()``) and one per
    :data:`WORKER_MEMORY` (320 MiB) of available memory (the system's, or a
    memory cgroup's limit less its usage).

    Raises
    ------
    UserError
        ``distributed`` is not installed; both or neither of ``address`` and
        ``workers`` given; ``workers`` not a whole number in
        ``[1, max_workers()]``; no scheduler answers at ``address``; the local
        cluster fails to start.
    """
    distributed = require()
    if (address is None) == (workers is None):
        raise UserError("give one of --dask ADDRESS (a running scheduler) and --workers N (a local cluster)")
    if address is not None:
        with _quiet(log):
            try:
                client = distributed.Client(address, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise UserError(f"--dask {address}: no Dask scheduler answers there ({exc})") from None
            with client:
                if log is not None:
                    client.forward_logging("distributed", level=logging.INFO)
                yield client
        return
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise UserError(f"--workers must be a whole number >= 1, got {workers!r}")
    limit, cores, memory = max_workers()
    if workers > limit:
        raise UserError(f"--workers {workers}: this machine can hold at most {limit} worker processes (one per "
                        f"usable core: {cores}; one per {WORKER_MEMORY >> 20} MiB of available memory: "
                        f"{memory / 2**30:.1f} GiB)")
    threads = _numba_share(cores, workers)
    with _quiet(log):
        yield from _local(distributed, workers, threads, log)


def _local(distributed, workers, threads, log):
    try:
        with _workers_ignore_interrupts():
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", env={"NUMBA_NUM_THREADS": str(threads)},
                                               silence_logs=logging.CRITICAL)  # the workers' stderr: quiet
    except Exception as exc:  # noqa: BLE001 - whatever stopped it, the user gets one line
        raise UserError(f"--workers {workers}: the local Dask cluster failed to start ({type(exc).__name__}: "
                        f"{exc}); nothing was written") from None
    try:
        try:
            client = distributed.Client(cluster)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--workers {workers}: could not connect to the local Dask cluster "
                            f"({type(exc).__name__}: {exc}); nothing was written") from None
        with client:
            if log is not None:
                client.forward_logging("distributed", level=logging.INFO)
            yield client
    finally:
        cluster.close()


def _failure_types(distributed):
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, CommClosedError, OSError, TimeoutError, distributed.client.FutureCancelledError,
            distributed.client.FuturesCancelledError)  # the latter from wait()


class ShardExecutor:
    """Runs the data passes over a checkpoint's selection sources (in order)
    on the cluster's workers: one task per shard and pass; passed explicitly
    as the ``executor`` of the selection (:func:`sparsecore.selection.each_source`).
    The client keeps only what a source knows without its data (name, shape,
    dtype, mode, normalisation). ``moved``: the bytes of arguments and
    results that crossed between the client and the workers (pickled)."""

    def __init__(self, client, reader, names, sources, scores=None):
        self.sources = list(sources)  # in the order of names
        self.client, self.reader, self.names = client, reader, list(names)
        self.shard_of = [reader.shard_of[n] for n in names]
        self.spec = (reader.folder, None if scores is None else os.path.abspath(os.fspath(scores)))
        self.moved = 0

    def _tasks_per_host(self):
        return tasks_per_host(self.client)

    def _run(self, jobs):
        """Submit ``(function, args)`` jobs, one task each; their results in
        order. A cluster failure, or a cluster without a worker for
        :data:`NO_WORKER_GRACE` seconds, becomes a :class:`UserError`."""
        distributed = require()
        futures = []
        try:
            hosts = self._tasks_per_host()
            futures = [self.client.submit(_in_share, hosts, fn, *args, key=f"{fn.__name__}-{uuid.uuid4().hex}",
                                          pure=False) for fn, args in jobs]
            self.moved += sum(len(pickle.dumps(args, protocol=5)) for _, args in jobs)
            self._wait(distributed, futures)
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

    def _wait(self, distributed, futures):
        """Until every future is done or one has failed. With no worker in
        the cluster for :data:`NO_WORKER_GRACE` seconds: a UserError."""
        grace = float(NO_WORKER_GRACE)
        poll = min(1.0, max(0.05, grace / 4))
        pending, alone_since = set(futures), None
        with self.client.as_current():
            while pending:
                try:
                    done, pending = distributed.wait(pending, timeout=poll, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    if self.client.scheduler_info()["workers"]:
                        alone_since = None
                    elif alone_since is None:
                        alone_since = time.monotonic()
                    elif time.monotonic() - alone_since >= grace:
                        raise UserError(f"the Dask cluster has had no worker for {grace:g} s, so it cannot "
                                        f"finish the run; nothing was written") from None
                    continue
                if any(f.status != "finished" for f in done):
                    return  # gather raises the error
                alone_since = None

    def map(self, fn, per):
        """``fn(source, *per[t])`` for each source ``t`` whose ``per[t]`` is
        not None, run on the workers, one task per shard; results in order."""
        by_shard = {}
        for t, a in enumerate(per):
            if a is not None:
                by_shard.setdefault(self.shard_of[t], []).append(t)
        src = self.sources
        jobs = [(_on_shard, (self.spec, shard, [(src[t].name, src[t].inv, src[t].scaled, per[t]) for t in ts], fn))
                for shard, ts in by_shard.items()]
        out = [None] * len(self.sources)
        for ts, results in zip(by_shard.values(), self._run(jobs)):
            for t, r in zip(ts, results):
                out[t] = _unpack(r)
        return out

    def write(self, tmp, plan, result, progress=None):
        """The writing pass: each shard pruned and written by a worker into a
        parts folder beside ``tmp``, then moved into ``tmp``; the summaries
        in the order one process gives them; the index and the other files
        copied; anything else in ``tmp`` removed; the parts folder removed."""
        _, selection, pattern = plan
        shards = self.reader.shards
        items = {shard: [] for shard in shards}
        for i, (src, shard) in enumerate(zip(self.sources, self.shard_of)):
            items[shard].append((src.name, src.inv, src.scaled, i))
        tmp = os.path.abspath(tmp)
        parts = _parts_folder(tmp)
        try:
            jobs = [(_write_shard, (self.spec, shard, parts, items[shard], selection, pattern)) for shard in shards]
            total = len(self.sources)
            for shard, (summaries, path) in zip(shards, self._run(jobs)):
                if os.path.dirname(os.path.dirname(path)) != parts or os.path.basename(path) != shard:
                    raise UserError(f"a Dask worker wrote shard {shard!r} at {path!r}, outside {parts!r}; "
                                    f"nothing was written")
                os.replace(path, os.path.join(tmp, shard))
                result.summary.extend(summaries)
                if progress is not None and summaries:
                    progress(len(result.summary), total, summaries[-1].name)
        finally:
            _remove(parts)  # partial files of killed workers; a late writer finds its folder gone
        pruned = set(self.names)
        result.copied = [n for n in self.reader.entries if n not in pruned]
        self.reader.copy_files(tmp)
        expected = set(shards) | {_first(rel) for rel in ([self.reader.index_name] if self.reader.index_name
                                                          else []) + self.reader.other_files()}
        for name in os.listdir(tmp):  # nothing but the output goes into place
            if name not in expected:
                _remove(os.path.join(tmp, name))


def _first(rel):
    """The first component of a relative path."""
    return os.path.normpath(rel).split(os.sep)[0]


def _remove(path):
    """Remove a file or a folder tree, whatever a late writer does meanwhile."""
    for _ in range(3):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if not os.path.lexists(path):
            return


def _parts_folder(tmp):
    """A new folder beside ``tmp`` for the workers' files, named as ``tmp``
    is (its stem, with the client's process id, and its suffix) so that, if
    the client is killed, the next write to the same output removes it as
    it removes ``tmp``."""
    stem, dot, suffix = os.path.basename(tmp).rpartition(".")
    if not stem:
        stem, dot, suffix = suffix, "", ""
    return tempfile.mkdtemp(prefix=f"{stem}-parts-", suffix=dot + suffix, dir=os.path.dirname(tmp))


def tasks_per_host(client):
    """``{host: tasks it runs at once}``: the threads of the workers on each machine."""
    per = {}
    for w in client.scheduler_info()["workers"].values():
        per[w["host"]] = per.get(w["host"], 0) + w["nthreads"]
    return per


def submit_in_share(client, hosts, fn, *args):
    """``client.submit(fn, *args)`` (never cached: ``pure=False``), run with the task thread's Numba threads
    set to its share of its machine's cores (``hosts``: :func:`tasks_per_host`)."""
    return client.submit(_in_share, hosts, fn, *args, key=f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}",
                         pure=False)


# --- on the workers ---------------------------------------------------------------

def _in_share(hosts, fn, *args):
    """``fn(*args)`` with this thread's Numba threads set to its share of
    the machine's cores (``hosts``: the tasks each machine runs at once)."""
    import numba
    from distributed import get_worker
    from distributed.comm import get_address_host

    worker = get_worker()
    tasks = hosts.get(get_address_host(worker.address)) or worker.state.nthreads
    before = numba.get_num_threads()
    numba.set_num_threads(min(_numba_share(_usable_cores(), tasks), numba.config.NUMBA_NUM_THREADS))
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(before)


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


def write_shard(reader, path, tensor):
    """One shard at ``path``, written like its input with ``tensor(name)``
    for each tensor (the seam the fault tests replace on a worker)."""
    reader.write_like(path, tensor)


def _write_shard(spec, shard, parts, items, selection, pattern):
    """One shard pruned (``items``: its pruned tensors and their places in
    the plan) and written, under its own name (torch.save records the name
    in the archive), into a new folder of its own inside ``parts``; returns
    the summaries and the file's path. The client moves the file into the
    output's temporary folder: a worker never writes there, so a worker
    killed mid-write, or one still writing when the client has finished,
    leaves nothing in the output."""
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

        part = os.path.join(parts, f".part-{uuid.uuid4().hex}")
        os.mkdir(part)  # fails once the client has removed the parts folder
        path = os.path.join(part, shard)
        try:
            write_shard(reader, path, tensor)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        return summaries, path
