"""CUDA kernels against the CPU kernels and references.

On the Numba CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1``, set before
Numba is imported, in a process of its own; threads per block shrunk so that
tiny inputs span several blocks), and on a real GPU when one is lent
(``bench/gpu.sh``). Skipped where neither is available.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecore import _device

from . import reference as ref
from .conftest import DTYPES, make

try:
    _device.cuda()
except RuntimeError as exc:  # no GPU and no simulator
    pytest.skip(f"CUDA unavailable: {exc}", allow_module_level=True)

import sparsecore as sc
from sparsecore import cuda as scu
from sparsecore._cuda import csr as device_csr
from sparsecore._cuda import select as device_select

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_device, "THREADS", 8)
    monkeypatch.setattr(_device, "THREADS_2D", (4, 4))
    monkeypatch.setattr(_device, "ROW_THREADS", 4)
    monkeypatch.setattr(_device, "HIST_BLOCKS", 2)  # two shared histograms flushed into one
    # Grids far below CUDA's limits (checked on every launch by tests/_launches.py), so that every
    # kernel's grid-stride loops run: large axes must be looped inside the kernels, not put on a grid
    # axis that stops at 65,535 blocks.
    monkeypatch.setattr(_device, "MAX_GRID", (3, 2, 2))


def test_device_selection_errors():
    with pytest.raises(ValueError, match="device must be"):
        _device.resolve("gpu")
    assert _device.resolve("auto", np.ones(2)) == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind", [((1, 1), "normal"), ((3, 40), "ties"), ((9, 7), "zero_rows"),
                                         ((2, 3, 2, 2), "ties"), ((5,), "normal"), ((0, 4), "normal")])
def test_to_csr_matches_cpu(rng, dtype, shape, kind):
    w = make(rng, shape, dtype, kind)
    for kw in (dict(threshold=0.5), dict(sparsity=0.0), dict(sparsity=0.4), dict(sparsity=1.0), dict(),
               dict(mask=make(rng, shape, np.float32) > 0)):
        got = scu.to_csr(w, **kw).to_scipy()
        want = sc.to_csr(w, **kw)
        assert got.indices.dtype == want.indices.dtype
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
    s = make(rng, shape, dtype, "ties")
    got = scu.to_csr(w, scores=s, sparsity=0.5).to_scipy()
    want = sc.to_csr(w, scores=s, sparsity=0.5)
    np.testing.assert_array_equal(got.toarray(), want.toarray())


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_rule_matches_cpu(rng, dtype):
    from sparsecore.selection import scores_source, select_one

    s = make(rng, (5, 7), dtype, "ties")
    for k in (0, 1, 5, 20, 35):
        dev = scores_source(s, absolute=True, device="cuda")
        assert dev.on_device
        assert select_one(dev, k) == select_one(scores_source(s, absolute=True), k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (6, 20), (33, 7), (5, 90)])
def test_csr_products_match_reference(rng, dtype, shape):
    w = make(rng, shape, dtype, "zero_rows")
    a = sc.to_csr(w, sparsity=0.6)
    x = rng.standard_normal(shape[1]).astype(dtype)
    X = rng.standard_normal((shape[1], 5)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(scu.csr_matmul(a, x).copy_to_host(), ref.matmul(a.toarray(), x), rtol=tol, atol=tol)
    if shape == (5, 90):  # 36 entries a row: the thread-group kernel, with an empty row
        assert device_csr.vector_width(a.nnz / a.shape[0]) == 8  # THREADS is 8 here
    dev = scu.to_csr(w, sparsity=0.6)
    np.testing.assert_allclose(scu.csr_matmul(dev, X).copy_to_host(), ref.matmul(a.toarray(), X), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_device_accumulator_matches_reference(rng, dtype, per_sample):
    c = _device.cuda()
    shapes = {"a": (5, 7), "b": (3,)}
    batches = [{k: make(rng, (3, *s) if per_sample else s, dtype) for k, s in shapes.items()} for _ in range(4)]
    ws = [{k: make(rng, s, dtype) for k, s in shapes.items()} for _ in range(4)]
    acc = sc.GradientAccumulator(stats=("g", "g2", "wg", "wg2"), device="auto")
    for g, w in zip(batches, ws):
        acc.update({k: c.to_device(v) for k, v in g.items()}, w, per_sample=per_sample)
    assert acc.device == "cuda" and acc.precision == "float64"
    for k in shapes:
        want = ref.accumulate([g[k] for g in batches], [w[k] for w in ws], per_sample=per_sample)
        got = acc.state(k)
        assert got["count"] == (12 if per_sample else 4)
        for s in ("g", "g2", "wg", "wg2"):
            assert got[s].shape == shapes[k]
            np.testing.assert_allclose(got[s].copy_to_host(), want[s], rtol=1e-12, atol=1e-12)


def test_device_accumulator_merge_state_dict_reset_and_errors(rng):
    c = _device.cuda()
    gs = [make(rng, (4, 3), np.float32) for _ in range(3)]
    one = sc.GradientAccumulator(device="cuda").update(gs[0]).update(gs[1])
    two = scu.DeviceAccumulator().update(c.to_device(gs[2]))
    host = sc.GradientAccumulator(precision="float64")
    for g in gs:
        host.update(g)
    merged = sc.GradientAccumulator(device="cuda").merge(one).merge(two)
    np.testing.assert_allclose(merged.state()["g2"].copy_to_host(), host.state()["g2"], rtol=1e-12)
    assert merged.count == 3 and merged.n_batches == 3
    back = sc.GradientAccumulator.from_state_dict(merged.state_dict(), device="cuda")
    np.testing.assert_array_equal(back.state()["g2"].copy_to_host(), merged.state()["g2"].copy_to_host())
    before = merged.state()["g2"].copy_to_host()
    bad = gs[0].copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"gradients 'grads' hold 1 NaN or Inf value \(first: Inf at index \(2, 1\)\)"):
        merged.update(c.to_device(bad))
    np.testing.assert_array_equal(merged.state()["g2"].copy_to_host(), before)  # a bad batch adds nothing
    assert merged.count == 3
    with pytest.raises(ValueError, match="cannot merge an accumulator on 'cpu'"):
        merged.merge(host)
    with pytest.raises(ValueError, match="shape"):
        merged.update(c.to_device(gs[0][:2]))
    w = {"x": make(rng, (2, 3), np.float32)}
    wbad = {"x": w["x"].copy()}
    wbad["x"][1, 1] = np.nan
    acc = sc.GradientAccumulator(stats=("wg",), device="cuda").update(w, w)
    with pytest.raises(ValueError, match=r"weights 'x' hold 1 NaN"):
        acc.update(w, wbad)
    np.testing.assert_allclose(acc.state("x")["wg"].copy_to_host(), w["x"].astype(np.float64) ** 2, rtol=1e-7)
    assert merged.reset().state()["g2"].copy_to_host().sum() == 0 and merged.count == 0


def test_mutual_information_counts_match_cpu(rng):
    acts = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    bins = sc.fit_bins(acts, 8)
    cpu = sc.UnitMIAccumulator(bins, 3).update(acts, y)
    np.testing.assert_array_equal(scu.UnitMICounts(bins, 3).update(acts, y).counts.copy_to_host(), cpu.counts)
    a_in = rng.standard_normal((40, 4))
    a_out = np.tanh(a_in @ rng.standard_normal((4, 3)))
    got = scu.pairwise_mi(a_in, a_out, sc.fit_bins(a_in, 6), sc.fit_bins(a_out, 6))
    np.testing.assert_allclose(got, sc.pairwise_mi(a_in, a_out, bins=6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(), dict(base=2), dict(correction="miller-madow"), dict(normalized=True),
                                  dict(bins="sturges")])
def test_public_mi_on_the_device_matches_cpu(rng, opts):
    c = _device.cuda()
    a_in = rng.standard_normal((30, 4)).astype(np.float32)
    a_in[:, 2] = 1.5  # a constant unit
    a_out = np.tanh(a_in @ rng.standard_normal((4, 3)).astype(np.float32))
    y = rng.integers(0, 3, 30)
    d_in, d_out = c.to_device(a_in), c.to_device(a_out)
    kw = {"bins": 5, **opts}
    np.testing.assert_allclose(sc.pairwise_mi(d_in, d_out, **kw), sc.pairwise_mi(a_in, a_out, **kw),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sc.unit_mi(d_out, c.to_device(y), **kw), sc.unit_mi(a_out, y, **kw),
                               rtol=1e-12, atol=1e-14)
    t = a_in[:, 0] * 2.0
    np.testing.assert_allclose(sc.unit_mi(d_out, c.to_device(t), target="continuous", **kw),
                               sc.unit_mi(a_out, t, target="continuous", **kw), rtol=1e-12, atol=1e-14)
    got, want = sc.fit_bins(d_in, 5), sc.fit_bins(a_in, 5)
    assert (got.nbins, got.strategy) == (want.nbins, want.strategy)
    np.testing.assert_array_equal(got.edges, want.edges)


def test_public_mi_on_the_device_refuses_bad_input(rng):
    c = _device.cuda()
    a = rng.standard_normal((10, 3))
    a[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"1 NaN or Inf value\(s\) \(first at sample 4, unit 1\)"):
        sc.unit_mi(c.to_device(a), np.zeros(10, np.int64), device="cuda")
    with pytest.raises(ValueError, match="equal-width"):
        sc.pairwise_mi(np.ones((4, 2)), np.ones((4, 2)), strategy="quantile", device="cuda")
    with pytest.raises(ValueError, match="labels for 'activations' must be >= 0"):
        sc.unit_mi(np.ones((4, 2)), np.array([0, 1, -1, 0]), device="cuda")
    with pytest.raises(ValueError, match="exceed the 1024 cells"):
        sc.pairwise_mi(np.eye(4), np.eye(4), bins=64, device="cuda")
    with pytest.raises(ValueError, match="pass reduce='mean' or reduce='max'"):
        sc.pairwise_mi(np.ones((4, 2, 3, 3)), np.ones((4, 2)), device="cuda")


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_public_mi_of_conv_maps_on_the_device(rng, reduce):
    c = _device.cuda()
    maps = rng.standard_normal((12, 3, 2, 3)).astype(np.float32)
    out = rng.standard_normal((12, 2))
    y = rng.integers(0, 2, 12)
    np.testing.assert_allclose(sc.unit_mi(c.to_device(maps), y, bins=4, reduce=reduce),
                               sc.unit_mi(maps, y, bins=4, reduce=reduce), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sc.pairwise_mi(c.to_device(maps), out, bins=4, reduce=reduce, device="cuda"),
                               sc.pairwise_mi(maps, out, bins=4, reduce=reduce), rtol=1e-12, atol=1e-14)


def _same_result(dev, cpu):
    assert [t.name for t in dev.summary] == [t.name for t in cpu.summary]
    for d, c in zip(dev.summary, cpu.summary):
        assert (d.pruned, d.nnz, d.csr_bytes) == (c.pruned, c.nnz, c.csr_bytes), d.name
    for k, m in cpu.masks.items():
        np.testing.assert_array_equal(dev.masks[k].copy_to_host(), m, err_msg=k)
        got = dev.csr[k].to_scipy()
        assert got.indices.dtype == cpu.csr[k].indices.dtype
        for part in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(got, part), getattr(cpu.csr[k], part), err_msg=f"{k} {part}")
    assert sorted(dev.groups) == sorted(cpu.groups)
    for k, g in cpu.groups.items():
        np.testing.assert_array_equal(dev.groups[k].copy_to_host(), g)
    assert dev.ignored == cpu.ignored


def _weights(rng, dtype=np.float32, kind="ties"):
    return {"conv": make(rng, (4, 4, 2, 2), dtype, kind), "fc1": make(rng, (6, 8), dtype, kind),
            "fc2": make(rng, (3, 8), dtype, "zero_rows")}


PRUNE_CASES = {
    "local": dict(sparsity=0.6),
    "local per tensor": dict(sparsity={"conv": 0.1, "fc1": 0.5, "fc2": 1.0}),
    "global": dict(sparsity=0.6, scope="global"),
    "global caps": dict(sparsity=0.7, scope="global", min_sparsity=0.5, max_sparsity={"conv": 0.6, "fc1": 0.9,
                                                                                    "fc2": 0.8}),
    "threshold": dict(threshold=1.5),
    "threshold caps": dict(threshold=2.5, max_sparsity=0.5, min_sparsity=0.2),
    "global l1": dict(sparsity=0.5, scope="global", normalize="l1"),
    "global l2": dict(sparsity=0.5, scope="global", normalize="l2"),
    "global max": dict(sparsity=0.5, scope="global", normalize="max"),
    "squared": dict(sparsity=0.5, scores="magnitude_squared"),
    "squared global l2": dict(sparsity=0.4, scope="global", scores="magnitude_squared", normalize="l2"),
    "ignore": dict(sparsity=0.5, ignore=["fc2"]),
    "2:4": dict(pattern="2:4"),
    "1:3 axis 0": dict(pattern=sc.NM(1, 3, axis=0)),
    "blocks mean": dict(pattern=sc.Blocks((2, 4)), sparsity=0.5),
    "blocks max global": dict(pattern=sc.Blocks((2, 2), "max"), sparsity=0.5, scope="global"),
    "blocks l2 threshold": dict(pattern=sc.Blocks((3, 4), "l2"), threshold=3.0),
    "units l2": dict(pattern=sc.Units(), sparsity=0.5),
    "units l1 global l2": dict(pattern=sc.Units(reduce="l1"), sparsity=0.5, scope="global", normalize="l2"),
    "units mean axis -1": dict(pattern=sc.Units(axis=-1, reduce="mean"), sparsity=0.4),
    "units max threshold": dict(pattern=sc.Units(reduce="max", min_keep=2), threshold=2.5),
}


WIDE_CASES = ("local", "global caps", "global l2", "threshold caps", "2:4", "blocks mean", "units l2")


@pytest.mark.parametrize("case, dtype", [(c, np.float32) for c in sorted(PRUNE_CASES)]
                         + [(c, np.float64) for c in WIDE_CASES])
def test_prune_on_device_matches_cpu(rng, case, dtype):
    w = _weights(rng, dtype)
    kw = dict(PRUNE_CASES[case])
    if case == "1:3 axis 0":
        w = {"fc": make(rng, (6, 5), dtype, "ties"), "conv": make(rng, (3, 2, 2, 2), dtype, "ties")}
    _same_result(sc.prune(w, device="cuda", **kw), sc.prune(w, device="cpu", **kw))


def test_prune_on_device_mixed_dtypes_and_device_inputs(rng):
    c = _device.cuda()
    w = {"a": make(rng, (5, 4), np.float32, "ties"), "b": make(rng, (3, 4), np.float64, "ties")}
    dw = {k: c.to_device(v) for k, v in w.items()}
    got = sc.prune(dw, sparsity=0.5, scope="global")  # device="auto": device arrays in, device results out
    assert isinstance(got.csr["a"], scu.DeviceCSR)
    _same_result(got, sc.prune(w, sparsity=0.5, scope="global"))
    np.testing.assert_array_equal(got.dense("b"), sc.prune(w, sparsity=0.5, scope="global").dense("b"))


@pytest.mark.parametrize("pattern", [None, "2:4", sc.Blocks((2, 2)), sc.Units()])
def test_prune_on_device_with_current_masks(rng, pattern):
    w = _weights(rng, np.float64, "normal")
    first = sc.prune(w, sparsity=0.3, pattern=None if pattern == "2:4" else pattern)
    masks = {k: m for k, m in first.masks.items() if k != "fc2"}  # fc2 without a mask: all kept
    kw = dict(pattern=pattern, masks=masks)
    if pattern != "2:4":
        kw.update(sparsity=0.6, scope="global")
    _same_result(sc.prune(w, device="cuda", **kw), sc.prune(w, device="cpu", **kw))
    with pytest.raises(ValueError, match="masks only grow"):
        sc.prune(w, device="cuda", masks=masks, sparsity=0.01, pattern=None if pattern == "2:4" else pattern)


def test_prune_on_device_gradient_criteria(rng):
    w = {"fc1": make(rng, (6, 5), np.float32), "fc2": make(rng, (3, 6), np.float32)}
    grads = [{k: make(rng, v.shape, np.float32) for k, v in w.items()} for _ in range(3)]
    host = sc.GradientAccumulator(stats=("g", "g2", "wg", "wg2"), precision="float64")
    dev = scu.DeviceAccumulator(stats=("g", "g2", "wg", "wg2"))
    for g in grads:
        host.update(g, w)
        dev.update(g, w)
    for crit in ("fisher", "taylor", "taylor_squared", "obd"):
        for scope in ("local", "global"):
            want = sc.prune(w, crit, state=host, sparsity=0.5, scope=scope, device="cpu")
            _same_result(sc.prune(w, crit, state=host, sparsity=0.5, scope=scope, device="cuda"), want)
    fixed = {k: {"g": host.state(k)["g"], "g2": host.state(k)["g2"]} for k in w}  # weights fixed: w * sum g
    for crit in ("taylor", "taylor_squared"):
        _same_result(sc.prune(w, crit, state=fixed, sparsity=0.5, device="cuda"),
                     sc.prune(w, crit, state=fixed, sparsity=0.5, device="cpu"))
    wanda = {"fc1": {"x_norm": rng.random(5)}, "fc2": {"x_norm": rng.random(6)}}
    _same_result(sc.prune(w, "wanda", state=wanda, sparsity=0.5, scope="global", device="cuda"),
                 sc.prune(w, "wanda", state=wanda, sparsity=0.5, scope="global", device="cpu"))
    mi = {"fc1": {"mi": rng.random((5, 6))}, "fc2": {"mi": rng.random((3, 6))}}  # fc1 as a Keras (in, out) MI
    _same_result(sc.prune(w, "mutual_info", state=mi, sparsity=0.5, device="cuda"),
                 sc.prune(w, "mutual_info", state=mi, sparsity=0.5, device="cpu"))
    with pytest.raises(ValueError, match="needs the statistic 'g2'"):
        sc.prune(w, "obd", state={k: {"g": 1} for k in w}, sparsity=0.5, device="cuda")


def test_prune_on_device_user_criterion_and_unit_scores(rng):
    c = _device.cuda()
    w = {"fc1": make(rng, (6, 5), np.float32), "fc2": make(rng, (4, 6), np.float32)}
    s = {k: make(rng, v.shape, np.float64) for k, v in w.items()}
    got = sc.prune(w, lambda wd, st: c.to_device(s[next(k for k in w if w[k].shape == wd.shape)]),
                   sparsity=0.5, device="cuda")
    _same_result(got, sc.prune(w, s, sparsity=0.5, device="cpu"))
    units = {"fc1": rng.random(6).astype(np.float32), "fc2": rng.random(4)}
    _same_result(sc.prune(w, units, pattern=sc.Units(), sparsity=0.5, scope="global", device="cuda"),
                 sc.prune(w, units, pattern=sc.Units(), sparsity=0.5, scope="global", device="cpu"))


def test_prune_on_device_refuses_bad_input(rng):
    w = {"fc": make(rng, (4, 8), np.float32)}
    bad = w["fc"].copy()
    bad[2, 3] = np.nan
    for kw in (dict(sparsity=0.5), dict(threshold=0.1), dict(sparsity=0.0), dict(pattern="2:4"),
               dict(pattern=sc.Blocks((2, 2)), sparsity=0.5), dict(sparsity=0.5, scope="global", normalize="l2")):
        with pytest.raises(ValueError, match=r"'fc' hold 1 NaN or Inf value \(first: NaN at index \(2, 3\)\)"):
            sc.prune({"fc": bad}, device="cuda", **kw)
    with pytest.raises(ValueError, match="'fc' hold 1 NaN"):
        sc.prune(w, {"fc": bad}, sparsity=0.5, device="cuda")
    with pytest.raises(TypeError, match="float32 or float64"):
        sc.prune({"fc": np.ones((2, 2), np.int32)}, sparsity=0.5, device="cuda")
    with pytest.raises(ValueError, match="groups above 32"):
        sc.prune({"fc": make(rng, (2, 64), np.float32)}, pattern="1:64", device="cuda")
    with pytest.raises(ValueError, match="global sparsity 0.9 prunes"):
        sc.prune(w, sparsity=0.9, scope="global", max_sparsity=0.5, device="cuda")


def test_torch_adapter_feeds_the_device_accumulator():
    torch = pytest.importorskip("torch")
    from torch import nn

    from sparsecore.adapters import torch as sct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    for per_sample in (False, True):
        dev = sct.collect_gradients(model, data, nn.functional.cross_entropy, per_sample=per_sample,
                                    stats=("g2", "wg"), device="cuda")
        cpu = sct.collect_gradients(model, data, nn.functional.cross_entropy, per_sample=per_sample,
                                    accumulator=sc.GradientAccumulator(stats=("g2", "wg"), precision="float64"))
        assert isinstance(dev, scu.DeviceAccumulator) and dev.count == cpu.count
        for k in sct.prunable(model):
            for s in ("g2", "wg"):
                np.testing.assert_allclose(dev.state(k)[s].copy_to_host(), cpu.state(k)[s], rtol=1e-6, atol=1e-9)


def test_streaming_mi_counts_match_cpu(rng):
    a_in = rng.standard_normal((30, 4))
    a_out = np.tanh(a_in @ rng.standard_normal((4, 3)))
    y = rng.integers(0, 2, 30)
    bi, bo = sc.fit_bins(a_in, 5), sc.fit_bins(a_out, 5)
    dev_u, cpu_u = scu.UnitMICounts(bo, 2), sc.UnitMIAccumulator(bo, 2)
    dev_p, cpu_p = scu.PairMICounts(bi, bo), sc.PairwiseMIAccumulator(bi, bo)
    for s in (slice(0, 12), slice(12, 30)):
        dev_u.update(a_out[s], y[s])
        cpu_u.update(a_out[s], y[s])
        dev_p.update(a_in[s], a_out[s])
        cpu_p.update(a_in[s], a_out[s])
    np.testing.assert_allclose(dev_u.mi(), cpu_u.mi(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dev_p.mi(), cpu_p.mi(), rtol=1e-12, atol=1e-15)


def test_torch_adapter_activations_on_the_device():
    torch = pytest.importorskip("torch")
    from torch import nn

    from sparsecore.adapters import torch as sct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(2)]
    kw = dict(n_classes=3, bins=4, pairwise=True, feature_norms=True)
    dev = sct.collect_activations(model, data, device="cuda", **kw)
    cpu = sct.collect_activations(model, data, device="cpu", **kw)
    _same_activation_stats(dev, cpu, rtol=1e-12)  # dense layers: no channel means, the same codes


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_selection_and_patterns_on_the_device(rng, dtype):
    c = _device.cuda()
    s = make(rng, (6, 8), dtype, "ties")
    d = c.to_device(s)
    host = lambda m: m.copy_to_host()  # noqa: E731
    np.testing.assert_array_equal(host(sc.threshold_mask(d, 0.5)), sc.threshold_mask(s, 0.5))
    for sp in (0.0, 0.3, 1.0):
        np.testing.assert_array_equal(host(sc.sparsity_mask(d, sp, absolute=True)),
                                      sc.sparsity_mask(s, sp, absolute=True))
        assert sc.select_threshold(d, sp) == sc.select_threshold(s, sp)
    np.testing.assert_array_equal(host(sc.nm_mask(d, 2, 4, absolute=True)), sc.nm_mask(s, 2, 4, absolute=True))
    np.testing.assert_array_equal(host(sc.nm_mask(d, 1, 3, axis=0)), sc.nm_mask(s, 1, 3, axis=0))
    for pool in ("mean", "max", "l2"):
        np.testing.assert_array_equal(host(sc.block_scores(d, (4, 3), pool)), sc.block_scores(s, (4, 3), pool))
        np.testing.assert_array_equal(host(sc.block_mask(d, (4, 3), pool, sparsity=0.5)),
                                      sc.block_mask(s, (4, 3), pool, sparsity=0.5))
    np.testing.assert_array_equal(host(sc.block_mask(d, (2, 2), threshold=0.1, absolute=True)),
                                  sc.block_mask(s, (2, 2), threshold=0.1, absolute=True))
    for reduce in ("l1", "l2", "mean", "max"):
        for axis in (0, -1):
            np.testing.assert_array_equal(host(sc.unit_scores(d, axis=axis, reduce=reduce, absolute=True)),
                                          sc.unit_scores(s, axis=axis, reduce=reduce, absolute=True))
    assert isinstance(sc.sparsity_mask(s, 0.5, device="cuda"), type(d))  # host input, device="cuda": device out
    bad = s.copy()
    bad[1, 2] = np.nan
    for call in (lambda a: sc.sparsity_mask(a, 0.5), lambda a: sc.threshold_mask(a, 0.0),
                 lambda a: sc.nm_mask(a, 2, 4), lambda a: sc.block_scores(a, (2, 2)), lambda a: sc.unit_scores(a)):
        with pytest.raises(ValueError, match=r"hold 1 NaN or Inf value \(first: NaN at index \(1, 2\)\)"):
            call(c.to_device(bad))


def _same_activation_stats(dev, cpu, rtol=1e-6):
    """Unit MI, pairwise MI and feature norms of the device and host passes
    (channel means summed in another order: float32 rounding apart)."""
    assert sorted(dev.unit_mi()) == sorted(cpu.unit_mi()) and sorted(dev.state()) == sorted(cpu.state())
    for k, v in cpu.unit_mi().items():
        np.testing.assert_allclose(dev.unit_mi()[k], v, rtol=rtol, atol=1e-9)
    for k, want in cpu.state().items():
        np.testing.assert_allclose(dev.state()[k]["mi"], want["mi"], rtol=rtol, atol=1e-9)
        np.testing.assert_allclose(dev.state()[k]["x_norm"], want["x_norm"], rtol=rtol)


def test_torch_adapter_conv_activations_on_the_device():
    torch = pytest.importorskip("torch")
    from torch import nn

    from sparsecore.adapters import torch as sct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    kw = dict(n_classes=3, bins=4, pairwise=True, feature_norms=True)
    dev = sct.collect_activations(model, data, modules=["0", "3"], device="cuda", **kw)
    cpu = sct.collect_activations(model, data, modules=["0", "3"], device="cpu", **kw)
    _same_activation_stats(dev, cpu)


def test_keras_adapter_on_the_device():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("the device path of the Keras adapter runs on the torch backend")
    from sparsecore.adapters import keras as sck

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="fc")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((6, 4, 4, 2)).astype(np.float32), rng.integers(0, 3, 6)) for _ in range(2)]
    for per_sample in (False, True):
        dev = sck.collect_gradients(model, data, stats=("g2", "wg"), per_sample=per_sample, device="cuda")
        cpu = sck.collect_gradients(model, data, stats=("g2", "wg"), per_sample=per_sample, device="cpu",
                                    accumulator=sc.GradientAccumulator(stats=("g2", "wg"), precision="float64"))
        assert dev.device == "cuda" and dev.count == cpu.count
        for k in sck.prunable(model):
            for s in ("g2", "wg"):
                np.testing.assert_allclose(dev.state(k)[s].copy_to_host(), cpu.state(k)[s], rtol=1e-6, atol=1e-9)
    kw = dict(n_classes=3, bins=4, pairwise=True, feature_norms=True)
    dev = sck.collect_activations(model, data, device="cuda", **kw)
    cpu = sck.collect_activations(model, data, device="cpu", **kw)
    _same_activation_stats(dev, cpu)


def test_device_results_convert_to_torch_and_cupy_on_a_gpu():
    """On a real GPU only (bench/gpu.sh): torch CUDA tensors in, CSR and masks
    out as torch/CuPy objects over the same device memory."""
    from numba import config

    torch = pytest.importorskip("torch")
    if config.ENABLE_CUDASIM or not torch.cuda.is_available():
        pytest.skip("needs a real GPU with PyTorch CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {"fc": torch.randn(64, 48, device="cuda", generator=g), "conv": torch.randn(8, 4, 3, 3, device="cuda",
                                                                                  generator=g)}
    res = sc.prune(w, sparsity=0.7, scope="global")
    want = sc.prune({k: v.cpu().numpy() for k, v in w.items()}, sparsity=0.7, scope="global")
    for k in w:
        m = torch.as_tensor(res.masks[k], device="cuda")
        assert m.data_ptr() == res.masks[k].device_ctypes_pointer.value  # no copy
        np.testing.assert_array_equal(m.cpu().numpy(), want.masks[k])
        t = res.csr[k].to_torch()
        assert t.layout == torch.sparse_csr and t.is_cuda
        np.testing.assert_array_equal(t.to_dense().cpu().numpy(), want.csr[k].toarray())
    x = torch.randn(48, device="cuda", generator=g)
    np.testing.assert_allclose(torch.as_tensor(sc.csr_matmul(res.csr["fc"], x), device="cuda").cpu().numpy(),
                               want.csr["fc"] @ x.cpu().numpy(), rtol=1e-5, atol=1e-5)
    cupy = pytest.importorskip("cupy")
    c = res.csr["fc"].to_cupy()
    np.testing.assert_array_equal(cupy.asnumpy(c.toarray()), want.csr["fc"].toarray())
    acc = sc.GradientAccumulator(device="auto").update({k: v * 2 for k, v in w.items()})
    assert acc.device == "cuda"
    np.testing.assert_allclose(acc.state("fc")["g2"].copy_to_host(), (2 * w["fc"].double()).square().cpu().numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_device_norms_equal_the_cpu_bit_for_bit(rng, mode):
    from sparsecore._kernels import cpu_select

    x = (rng.standard_normal(3 * cpu_select.NORM_BLOCK + 17) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    src = device_select.device_source("x", x, mode)
    for kind in (1, 2, 3):
        assert device_select.score_norm(src, kind) == cpu_select.score_norm(x, mode, kind)


def test_readme_cuda_example_runs():
    """The README's CUDA example: as written on a real GPU; on the simulator
    with the torch tensors on the CPU (device="cuda" still runs our kernels),
    at toy sizes and without its last two lines (torch CUDA views)."""
    import pathlib
    import re

    from numba import config

    torch = pytest.importorskip("torch")
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "GradientAccumulator(stats" in b
             and 'device="cuda"' in b][0]
    if config.ENABLE_CUDASIM or not torch.cuda.is_available():
        block = "\n".join(line for line in block.splitlines() if "to_torch" not in line
                          and "torch.as_tensor" not in line)
        block = block.replace('device="cuda", generator', 'device="cpu", generator').replace(
            'torch.Generator(device="cuda")', 'torch.Generator(device="cpu")')
        block = block.replace("256", "12").replace("784", "20")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    r, w = scope["r"], scope["w"]
    assert sum(s.pruned for s in r.summary) == round(0.9 * sum(v.numel() for v in w.values()))
    assert all(s.pruned <= round(0.97 * s.size) for s in r.summary)
    assert scope["host"].shape == tuple(w["fc2"].shape) and scope["y"].shape == (w["fc1"].shape[0],)


def test_prune_on_device_edge_shapes(rng):
    w = {"empty": np.zeros((0, 5), np.float32), "vec": make(rng, (7,), np.float32, "ties"),
         "one": np.array([[2.0]], np.float32), "zeros": np.zeros((3, 4), np.float32)}
    for kw in (dict(sparsity=0.5), dict(sparsity=0.5, scope="global"), dict(threshold=0.5), dict(sparsity=1.0),
               dict(sparsity=0.0, scope="global", normalize="l2")):
        _same_result(sc.prune(w, device="cuda", **kw), sc.prune(w, device="cpu", **kw))


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES), ntensors=st.integers(1, 3),
       sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]), scope=st.sampled_from(["local", "global"]),
       normalize=st.sampled_from(["none", "l1", "l2", "max"]), capped=st.booleans(), ties=st.booleans())
def test_prune_on_device_random_settings_match_cpu(seed, dtype, ntensors, sparsity, scope, normalize, capped, ties):
    """Property: for any shapes, dtype, scope, sparsity, cap and normalisation
    (few ties or many), the device gives the CPU's masks and CSR."""
    r = np.random.default_rng(seed)
    w = {f"t{i}": make(r, tuple(int(d) for d in r.integers(1, 7, size=r.integers(1, 4))), dtype,
                       "ties" if ties else "normal") for i in range(ntensors)}
    kw = dict(sparsity=sparsity, scope=scope, normalize=normalize)
    if capped and scope == "global":
        kw.update(max_sparsity=0.95, sparsity=min(sparsity, 0.9))
    try:
        want = sc.prune(w, device="cpu", **kw)
    except ValueError as exc:  # a cap below 1 keeps an entry of each tensor: a target above that is refused
        assert capped and "caps allow" in str(exc)
        with pytest.raises(ValueError, match="caps allow"):
            sc.prune(w, device="cuda", **kw)
        return
    _same_result(sc.prune(w, device="cuda", **kw), want)


