"""Dask under faults: workers killed mid-write or all at once, a late ("zombie") writer, a local cluster that
fails to start, more workers than the machine holds, and each worker's share of the cores. Real worker
processes throughout; each test takes seconds."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sparsecore.io import UserError, open_weights, prune_file
from sparsecore.io.tensorwise import lazy_sources

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")
import dask  # noqa: E402
import numba  # noqa: E402

from sparsecore.io import cluster as sc_cluster  # noqa: E402

from .test_dask import _same_folders, _slow_writes, make_checkpoint  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the test module

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model", shards=3, per=2, rows=64, cols=96)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        yield c


def _write_then_die(src, path, tensor):
    """On a worker: the shard's file is written up to its second tensor, then the worker is killed."""
    seen = []

    def first_only(name):
        if seen:
            os.kill(os.getpid(), signal.SIGKILL)
        seen.append(name)
        return tensor(name)
    src.write_like(path, first_only)


def _dying_mid_write():
    """On a worker: its first shard write dies half-way (the nanny's restarted worker writes normally)."""
    from sparsecore.io import cluster

    cluster.write_shard = _write_then_die


def test_a_worker_killed_mid_write_leaves_no_partial_file(model, tmp_path):
    one = prune_file(model, tmp_path / "one", sparsity=0.6, scope="global")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        c.run(_dying_mid_write)
        pid = next(iter(c.run(os.getpid).values()))
        many = prune_file(model, tmp_path / "many", sparsity=0.6, scope="global", client=c)
        assert pid not in c.run(os.getpid).values()  # the worker was killed (and restarted by its nanny)
    _same_folders(tmp_path / "one", tmp_path / "many")  # the half-written file is not in the output
    assert many.summary == one.summary
    assert sorted(os.listdir(tmp_path)) == ["many", "one"]  # nor beside it


def test_a_late_writer_never_writes_into_the_output(client, model, tmp_path, monkeypatch):
    """A worker still writing a shard when the client has finished (its task ran again elsewhere)."""
    one = prune_file(model, tmp_path / "one", sparsity=0.5)
    started, resume, zombies = threading.Event(), threading.Event(), []
    real_run, real_write = sc_cluster.ShardExecutor._run, sc_cluster.write_shard

    def paused_write(src, path, tensor):  # in this process only (the zombie): stops after its first tensor
        seen = []

        def tensor_then_wait(name):
            if seen:
                started.set()
                assert resume.wait(60)
            seen.append(name)
            return tensor(name)
        real_write(src, path, tensor_then_wait)

    def zombie(args):
        with _anything():
            sc_cluster._write_shard(*args)

    def run(self, jobs):
        if jobs and jobs[0][0] is sc_cluster._write_shard:  # the writing pass: a zombie starts the first shard
            t = threading.Thread(target=zombie, args=(jobs[0][1],), daemon=True)
            t.start()
            zombies.append(t)
            assert started.wait(60)
        return real_run(self, jobs)

    monkeypatch.setattr(sc_cluster, "write_shard", paused_write)
    monkeypatch.setattr(sc_cluster.ShardExecutor, "_run", run)
    many = prune_file(model, tmp_path / "many", sparsity=0.5, client=client)
    resume.set()  # the zombie writes the rest of its file, after the output is in place
    zombies[0].join(60)
    assert not zombies[0].is_alive()
    _same_folders(tmp_path / "one", tmp_path / "many")
    assert many.summary == one.summary
    assert sorted(os.listdir(tmp_path)) == ["many", "one"]


