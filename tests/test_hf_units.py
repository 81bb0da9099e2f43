"""Whole heads and channels of Hugging Face transformers (adapters.hf_units): the groups found from the model,
the smaller model equal to the masked one, and the round trip through save_pretrained / from_pretrained."""

import json
import os

import numpy as np
import pytest

import sparsecore as sc

from .conftest import tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hfu = pytest.importorskip("sparsecore.adapters.hf_units")


def _ids(n=2, length=12, vocab=97, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (n, length)))


def _masked(model, groups, keep):
    """The model with every removed unit's entries zeroed (the reference the smaller model must equal)."""
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    with torch.no_grad():
        for g in groups:
            for t, m in g.keep_masks(keep[g.name], {t: shapes[t] for t in g.tensors()}).items():
                params[t].mul_(torch.from_numpy(m).to(params[t].dtype))
    return model


def _keep(groups, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        k = np.zeros(g.units, np.bool_)
        k[rng.choice(g.units, max(1, g.units // 2), replace=False)] = True
        out[g.name] = k
    return out


def test_decoder_groups_follow_grouped_query_attention():
    model = tiny_llama()
    groups = {g.name: g for g in hfu.unit_groups(model)}
    assert sorted(groups) == ["model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp",
                              "model.layers.1.self_attn"]
    attn = groups["model.layers.0.self_attn"]
    assert attn.units == 2  # key/value heads; each takes its 2 query heads (hidden 32, 4 heads of 8)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    got = {(t, a): i for t, a, i in attn.resolve(shapes)}
    q = got[("model.layers.0.self_attn.q_proj.weight", 0)]
    assert q.tolist() == [list(range(16)), list(range(16, 32))]  # query heads 0-1 read key/value head 0
    assert got[("model.layers.0.self_attn.k_proj.weight", 0)].tolist() == [list(range(8)), list(range(8, 16))]
    assert got[("model.layers.0.self_attn.o_proj.weight", 1)].tolist() == q.tolist()
    mlp = groups["model.layers.1.mlp"]
    assert mlp.units == 64 and [(t.rsplit(".", 2)[1], a) for t, a, _ in mlp.members] == \
        [("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)]
    assert [g.name for g in hfu.unit_groups(model, "channels")] == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("units", [("heads", "channels"), ("heads",), ("channels",)])
def test_the_smaller_decoder_equals_the_masked_one_and_round_trips(tmp_path, units):
    model = tiny_llama()
    groups = hfu.unit_groups(model, units)
    keep = _keep(groups)
    ids = _ids()
    with torch.no_grad():
        want = _masked(tiny_llama(), groups, keep)(ids).logits
    counts = hfu.remove_units(model, keep, groups)
    assert counts == {g.name: int(keep[g.name].sum()) for g in groups}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < sum(p.numel() for p in tiny_llama().parameters())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "heads" in units:
        assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    if "channels" in units:
        assert model.config.intermediate_size == 32
    hfu.save_check(model)
    model.save_pretrained(tmp_path / "small")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert sum(p.numel() for p in back.parameters()) == n_params
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, got, rtol=1e-6, atol=1e-6)


def test_counts_that_differ_by_layer_run_but_are_refused_for_saving():
    model = tiny_llama()
    groups = hfu.unit_groups(model, "channels")
    keep = {g.name: np.arange(g.units) < (10 if i == 0 else 20) for i, g in enumerate(groups)}
    with torch.no_grad():
        want = _masked(tiny_llama(), groups, keep)(_ids()).logits
    hfu.remove_units(model, keep, groups)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, want, rtol=1e-5, atol=1e-5)
    assert model.config.intermediate_size == 64  # no count for all layers: left as it was
    with pytest.raises(ValueError, match="different counts"):
        hfu.save_check(model)


def test_a_refused_removal_leaves_the_model_as_it_was():
    model = tiny_llama()
    groups = hfu.unit_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = _keep(groups)
    keep["model.layers.1.self_attn"] = np.zeros(2, np.bool_)  # removes every head of a layer
    with pytest.raises(ValueError, match="keeps 0 of its 2 units"):
        hfu.remove_units(model, keep, groups)
    with pytest.raises(ValueError, match="unknown groups"):
        hfu.remove_units(model, {"model.layers.9.mlp": np.ones(64, np.bool_)}, groups)
    with pytest.raises(ValueError, match="not the weight or bias of an nn.Linear"):
        hfu.remove_units(model, {}, [sc.Group("norm", [("model.layers.0.input_layernorm.weight", 0)], units=4)])
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_prune_units_keeps_the_largest_units_the_same_count_in_every_layer():
    model = tiny_llama()
    with torch.no_grad():  # make channel 5 of layer 0 the largest by far, and channel 6 nothing
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight[5] *= 100
        mlp.gate_proj.weight[6] = 0
        mlp.up_proj.weight[6] = 0
        mlp.down_proj.weight[:, 6] = 0
        up5 = mlp.up_proj.weight[5].clone()
    counts = hfu.prune_units(model, 0.5)
    assert set(counts.values()) == {1, 32}
    up = model.model.layers[0].mlp.up_proj.weight
    assert any(torch.equal(r, up5) for r in up)  # kept
    assert not any(torch.count_nonzero(r) == 0 for r in up)  # the empty channel went
    hfu.save_check(model)


def test_encoder_groups_heads_and_channels():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    groups = hfu.unit_groups(model)
    assert [(g.name, g.units) for g in groups] == [  # modules' order: a layer's MLP group is named at the layer
        ("encoder.layer.0.intermediate", 48), ("encoder.layer.0.attention", 4),
        ("encoder.layer.1.intermediate", 48), ("encoder.layer.1.attention", 4)]
    keep = _keep(groups)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (2, 9)))
    ref = transformers.BertModel(cfg).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = _masked(ref, groups, keep)(ids).last_hidden_state
    hfu.remove_units(model, keep, groups)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert model.config.intermediate_size == 24
    with pytest.raises(ValueError, match="derives the head size"):
        hfu.save_check(model)


def test_a_model_of_no_known_layout_is_refused_by_class():
    with pytest.raises(ValueError, match="Sequential: no attention or MLP"):
        hfu.unit_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="units must name"):
        hfu.unit_groups(tiny_llama(), "neurons")


def test_kept_entries_join_groups_that_cut_one_axis():
    a = sc.Group("a", [("w", 0)], units=4)
    b = sc.Group("b", [("w", 0, np.array([[0], [2]])), ("v", 1)], units=2)
    got = sc.kept_entries([a, b], {"a": np.array([True, True, False, True]), "b": np.array([False, True])},
                          {"w": (4, 3), "v": (5, 2)})
    assert {k: v.tolist() for k, v in got.items()} == {("w", 0): [1, 3], ("v", 1): [1]}
    with pytest.raises(ValueError, match="unknown groups"):
        sc.kept_entries([a], {"c": np.ones(4, bool)}, {"w": (4, 3)})
    with pytest.raises(TypeError, match="Group objects"):
        sc.kept_entries(["a"], {}, {})


def _calibration(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 97, (2, 24))) for _ in range(n)]