def test_gradual_pruner_on_the_device_matches_cpu(rng):
    c = _device.cuda()
    w = {"fc1": make(rng, (6, 8), np.float32), "fc2": make(rng, (4, 6), np.float32)}
    sched = sc.PolynomialDecay(0.0, 0.8, begin=0, end=4, frequency=2)
    dev, cpu = sc.GradualPruner(sched, scope="global"), sc.GradualPruner(sched, scope="global")
    for t in range(5):
        d = dev.step(t, {k: c.to_device(v) for k, v in w.items()})
        h = cpu.step(t, w)
        assert (d is None) == (h is None)
        if h is not None:
            _same_result(d, h)
    for k in w:
        np.testing.assert_array_equal(dev.history.masks()[k], cpu.history.masks()[k])
        np.testing.assert_array_equal(dev.masks[k].copy_to_host(), cpu.masks[k])


def test_prune_auto_follows_device_scores(rng):
    c = _device.cuda()
    w = {"fc": make(rng, (4, 6), np.float32)}
    s = {"fc": make(rng, (4, 6), np.float32, "ties")}
    got = sc.prune(w, {"fc": c.to_device(s["fc"])}, sparsity=0.5)  # host weights, device scores: the GPU
    assert isinstance(got.csr["fc"], scu.DeviceCSR)
    _same_result(got, sc.prune(w, s, sparsity=0.5))


