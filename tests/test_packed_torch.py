"""PackedLinear and sparsify: drop-in packed layers give the masked dense model's outputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sparsecore as sc  # noqa: E402
from sparsecore.adapters import torch as sct  # noqa: E402


def _pruned_linear(rng, n_in, n_out, sparsity, dtype=torch.float32, bias=True):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        w = torch.as_tensor(rng.standard_normal((n_out, n_in)), dtype=torch.float32)
        w[torch.as_tensor(rng.random((n_out, n_in)) < sparsity)] = 0
        lin.weight.copy_(w)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["auto", "delta8", "bitmask"])
@pytest.mark.parametrize("tokens, sparsity", [((1,), 0.6), ((5,), 0.6), ((2, 3), 0.6),
                                              ((40,), 0.6),  # a prefill: F.linear on a dense copy
                                              ((40,), 0.9)])  # too sparse for that: the packed matrix product
def test_packed_linear_matches_masked_dense(rng, dtype, fmt, tokens, sparsity):
    lin = _pruned_linear(rng, 37, 11, sparsity, dtype)
    packed = sct.PackedLinear.from_linear(lin, format=fmt)
    assert packed.packed.dtype == str(dtype).removeprefix("torch.")
    assert packed._dense_route == (sparsity < 0.8)
    x = torch.as_tensor(rng.standard_normal((*tokens, 37)), dtype=torch.float32).to(dtype)
    with torch.no_grad():
        want = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        got = packed(x)
    assert got.dtype == dtype and got.shape == (*tokens, 11)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=tol, atol=tol * 10)


def test_packed_linear_with_a_mask_and_nm(rng):
    lin = _pruned_linear(rng, 16, 8, 0.0, bias=False)
    mask = sc.nm_mask(np.abs(lin.weight.detach().numpy()), 2, 4)
    packed = sct.PackedLinear.from_linear(lin, mask, format="nm")
    assert (packed.packed.format, packed.packed.n, packed.packed.m) == ("nm", 2, 4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = x @ (lin.weight * torch.as_tensor(mask)).T
        np.testing.assert_allclose(packed(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_packed_linear_refuses_training_and_other_devices(rng):
    packed = sct.PackedLinear.from_linear(_pruned_linear(rng, 8, 4, 0.5))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="for inference"):
        packed(x)
    with torch.no_grad():
        assert packed(x).shape == (2, 4)
    with pytest.raises(TypeError, match="PackedMatrix"):
        sct.PackedLinear(np.eye(3))
    with torch.no_grad():  # one token as a vector, and no features at all
        v = torch.randn(8)
        np.testing.assert_allclose(packed(v).numpy(), packed(v[None])[0].numpy(), rtol=1e-6)
        assert packed(v).shape == (4,)
        with pytest.warns(UserWarning, match="zero-element"):  # torch's own, initialising no weights
            empty = sct.PackedLinear.from_linear(nn.Linear(0, 3))
        assert torch.equal(empty(torch.zeros(5, 0)), empty.bias.expand(5, 3))


def test_sparsify_swaps_pruned_layers_only(rng):
    model = nn.Sequential(_pruned_linear(rng, 64, 64, 0.9), nn.ReLU(), _pruned_linear(rng, 64, 8, 0.0))
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
    report = sct.sparsify(model, measure=False)
    assert list(report) == ["0"]  # the dense layer has no zero: not considered
    assert report["0"]["swapped"] and report["0"]["nbytes"] < report["0"]["dense_nbytes"]
    assert isinstance(model[0], sct.PackedLinear) and isinstance(model[2], nn.Linear)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    slow = nn.Sequential(_pruned_linear(rng, 64, 64, 0.9))
    report = sct.sparsify(slow, measure=False, min_speedup=100.0)  # no layer reads 100x fewer bytes
    assert not report["0"]["swapped"] and isinstance(slow[0], nn.Linear)
    timed = nn.Sequential(_pruned_linear(rng, 64, 64, 0.9))
    report = sct.sparsify(timed, repeats=3)
    assert report["0"]["speedup"] > 0 and report["0"]["swapped"] == (report["0"]["speedup"] >= 1.0)


def test_sparsified_causal_lm_generates_the_same_tokens(rng):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers") and n.endswith("proj.weight")]
    sct.apply_masks(model, sc.prune(sct.weights(model, names), sparsity=0.7).masks)
    ids = torch.as_tensor(rng.integers(0, 97, (1, 6)))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    report = sct.sparsify(model, measure=False)
    assert sum(r["swapped"] for r in report.values()) == len(names)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


def test_conv1d_is_packed_transposed(rng):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    conv = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs; weight (10, 6)
    with torch.no_grad():
        conv.weight[torch.as_tensor(rng.random((10, 6)) < 0.5)] = 0
    packed = sct.PackedLinear.from_linear(conv)
    assert packed.packed.shape == (6, 10)
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        np.testing.assert_allclose(packed(x).numpy(), conv(x).numpy(), rtol=1e-5, atol=1e-6)


def _tiny_llama(seed, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_sparse_builds_packed_layers_from_the_file(rng, tmp_path, monkeypatch, dtype):
    from sparsecore.io.sparse import SparseFile

    model = _tiny_llama(0, dtype)
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers") and n.endswith("proj.weight")]
    masks = sc.prune(sct.weights(model, names), sparsity=0.7).masks
    sct.apply_masks(model, masks)
    path = tmp_path / "m.sparse.h5"
    sct.save_sparse(model, path, masks)
    ids = torch.as_tensor(rng.integers(0, 97, (1, 6)))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False)
        want_logits = model(ids).logits

    def no_dense(*a):
        raise AssertionError("a pruned Linear weight was made dense or CSR")
    monkeypatch.setattr(SparseFile, "_dense", no_dense)
    monkeypatch.setattr(SparseFile, "_csr_parts", no_dense)
    fresh = _tiny_llama(1, dtype)  # other weights everywhere
    report = sct.load_sparse(fresh, path)
    assert sorted(f"{m}.weight" for m, r in report.items() if r["swapped"]) == sorted(names)
    with SparseFile(path) as f:
        for m in report:
            got, stored = fresh.get_submodule(m).packed, f.packed(f"{m}.weight")
            assert got.format == stored.format and got.dtype == str(dtype).removeprefix("torch.")
            assert np.array_equal(got.vals, stored.vals)
    with torch.no_grad():
        assert torch.equal(fresh.generate(ids, max_new_tokens=10, do_sample=False), want)
        np.testing.assert_allclose(fresh(ids).logits.float().numpy(), want_logits.float().numpy(),
                                   rtol=1e-5, atol=5e-3 if dtype == torch.bfloat16 else 1e-5)  # bf16 GEMM rounds sums


def test_load_sparse_repacks_transposes_and_fills_meta_models(rng, tmp_path):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    def build():
        return nn.Sequential(_pruned_linear(rng, 40, 24, 0.0), nn.ReLU(), Conv1D(8, 24))
    model = build()
    masks = {"0.weight": rng.random((24, 40)) > 0.8, "2.weight": rng.random((24, 8)) > 0.5}
    sct.apply_masks(model, masks)
    path = tmp_path / "m.sparse.h5"
    sct.save_sparse(model, path, masks)
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = model(x)
    with torch.device("meta"):
        fresh = build()
    report = sct.load_sparse(fresh, path, format="bitmask")
    assert report["0"]["format"] == report["2"]["format"] == "bitmask" and report["0"]["swapped"]
    assert fresh[2].packed.shape == (8, 24)  # Conv1D stored (in, out), packed (out, in)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    dense = build()
    report = sct.load_sparse(dense, path, include=["2"])
    assert not report["0"]["swapped"] and isinstance(dense[0], nn.Linear)
    assert torch.equal(dense[0].weight, model[0].weight)  # loaded dense, zeros where pruned
    with torch.no_grad():
        np.testing.assert_allclose(dense(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_load_sparse_refuses_what_does_not_fit_and_leaves_the_model(rng, tmp_path):
    model = nn.Sequential(_pruned_linear(rng, 16, 8, 0.5), nn.ReLU(), _pruned_linear(rng, 8, 4, 0.0))
    path = tmp_path / "m.sparse.h5"
    sct.save_sparse(model, path, {"0.weight": model[0].weight.detach().numpy() != 0})

    def check_untouched(m, exc, match):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        kinds = [type(c) for c in m]
        with pytest.raises(exc, match=match):
            sct.load_sparse(m, path)
        assert [type(c) for c in m] == kinds
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    check_untouched(nn.Sequential(_pruned_linear(rng, 16, 9, 0.5), nn.ReLU(), _pruned_linear(rng, 9, 4, 0.0)),
                    ValueError, r"'0.weight' has shape \(8, 16\) in the file, \(9, 16\)")
    check_untouched(nn.Sequential(_pruned_linear(rng, 16, 8, 0.5), nn.ReLU(), _pruned_linear(rng, 8, 4, 0.0),
                                  nn.Linear(4, 2)), ValueError, "not in .*first '3.weight'")
    check_untouched(nn.Sequential(_pruned_linear(rng, 16, 8, 0.5)), ValueError, "not in the model, first '2.weight'")
    loose = nn.Sequential(_pruned_linear(rng, 16, 8, 0.5))
    assert sct.load_sparse(loose, path, strict=False)["0"]["swapped"]
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ValueError, match="not a sparsecore sparse file"):
        sct.load_sparse(model, pt)
