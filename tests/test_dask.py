"""Dask: sharded checkpoints pruned on a local cluster of worker processes, bit for bit as one process
prunes them; accumulators combined by a tree of merges; wide pairwise MI in blocks."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.io import UserError, prune_file
from sparsecore.io import _safetensors as st

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")
from sparsecore import parallel  # noqa: E402
from sparsecore.io import cluster as sc_cluster  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the test module


def make_checkpoint(folder, shards=4, per=3, rows=256, cols=320, seed=0, bf16=True):
    """A model folder of safetensors shards with an index, a config and a tokenizer file: float32 matrices
    (one bf16 per shard), a bias and an int tensor per shard."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        items = []
        for t in range(per):
            a = rng.standard_normal((rows + 8 * t, cols)).astype(np.float32) * (1 + s)
            if bf16 and t == 0:
                items.append((f"layers.{s}.w{t}.weight", "BF16", a.shape,
                              lambda a=a: (a.view(np.uint32) >> 16).astype(np.uint16)))
            else:
                items.append((f"layers.{s}.w{t}.weight", "F32", a.shape, lambda a=a: a))
        b = rng.standard_normal(cols).astype(np.float32)
        items.append((f"layers.{s}.bias", "F32", b.shape, lambda b=b: b))
        items.append((f"layers.{s}.steps", "I64", (2,), lambda: np.arange(2, dtype=np.int64)))
        for n, *_ in items:
            weight_map[n] = shard
        with open(os.path.join(folder, shard), "wb") as f:
            st.write(f, items, {"format": "pt"})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "test"}, f)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0"}')
    return folder


def _same_folders(a, b):
    fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert fa == fb
    for name in fa:
        with open(os.path.join(a, name), "rb") as x, open(os.path.join(b, name), "rb") as y:
            assert x.read() == y.read(), name


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        yield c


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model")


