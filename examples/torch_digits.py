"""The reference article's workflow in PyTorch, on scikit-learn's bundled digits.

Train a small MLP; compute importance (magnitude, empirical Fisher Σ g² from
per-sample gradients, Taylor |Σ w·g|, OBD ½·w²·Σ g², pairwise mutual
information between the units each weight connects, and Wanda's |w|·‖x‖);
select by threshold or by sparsity, locally or globally; prune; fine-tune with
the masks held; export CSR; run inference on the CSR weights; report accuracy.

    python examples/torch_digits.py [--sparsity 0.9] [--scope global] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import sparsecore as sc
from sparsecore.adapters import torch as sct

CRITERIA = ["magnitude", "fisher", "taylor", "obd", "mutual_info", "wanda"]


def data(seed=0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long())


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(x, y, size, seed=None):
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else \
        torch.arange(len(y))
    for i in range(0, len(y), size):
        j = idx[i:i + size]
        yield x[j], y[j]


def train(model, x, y, epochs, seed, lr=1e-3, masks=None):
    """Adam on cross-entropy; with ``masks`` the pruned weights are held at zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    hold = sct.MaskHold(model, masks, opt) if masks else None
    model.train()
    try:
        for e in range(epochs):
            for xb, yb in batches(x, y, 64, seed * 1000 + e):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
    finally:
        if hold is not None:
            hold.remove()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def importance(model, xtr, ytr, criterion):
    """``(scores argument, state)`` for ``sc.prune`` under ``criterion``."""
    loss = nn.functional.cross_entropy
    if criterion == "magnitude":
        return "magnitude", None
    if criterion in ("fisher", "obd"):
        acc = sct.collect_gradients(model, batches(xtr, ytr, 256), loss, per_sample=True)
        return criterion, acc
    if criterion == "taylor":
        acc = sct.collect_gradients(model, batches(xtr, ytr, 256), loss, per_sample=True, stats=("wg",))
        return criterion, acc
    if criterion == "mutual_info":
        st = sct.collect_activations(model, list(batches(xtr, ytr, 256)), unit=False, pairwise=True, bins=8)
        return "mutual_info", st.state()
    if criterion == "wanda":
        st = sct.collect_activations(model, list(batches(xtr, ytr, 256)), unit=False, feature_norms=True)
        return "wanda", st.state()
    raise ValueError(f"unknown criterion {criterion!r}; valid: {CRITERIA}")


def run(criterion="obd", sparsity=0.9, scope="global", threshold=None, seed=0, epochs=30, tune_epochs=5,
        out=print):
    xtr, ytr, xte, yte = data(seed)
    model = train(make_model(seed), xtr, ytr, epochs, seed)
    acc_dense = accuracy(model, xte, yte)
    w = sct.weights(model)
    scores, state = importance(model, xtr, ytr, criterion)
    kw = dict(threshold=threshold) if threshold is not None else dict(sparsity=sparsity)
    result = sc.prune({k: v.copy() for k, v in w.items()}, scores, state=state, scope=scope,
                      normalize="l2" if scope == "global" and criterion != "magnitude" else "none",
                      max_sparsity=0.98 if scope == "global" else 1.0, **kw)
    sct.apply_masks(model, result.masks)
    acc_pruned = accuracy(model, xte, yte)
    train(model, xtr, ytr, tune_epochs, seed + 1, masks=result.masks)
    acc_tuned = accuracy(model, xte, yte)
    still_zero = all(bool((p.detach().numpy()[~result.masks[k]] == 0).all())
                     for k, p in sct.prunable(model).items())
    final = sc.prune(sct.weights(model), {k: m.astype(np.float32) for k, m in result.masks.items()},
                     threshold=0.5)  # exactly the held masks, as CSR
    sparse_model = sct.swap_sparse_linear(torch.nn.Sequential(*[m for m in model]), final)
    acc_csr = accuracy(sparse_model, xte, yte)
    out(f"{criterion}: {scope} {'threshold ' + str(threshold) if threshold is not None else f'{sparsity:.0%}'}")
    out(final.table())
    out(f"test accuracy: dense {acc_dense:.3f} | pruned {acc_pruned:.3f} | fine-tuned {acc_tuned:.3f} | "
        f"CSR inference {acc_csr:.3f}")
    return {"dense": acc_dense, "pruned": acc_pruned, "tuned": acc_tuned, "csr": acc_csr,
            "sparsity": sum(s.pruned for s in final.summary) / sum(s.size for s in final.summary),
            "held": still_zero, "result": result}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--criterion", choices=CRITERIA, default="obd")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--scope", choices=["local", "global"], default="global")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run(a.criterion, a.sparsity, a.scope, a.threshold, a.seed)


if __name__ == "__main__":
    main()
