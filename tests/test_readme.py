"""The README's example runs as written."""

import pathlib
import re

import numpy as np


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks, "README lost its Python example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    res = scope["result"]
    assert sum(s.pruned for s in res.summary) == round(0.9 * (256 * 784 + 10 * 256))
    assert scope["y"].shape == (256,) and scope["mask"].dtype == np.bool_


def test_readme_structured_example_runs(tmp_path, monkeypatch):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert scope["small"]["fc1"].weight.shape == (48, 32) and scope["small"]["fc2"].weight.shape == (10, 48)
    assert scope["compact"].values.shape == (64, 16)
    assert scope["bsr"].blocksize == (4, 4)
    masks = scope["pruner"].masks
    assert abs(1 - sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values()) - 0.8) < 1e-3
    import sparsecore as sc

    back = sc.PruningHistory.load(tmp_path / "history.npz").masks()
    assert all(np.array_equal(back[k], masks[k]) for k in masks)


def test_readme_torch_example_runs():
    import pytest

    pytest.importorskip("torch")
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
             if "sparsecore.adapters" in b and "transformers" not in b][0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    from sparsecore.adapters import torch as sct

    model, masks = scope["model"], scope["result"].masks
    assert isinstance(model[0], sct.SparseLinear)
    assert model[0].weight._nnz() <= int(masks["0.weight"].sum())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * (64 * 128 + 128 * 10))


def test_readme_keras_example_runs():
    import os

    import pytest

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() not in ("torch", "tensorflow"):
        pytest.skip("gradients: torch and tensorflow backends")
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "adapters import keras" in b][0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    masks = scope["gradual"].masks
    assert abs(sum(int((~m).sum()) for m in masks.values()) / sum(m.size for m in masks.values()) - 0.9) < 1e-3


def test_readme_repair_example_runs(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "sc.reconstruct(" in b][0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert capsys.readouterr().out.strip() == "True"
    assert scope["sgpt"].masks["fc"].sum() == 32 * 64 // 2
    assert not scope["fixed"].dense("fc")[~scope["masks"]["fc"]].any()


def test_readme_sample_output_is_the_real_one():
    """The output shown under the README's first command is what `sparsecore prune` prints."""
    import subprocess
    import sys

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    shown = re.search(r"```\n(pruned the embedded default model.*?)```", text, re.DOTALL).group(1)
    r = subprocess.run([sys.executable, "-m", "sparsecore", "prune"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout == shown


def test_readme_hugging_face_recipe_runs(hf_folder, tmp_path, monkeypatch, capsys):
    """The recipe's Python block and its commands, on a tiny Llama with a tokenizer (names swapped in)."""
    import pytest

    pytest.importorskip("transformers")
    import shlex

    from sparsecore import cli
    from sparsecore.io import open_weights

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## A Hugging Face model in one command"):text.index("## PyTorch\n")]
    block = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    swaps = {'"smollm2-135m-fp32"': repr(str(hf_folder / "model")), '"wiki.txt"': repr(str(hf_folder / "text.txt")),
             "samples, seq_len = 32, 512": "samples, seq_len = 4, 32", '"smol-50"': repr(str(tmp_path / "py"))}
    for a, b in swaps.items():
        assert a in block, a
        block = block.replace(a, b)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "8/14 " in printed and printed.rstrip().splitlines()[-1] == "14 layers, 50.00% pruned"
    with open_weights(tmp_path / "py") as r:
        q = r.floats("model.layers.0.self_attn.q_proj.weight")
    assert float((q == 0).mean()) == 0.5
    # the commands: the first sparsecore prune line, on the tiny model and the text
    commands = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[0].replace("\\\n", " ")
    line = next(c for c in commands.splitlines() if c.startswith("sparsecore prune smollm2"))
    args = shlex.split(line.split("#")[0])[1:]
    args[1], args[3] = str(hf_folder / "model"), str(tmp_path / "cli")
    args[args.index("--calibration") + 1] = str(hf_folder / "text.txt")
    assert cli.main(args + ["--samples", "4", "--seq-len", "32", "--quiet"]) == 0
    a, b = (open_weights(tmp_path / n) for n in ("py", "cli"))
    with a, b:  # the same windows of the same text: the same model, from Python and from the command
        for n in b.entries:
            if ".layers." in n:
                np.testing.assert_array_equal(a.raw(n), b.raw(n), err_msg=n)


def test_readme_hf_units_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("transformers")
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "hf_units.prune_units" in b][0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert set(scope["counts"].values()) == {32}
    assert scope["model"].config.intermediate_size == 32 and scope["model"].config.mlp_bias
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smaller")
    assert back.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