def test_the_refits_bring_the_outputs_closer_and_a_bias_round_trips(tmp_path):
    data, test = _calibration(), _ids(4, 24, seed=7)
    with torch.no_grad():
        ref = tiny_llama()(test).logits
    stats = hfu.input_stats(tiny_llama(), data, [hfu.consumer(g) for g in hfu.unit_groups(tiny_llama())])
    err = {}
    for repair in hfu.REPAIRS:
        m = tiny_llama()
        hfu.prune_units(m, 0.5, score="fluctuation", repair=repair, stats=stats)
        with torch.no_grad():
            err[repair] = float(((m(test).logits - ref) ** 2).mean())
        if repair == "refit+bias":
            assert m.config.attention_bias and m.config.mlp_bias
            assert torch.count_nonzero(m.model.layers[0].self_attn.q_proj.bias) == 0  # made so the config fits
            assert torch.count_nonzero(m.model.layers[0].mlp.down_proj.bias) > 0
            hfu.save_check(m)
            m.save_pretrained(tmp_path / "small")
            back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
            with torch.no_grad():
                torch.testing.assert_close(back(test).logits, m(test).logits, rtol=1e-6, atol=1e-6)
        assert m.config.attention_bias == m.config.mlp_bias == repair.endswith("bias")
    # each layer's fit is optimal (test_shrink); through the model, the refits still beat none (FLAP's bias
    # alone need not: on these inputs it does not)
    assert err["refit+bias"] < err["none"] and err["refit"] < err["none"]


def test_fluctuation_scores_and_the_stats_they_come_from():
    model, data = tiny_llama(), _calibration(3)
    stats = hfu.input_stats(model, data, ["model.layers.0.mlp.down_proj"])
    h, mu, count = stats["model.layers.0.mlp.down_proj"]
    xs = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in data:
            model(b)
    hook.remove()
    x = torch.cat(xs).double().numpy()
    assert count == 3 * 2 * 24
    np.testing.assert_allclose(h, x.T @ x / count, rtol=1e-10)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=1e-14)
    groups = hfu.unit_groups(model, "channels")[:1]
    s = hfu.fluctuation_scores(groups, model, stats)["model.layers.0.mlp.down_proj.weight"]
    w = model.model.layers[0].mlp.down_proj.weight.detach().double().numpy()
    np.testing.assert_allclose(s, w ** 2 * x.var(0, ddof=1)[None, :], rtol=1e-8)