# --- launch limits (a GPU's; the simulator's launches are checked by tests/_launches.py) ---

def test_launches_are_checked_as_a_gpu_would():
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from ._launches import LaunchError

    assert getattr(FakeCUDAKernel.__call__, "checked", False)
    from sparsecore._kernels import cuda_accumulate, cuda_select

    c = _device.cuda()
    dst = c.to_device(np.zeros(4))
    with pytest.raises(LaunchError, match="grid .* 0 blocks along axis x"):
        cuda_accumulate.add_into[0, 4](dst, dst)
    with pytest.raises(LaunchError, match="4 blocks along axis x"):  # MAX_GRID is (3, 2, 2) here
        cuda_accumulate.add_into[4, 4](dst, dst)
    with pytest.raises(LaunchError, match="do not declare"):
        cuda_accumulate.add_into[1, 4](c.to_device(np.zeros(4, np.float32)), dst)
    assert cuda_select.HIST_SIZE == 1 << cuda_select.HIST_BITS


def test_large_axes_loop_inside_the_kernels(rng):
    """More samples, units and rows than the (lowered) grid covers: each
    kernel loops (MI codes and counts, pair tables, row blocks, SpMM rows)."""
    c = _device.cuda()
    a_in = rng.standard_normal((70, 9))
    a_out = np.tanh(a_in[:, :7] * 2)
    y = rng.integers(0, 3, 70)
    np.testing.assert_allclose(sc.pairwise_mi(c.to_device(a_in), c.to_device(a_out), bins=4),
                               sc.pairwise_mi(a_in, a_out, bins=4), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sc.unit_mi(c.to_device(a_in), y, bins=4), sc.unit_mi(a_in, y, bins=4),
                               rtol=1e-12, atol=1e-14)
    b_in, b_out = sc.fit_bins(a_in, 4), sc.fit_bins(a_out, 4)
    dev = scu.PairMICounts(b_in, b_out).update(c.to_device(a_in), c.to_device(a_out))
    host = sc.PairwiseMIAccumulator(b_in, b_out).update(a_in, a_out)
    np.testing.assert_array_equal(dev.counts.copy_to_host(), host.counts)
    units = scu.UnitMICounts(b_in, 3).update(c.to_device(a_in), y)
    np.testing.assert_array_equal(units.counts.copy_to_host(), sc.UnitMIAccumulator(b_in, 3).update(a_in, y).counts)
    w = make(rng, (23, 11), np.float32, "ties")
    got = scu.to_csr(w, sparsity=0.5).to_scipy()
    want = sc.to_csr(w, sparsity=0.5)
    for part in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, part), getattr(want, part))
    X = rng.standard_normal((11, 13)).astype(np.float32)
    np.testing.assert_allclose(scu.csr_matmul(want, X).copy_to_host(), ref.matmul(want.toarray(), X), rtol=1e-5,
                               atol=1e-5)


