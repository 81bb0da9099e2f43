"""Calibration statistics on a Dask cluster, with the PyTorch adapter.

The recipe for data that one machine does not get through:
1. Each worker reads its own shard of the calibration data (here an .npz
   file per shard; in real use files or object-store keys) and builds
   sparsecore accumulators with the PyTorch adapter: the empirical Fisher
   Σ g² of every weight (``collect_gradients``, per sample) and the Hessian
   H = Σ x xᵀ of the first layer's inputs (a forward hook into a
   ``HessianAccumulator``).
2. ``sparsecore.parallel.accumulate`` merges them by a tree of tasks. Only
   the accumulators cross the network, never the data.
3. The client prunes with the merged statistics: globally by OBD
   (½ w² Σ g²), and the first layer by SparseGPT from the merged H.

The merged statistics are checked against one pass over all the data on the
client. The Hessian's counts agree exactly and its sums to float64
rounding; the gradient sums agree within the accumulator's stated bound.

    python examples/dask_calibration.py [--workers 2] [--shards 8] [--sparsity 0.7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

import sparsecore as sc
from sparsecore import parallel
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_digits as td  # noqa: E402  (the digits data, the MLP and its training)


def gradients_of(args):
    """On a worker: the Fisher accumulator of one data shard."""
    state, path = args
    model = td.make_model(0)
    model.load_state_dict(state)
    with np.load(path) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    return sct.collect_gradients(model, td.batches(x, y, 128), nn.functional.cross_entropy, per_sample=True)


def hessian_of(args):
    """On a worker: H = Σ x xᵀ of the first layer's inputs over one data shard."""
    state, path = args
    model = td.make_model(0)
    model.load_state_dict(state)
    with np.load(path) as f:
        x = torch.from_numpy(f["x"])
    acc = sc.HessianAccumulator(64, name="0.weight")
    def take(module, inputs):  # returns None: the layer's input goes on unchanged
        acc.update(inputs[0].detach().numpy())

    hook = model[0].register_forward_pre_hook(take)
    with torch.no_grad():
        for i in range(0, len(x), 128):
            model(x[i:i + 128])
    hook.remove()
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args(argv)
    import cloudpickle
    import distributed

    cloudpickle.register_pickle_by_value(td)  # the workers need not find the examples folder
    xtr, ytr, xte, yte = td.data(0)
    model = td.train(td.make_model(0), xtr, ytr, epochs=30, seed=0)
    print(f"dense test accuracy: {td.accuracy(model, xte, yte):.3f}")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp, \
            distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        paths = []
        for k, idx in enumerate(np.array_split(np.arange(len(ytr)), args.shards)):  # the data, as shards
            paths.append(os.path.join(tmp, f"shard{k}.npz"))
            np.savez(paths[-1], x=xtr[idx].numpy(), y=ytr[idx].numpy())
        grads = parallel.accumulate(client, gradients_of, [(state, p) for p in paths], split_every=4)
        hess = parallel.accumulate(client, hessian_of, [(state, p) for p in paths], split_every=4)

    # one pass over all the data here, to compare
    one_g = sct.collect_gradients(model, td.batches(xtr, ytr, 128), nn.functional.cross_entropy, per_sample=True)
    one_h = hessian_of((state, _whole(xtr, ytr)))
    g, w = grads.state("0.weight")["g2"], one_g.state("0.weight")["g2"]
    print(f"{args.shards} shards on {args.workers} workers, merged by a tree: Hessian count {hess.count} "
          f"(one pass {one_h.count}); largest relative differences from one pass: Hessian "
          f"{_rel(hess.hessian(), one_h.hessian()):.1e}, Fisher {_rel(g, w):.1e}")

    obd = sc.prune(sct.weights(model), "obd", state=grads, sparsity=args.sparsity, scope="global")
    pruned = td.make_model(0)
    pruned.load_state_dict(state)
    sct.apply_masks(pruned, obd.masks)
    print(f"OBD (½ w² Σ g²) from the cluster, global {args.sparsity:.0%}: test accuracy "
          f"{td.accuracy(pruned, xte, yte):.3f}")
    first = sc.sparsegpt({"0.weight": state["0.weight"].numpy()}, {"0.weight": hess}, sparsity=args.sparsity)
    pruned.load_state_dict(state)
    with torch.no_grad():
        pruned[0].weight.copy_(torch.from_numpy(first.dense("0.weight")))
    print(f"SparseGPT on the first layer from the merged Hessian, {args.sparsity:.0%}: test accuracy "
          f"{td.accuracy(pruned, xte, yte):.3f}")


def _whole(x, y):
    path = os.path.join(tempfile.mkdtemp(), "all.npz")
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


if __name__ == "__main__":
    main()
