"""Sharded checkpoints (a Hugging Face model folder) read, pruned and written as one model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sparsecore as sc
import sparsecore.io
from sparsecore.io import UserError, open_weights, prune_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved by transformers in several safetensors shards, with a tokenizer-like file."""
    model = _tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return model, folder


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsecore", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def _weights(folder):
    with open_weights(folder) as r:
        return {n: r.floats(n) for n in r.entries}, r.format


def test_a_folder_and_its_index_open_as_one_model(sharded):
    model, folder = sharded
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) > 2
    for path in (folder, folder / "model.safetensors.index.json"):
        with open_weights(path) as r:
            assert r.format == "sharded-safetensors" and r.shards and set(r.shards) == set(shards)
            want = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            assert set(r.entries) == set(want)
            for n, v in want.items():
                np.testing.assert_array_equal(r.floats(n), v)
            assert not r.entries["model.embed_tokens.weight"].default  # an embedding: left out
    r = _cli("info", folder)
    assert r.returncode == 0 and "sharded-safetensors" in r.stdout and "model.layers.1.mlp.down_proj.weight" in r.stdout


@pytest.mark.parametrize("scope", ["local", "global"])
def test_pruned_folder_keeps_the_layout_and_loads_in_transformers(sharded, tmp_path, scope):
    model, folder = sharded
    out = tmp_path / "pruned"
    res = prune_file(folder, out, sparsity=0.6, scope=scope)
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))  # shards, index, config, tokenizer
    for f in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (folder / f).read_bytes()
    dense, _ = _weights(folder)
    got, fmt = _weights(out)
    assert fmt == "sharded-safetensors"
    chosen = [s.name for s in res.summary]
    assert "model.embed_tokens.weight" not in chosen and all(dense[n].ndim == 2 for n in chosen)
    want = sc.prune({n: dense[n] for n in chosen}, sparsity=0.6, scope=scope, max_sparsity=0.99
                    if scope == "global" else 1.0)
    for n in dense:
        np.testing.assert_array_equal(got[n], want.dense(n) if n in chosen else dense[n], err_msg=n)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    r = _cli("report", out)
    assert r.returncode == 0 and "model.layers.1.mlp.down_proj.weight" in r.stdout


def test_bf16_shards_stay_bit_for_bit(tmp_path):
    model = _tiny_llama().to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder, max_shard_size="10KB")
    prune_file(folder, tmp_path / "out", sparsity=0.5)
    with open_weights(folder) as a, open_weights(tmp_path / "out") as b:
        for n, e in a.entries.items():
            assert b.entries[n].dtype == "bfloat16"
            ra, rb = a.raw(n), b.raw(n)
            if e.default:
                assert np.array_equal(rb[rb != 0], ra[rb != 0]) and (rb == 0).mean() >= 0.5
            else:
                assert np.array_equal(ra, rb), n


def test_bin_shards_and_tied_heads_stored_twice(tmp_path):
    """pytorch_model.bin shards with their index; a checkpoint that stores the tied head as well: marked,
    left out, and never pruned apart from the embedding."""
    model = _tiny_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "bin"
    folder.mkdir()
    names = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, ns in halves.items():
        torch.save({n: sd[n] for n in ns}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {n: s for s, ns in halves.items() for n in ns}}))
    model.config.save_pretrained(folder)
    with open_weights(folder) as r:
        assert r.format == "sharded-torch" and "lm_head.weight" in r.entries
        assert r.entries["lm_head.weight"].left_out == "tied to model.embed_tokens.weight"
    prune_file(folder, tmp_path / "out", sparsity=0.5, scope="global")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(folder))
    got, fmt = _weights(tmp_path / "out")
    assert fmt == "sharded-torch"
    np.testing.assert_array_equal(got["lm_head.weight"], sd["lm_head.weight"].numpy())
    assert (got["model.layers.0.mlp.up_proj.weight"] == 0).mean() > 0.2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight.detach(),
                       torch.as_tensor(got["model.layers.0.mlp.up_proj.weight"]))


def test_broken_and_hostile_folders_are_refused(sharded, tmp_path):
    _, folder = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    some = next(iter(index["weight_map"]))

    def with_index(mutate, name):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(folder):
            os.link(folder / f, d / f)
        i = json.loads(json.dumps(index))
        mutate(i)
        os.unlink(d / "model.safetensors.index.json")
        (d / "model.safetensors.index.json").write_text(json.dumps(i))
        return d

    cases = [
        (lambda i: i["weight_map"].__setitem__(some, "../outside.safetensors"), "a shard must be a file name"),
        (lambda i: i["weight_map"].__setitem__(some, "gone.safetensors"), "is missing from the folder"),
        (lambda i: i["weight_map"].pop(some), "which the index does not list"),
        (lambda i: i["weight_map"].__setitem__("ghost.weight", i["weight_map"][some]), "does not hold it"),
        (lambda i: i.pop("weight_map"), "no weight_map"),
    ]
    for k, (mutate, message) in enumerate(cases):
        d = with_index(mutate, f"bad{k}")
        with pytest.raises(ValueError, match=message):
            open_weights(d)
        r = _cli("info", d)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="overlap the input folder"):
        prune_file(folder, folder / "out", sparsity=0.5)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="a sharded checkpoint is written as a folder"):
        prune_file(folder, tmp_path / "afile", sparsity=0.5, force=True)