CASES = {
    "local": dict(sparsity=0.5),
    "global, default caps (radix histograms)": dict(sparsity=0.7, scope="global"),
    "global, no caps (sampled bracket)": dict(sparsity=0.7, scope="global", max_sparsity=1.0),
    "global, binding caps": dict(sparsity=0.8, scope="global", min_sparsity=0.3, max_sparsity=0.85),
    "global, l2 normalised": dict(sparsity=0.6, scope="global", normalize="l2"),
    "global, per-tensor caps and max normalised": dict(sparsity=0.5, scope="global", normalize="max",
                                                        max_sparsity={"layers.0.w1.weight": 0.2}),
    "2:4": dict(pattern="2:4"),
    "threshold with caps": dict(threshold=0.5, max_sparsity=0.4),
    "row": dict(sparsity=0.5, scope="row"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shards_on_workers_equal_one_process(client, model, tmp_path, case):
    kw = CASES[case]
    if isinstance(kw.get("max_sparsity"), dict):  # every tensor needs a cap: the others get the default
        with sc.io.open_weights(model) as r:
            names = r.select([], [])
        kw = {**kw, "max_sparsity": {n: kw["max_sparsity"].get(n, 0.99) for n in names}}
    one = prune_file(model, tmp_path / "one", **kw)
    many = prune_file(model, tmp_path / "many", client=client, **kw)
    _same_folders(tmp_path / "one", tmp_path / "many")
    assert many.summary == one.summary and many.copied == one.copied
    assert 0 < many.moved_bytes < one.input_bytes / 4  # histograms, counts and rules, never the tensors
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_scores_files_are_read_by_the_workers(client, model, tmp_path):
    scores = make_checkpoint(tmp_path / "scores", seed=1, bf16=False)  # same names and shapes, other values
    one = prune_file(model, tmp_path / "one", sparsity=0.6, scope="global", scores=scores)
    many = prune_file(model, tmp_path / "many", sparsity=0.6, scope="global", scores=scores, client=client)
    _same_folders(tmp_path / "one", tmp_path / "many")
    assert many.summary == one.summary


def test_bad_input_is_refused_as_in_one_process(client, model, tmp_path):
    bad = make_checkpoint(tmp_path / "bad", shards=2, cols=322)  # 322 columns: not in groups of 4
    with pytest.raises(ValueError, match="multiple of 4|groups of 4|divisible"):
        prune_file(bad, tmp_path / "out", pattern="2:4", client=client)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(UserError, match="a Dask cluster prunes a sharded checkpoint"):
        prune_file(model, tmp_path / "out.sparse.h5", sparsity=0.5, client=client)


def _slow_writes(seconds):
    """On a worker: the shard writes take ``seconds`` longer (a worker restarted by its nanny is fast)."""
    from sparsecore.io import cluster

    original = cluster._write_shard

    def slow(*args):
        time.sleep(seconds)
        return original(*args)
    cluster._write_shard = slow


def _die(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def _dying_writes():
    """On a worker: a shard write kills the worker."""
    from sparsecore.io import cluster

    cluster._write_shard = _die


def test_a_worker_killed_mid_run_is_retried_with_the_same_result(model, tmp_path):
    one = prune_file(model, tmp_path / "one", sparsity=0.7, scope="global")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as c:
        c.run(_slow_writes, 1.5)
        pids = list(c.run(os.getpid).values())
        got, errors = {}, []

        def run():
            try:
                got["r"] = prune_file(model, tmp_path / "many", sparsity=0.7, scope="global", client=c)
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                errors.append(exc)
        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 60
        while not any("_write_shard" in str(k) for v in c.processing().values() for k in v):
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)  # mid-write: its shard is written again elsewhere
        t.join(120)
        assert not t.is_alive() and not errors, errors
    _same_folders(tmp_path / "one", tmp_path / "many")
    assert got["r"].summary == one.summary


def test_a_cluster_that_gives_up_leaves_no_output(model, tmp_path):
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as lc, distributed.Client(lc) as c:
        c.run(_dying_writes)
        with pytest.raises(UserError, match=r"the Dask cluster could not finish the run \(KilledWorker"):
            prune_file(model, tmp_path / "out", sparsity=0.5, client=c)
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary folder


def test_the_command_line_runs_on_a_local_cluster(model, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sparsecore", "prune", str(model), *map(str, args)],
                              capture_output=True, text=True, timeout=300)
    limit = sc_cluster.max_workers()[0]
    a = cli("-o", tmp_path / "one", "--sparsity", "0.7", "--scope", "global", "--quiet")
    b = cli("-o", tmp_path / "many", "--sparsity", "0.7", "--scope", "global", "--workers", min(2, limit))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert "moved between the client and the workers" in b.stdout
    _same_folders(tmp_path / "one", tmp_path / "many")
    c = cli("-o", tmp_path / "x", "--sparsity", "0.7", "--workers", "0")
    assert c.returncode == 2 and "--workers must be 1 or more" in c.stderr
    e = cli("-o", tmp_path / "x", "--sparsity", "0.7", "--workers", limit + 1)  # refused before any file is read
    assert e.returncode == 1 and e.stderr.startswith(
        f"sparsecore: error: --workers {limit + 1}: this machine can hold at most {limit} worker processes (one per "
        f"usable core: "), e.stderr
    d = cli("-o", tmp_path / "x", "--sparsity", "0.7", "--dask", "tcp://127.0.0.1:1")
    assert d.returncode != 0 and "--dask tcp://127.0.0.1:1: no Dask scheduler answers there" in d.stderr
    assert not os.path.exists(tmp_path / "x")


def test_without_dask_the_flags_say_what_to_install(model, tmp_path):
    code = ("import sys; sys.modules['distributed'] = None; from sparsecore.cli import main; "
            f"sys.exit(main(['prune', {str(model)!r}, '-o', {str(tmp_path / 'out')!r}, '--sparsity', '0.5', "
            "'--workers', '2']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "pip install 'sparsecore[dask]'" in r.stderr
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(UserError, match=r"pip install 'sparsecore\[dask\]'"):
        sys.modules["distributed"], saved = None, sys.modules["distributed"]
        try:
            sc_cluster.require()
        finally:
            sys.modules["distributed"] = saved


# --- calibration statistics and pairwise MI ---------------------------------------------------

def _shard_data(seed, n=300, d=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * (1 + seed % 3)
    return x, rng.integers(0, 3, n)


def _hessian(seed):
    return sc.HessianAccumulator(24).update(_shard_data(seed)[0])


def _gradients(seed):
    acc = sc.GradientAccumulator(("g", "g2"))
    x, _ = _shard_data(seed)
    for i in range(0, len(x), 50):  # float32 batch gradients, as a framework gives them
        acc.update({"w": x[i:i + 50].astype(np.float32)})
    return acc


BINS = sc.fit_bins(np.vstack([_shard_data(s)[0] for s in range(8)]), 8)


def _unit_mi(seed):
    x, y = _shard_data(seed)
    return sc.UnitMIAccumulator(BINS, 3).update(x, y)


def _pair_mi(seed):
    x, _ = _shard_data(seed)
    return sc.PairwiseMIAccumulator(BINS, BINS).update(x, np.tanh(x[:, ::-1]))


def test_tree_merges_equal_one_pass(client):
    seeds = list(range(8))
    x = np.vstack([_shard_data(s)[0] for s in seeds])
    y = np.concatenate([_shard_data(s)[1] for s in seeds])
    h = parallel.accumulate(client, _hessian, seeds, split_every=3)  # three levels: 8 -> 3 -> 1
    one = sc.HessianAccumulator(24).update(x)
    assert h.count == one.count == 2400
    np.testing.assert_allclose(h.hessian(), one.hessian(), rtol=1e-13, atol=1e-10)  # float64 sums, reordered
    g = parallel.accumulate(client, _gradients, seeds, split_every=2)
    whole = sc.GradientAccumulator(("g", "g2"))
    for i in range(0, len(x), 50):
        whole.update({"w": x[i:i + 50].astype(np.float32)})
    want, got = whole.state("w"), g.state("w")
    x32 = x.astype(np.float32).astype(np.float64)
    for s in ("g", "g2"):  # the stated bound of "mixed" precision: 1e-6 of the sum of |terms|
        bound = 1e-6 * sum(np.abs(x32[i:i + 50] ** (2 if s == "g2" else 1)) for i in range(0, len(x), 50))
        assert np.all(np.abs(got[s] - want[s]) <= bound)
    u = parallel.tree_merge(client, [client.submit(_unit_mi, s) for s in seeds])
    np.testing.assert_array_equal(u.counts, sc.UnitMIAccumulator(BINS, 3).update(x, y).counts)
    p = parallel.accumulate(client, _pair_mi, seeds, split_every=4)
    whole_p = sc.PairwiseMIAccumulator(BINS, BINS).update(x, np.tanh(x[:, ::-1]))
    np.testing.assert_array_equal(p.counts, whole_p.counts)
    assert p.n == whole_p.n == 2400
    np.testing.assert_array_equal(p.mi(), whole_p.mi())


def _hessian_on_its_share(seed):
    import numba

    from sparsecore.io.cluster import _numba_share, _usable_cores

    want = min(_numba_share(_usable_cores(), 2), numba.config.NUMBA_NUM_THREADS)  # 2 one-thread workers
    if numba.get_num_threads() != want:
        raise RuntimeError(f"a calibration task ran Numba on {numba.get_num_threads()} threads, not {want}")
    return _hessian(seed)


def test_calibration_tasks_run_numba_on_their_share_of_the_cores(client):
    h = parallel.accumulate(client, _hessian_on_its_share, list(range(4)), split_every=2)
    assert h.count == 1200


def test_tree_merge_refuses_what_it_cannot_merge(client):
    with pytest.raises(ValueError, match="split_every must be an integer >= 2, got 1"):
        parallel.tree_merge(client, [_hessian(0)], split_every=1)
    with pytest.raises(ValueError, match="needs at least one accumulator"):
        parallel.tree_merge(client, [])
    with pytest.raises(TypeError, match=r"tree_merge combines accumulators \(sparsecore.Accumulator"):
        parallel.tree_merge(client, [np.ones(3), np.ones(3)])
    with pytest.raises(TypeError, match="of one kind, got HessianAccumulator and GradientAccumulator"):
        parallel.tree_merge(client, [_hessian(0), sc.GradientAccumulator()])
    with pytest.raises(ValueError, match="can merge only a HessianAccumulator of 24 features"):
        parallel.tree_merge(client, [_hessian(0), sc.HessianAccumulator(5).update(np.ones((2, 5)))])


@pytest.mark.parametrize("block", [7, (5, 11), 1024])
def test_pairwise_mi_in_blocks_equals_one_call(client, block):
    rng = np.random.default_rng(3)
    a_in = rng.standard_normal((500, 23))
    a_out = np.tanh(a_in @ rng.standard_normal((23, 17))) + 0.1 * rng.standard_normal((500, 17))
    want = sc.pairwise_mi(a_in, a_out, bins=8, correction="miller-madow")
    got = parallel.pairwise_mi(client, a_in, a_out, bins=8, correction="miller-madow", block=block)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        parallel.pairwise_mi(client, a_in, a_out, block=0)
    with pytest.raises(ValueError, match="inputs hold 500 samples but outputs 499"):
        parallel.pairwise_mi(client, a_in, a_out[:499])


def test_the_recipe_with_the_pytorch_adapter_runs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "dask_calibration.py")
    r = subprocess.run([sys.executable, example, "--workers", "2", "--shards", "4"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("4 shards on 2 workers"))
    count, one = (int(v) for v in re.findall(r"Hessian count (\d+) \(one pass (\d+)\)", line)[0])
    assert count == one > 0
    hess, fisher = (float(v) for v in re.findall(r"Hessian ([0-9.e+-]+), Fisher ([0-9.e+-]+)", line)[0])
    assert hess < 1e-12 and fisher < 1e-6
    acc = float(re.findall(r"SparseGPT on the first layer .*: test accuracy ([0-9.]+)", r.stdout)[0])
    assert acc > 0.9


def test_bin_shards_on_workers_equal_one_process(client, tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(64, 48, generator=g) * (i + 1) for i in range(6)}
    sd["layers.0.weight"] = sd["layers.0.weight"].to(torch.bfloat16)
    folder = tmp_path / "bin"
    folder.mkdir()
    halves = {"pytorch_model-00001-of-00002.bin": list(sd)[:3], "pytorch_model-00002-of-00002.bin": list(sd)[3:]}
    for shard, names in halves.items():
        torch.save({n: sd[n] for n in names}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, ns in halves.items() for n in ns}}))
    one = prune_file(folder, tmp_path / "one", sparsity=0.6, scope="global")
    many = prune_file(folder, tmp_path / "many", sparsity=0.6, scope="global", client=client)
    _same_folders(tmp_path / "one", tmp_path / "many")  # torch.save names its archive after the file
    assert many.summary == one.summary
