"""Sequential calibration in the PyTorch adapter: block by block, from the
inputs the already pruned blocks produce, on MLPs, CNNs and Hugging Face
transformers (tiny models built here from a config)."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import sparsecore as sc
from sparsecore.adapters import torch as sct


def _mlp(rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    x = torch.as_tensor(rng.standard_normal((256, 16)) @ rng.standard_normal((16, 16)))
    held = torch.as_tensor(rng.standard_normal((128, 16)) @ rng.standard_normal((16, 16)))
    return model, [x[i:i + 64] for i in range(0, 256, 64)], held


def _gap(model, dense, x):
    with torch.no_grad():
        return float(((model(x) - dense(x)) ** 2).mean())


def test_sparsegpt_on_an_mlp_beats_magnitude(rng):
    model, data, held = _mlp(rng)
    dense = copy.deepcopy(model)
    mag = copy.deepcopy(model)
    masks = sc.prune(sct.weights(mag), sparsity=0.5).masks
    sct.apply_masks(mag, masks)
    r = sct.prune_sequential(model, data, sparsity=0.5)
    assert [s.name for s in r.summary] == ["0.weight", "2.weight", "4.weight"]
    for name, m in r.masks.items():
        assert m.sum() == m.size // 2
        np.testing.assert_array_equal(sct.weights(model)[name] != 0, m & (sct.weights(model)[name] != 0))
        assert not sct.weights(model)[name][~m].any()
    assert _gap(model, dense, held) < _gap(mag, dense, held)


def test_each_layer_sees_the_pruned_layers_before_it(rng):
    """The second layer's refit uses H of the inputs that the already pruned
    and refitted first layer produces: redone by hand, it gives the same weights."""
    model, data, _ = _mlp(rng)
    dense = copy.deepcopy(model)
    sct.prune_sequential(model, data, sparsity=0.5, method="magnitude", update="refit")
    by_hand = copy.deepcopy(dense)
    for i in (0, 2):
        layer = by_hand[i]
        acc = sc.HessianAccumulator(layer.in_features)
        with torch.no_grad():
            for x in data:
                acc.update(by_hand[:i](x).numpy())
        w = layer.weight.detach().numpy()
        keep = sc.prune({"w": w}, sparsity=0.5).masks
        new = sc.reconstruct({"w": w}, {"w": acc}, keep, method="refit").dense("w")
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(new))
        np.testing.assert_allclose(model[i].weight.detach().numpy(), new, rtol=1e-9, atol=1e-12)


def test_a_failure_restores_the_model(rng):
    model, data, _ = _mlp(rng)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(done, total, name):
        if done == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sct.prune_sequential(model, data, sparsity=0.5, progress=boom)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of sparsity= and pattern="):
        sct.prune_sequential(model, data)
    with pytest.raises(ValueError, match="updates the weights itself"):
        sct.prune_sequential(model, data, sparsity=0.5, update="obs")
    with pytest.raises(ValueError, match="method must be one of"):
        sct.prune_sequential(model, data, sparsity=0.5, method="best")


@pytest.mark.parametrize("method, update", [("sparsegpt", None), ("wanda", None), ("wanda", "obs+refit"),
                                            ("obs", "obs")])
def test_cnn_layers_are_calibrated_on_their_patches(rng, method, update):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).double()
    x = torch.as_tensor(rng.standard_normal((96, 3, 8, 8)))
    data = [(x[i:i + 32], None) for i in range(0, 96, 32)]
    dense = copy.deepcopy(model)
    r = sct.prune_sequential(model, data, sparsity=0.5, method=method, update=update)
    assert sorted(r.masks) == ["0.weight", "2.weight", "5.weight"]
    for name, m in r.masks.items():
        assert m.shape == tuple(dict(model.named_parameters())[name].shape)
        rows = m.reshape(m.shape[0], -1)
        if method == "wanda":  # ranked per output row: round(0.5 * cols) of each row go
            assert (rows.sum(axis=1) == rows.shape[1] - round(0.5 * rows.shape[1])).all()
        else:
            assert m.sum() == m.size - round(0.5 * m.size)
    assert torch.isfinite(model(x)).all()
    if update is not None or method == "sparsegpt":  # repaired: closer to the dense outputs than the mask alone
        masked = copy.deepcopy(dense)
        sct.apply_masks(masked, r.masks)
        assert _gap(model, dense, x) < _gap(masked, dense, x)


transformers = None


def _tiny(kind):
    global transformers
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "decoder":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    return model.double().eval()


def _batches(rng, lengths, batch=4):
    out = []
    for n in lengths:
        ids = torch.as_tensor(rng.integers(0, 97, (batch, n)))
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[0, n // 2:] = 0  # padding at the end of the first sequence
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hidden(model, data):
    with torch.no_grad():
        out = [model(**b, output_hidden_states=True).hidden_states[-1] for b in data]
    return out


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_transformers_are_pruned_layer_by_layer(rng, kind, target):
    model = _tiny(kind)
    dense = copy.deepcopy(model)
    data = _batches(rng, [12, 9, 16])
    r = sct.prune_sequential(model, data, **target)
    stack = ".layers." if kind == "decoder" else ".layer."
    inside = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and stack in n]
    assert sorted(r.masks) == sorted(inside)
    assert len(r.masks) == (14 if kind == "decoder" else 12)
    for name, m in r.masks.items():
        if "pattern" in target:
            assert sc.is_n_m(m, 2, 4)
        else:
            assert m.sum() == m.size // 2
    if kind == "decoder":  # the head shares the embedding and stays whole
        torch.testing.assert_close(model.lm_head.weight, dense.lm_head.weight)
    got = _hidden(model, data)
    assert all(torch.isfinite(h).all() for h in got)
    mag = copy.deepcopy(dense)
    sct.apply_masks(mag, sc.prune({k: v for k, v in sct.weights(mag).items() if k in r.masks},
                                  **target).masks)
    want = _hidden(dense, data)
    err = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want))
    err_mag = sum(float(((g - w) ** 2).sum()) for g, w in zip(_hidden(mag, data), want))
    assert err < err_mag


def _inputs(model, keys, b):
    """The inputs each layer ``keys`` sees when ``model`` runs on batch ``b``."""
    seen, hooks = {}, []
    for key in keys:
        def catch(module, args, key=key):
            seen[key] = args[0].numpy()
        hooks.append(model.get_submodule(key[:-len(".weight")]).register_forward_pre_hook(catch))
    try:
        with torch.no_grad():
            model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _assert_redone(pruned, dense, run, keys, data, target=None, a=1.0, **how):
    """Each layer's weights in ``pruned`` equal SparseGPT (at 50%, or ``how``) of its dense weights with the
    Hessian of the inputs it sees in ``run`` (a model) over ``data``; ``target``: a model giving the dense
    inputs of the cross term (dense_target, weighing it by ``a``)."""
    how = how or {"sparsity": 0.5}
    accs = {k: sc.HessianAccumulator(run.get_parameter(k).shape[1], cross=target is not None) for k in keys}
    for b in data:
        mask = b["attention_mask"].numpy().astype(bool).reshape(-1) if isinstance(b, dict) else None
        got = _inputs(run, keys, b)
        want = _inputs(target, keys, b) if target is not None else {}
        for key, acc in accs.items():
            acc.update(got[key], mask=mask, **({"dense": want[key]} if target is not None else {}))
    for key, acc in accs.items():
        redo = sc.sparsegpt({key: dense.get_parameter(key).detach().numpy()}, {key: acc}, dense_target=a,
                            **how).dense(key)
        np.testing.assert_allclose(pruned.get_parameter(key).detach().numpy(), redo, rtol=1e-8, atol=1e-10,
                                   err_msg=key)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_every_layer_is_calibrated_on_what_the_layers_pruned_before_it_give(rng, kind):
    """Each layer reads what every layer before it, in this block and the
    earlier ones, gives once pruned (o_proj the pruned q/k/v, down_proj the
    pruned gate/up): its Hessian taken from the final model redoes exactly
    the weights prune_sequential wrote."""
    model = _tiny(kind)
    dense = copy.deepcopy(model)
    data = _batches(rng, [10, 14])
    r = sct.prune_sequential(model, data, sparsity=0.5, order="layer")
    _assert_redone(model, dense, model, list(r.masks), data)


def test_block_order_calibrates_a_block_on_its_dense_forward(rng):
    """order="block" (the default): every layer of block i from one pass of block i as it
    was before any of its layers was pruned (blocks before it pruned)."""
    model = _tiny("decoder")
    dense = copy.deepcopy(model)
    data = _batches(rng, [10, 14])
    r = sct.prune_sequential(model, data, sparsity=0.5)  # order="block", the default
    for i in range(2):
        hybrid = copy.deepcopy(dense)
        for j in range(i):
            hybrid.model.layers[j].load_state_dict(model.model.layers[j].state_dict())
        _assert_redone(model, dense, hybrid, [k for k in r.masks if k.startswith(f"model.layers.{i}.")], data)
    with pytest.raises(ValueError, match="order must be 'layer' or 'block', got 'rows'"):
        sct.prune_sequential(model, data, sparsity=0.5, order="rows")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_dense_target_aims_every_block_toward_the_dense_model(rng, kind):
    """dense_target: each layer of block i from the inputs the pruned blocks before it give and, for the
    cross term, the inputs the dense model gives: redone by hand, the same weights."""
    model = _tiny(kind)
    dense = copy.deepcopy(model)
    data = _batches(rng, [10, 14])
    r = sct.prune_sequential(model, data, sparsity=0.5, dense_target=0.5)
    stack = (lambda m: m.model.layers) if kind == "decoder" else (lambda m: m.encoder.layer)
    for i in range(2):
        hybrid = copy.deepcopy(dense)
        for j in range(i):
            stack(hybrid)[j].load_state_dict(stack(model)[j].state_dict())
        _assert_redone(model, dense, hybrid, [k for k in r.masks if f"layers.{i}." in k or f"layer.{i}." in k], data,
                       target=dense, a=0.5)


def test_dense_layers_choose_which_layers_aim_at_the_dense_model(rng):
    """dense_layers=["*q_proj*"]: q/k/v (one group, led by q_proj) aim toward the dense model, the other
    layers keep SparseGPT's objective; each redone by hand."""
    model = _tiny("decoder")
    dense = copy.deepcopy(model)
    data = _batches(rng, [10, 14])
    r = sct.prune_sequential(model, data, sparsity=0.5, dense_target=0.5, dense_layers=["*q_proj*"])
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    block = [k for k in r.masks if "layers.1." in k]
    qkv = [k for k in block if any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    assert len(qkv) == 3
    _assert_redone(model, dense, hybrid, qkv, data, target=dense, a=0.5)
    _assert_redone(model, dense, hybrid, [k for k in block if k not in qkv], data)


def test_dense_batches_form_the_cross_term_on_the_first_batches(rng):
    """dense_batches=k: H from every batch, the cross term from the first k batches, scaled to all."""
    model = _tiny("decoder")
    dense = copy.deepcopy(model)
    data = _batches(rng, [10, 14, 12])
    r = sct.prune_sequential(model, data, sparsity=0.5, dense_target=0.5, dense_batches=2)
    keys = [k for k in r.masks if "layers.0." in k]
    accs = {k: sc.HessianAccumulator(dense.get_parameter(k).shape[1], cross=True) for k in keys}
    plain = {k: sc.HessianAccumulator(dense.get_parameter(k).shape[1]) for k in keys}
    for j, b in enumerate(data):
        mask = b["attention_mask"].numpy().astype(bool).reshape(-1)
        got = _inputs(dense, keys, b)
        for k in keys:
            if j < 2:
                accs[k].update(got[k], mask=mask, dense=got[k])  # block 0: the same inputs, zero cross term
            plain[k].update(got[k], mask=mask)
    for k in keys:  # block 0's cross term is zero: the weights are SparseGPT's from all batches
        redo = sc.sparsegpt({k: dense.get_parameter(k).detach().numpy()}, {k: plain[k]}, sparsity=0.5).dense(k)
        np.testing.assert_allclose(model.get_parameter(k).detach().numpy(), redo, rtol=1e-8, atol=1e-10)
    later = [k for k in r.masks if "layers.1." in k]
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    accs = {k: sc.HessianAccumulator(dense.get_parameter(k).shape[1], cross=True) for k in later}
    part = {k: sc.HessianAccumulator(dense.get_parameter(k).shape[1], cross=True) for k in later}
    for j, b in enumerate(data):
        mask = b["attention_mask"].numpy().astype(bool).reshape(-1)
        got, want = _inputs(hybrid, later, b), _inputs(dense, later, b)
        for k in later:
            accs[k].update(got[k], mask=mask, dense=got[k])
            if j < 2:
                part[k].update(got[k], mask=mask, dense=want[k])
    for k in later:  # H of all batches, the cross term of the first two scaled by the token counts
        g = part[k].cross_term() * (accs[k].count / part[k].count)
        acc = sc.HessianAccumulator(g.shape[0], cross=True).update_gram(accs[k].hessian(), accs[k].count, g)
        redo = sc.sparsegpt({k: dense.get_parameter(k).detach().numpy()}, {k: acc}, sparsity=0.5,
                            dense_target=0.5).dense(k)
        np.testing.assert_allclose(model.get_parameter(k).detach().numpy(), redo, rtol=1e-7, atol=1e-9, err_msg=k)
    with pytest.raises(ValueError, match="dense_batches must be a positive integer or None, got 0"):
        sct.prune_sequential(copy.deepcopy(dense), data, sparsity=0.5, dense_target=0.5, dense_batches=0)


def test_dense_target_on_an_mlp_and_its_refusals(rng):
    model, data, held = _mlp(rng)
    dense = copy.deepcopy(model)
    sct.prune_sequential(model, data, pattern="2:4", dense_target=1.0)
    for i in (0, 2, 4):  # layer i from the inputs the pruned layers before it give, aimed at the dense model's
        hybrid = copy.deepcopy(dense)
        for j in range(i):
            hybrid[j].load_state_dict(model[j].state_dict())
        _assert_redone(model, dense, hybrid, [f"{i}.weight"], data, target=dense, pattern="2:4")
    for bad in (1.5, -0.1, "dense", True):
        with pytest.raises(ValueError, match=f"dense_target must be a number in \\[0, 1\\], got {bad!r}"):
            sct.prune_sequential(copy.deepcopy(dense), data, sparsity=0.5, dense_target=bad)
    with pytest.raises(ValueError, match="method='wanda' needs update="):
        sct.prune_sequential(copy.deepcopy(dense), data, sparsity=0.5, method="wanda", dense_target=0.5)


def test_feature_norms_of_transformers_with_varying_lengths(rng):
    model = _tiny("encoder")
    data = [(b["input_ids"], torch.zeros(4, dtype=torch.long)) for b in _batches(rng, [7, 11, 5])]
    wrapped = _IdsOnly(model)
    mods = ["model.encoder.layer.0.attention.self.query", "model.encoder.layer.1.output.dense"]
    stats = sct.collect_activations(wrapped, data, mods, unit=False, feature_norms=True)
    for name in mods:
        seen = []
        h = wrapped.get_submodule(name).register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for x, _ in data:
                wrapped(x)
        h.remove()
        want = torch.cat(seen).pow(2).sum(0).sqrt().numpy()
        np.testing.assert_allclose(stats.state()[f"{name}.weight"]["x_norm"], want, rtol=1e-10)
    with pytest.raises(ValueError, match="needs one output per sample"):
        sct.collect_activations(wrapped, data, mods, n_classes=2, unit=True)


class _IdsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def test_wide_layers_gram_tiles_give_the_full_hessian(rng):
    """Inputs wider than a Gram tile (600 features: three tiles, the lower triangle of them formed):
    the Hessian the adapter hands over is the full Σ x xᵀ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 8)).double()
    data = [torch.as_tensor(rng.standard_normal((50, 600))) for _ in range(3)]
    dense = copy.deepcopy(model)
    sct.prune_sequential(model, data, sparsity=0.5)
    acc = sc.HessianAccumulator(600)
    for x in data:
        acc.update(x.numpy())
    redo = sc.sparsegpt({"w": dense[0].weight.detach().numpy()}, {"w": acc}, sparsity=0.5).dense("w")
    np.testing.assert_allclose(model[0].weight.detach().numpy(), redo, rtol=1e-7, atol=1e-9)