def test_empty_inputs_launch_nothing(rng):
    c = _device.cuda()
    a = sc.to_csr(make(rng, (5, 4), np.float32), sparsity=0.5)
    out = scu.csr_matmul(a, np.zeros((4, 0), np.float32))  # X of no columns
    assert out.shape == (5, 0)
    assert scu.csr_matmul(sc.to_csr(np.zeros((0, 4), np.float32)), np.ones(4, np.float32)).shape == (0,)
    bins = sc.fit_bins(rng.standard_normal((10, 3)), 4)
    none = np.zeros((0, 3))
    with pytest.raises(ValueError, match=r"hold 0 sample\(s\); MI needs at least 2"):  # as the CPU
        sc.UnitMIAccumulator(bins, 2).update(none, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"hold 0 sample\(s\); MI needs at least 2"):
        scu.UnitMICounts(bins, 2).update(c.to_device(none), np.zeros(0, np.int64))
    no_units = sc.fit_bins(rng.standard_normal((10, 0)), 4)
    zero = np.zeros((6, 0))
    got = scu.UnitMICounts(no_units, 2).update(c.to_device(zero), np.zeros(6, np.int64))
    want = sc.UnitMIAccumulator(no_units, 2).update(zero, np.zeros(6, np.int64))
    assert got.counts.shape == want.counts.shape == (0, 4, 2)
    pairs = scu.PairMICounts(no_units, bins).update(c.to_device(zero), c.to_device(rng.standard_normal((6, 3))))
    assert pairs.n == 6 and pairs.counts.shape == (3, 0, 4, 4)
    np.testing.assert_array_equal(sc.unit_mi(c.to_device(np.zeros((6, 0))), np.zeros(6, np.int64)),
                                  sc.unit_mi(np.zeros((6, 0)), np.zeros(6, np.int64)))


