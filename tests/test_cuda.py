"""CUDA kernels against the CPU kernels and references.

On the Numba CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1``, set before
Numba is imported, in a process of its own; threads per block shrunk so that
tiny inputs span several blocks), and on a real GPU when one is lent
(``bench/gpu.sh``). Skipped where neither is available.
"""

import numpy as np
import pytest

from sparsecore import _device

from . import reference as ref
from .conftest import DTYPES, make

try:
    _device.cuda()
except RuntimeError as exc:  # no GPU and no simulator
    pytest.skip(f"CUDA unavailable: {exc}", allow_module_level=True)

import sparsecore as sc
from sparsecore import cuda as scu

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_device, "THREADS", 32)
    monkeypatch.setattr(_device, "THREADS_2D", (4, 4))


def test_device_selection_errors():
    with pytest.raises(ValueError, match="device must be"):
        _device.resolve("gpu")
    assert _device.resolve("auto", np.ones(2)) == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kind", [((1, 1), "normal"), ((3, 40), "ties"), ((9, 7), "zero_rows")])
def test_to_csr_matches_cpu(rng, dtype, shape, kind):
    w = make(rng, shape, dtype, kind)
    for kw in (dict(threshold=0.5), dict(sparsity=0.0), dict(sparsity=0.4), dict(sparsity=1.0)):
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
    from sparsecore.selection import _select_one, scores_source

    s = make(rng, (5, 7), dtype, "ties")
    for k in (0, 1, 5, 20, 35):
        assert scu.select_rule(s, k, absolute=True) == _select_one(scores_source(s, absolute=True), k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (6, 20), (33, 7)])
def test_csr_products_match_reference(rng, dtype, shape):
    w = make(rng, shape, dtype, "zero_rows")
    a = sc.to_csr(w, sparsity=0.6)
    x = rng.standard_normal(shape[1]).astype(dtype)
    X = rng.standard_normal((shape[1], 5)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(scu.csr_matmul(a, x).copy_to_host(), ref.matmul(a.toarray(), x), rtol=tol, atol=tol)
    dev = scu.to_csr(w, sparsity=0.6)
    np.testing.assert_allclose(scu.csr_matmul(dev, X).copy_to_host(), ref.matmul(a.toarray(), X), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradient_sums_match_reference(rng, dtype, per_sample):
    shape = (5, 7)
    batches = [make(rng, (3, *shape) if per_sample else shape, dtype) for _ in range(4)]
    ws = [make(rng, shape, dtype) for _ in range(4)]
    acc = scu.GradientSums(shape, stats=("g", "g2", "wg", "wg2"))
    for g, w in zip(batches, ws):
        acc.update(g, w, per_sample=per_sample)
    want = ref.accumulate(batches, ws, per_sample=per_sample)
    for k in ("g", "g2", "wg", "wg2"):
        np.testing.assert_allclose(acc.state()[k].copy_to_host(), want[k], rtol=1e-12, atol=1e-12)
    assert acc.count == (12 if per_sample else 4)


def test_mutual_information_counts_match_cpu(rng):
    acts = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    bins = sc.fit_bins(acts, 8)
    cpu = sc.UnitMIAccumulator(bins, 3).update(acts, y)
    np.testing.assert_array_equal(scu.unit_label_counts(acts, y, bins, 3).copy_to_host(), cpu.counts)
    a_in = rng.standard_normal((40, 4))
    a_out = np.tanh(a_in @ rng.standard_normal((4, 3)))
    got = scu.pairwise_mi(a_in, a_out, sc.fit_bins(a_in, 6), sc.fit_bins(a_out, 6)).copy_to_host()
    np.testing.assert_allclose(got, sc.pairwise_mi(a_in, a_out, bins=6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_on_device_matches_cpu(rng, scope):
    w = {"a": make(rng, (4, 3, 2), np.float32, "ties"), "b": make(rng, (5, 6), np.float32, "normal")}
    csr, masks = scu.prune(w, sparsity=0.6, scope=scope)
    want = sc.prune(w, sparsity=0.6, scope=scope)
    for k in w:
        np.testing.assert_array_equal(masks[k].copy_to_host(), want.masks[k])
        got = csr[k].to_scipy()
        np.testing.assert_array_equal(got.indptr, want.csr[k].indptr)
        np.testing.assert_array_equal(got.indices, want.csr[k].indices)
    s = {k: make(rng, v.shape, np.float32, "ties") for k, v in w.items()}
    _, masks = scu.prune(w, s, threshold=0.5)
    want = sc.prune(w, s, threshold=0.5)
    for k in w:
        np.testing.assert_array_equal(masks[k].copy_to_host(), want.masks[k])


def test_torch_adapter_feeds_the_device_accumulator():
    torch = pytest.importorskip("torch")
    from sparsecore.adapters import torch as sct
    from torch import nn

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
    from sparsecore.adapters import torch as sct
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(2)]
    kw = dict(n_classes=3, bins=4, pairwise=True, feature_norms=True)
    dev = sct.collect_activations(model, data, device="cuda", **kw)
    cpu = sct.collect_activations(model, data, device="cpu", **kw)
    for k in cpu.unit_mi():
        np.testing.assert_allclose(dev.unit_mi()[k], cpu.unit_mi()[k], rtol=1e-12, atol=1e-15)
    for k, st in cpu.state().items():
        np.testing.assert_allclose(dev.state()[k]["mi"], st["mi"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dev.state()[k]["x_norm"], st["x_norm"], rtol=1e-6)
