"""Pruning quality of the Keras adapter on scikit-learn's digits.

The Keras twin of ``bench/quality.py``: a Sequential MLP 64-128-64-10 fitted
30 epochs per seed; each criterion's importance computed once; global pruning
to 50-95%; held-out accuracy one-shot and after a 3-epoch ``model.fit`` with
the masks held by ``MaskCallback``; mean ± std over seeds. Keras 3 has no
maintained pruning tool to compare with (TensorFlow Model Optimization serves
Keras 2 only); magnitude is the baseline.

    KERAS_BACKEND=torch python bench/quality_keras.py [--seeds 3] [--json F]
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))

import keras
import keras_digits as ex
from _tables import accuracy_table

import sparsecore as sc
from sparsecore.adapters import keras as sck

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
CRITERIA = ["magnitude", "fisher", "taylor", "obd", "mutual_info", "wanda"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows, times = [], {}
    for seed in range(args.seeds):
        xtr, xte, ytr, yte = ex.data(seed)
        base = ex.make_model(seed)
        t = time.perf_counter()
        base.fit(xtr, ytr, epochs=30, batch_size=64, verbose=0)
        times.setdefault("training epoch (model.fit, batches of 64)", []).append((time.perf_counter() - t) / 30)
        dense = ex.accuracy(base, xte, yte)
        saved = base.get_weights()
        t = time.perf_counter()
        grads = sck.collect_gradients(base, ex.batches(xtr, ytr, 128), per_sample=True, stats=("g2", "wg"))
        times.setdefault("per-sample gradients -> Σg², Σw·g", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        acts = sck.collect_activations(base, ex.batches(xtr, ytr, 256), unit=False, pairwise=True,
                                       feature_norms=True, bins=8)
        times.setdefault("activations -> pairwise MI (8 bins) and input norms", []).append(time.perf_counter() - t)
        imp = {"magnitude": ("magnitude", None), "fisher": ("fisher", grads), "taylor": ("taylor", grads),
               "obd": ("obd", grads), "mutual_info": ("mutual_info", acts.state()), "wanda": ("wanda", acts.state())}
        for s in SPARSITIES:
            for c in CRITERIA:
                base.set_weights(saved)
                scores, state = imp[c]
                r = sc.prune(sck.weights(base), scores, state=state, sparsity=s, scope="global",
                             normalize="none" if c == "magnitude" else "l2")
                sck.apply_masks(base, r.masks)
                one = ex.accuracy(base, xte, yte)
                base.fit(xtr, ytr, epochs=3, batch_size=64, verbose=0, callbacks=[sck.MaskCallback(r.masks)])
                rows.append({"seed": seed, "sparsity": s, "criterion": c, "dense": dense, "one_shot": one,
                             "tuned": ex.accuracy(base, xte, yte)})
    dense = [r["dense"] for r in rows if r["criterion"] == "magnitude" and r["sparsity"] == SPARSITIES[0]]
    print(f"Keras {keras.__version__} on {keras.backend.backend()}; digits, MLP 64-128-64-10, {args.seeds} seeds; "
          f"dense test accuracy {statistics.mean(dense):.3f} ± {statistics.pstdev(dense):.3f}\n")
    print(accuracy_table(rows, CRITERIA, SPARSITIES))
    print("\n| step | median s |")
    print("|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