class _anything:
    """A context that swallows any error: whether a zombie's write fails or not, it must leave nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def test_a_cluster_without_workers_fails_in_bounded_time(model, tmp_path, monkeypatch):
    monkeypatch.setattr(sc_cluster, "NO_WORKER_GRACE", 2.0, raising=False)  # absent: waits forever
    with distributed.LocalCluster(n_workers=0, dashboard_address=":0") as lc, distributed.Client(lc) as c:
        # a worker with its nanny, in a process group of their own: killed together, none comes back
        p = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", lc.scheduler_address,
                              "--nthreads", "1", "--no-dashboard"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            c.wait_for_workers(1, timeout=60)
            c.run(_slow_writes, 30)
            got = []

            def run():
                try:
                    prune_file(model, tmp_path / "out", sparsity=0.5, client=c)
                except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                    got.append(exc)
            t = threading.Thread(target=run, daemon=True)
            t.start()
            deadline = time.monotonic() + 60
            while not any("_write_shard" in str(k) for v in c.processing().values() for k in v):
                assert time.monotonic() < deadline and t.is_alive()
                time.sleep(0.05)
            os.killpg(p.pid, signal.SIGKILL)
            killed = time.monotonic()
            t.join(30)
            assert not t.is_alive(), "the run waits for a worker forever"
            assert time.monotonic() - killed < 15
        finally:
            with _anything():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert len(got) == 1 and isinstance(got[0], UserError), got
    assert str(got[0]) == "the Dask cluster has had no worker for 2 s, so it cannot finish the run; nothing was written"
    assert os.listdir(tmp_path) == []  # neither the output nor a temporary folder


def test_a_local_cluster_that_fails_to_start_says_so_in_one_line(model, tmp_path):
    kill = tmp_path / "kill_at_start.py"  # a worker preload: the worker is killed as it starts
    kill.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with dask.config.set({"distributed.worker.preload": [str(kill)]}), \
            pytest.raises(UserError, match=r"^--workers 1: the local Dask cluster failed to start \(RuntimeError"):
        with sc_cluster.connect(workers=1):
            pass
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": f"[{str(kill)!r}]"}
    r = subprocess.run([sys.executable, "-m", "sparsecore", "prune", str(model), "-o", str(tmp_path / "out"),
                        "--sparsity", "0.5", "--workers", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "sparsecore: error: --workers 1: the local Dask cluster failed to start"), r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_more_workers_than_the_machine_holds_are_refused(monkeypatch):
    with pytest.raises(UserError, match=rf"^--workers {CORES + 1}: this machine can hold at most {CORES} worker "
                                        rf"processes \(one per usable core: {CORES}; one per 320 MiB"):
        with sc_cluster.connect(workers=CORES + 1):
            pass
    monkeypatch.setattr(sc_cluster, "_usable_cores", lambda: 64)
    monkeypatch.setattr(sc_cluster, "_available_memory", lambda: 3 * sc_cluster.WORKER_MEMORY + 5)
    assert sc_cluster.max_workers() == (3, 64, 3 * sc_cluster.WORKER_MEMORY + 5)
    with pytest.raises(UserError, match=r"^--workers 4: this machine can hold at most 3 worker processes \(one per "
                                        r"usable core: 64; one per 320 MiB of available memory: 0\.9 GiB\)$"):
        with sc_cluster.connect(workers=4):
            pass
    monkeypatch.setattr(sc_cluster, "_available_memory", lambda: 5)
    assert sc_cluster.max_workers()[0] == 1  # one worker is always allowed: one process would need as much
    with pytest.raises(UserError, match=r"--workers must be a whole number >= 1, got 0"):
        with sc_cluster.connect(workers=0):
            pass


def test_the_machine_figures_are_sane():
    limit, cores, memory = sc_cluster.max_workers()
    assert cores == CORES and 0 < memory and 1 <= limit <= cores


def _threads(source):
    import numba

    return numba.get_num_threads()


def test_each_worker_runs_numba_on_its_share_of_the_cores(client, model):
    share = max(1, CORES // 2)  # two single-threaded workers on this machine
    with open_weights(model) as reader:  # the tasks of a data pass, on a cluster started without settings
        names = reader.select([], [])
        srcs = lazy_sources(reader, names, None)
        executor = sc_cluster.ShardExecutor(client, reader, names, [srcs[n] for n in names])
        assert executor.map(_threads, [()] * len(names)) == [share] * len(names)
    after = client.gather([client.submit(numba.get_num_threads, pure=False) for _ in range(4)])
    assert after == [CORES] * 4  # restored after each task
    n = min(2, sc_cluster.max_workers()[0])
    with sc_cluster.connect(workers=n) as c:  # a local cluster's workers start with their share
        assert c.submit(numba.get_num_threads, pure=False).result() == max(1, CORES // n)


_CLI = r"""
import sys, time
from sparsecore import cli
from sparsecore.io import cluster
if sys.argv[1] == "hold":  # the cluster is up and the run under way: hold there until interrupted
    def hold(*args, **kwargs):
        print("READY", flush=True)
        time.sleep(60)
    cluster.ShardExecutor.write = hold
sys.exit(cli.main(sys.argv[2:]))
"""


def _cli_run(mode, *args):
    return subprocess.Popen([sys.executable, "-c", _CLI, mode, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_cluster_run_prints_only_our_lines(model, tmp_path):
    """Finished, interrupted by Ctrl-C (SIGINT to the whole process group, as a terminal sends it), or with
    its logs asked for: nothing of Dask's on the terminal, no worker traceback."""
    p = _cli_run("run", "prune", model, "-o", tmp_path / "a", "--sparsity", "0.5", "--workers", "2", "--quiet")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == "" and out == "", err
    p = _cli_run("hold", "prune", model, "-o", tmp_path / "b", "--sparsity", "0.5", "--workers", "2", "--quiet")
    assert p.stdout.readline().strip() == "READY"
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "sparsecore: interrupted; no output was written", err
    assert not os.path.exists(tmp_path / "b")
    log = tmp_path / "dask.log"
    p = _cli_run("run", "prune", model, "-o", tmp_path / "c", "--sparsity", "0.5", "--workers", "2", "--quiet",
                 "--dask-log", log)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == "", err
    text = log.read_text()
    assert "distributed.scheduler" in text and "distributed.nanny" in text
