import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


@pytest.fixture
def force_int64(monkeypatch):
    """Make every CSR take the int64 index path, even on tiny inputs."""
    import sparsecore.csr

    monkeypatch.setattr(sparsecore.csr, "INT32_LIMIT", -1)


# Edge shapes every kernel test runs over.
SHAPES = [(0,), (0, 5), (1, 1), (1, 17), (17, 1), (7, 13), (3, 4, 5), (64, 300)]
DTYPES = [np.float32, np.float64]


def make(rng, shape, dtype, kind="normal"):
    """Seeded data with the features that trip kernels: ties, zero rows, negatives."""
    if kind == "normal":
        a = rng.standard_normal(shape)
    elif kind == "ties":
        a = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:  # zero rows
        a = rng.standard_normal(shape)
        if a.ndim >= 2 and a.shape[0]:
            a[:: 2] = 0
    return a.astype(dtype)


#: The words of the tiny Hugging Face models' tokenizer (ids 1..96; 0 is [UNK]).
WORDS = [f"w{i}" for i in range(96)]


def tiny_llama(dtype=None):
    """A tiny Llama (2 layers, hidden 32, grouped-query attention), seeded, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).to(dtype or torch.float32).eval()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A tiny Llama saved by transformers in 7 safetensors shards, with a word-level tokenizer, and
    calibration files beside it: token ids (``ids.npy``, ``ids.jsonl``) and text (``text.txt``)."""
    import json

    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    tiny_llama().save_pretrained(root / "model", max_shard_size="20KB")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, 2000)
    np.save(root / "ids.npy", ids)
    with open(root / "ids.jsonl", "w") as f:
        for k in range(0, 2000, 250):
            f.write(json.dumps({"input_ids": ids[k:k + 250].tolist()}) + "\n")
    words = rng.integers(0, 96, 3000)
    (root / "text.txt").write_text("\n\n".join(" ".join(WORDS[w] for w in words[k:k + 100])
                                               for k in range(0, 3000, 100)))
    return root


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    from . import _launches

    _launches.install()
