"""``sparsecore prune MODEL_DIR --method ... --calibration FILE``: the engine's sequential calibration on a
Hugging Face model folder from the command line, through the ``sparsecore[hf]`` plug-in."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import sparsecore.adapters.hf as schf  # noqa: E402
import sparsecore.adapters.torch as sct  # noqa: E402
from sparsecore import cli  # noqa: E402
from sparsecore.io import calibration, open_weights  # noqa: E402
from sparsecore.io.offline import RECIPE, densify_file  # noqa: E402

from .conftest import tiny_llama as _tiny_llama  # noqa: E402


@pytest.fixture
def folder(hf_folder):
    return hf_folder


def _run(*args):
    return cli.main(["prune", *map(str, args)])


def _tensors(path):
    with open_weights(path) as r:
        return {n: r.raw(n) for n in r.entries}


def test_matches_python_path_bit_for_bit(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(folder / "model", "-o", out, "--method", "sparsegpt", "--calibration", folder / "ids.npy",
                "--sparsity", "0.5", "--samples", "8", "--seq-len", "64") == 0
    printed = capsys.readouterr().out
    assert "14 layers" in printed and "peak memory" in printed and "written:" in printed
    # the Python path on the same windows
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "model").eval()
    ids = np.load(folder / "ids.npy")[:8 * 64].reshape(8, 64)
    sct.prune_sequential(model, [{"input_ids": torch.as_tensor(r)[None]} for r in ids], sparsity=0.5)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    got, before = _tensors(out), _tensors(folder / "model")
    assert set(got) == set(before)
    changed = [n for n in got if not np.array_equal(got[n], before[n])]
    assert len(changed) == 14 and all(".layers." in n for n in changed)
    for n, v in got.items():
        assert np.array_equal(v, want[n]), n
    # the same layout: shard names, index, config; and it loads in transformers
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder / "model") + [RECIPE])
    assert (out / "model.safetensors.index.json").read_bytes() == \
        (folder / "model" / "model.safetensors.index.json").read_bytes()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    q = loaded.model.layers[1].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == 0.5
    recipe = json.loads((out / RECIPE).read_text())
    assert recipe["method"] == "sparsegpt" and recipe["sparsity"] == "0.5"
    assert recipe["calibration_sha256"] == calibration.digest(list(ids))


def test_progress_ends_at_total_and_options_reach_the_driver(folder, tmp_path):
    calls, lines = [], []
    req = calibration.CalibratedPrune(src=str(folder / "model"), dst=str(tmp_path / "o"),
                                      calibration=str(folder / "ids.npy"), method="wanda", update="obs",
                                      sparsity=0.6, samples=4, seq_len=32, order="layer", dense_target=0.5,
                                      dense_batches=2, progress=lambda d, t, n: calls.append((d, t)),
                                      say=lines.append)
    res = schf.prune(req)
    assert calls[-1] == (14, 14) and [d for d, _ in calls] == list(range(1, 15))
    assert res.calibration["samples"] == 4 and res.calibration["tokens"] == 128
    assert any("calibration: 4 samples of 32 tokens" in s for s in lines)
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "model").eval()
    ids = np.load(folder / "ids.npy")[:128].reshape(4, 32)
    sct.prune_sequential(model, [{"input_ids": torch.as_tensor(r)[None]} for r in ids], sparsity=0.6,
                         method="wanda", update="obs", order="layer", dense_target=0.5, dense_batches=2)
    got = _tensors(tmp_path / "o")
    for n, v in model.state_dict().items():
        if n in got:
            assert np.array_equal(got[n], v.numpy()), n


def test_bfloat16_model_keeps_its_dtype_and_sparse_output(folder, tmp_path):
    src = tmp_path / "bf16"
    _tiny_llama(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert _run(src, "-o", tmp_path / "out", "--method", "sparsegpt", "--calibration", folder / "ids.npy",
                "--pattern", "2:4", "--samples", "4", "--seq-len", "32", "--quiet") == 0
    with open_weights(tmp_path / "out") as r, open_weights(src) as s:
        assert {n: e.dtype for n, e in r.entries.items()} == {n: e.dtype for n, e in s.entries.items()}
        q = r.floats("model.layers.0.self_attn.q_proj.weight").reshape(-1, 4)
        assert ((q != 0).sum(1) <= 2).all()
    # the same run into one sparse file: densified, the same folder
    assert _run(src, "-o", tmp_path / "o.sparse.h5", "--method", "sparsegpt", "--calibration",
                folder / "ids.npy", "--pattern", "2:4", "--samples", "4", "--seq-len", "32", "--quiet") == 0
    densify_file(tmp_path / "o.sparse.h5", tmp_path / "back")
    a, b = _tensors(tmp_path / "back"), _tensors(tmp_path / "out")
    assert all(np.array_equal(a[n], b[n]) for n in b)
    with open_weights(tmp_path / "o.sparse.h5") as r:
        assert r.h5.attrs["method"] == "sparsegpt" and len(r.h5.attrs["calibration_sha256"]) == 64


def test_text_and_json_lines(folder, tmp_path, capsys):
    assert _run(folder / "model", "-o", tmp_path / "t", "--method", "wanda", "--calibration", folder / "text.txt",
                "--sparsity", "0.5", "--samples", "4", "--seq-len", "64") == 0
    assert "calibration: 4 samples of 64 tokens from" in capsys.readouterr().out
    # JSON lines of token ids: the same windows as the .npy, so the same hash and the same model
    for name in ("ids.jsonl", "ids.npy"):
        assert _run(folder / "model", "-o", tmp_path / name, "--method", "sparsegpt", "--calibration",
                    folder / name, "--sparsity", "0.5", "--samples", "6", "--seq-len", "50", "--quiet") == 0
    a, b = (json.loads((tmp_path / n / RECIPE).read_text()) for n in ("ids.jsonl", "ids.npy"))
    assert a["calibration_sha256"] == b["calibration_sha256"]
    ta, tb = _tensors(tmp_path / "ids.jsonl"), _tensors(tmp_path / "ids.npy")
    assert all(np.array_equal(ta[n], tb[n]) for n in ta)


def test_owl_allocation(folder, tmp_path):
    assert _run(folder / "model", "-o", tmp_path / "o", "--method", "sparsegpt", "--calibration",
                folder / "ids.npy", "--sparsity", "0.6", "--allocation", "owl", "--samples", "4", "--seq-len",
                "32", "--quiet") == 0
    with open_weights(tmp_path / "o") as r:
        per_block = {b: np.mean([float((r.floats(n) == 0).mean()) for n in r.entries
                                 if f".layers.{b}." in n and n.endswith("proj.weight")]) for b in (0, 1)}
    assert per_block[0] != pytest.approx(per_block[1], abs=1e-3)
    assert np.mean(list(per_block.values())) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("args, words", [
    (["--method", "sparsegpt", "--sparsity", "0.5"], "--calibration FILE"),
    (["--samples", "4", "--sparsity", "0.5"], "--samples applies to calibrated pruning"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--scope", "global"], "--scope"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--samples", "0"], "--samples must be"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--dense-target", "2"], "--dense-target"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--update", "obs"], "--update applies"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--workers", "2"], "--workers"),
    (["--method", "sparsegpt", "--calibration", "X", "--sparsity", "0.5", "--dense-batches", "2"],
     "--dense-batches applies"),
    (["--method", "sparsegpt", "--calibration", "X"], "--sparsity or --pattern"),
])
def test_bad_flags_exit_2_naming_the_flag(folder, tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        _run(folder / "model", "-o", tmp_path / "o", *args)
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, args, words", [
    (lambda p: np.save(p / "c.npy", np.arange(100)), ["--samples", "4", "--seq-len", "64"], "gives 100 tokens"),
    (lambda p: np.save(p / "c.npy", np.arange(1000)), ["--seq-len", "200"], "exceeds the model's 128 positions"),
    (lambda p: np.save(p / "c.npy", np.full(1000, 500)), ["--samples", "2", "--seq-len", "64"],
     "outside the model's vocabulary of 97"),
    (lambda p: np.save(p / "c.npy", np.zeros(9, np.float32)), ["--seq-len", "8"], "integer array"),
    (lambda p: (p / "c.jsonl").write_text('{"input_ids": [1, 2]}\n"text"\n'), ["--seq-len", "8"],
     "mixes token ids with text"),
    (lambda p: (p / "c.jsonl").write_text('{"nope": 1}\n'), ["--seq-len", "8"], "line 1 is neither"),
    (lambda p: (p / "c.txt").write_bytes(b"\xff\xfe bad"), ["--seq-len", "8"], "not UTF-8"),
])
def test_bad_calibration_one_line_nothing_written(folder, tmp_path, capsys, make, args, words):
    make(tmp_path)
    cal = next(p for p in tmp_path.iterdir() if p.name.startswith("c."))
    assert _run(folder / "model", "-o", tmp_path / "o", "--method", "sparsegpt", "--calibration", cal,
                "--sparsity", "0.5", *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_text_without_tokenizer_and_missing_plugin(folder, tmp_path, capsys, monkeypatch):
    src = tmp_path / "bare"
    _tiny_llama().save_pretrained(src)
    assert _run(src, "-o", tmp_path / "o", "--method", "sparsegpt", "--calibration", folder / "text.txt",
                "--sparsity", "0.5") == 1
    assert "no tokenizer" in capsys.readouterr().err
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    assert _run(src, "-o", tmp_path / "o", "--method", "sparsegpt", "--calibration", folder / "ids.npy",
                "--sparsity", "0.5") == 1
    assert "pip install 'sparsecore[hf]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_encoder_rows(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).eval().save_pretrained(tmp_path / "bert")
    np.save(tmp_path / "rows.npy", np.random.default_rng(1).integers(1, 97, (6, 40)))
    assert _run(tmp_path / "bert", "-o", tmp_path / "o", "--method", "sparsegpt", "--calibration",
                tmp_path / "rows.npy", "--sparsity", "0.5", "--samples", "5", "--seq-len", "32", "--quiet") == 0
    with open_weights(tmp_path / "o") as r:
        w = r.floats("encoder.layer.1.attention.self.query.weight")
    assert float((w == 0).mean()) == 0.5
    # sentences of several lengths, batched with padding: the padding is left out, as in the Python path
    lines = [" ".join(f"w{k}" for k in range(1 + i % 7, 2 + i % 7 + 3 * (i % 5))) for i in range(20)]
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 97)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "bert")
    assert _run(tmp_path / "bert", "-o", tmp_path / "o2", "--method", "sparsegpt", "--calibration",
                tmp_path / "lines.txt", "--sparsity", "0.5", "--samples", "20", "--seq-len", "8", "--quiet") == 0
    model = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    ids = [[int(t[1:]) for t in line.split()][:8] for line in lines]
    data = []
    for k in range(0, 20, schf.ENCODER_BATCH):
        part = ids[k:k + schf.ENCODER_BATCH]
        n = max(map(len, part))
        data.append({"input_ids": torch.tensor([p + [0] * (n - len(p)) for p in part]),
                     "attention_mask": torch.tensor([[1] * len(p) + [0] * (n - len(p)) for p in part])})
    sct.prune_sequential(model, data, sparsity=0.5)
    got = _tensors(tmp_path / "o2")
    for n, v in model.state_dict().items():
        if n in got:
            assert np.array_equal(got[n], v.numpy()), n
    recipe = json.loads((tmp_path / "o" / RECIPE).read_text())
    assert recipe["calibration_samples"] == "5" and recipe["calibration_tokens"] == str(5 * 32)


def test_a_long_summary_is_shown_per_block():
    from sparsecore.prune import TensorSummary, format_table

    lines = [TensorSummary(f"model.layers.{b}.{p}.weight", (8, 8), 64, 32, 32, 256, 300)
             for b in range(30) for p in ("q", "k", "v", "o", "gate", "up", "down")]
    rows = cli._by_block(lines)
    assert [r.name for r in rows] == [f"model.layers.{b}.*" for b in range(30)]
    assert rows[3].shape == "7 tensors" and rows[3].size == 7 * 64 and rows[3].pruned == 7 * 32
    total = format_table(rows).splitlines()[-1]
    assert total.split()[:3] == ["total", str(30 * 7 * 32), "50.00%"]


# --- --units: whole heads and channels removed into a smaller model -----------------------------------------

def test_units_write_a_smaller_model_that_from_pretrained_loads(folder, tmp_path, capsys):
    from sparsecore.adapters import hf_units

    out = tmp_path / "small"
    assert _run(folder / "model", "-o", out, "--units", "heads,channels", "--sparsity", "0.5", "--calibration",
                folder / "ids.npy", "--samples", "8", "--seq-len", "64", "--multiple", "16") == 0
    printed = capsys.readouterr().out
    assert "heads 1 of 2 kept in each of 2 layers, channels 32 of 64 kept in each of 2 layers" in printed
    assert "fewer)" in printed and "from_pretrained loads it" in printed
    small = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert small.config.num_key_value_heads == 1 and small.config.intermediate_size == 32
    assert small.config.mlp_bias and small.config.attention_bias  # the default repair fits biases
    # the Python path on the same windows gives the same model
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "model").eval()
    ids = np.load(folder / "ids.npy")[:8 * 64].reshape(8, 64)
    hf_units.prune_units(model, 0.5, data=[{"input_ids": torch.as_tensor(r)[None]} for r in ids],
                         score="fluctuation", repair="refit+bias", order="block", multiple=16)
    want = model.state_dict()
    for n, v in small.state_dict().items():
        assert torch.equal(v, want[n]), n
    # the tokenizer came along; the input is untouched; the record says how
    assert (out / "tokenizer.json").read_bytes() == (folder / "model" / "tokenizer.json").read_bytes()
    recipe = json.loads((out / RECIPE).read_text())
    assert recipe["units"] == "heads,channels" and recipe["repair"] == "refit+bias"
    assert transformers.LlamaForCausalLM.from_pretrained(folder / "model").config.intermediate_size == 64


@pytest.mark.parametrize("args, words", [
    (["--units", "heads", "--sparsity", "0.5"], "needs calibration"),
    (["--units", "neurons", "--sparsity", "0.5", "--calibration", "X"], "--units takes heads, channels"),
    (["--units", "heads", "--calibration", "X"], "--units takes --sparsity"),
    (["--units", "heads", "--sparsity", "0.5", "--calibration", "X", "--method", "sparsegpt"], "--method sparsegpt"),
    (["--units", "heads", "--sparsity", "0.5", "--calibration", "X", "--update", "obs"], "--update applies"),
    (["--units", "heads", "--sparsity", "0.5", "--calibration", "X", "--allocation", "owl"], "--allocation applies"),
    (["--units", "heads", "--sparsity", "0.5", "--calibration", "X", "--multiple", "0"], "--multiple must be"),
    (["--unit-repair", "bias", "--sparsity", "0.5"], "--unit-repair applies with --units"),
])
def test_bad_unit_flags_exit_2_naming_the_flag(folder, tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        _run(folder / "model", "-o", tmp_path / "o", *args)
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