def test_kept_counts_round_to_a_multiple_and_options_are_checked():
    model = tiny_llama()
    counts = hfu.prune_units(model, {"channels": 0.3}, units="channels", multiple=16)
    assert set(counts.values()) == {32}  # 64 - round(19.2) = 45 kept, rounded down to 32
    with pytest.raises(ValueError, match="need calibration batches"):
        hfu.prune_units(tiny_llama(), 0.5, repair="refit")
    with pytest.raises(ValueError, match="score must be one of"):
        hfu.prune_units(tiny_llama(), 0.5, score="taylor")
    with pytest.raises(ValueError, match=r"sparsity names \['heads'\]"):
        hfu.prune_units(tiny_llama(), {"heads": 0.5}, units="channels")
    with pytest.raises(ValueError, match="multiple must be"):
        hfu.prune_units(tiny_llama(), 0.5, multiple=0)
    with pytest.raises(ValueError, match=r"sparsity of channels must be a number in \[0, 1\)"):
        hfu.prune_units(tiny_llama(), {"channels": 1.0}, units="channels")


def test_block_by_block_cuts_what_one_pass_cuts_when_the_statistics_do_not_matter():
    data, test = _calibration(), _ids(3, 20, seed=5)
    a, b = tiny_llama(), tiny_llama()
    ca = hfu.prune_units(a, 0.5, data=data)
    cb = hfu.prune_units(b, 0.5, data=data, order="block")
    assert ca == cb
    with torch.no_grad():
        torch.testing.assert_close(a(test).logits, b(test).logits, rtol=0, atol=0)
    with torch.no_grad():
        ref = tiny_llama()(test).logits
    c = tiny_llama()
    hfu.prune_units(c, 0.5, data=data, order="block", score="fluctuation", repair="refit+bias")
    assert c.config.num_key_value_heads == 1 and c.config.intermediate_size == 32 and c.config.mlp_bias
    with torch.no_grad():
        assert float(((c(test).logits - ref) ** 2).mean()) < float(((a(test).logits - ref) ** 2).mean())
    assert c.config.use_cache  # put back
    with pytest.raises(ValueError, match="order='block' cuts block by block"):
        hfu.prune_units(tiny_llama(), 0.5, order="block")


def test_an_encoder_with_padding_cut_block_by_block():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    rng = np.random.default_rng(0)
    data = []
    for _ in range(3):
        ids = torch.from_numpy(rng.integers(1, 50, (2, 10)))
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 6:] = 0
        data.append({"input_ids": ids, "attention_mask": mask})
    stats = hfu.input_stats(model, data, ["encoder.layer.0.output.dense"])
    assert stats["encoder.layer.0.output.dense"][2] == 3 * (10 + 6)  # padding left out
    counts = hfu.prune_units(model, 0.25, data=data, order="block", score="fluctuation", repair="refit")
    assert counts["encoder.layer.1.attention"] == 3 and counts["encoder.layer.0.intermediate"] == 36
    with torch.no_grad():
        out = model(**data[0]).last_hidden_state
    assert out.shape == (2, 10, 32) and torch.isfinite(out).all()


def test_write_folder_is_atomic_and_carries_the_other_files(hf_folder, tmp_path):
    import shutil

    from sparsecore.io import UserError
    from sparsecore.io.offline import RECIPE, write_folder

    src = tmp_path / "model"
    shutil.copytree(hf_folder / "model", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}

    def fail(folder):
        (tmp_path / "seen").write_text(folder)
        raise RuntimeError("the framework failed half way")
    with pytest.raises(RuntimeError, match="half way"):
        write_folder(src, tmp_path / "out", fail)
    assert not (tmp_path / "out").exists() and not os.path.exists((tmp_path / "seen").read_text())
    model = tiny_llama()
    hfu.prune_units(model, {"channels": 0.5}, units="channels")
    res = write_folder(src, tmp_path / "out", model.save_pretrained, provenance={"units": "channels"})
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == before["tokenizer.json"]
    assert json.loads((out / RECIPE).read_text())["units"] == "channels"
    assert not (out / "model.safetensors.index.json").exists() or \
        (out / "model.safetensors.index.json").read_bytes() != before["model.safetensors.index.json"]
    assert res.output_bytes < res.input_bytes
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 32
    with pytest.raises(UserError, match="exists"):
        write_folder(src, out, model.save_pretrained)
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    with pytest.raises(UserError, match="other copies of the weights"):
        write_folder(src, tmp_path / "out2", model.save_pretrained)
    assert not (tmp_path / "out2").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.name != "pytorch_model.bin"} == before


def test_global_scope_ranks_standardised_scores_across_layers():
    model = tiny_llama()
    with torch.no_grad():  # layer 1's MLP weights 100 times larger: raw scores would empty layer 0 first
        for lin in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj,
                    model.model.layers[1].mlp.down_proj):
            lin.weight.mul_(100)
    params = {t: p.detach().numpy() for t, p in model.named_parameters()}
    raw = sc.prune(params, groups=hfu.unit_groups(model, "channels"), sparsity=0.5, scope="global").groups
    assert sorted(int(k.sum()) for k in raw.values()) == [1, 63]  # raw magnitudes: layer 0 all but emptied
    counts = hfu.prune_units(model, {"channels": 0.5}, units="channels", scope="global")
    assert sum(counts.values()) == 64  # the same total as 32 of 64 in each of 2 layers
    assert all(12 <= c <= 52 for c in counts.values())  # z-scores: neither layer emptied by the other's scale
