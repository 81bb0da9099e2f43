"""PyTorch adapter against torch.autograd, torch.nn.utils.prune and the engine."""

import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import sparsecore as sc
from sparsecore.adapters import torch as sct


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()] if bn else [nn.Linear(12, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def loader(seed=0, n=40, size=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def test_prunable_and_weights_share_memory():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2), nn.LayerNorm(2))
    assert list(sct.prunable(m)) == ["0.weight", "2.weight"]
    assert list(sct.prunable(m, include=["*.bias"])) == ["0.bias", "2.bias", "3.bias"]
    assert list(sct.prunable(m, exclude=["0.*"])) == ["2.weight"]
    w = sct.weights(m)
    with torch.no_grad():
        m[2].weight[0, 0] = 123.0
    assert w["2.weight"][0, 0] == 123.0  # a view of the parameter, no copy
    assert w["0.weight"].shape == (4, 1, 3, 3)
    with pytest.raises(ValueError, match="matches no parameter"):
        sct.prunable(m, include=["nothing*"])


def _reference_grads(model, data, per_sample):
    """Sums of g**2 and w*g by plain autograd, sample by sample or batch by batch."""
    params = sct.prunable(model)
    g2 = {k: torch.zeros_like(p) for k, p in params.items()}
    wg = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for x, y in data:
        groups = [(x[i:i + 1], y[i:i + 1]) for i in range(len(y))] if per_sample else [(x, y)]
        for xs, ys in groups:
            model.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            for k, p in params.items():
                g2[k] += p.grad ** 2
                wg[k] += p.detach() * p.grad
    return g2, wg


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bn", [False, True])
def test_collect_gradients_matches_autograd(per_sample, bn):
    model = mlp(bn=bn)
    data = loader()
    acc = sct.collect_gradients(model, data, nn.functional.cross_entropy, per_sample=per_sample,
                                accumulator=sc.GradientAccumulator(stats=("g2", "wg"), precision="float64"))
    g2, wg = _reference_grads(model, data, per_sample)
    assert acc.count == (40 if per_sample else 4)
    for k in g2:
        np.testing.assert_allclose(acc.state(k)["g2"], g2[k].double().numpy(), rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(acc.state(k)["wg"], wg[k].double().numpy(), rtol=1e-4, atol=1e-8)


def test_collect_gradients_leaves_the_model_as_it_was():
    model = mlp(bn=True)
    model.train()
    model[0].bias.requires_grad_(False)
    marker = torch.ones_like(model[3].weight)
    model[3].weight.grad = marker
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    for per_sample in (False, True):
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            sct.collect_gradients(model, loader(), bad_loss, per_sample=per_sample)
        assert model.training and all(m.training for m in model.modules())
        assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
        assert model[3].weight.grad is marker
        assert model[0].weight.grad is None
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_collect_activations_matches_engine():
    model = mlp()
    data = loader(n=200, size=50)
    st = sct.collect_activations(model, data, n_classes=3, bins=8, pairwise=True, feature_norms=True)
    xs = torch.cat([x for x, _ in data])
    ys = torch.cat([y for _, y in data]).numpy()
    with torch.no_grad():
        h0 = model[0](xs)
        a1 = model[1](h0)
        h2 = model[2](a1)
    np.testing.assert_allclose(st.unit_mi()["0"], sc.unit_mi(h0.numpy(), ys, bins=8), rtol=1e-12)
    np.testing.assert_allclose(st.state()["2.weight"]["mi"], sc.pairwise_mi(a1.numpy(), h2.numpy(), bins=8),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.state()["0.weight"]["x_norm"], np.linalg.norm(xs.double().numpy(), axis=0),
                               rtol=1e-6)
    assert set(st.unit_scores()) == {"0.weight", "2.weight", "4.weight"}
    r = sc.prune(sct.weights(model), "wanda", state=st.state(), sparsity=0.5)
    want = np.abs(sct.weights(model)["0.weight"]) * st.state()["0.weight"]["x_norm"][None, :]
    np.testing.assert_array_equal(r.masks["0.weight"], sc.sparsity_mask(want, 0.5))
    with pytest.raises(TypeError, match="reads data twice"):
        sct.collect_activations(model, iter(data), n_classes=3)


def test_conv_activations_reduce_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    st = sct.collect_activations(model, data, n_classes=3, pairwise=True, feature_norms=True)
    assert st.state()["0.weight"]["mi"].shape == (4, 2)
    xs = torch.cat([x for x, _ in data]).double().numpy()
    np.testing.assert_allclose(st.state()["0.weight"]["x_norm"], np.sqrt((xs ** 2).sum(axis=(0, 2, 3))), rtol=1e-6)
    r = sc.prune(sct.weights(model), "wanda", state=st.state(), sparsity=0.5)
    assert r.masks["0.weight"].shape == (4, 2, 3, 3)


def test_masks_from_torch_prune():
    from torch.nn.utils import prune as tprune

    model = mlp()
    tprune.l1_unstructured(model[0], "weight", amount=0.4)
    tprune.random_unstructured(model[2], "weight", amount=0.3)
    masks = sct.masks_from_torch_prune(model)
    assert set(masks) == {"0.weight", "2.weight"}
    np.testing.assert_array_equal(masks["0.weight"], model[0].weight_mask.numpy() != 0)
    assert "0.weight" in sct.prunable(model)
    np.testing.assert_array_equal(sct.weights(model)["0.weight"], model[0].weight.detach().numpy())
    sd = sct.masked_state_dict(model)
    fresh = mlp()
    fresh.load_state_dict(sd, strict=True)
    np.testing.assert_array_equal(fresh[0].weight.detach().numpy(), model[0].weight.detach().numpy())


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                                      lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)])
def test_mask_hold_keeps_pruned_weights_zero(make_opt):
    model = mlp()
    opt = make_opt(model.parameters())
    data = loader()
    for x, y in data:  # optimizer state from before the pruning
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    r = sc.prune(sct.weights(model), sparsity=0.7, scope="global")
    with sct.MaskHold(model, r.masks, opt):
        for _ in range(3):
            for x, y in data:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                for k, p in sct.prunable(model).items():
                    assert (p.detach().numpy()[~r.masks[k]] == 0).all()
        assert any((p.detach().numpy()[r.masks[k]] != sct.weights(mlp())[k][r.masks[k]]).any()
                   for k, p in sct.prunable(model).items())
    x, y = data[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the hold is gone: pruned weights move again
    assert any((p.detach().numpy()[~r.masks[k]] != 0).any() for k, p in sct.prunable(model).items())


@pytest.mark.parametrize("idx64", [False, True])
def test_torch_csr_round_trip_keeps_index_dtype_without_copy(rng, idx64, monkeypatch):
    if idx64:
        import sparsecore.csr

        monkeypatch.setattr(sparsecore.csr, "INT32_LIMIT", -1)
    a = sc.to_csr(rng.standard_normal((7, 9)).astype(np.float32), sparsity=0.6)
    t = sct.to_torch_csr(a)
    assert t.crow_indices().dtype == (torch.int64 if idx64 else torch.int32)
    assert np.shares_memory(t.values().numpy(), a.data)
    b = sct.from_torch_csr(t)
    assert np.shares_memory(b.data, a.data) and b.indices.dtype == a.indices.dtype
    np.testing.assert_array_equal(b.toarray(), a.toarray())
    np.testing.assert_array_equal(t.to_dense().numpy(), a.toarray())


def test_sparse_linear_and_swap():
    model = mlp()
    r = sc.prune(sct.weights(model), sparsity=0.8, scope="global")
    sct.apply_masks(model, r.masks)
    x = torch.randn(5, 2, 12)
    with torch.no_grad():
        want = model(x)
    sparse = sct.swap_sparse_linear(model, r)
    assert isinstance(sparse[0], sct.SparseLinear) and sparse[0].weight._nnz() == r.csr["0.weight"].nnz
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-6)


