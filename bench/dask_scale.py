"""Dask: a generated 4-shard checkpoint (>= 2 GB) pruned globally to 90%,
and a calibration reduction.

1. Prune one model folder (4 safetensors shards of float32 matrices, with an
   index) three ways: in one process (``prune_file``), and with ``client=``
   on a local cluster of 1 worker and of 2 worker processes. The default
   caps hold (0.99 per tensor), so the global threshold comes from radix
   histograms. Reported: wall time (after a warm-up run on a small folder
   that loads the kernels in every worker), the bytes moved between client
   and workers (pickled arguments and results; the tensors never move), and
   that the output folders are identical. The anchor is one sequential read
   of the checkpoint's bytes in the same run (``cat`` to /dev/null), the
   floor for any pass over the files.
2. Reduce 8 partial ``HessianAccumulator`` (one per data shard, built on the
   workers) by ``sparsecore.parallel.accumulate``'s tree. Compared with one
   pass over all the data on the client: wall time, bytes moved, and the
   largest difference.

The machine has 2 shared cores, so two workers compete with each other and
with the client; on a real cluster each worker has its own disk and cores.

    python bench/dask_scale.py [--gb 2.1] [--dir DIR] [--repeat 2] [--json FILE]
"""

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import sparsecore as sc
from sparsecore import parallel
from sparsecore.io import prune_file, save_safetensors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CACHE  # noqa: E402


def make_checkpoint(folder, gb, shards=4, side=4096, seed=0):
    """``shards`` safetensors files of float32 ``side x side`` matrices, ``gb`` GB in all, one tensor in
    memory at a time; kept in the cache and reused while its size matches."""
    per = max(1, round(gb * 1e9 / (shards * side * side * 4)))
    stamp = os.path.join(folder, ".made")
    want = f"{shards} {per} {side} {seed}"
    if os.path.exists(stamp) and open(stamp).read() == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        items = {}
        for t in range(per):
            name = f"model.layers.{s * per + t}.mlp.weight"
            scale = 0.02 * (1 + (s * per + t) % 7)  # layers of different scales: a global threshold matters
            items[name] = (np.float32, (side, side),
                           lambda scale=scale: (rng.standard_normal((side, side), np.float32) * scale))
            weight_map[name] = shard
        save_safetensors(os.path.join(folder, shard), items, {"format": "pt"}, force=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "generated"}, f)
    with open(stamp, "w") as f:
        f.write(want)
    return folder


def checkpoint_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def read_floor(folder):
    """Seconds to read every shard once, sequentially (the floor of one pass)."""
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    t = time.perf_counter()
    subprocess.run(["cat", *shards], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def same_folders(a, b):
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    for n in names:
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        if os.path.getsize(pa) != os.path.getsize(pb):
            return False
        with open(pa, "rb") as x, open(pb, "rb") as y:
            while True:
                ca, cb = x.read(1 << 24), y.read(1 << 24)
                if ca != cb:
                    return False
                if not ca:
                    break
    return True


def shard_data(seed, n=8192, d=1536):
    """A data shard of layer inputs, generated from its seed (as a worker reads its own files)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d), np.float32) * rng.uniform(0.5, 2.0, d).astype(np.float32)


def partial_hessian(seed):
    """A worker's data shard into its own accumulator."""
    x = shard_data(seed)
    return sc.HessianAccumulator(x.shape[1]).update(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.1)
    ap.add_argument("--dir", default=os.path.join(CACHE, "dask"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    import distributed

    model = make_checkpoint(os.path.join(args.dir, "model"), args.gb)
    small = make_checkpoint(os.path.join(args.dir, "small"), 0.05, side=512)
    size = checkpoint_bytes(model)
    print(f"sparsecore {sc.__version__}; checkpoint: 4 shards, {size / 1e9:.2f} GB float32; global 90%, "
          f"default caps; {os.cpu_count()} cores")
    out = tempfile.mkdtemp(dir=args.dir, prefix="out-")
    rows, reference = [], os.path.join(out, "one")
    floor = statistics.median(read_floor(model) for _ in range(3))
    print(f"anchor: one sequential read of the shards {floor:.2f} s ({size / floor / 1e9:.2f} GB/s)")

    def timed(label, client):
        prune_file(small, os.path.join(out, "warm"), sparsity=0.9, scope="global", client=client, force=True)
        secs, res = [], None
        for _ in range(args.repeat):
            target = reference if client is None else os.path.join(out, "many")
            t = time.perf_counter()
            res = prune_file(model, target, sparsity=0.9, scope="global", client=client, force=True, sync=False)
            secs.append(time.perf_counter() - t)
        same = True if client is None else same_folders(reference, os.path.join(out, "many"))
        row = {"run": label, "seconds": statistics.median(secs), "moved_bytes": res.moved_bytes,
               "identical": same, "passes_equivalent": statistics.median(secs) / floor}
        rows.append(row)
        print(f"  {label:<24} {row['seconds']:7.1f} s  ({row['passes_equivalent']:.1f} x the read)  "
              f"moved {res.moved_bytes / 1e6:8.2f} MB  identical to one process: {same}", flush=True)

    try:
        timed("one process", None)
        for workers in (1, 2):
            with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                          dashboard_address=":0") as lc, distributed.Client(lc) as client:
                timed(f"local cluster, {workers} worker{'s' if workers > 1 else ''}", client)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = rows[0]["seconds"]
    print("\n| run | wall time (s) | vs one process | bytes moved | identical output |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {r['moved_bytes'] / 1e6:.2f} MB "
              f"| {r['identical']} |")

    # 2. 8 partial Hessians: one pass on the client vs built on 2 workers and merged by a tree
    seeds = list(range(8))
    partial_hessian(99)  # warm-up
    t = time.perf_counter()
    one = sc.HessianAccumulator(shard_data(0).shape[1])
    for s in seeds:
        one.update(shard_data(s))  # the same data in one accumulator, one pass on the client
    t_one = time.perf_counter() - t
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, distributed.Client(lc) as client:
        parallel.accumulate(client, partial_hessian, [99], split_every=2)  # warm-up in the workers
        t = time.perf_counter()
        merged = parallel.accumulate(client, partial_hessian, seeds, split_every=2)
        t_tree = time.perf_counter() - t
    moved = 7 * len(pickle.dumps(one, protocol=5))  # each of 8 partials but one crosses once (tree of 2s)
    diff = float(np.max(np.abs(merged.hessian() - one.hessian())) / np.max(np.abs(one.hessian())))
    print(f"\n8 partial Hessians of {one.features} features ({one.count:,} inputs): one pass here {t_one:.1f} s; "
          f"on 2 workers with a tree merge {t_tree:.1f} s ({t_tree / t_one:.2f}x); about {moved / 1e6:.0f} MB "
          f"moved between workers; count {merged.count:,} (one pass {one.count:,}); largest relative "
          f"difference {diff:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": size, "read_floor": floor, "rows": rows,
                       "hessian": {"one": t_one, "tree": t_tree, "rel_diff": diff}}, f, indent=1)


if __name__ == "__main__":
    main()