def test_an_existing_output_folder_is_replaced_only_whole(sharded, tmp_path):
    _, folder = sharded
    out = tmp_path / "out"
    prune_file(folder, out, sparsity=0.5)
    with pytest.raises(UserError, match="exists; pass force=True to replace it"):
        prune_file(folder, out, sparsity=0.7)
    (out / "stale.txt").write_text("from before")
    prune_file(folder, out, sparsity=0.7, force=True)
    assert not (out / "stale.txt").exists()
    assert [f for f in os.listdir(tmp_path) if "sparsecore-tmp" in f] == []
    got, _ = _weights(out)
    assert (got["model.layers.0.self_attn.q_proj.weight"] == 0).mean() == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_sparse_output_of_a_folder_densifies_back_to_the_folder(sharded, tmp_path, scope):
    """A sharded checkpoint pruned into one sparse HDF5 file (every shard's tensors as CSR, the layout, the
    index and the other files kept), then densified: the same folder as a dense prune writes."""
    _, folder = sharded
    prune_file(folder, tmp_path / "m.sparse.h5", sparsity=0.6, scope=scope)
    prune_file(folder, tmp_path / "dense", sparsity=0.6, scope=scope)
    with open_weights(tmp_path / "m.sparse.h5") as r:
        assert r.kind == "sharded" and "model.layers.0.mlp.up_proj.weight" in r.pruned
    res = sc.io.densify_file(tmp_path / "m.sparse.h5", tmp_path / "back")
    assert res.output_bytes > 0
    assert sorted(os.listdir(tmp_path / "back")) == sorted(os.listdir(folder))
    for f in os.listdir(folder):
        assert (tmp_path / "back" / f).read_bytes() == (tmp_path / "dense" / f).read_bytes(), f
    with pytest.raises(UserError, match="lies inside the output folder"):
        sc.io.densify_file(tmp_path / "m.sparse.h5", tmp_path, force=True)
    r = _cli("densify", tmp_path / "m.sparse.h5", "-o", tmp_path / "back2")
    assert r.returncode == 0, r.stderr
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back2") is not None


def test_folder_outputs_obey_the_name_and_the_format(sharded, tmp_path):
    """A model folder is written as a folder in its shards' format: a name that says one file, or a --format
    that says another, is refused (nothing written), never silently contradicted."""
    _, folder = sharded
    for name in ("single.safetensors", "tox.pt", "m.h5"):
        r = _cli("prune", folder, "-o", tmp_path / name, "--sparsity", "0.5")
        assert r.returncode == 1 and "a model folder is written as a folder of shards" in r.stderr, r.stderr
        assert not (tmp_path / name).exists()
    r = _cli("prune", folder, "-o", tmp_path / "out", "--sparsity", "0.5", "--format", "torch")
    assert r.returncode == 1 and "keeps its shards' format (safetensors); --format torch converts single files " \
        "only" in r.stderr and "format=" not in r.stderr and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="format='torch' converts single files only"):
        prune_file(folder, tmp_path / "out", sparsity=0.5, format="torch")
    assert prune_file(folder, tmp_path / "same", sparsity=0.5, format="safetensors").format == "sharded-safetensors"
    prune_file(folder, tmp_path / "m.sparse.h5", sparsity=0.5)
    with pytest.raises(UserError, match="the name says a safetensors file, but a model folder is written"):
        sparsecore.io.densify_file(tmp_path / "m.sparse.h5", tmp_path / "d.safetensors")


@pytest.mark.parametrize("layout", ["shards", "singles"])
def test_a_folder_with_other_copies_of_the_weights_is_refused(sharded, tmp_path, layout):
    """Hub folders often hold the weights twice (model.safetensors beside pytorch_model.bin, onnx/...): every
    copy but one would be carried dense, so the prune is refused with the list; trainer state is no copy."""
    model, folder = sharded
    if layout == "singles":  # one model.safetensors, and a pytorch_model.bin beside it
        folder = tmp_path / "single"
        model.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        want = "pytorch_model.bin"
    else:
        (folder / "onnx").mkdir()
        (folder / "onnx" / "model.onnx").write_bytes(b"onnx")
        want = "onnx/model.onnx"
    (folder / "training_args.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(UserError, match=f"other copies of the weights besides its safetensors shards \\({want}\\)"):
        prune_file(folder, tmp_path / "out", sparsity=0.5)
    r = _cli("prune", folder, "-o", tmp_path / "out.sparse.h5", "--sparsity", "0.5")
    assert r.returncode == 1 and want in r.stderr and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.sparse.h5").exists()
    os.remove(folder / want)  # the one copy left: pruned, the trainer state carried
    prune_file(folder, tmp_path / "out", sparsity=0.5)
    assert (tmp_path / "out" / "training_args.bin").read_bytes() == b"\x80\x04N."