def _unit_hooks(model, names, keep):
    hs = []
    for n in names:
        mask = torch.from_numpy(keep[n].astype(np.float32))
        shape = (1, -1) + (1,) * 2 if isinstance(model.get_submodule(n), nn.BatchNorm2d) else (1, -1)
        hs.append(model.get_submodule(n).register_forward_hook(lambda m, i, o, mask=mask, shape=shape:
                                                               o * mask.reshape(shape)))
    return hs


def test_shrink_mlp_and_cnn():
    model = mlp(bn=True).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    r = sc.prune({k: v for k, v in sct.weights(model).items() if k != "5.weight"}, sparsity=0.5,
                 pattern=sc.Units(reduce="l2"))
    small = sct.shrink_model(model, ["0", "1", "3", "5"], r.groups)
    assert small[0].out_features == 8 and small[1].num_features == 8 and small[3].in_features == 8
    assert model[0].out_features == 16  # the original is untouched
    x = torch.randn(6, 12)
    hooks = _unit_hooks(model, ["1", "3"], {"1": r.groups["0.weight"], "3": r.groups["3.weight"]})
    with torch.no_grad():
        want = model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    with torch.no_grad():
        for bn in (cnn[1], cnn[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    r = sc.prune({"0.weight": sct.weights(cnn)["0.weight"], "3.weight": sct.weights(cnn)["3.weight"]},
                 sparsity=0.4, pattern=sc.Units(reduce="l1"))
    small = sct.shrink_model(cnn, ["0", "1", "3", "4", "8"], r.groups)
    assert small[0].out_channels == 5 and small[3].in_channels == 5 and small[8].in_features == 4
    x = torch.randn(2, 3, 7, 7)
    hooks = _unit_hooks(cnn, ["1", "4"], {"1": r.groups["0.weight"], "4": r.groups["3.weight"]})
    with torch.no_grad():
        want = cnn(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not connect"):
        sct.shrink_model(cnn, ["0", "8"], {})


def test_state_dict_and_sparse_file(tmp_path):
    model = mlp()
    r = sc.prune(sct.weights(model), sparsity=0.6)
    sd = sct.masked_state_dict(model, r.masks)
    fresh = mlp(seed=5)
    fresh.load_state_dict(sd, strict=True)
    np.testing.assert_array_equal(fresh[0].weight.detach().numpy(), np.where(r.masks["0.weight"],
                                                                             sct.weights(model)["0.weight"], 0))
    res = sct.save_sparse(model, tmp_path / "m.sparse.h5", r.masks, criterion="magnitude")
    assert {s.name for s in res.summary} == set(r.masks)
    sc.io.densify_file(tmp_path / "m.sparse.h5", tmp_path / "back.pt")
    back = mlp(seed=7)
    back.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)
    for k, v in sd.items():
        assert torch.equal(back.state_dict()[k], v)


def test_article_workflow_on_digits():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
    try:
        import torch_digits
    finally:
        sys.path.pop(0)
    lines = []
    out = torch_digits.run("obd", sparsity=0.8, scope="global", epochs=15, tune_epochs=3, out=lines.append)
    assert out["dense"] > 0.9
    assert out["tuned"] >= out["pruned"] and out["csr"] == out["tuned"] and out["held"]
    assert abs(out["sparsity"] - 0.8) < 1e-3
    for crit in ("magnitude", "fisher", "taylor", "mutual_info", "wanda"):
        o = torch_digits.run(crit, sparsity=0.5, scope="local", epochs=15, tune_epochs=1, out=lines.append)
        assert o["csr"] == o["tuned"] and o["held"] and o["tuned"] > 0.5
    o = torch_digits.run("magnitude", threshold=0.05, scope="local", epochs=15, tune_epochs=1, out=lines.append)
    assert 0 < o["sparsity"] < 1
    lines.clear()
    o = torch_digits.run(out=lines.append)  # the defaults: within 2 points of dense, with progress
    assert o["tuned"] >= o["dense"] - 0.02 and abs(o["sparsity"] - 0.9) < 1e-3
    assert "  fine-tuning: epoch 30/30" in " ".join(lines) and sum("training: epoch" in x for x in lines) == 3


def test_collect_gradients_from_a_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(30, 12, generator=g), torch.randint(0, 3, (30,), generator=g))
    acc = sct.collect_gradients(model, DataLoader(ds, batch_size=8), nn.functional.cross_entropy, per_sample=True)
    lst = sct.collect_gradients(model, [ds[i:i + 8] for i in range(0, 30, 8)], nn.functional.cross_entropy,
                                per_sample=True)
    assert acc.count == 30
    for k in sct.prunable(model):
        np.testing.assert_allclose(acc.state(k)["g2"], lst.state(k)["g2"], rtol=1e-6)


def test_rough_edges_get_plain_errors(rng):
    """Each of these ended in a raw framework error or a confusing message (issue 15)."""
    model = nn.Sequential(nn.Linear(4, 3))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    for per_sample in (False, True):
        with pytest.raises(ValueError, match=r"loss_fn returned \(5,\).*reduction='mean' or 'sum', not 'none'"
                           if not per_sample else r"loss_fn returned \(1,\)"):
            sct.collect_gradients(model, data, nn.CrossEntropyLoss(reduction="none"), per_sample=per_sample)
    with pytest.raises(ValueError, match=r"no parameter 'nope.weight' \(masks are keyed like weights\(model\): "
                                         r"\['0.weight', '0.bias'\]"):
        sct.apply_masks(model, {"nope.weight": np.ones((3, 4), bool)})
    with pytest.raises(TypeError, match="a mask alone holds no values; pass to_csr"):
        sct.to_torch_csr(np.ones((3, 4), bool))
    acc = sc.GradientAccumulator().update({"w": np.ones((3, 4))})
    assert acc.state()["count"] == 1 and acc.state().keys() == acc.state("w").keys()  # one tensor: no name needed
    two = sc.GradientAccumulator().update({"w": np.ones((3, 4)), "v": np.ones(2)})
    with pytest.raises(ValueError, match=r"state\(\) needs the tensor's name: the accumulator holds 2 tensors"):
        two.state()
    with pytest.raises(ValueError, match="lack the leading sample axis"):
        acc.update({"w": np.ones((3, 4))}, per_sample=True)