def test_vector_spmv_threads_fit_its_shared_array(rng, monkeypatch):
    from sparsecore._kernels import cuda_csr

    monkeypatch.setattr(_device, "THREADS", 2 * cuda_csr.MAX_THREADS)  # more than its shared array holds
    w = make(rng, (3, 300), np.float64)
    a = sc.to_csr(w, sparsity=0.5)
    x = rng.standard_normal(300)
    assert device_csr.vector_width(a.nnz / a.shape[0]) == 32
    np.testing.assert_allclose(scu.csr_matmul(a, x).copy_to_host(), ref.matmul(a.toarray(), x), rtol=1e-12)


def test_maps_without_positions_are_refused_as_on_the_cpu():
    c = _device.cuda()
    maps = np.ones((4, 2, 0, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    for reduce in ("mean", "max"):
        with pytest.raises(ValueError, match=r"shape \(4, 2, 0, 3\): no positions to reduce per channel"):
            sc.unit_mi(maps, y, reduce=reduce)
        with pytest.raises(ValueError, match=r"shape \(4, 2, 0, 3\): no positions to reduce per channel"):
            sc.unit_mi(c.to_device(maps), y, reduce=reduce)
    with pytest.raises(ValueError, match="no positions"):
        scu.units(c.to_device(maps))


def test_device_label_counts_check_labels_as_on_the_cpu(rng):
    c = _device.cuda()
    a = rng.standard_normal((6, 2))
    bins = sc.fit_bins(a, 3)
    for y, msg in ((np.array([0, 1, 2, 0, 1, 0]), "is >= n_classes=2"), (np.array([0, 1, -1, 0, 1, 0]), ">= 0"),
                   (np.zeros(5, np.int64), "hold 5 values"), (np.zeros(6), "are floats")):
        with pytest.raises((ValueError, TypeError), match=msg):
            sc.UnitMIAccumulator(bins, 2).update(a, y)
        with pytest.raises((ValueError, TypeError), match=msg):
            scu.UnitMICounts(bins, 2).update(c.to_device(a), c.to_device(y))
    with pytest.raises(ValueError, match="samples"):
        scu.PairMICounts(bins, bins).update(c.to_device(a), c.to_device(a[:4]))
