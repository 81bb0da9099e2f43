"""Pruning quality on scikit-learn's digits: accuracy by criterion and sparsity.

For each seed an MLP 64-128-64-10 is trained (PyTorch, 30 epochs of AdamW);
each criterion's importance is computed once on the training split; the
model is pruned globally to 50, 70, 80, 90 and 95%, evaluated on the held-out
split one-shot and after a short fine-tune (3 epochs, masks held). The anchor
is ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` on the same
trained model, fine-tuned the same way. Mean and standard deviation over the
seeds. Then the wall time of each criterion's importance collection against
one plain training epoch on the same data.

    python bench/quality.py [--seeds 3] [--json F]
"""

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune as tprune

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import torch_digits as ex
from _tables import accuracy_table

import sparsecore as sc
from sparsecore.adapters import torch as sct

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
CRITERIA = ["magnitude", "fisher", "taylor", "obd", "mutual_info", "wanda"]
TUNE_EPOCHS = 3


def torch_global_l1(model, sparsity):
    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m if isinstance(mod, nn.Linear)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    masks = sct.masks_from_torch_prune(m)
    for mod, name in params:
        tprune.remove(mod, name)
    return m, masks


def one_seed(seed, rows):
    xtr, ytr, xte, yte = ex.data(seed)
    base = ex.train(ex.make_model(seed), xtr, ytr, 30, seed)
    dense = ex.accuracy(base, xte, yte)
    imp = {c: ex.importance(base, xtr, ytr, c) for c in CRITERIA}
    for s in SPARSITIES:
        for c in CRITERIA + ["torch L1 global"]:
            if c == "torch L1 global":
                model, masks = torch_global_l1(base, s)
            else:
                model = copy.deepcopy(base)
                scores, state = imp[c]
                r = sc.prune(sct.weights(model), scores, state=state, sparsity=s, scope="global",
                             normalize="none" if c == "magnitude" else "l2")
                masks = r.masks
                sct.apply_masks(model, masks)
            one = ex.accuracy(model, xte, yte)
            ex.train(model, xtr, ytr, TUNE_EPOCHS, seed + 1, masks=masks)
            rows.append({"seed": seed, "sparsity": s, "criterion": c, "dense": dense, "one_shot": one,
                         "tuned": ex.accuracy(model, xte, yte)})


def timing(seed=0, repeat=5):
    xtr, ytr, _, _ = ex.data(seed)
    model = ex.train(ex.make_model(seed), xtr, ytr, 2, seed)

    def epoch():
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.train()
        for xb, yb in ex.batches(xtr, ytr, 64, 0):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()

    def med(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    t_epoch = med(epoch)
    out = {"training epoch (AdamW, batches of 64)": t_epoch}
    loss = nn.functional.cross_entropy
    out["per-sample gradients -> Σg², Σw·g (torch.func vmap)"] = med(lambda: sct.collect_gradients(
        model, ex.batches(xtr, ytr, 256), loss, per_sample=True, stats=("g2", "wg")))
    out["batch gradients -> Σg² (batches of 64)"] = med(lambda: sct.collect_gradients(
        model, ex.batches(xtr, ytr, 64), loss))
    data = list(ex.batches(xtr, ytr, 256))
    out["activations -> pairwise MI (8 bins), two passes"] = med(lambda: sct.collect_activations(
        model, data, unit=False, pairwise=True, bins=8))
    out["activations -> input norms (Wanda)"] = med(lambda: sct.collect_activations(
        model, data, unit=False, feature_norms=True))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for seed in range(args.seeds):
        one_seed(seed, rows)
    dense = [r["dense"] for r in rows if r["criterion"] == "magnitude" and r["sparsity"] == SPARSITIES[0]]
    print(f"digits, MLP 64-128-64-10, {args.seeds} seeds; dense test accuracy "
          f"{statistics.mean(dense):.3f} ± {statistics.pstdev(dense):.3f}\n")
    print("global pruning; test accuracy mean ± std over seeds, one-shot / after a "
          f"{TUNE_EPOCHS}-epoch fine-tune with masks held\n")
    print(accuracy_table(rows, CRITERIA + ["torch L1 global"], SPARSITIES))
    t = timing()
    base = t["training epoch (AdamW, batches of 64)"]
    print("\n| importance collection over the training split | median ms | vs one training epoch |")
    print("|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "timing": t}, f, indent=1)


if __name__ == "__main__":
    main()
