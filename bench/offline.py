"""Offline pruning of a generated ~1 GB float32 checkpoint, globally to 90%.

Times ``sparsecore prune`` (a fresh process, as a user runs it) against a
fresh process that reads every tensor of the same file with h5py and writes
them to a new file, alternating, and reports medians and the ratio; peak
resident memory of our process against 3 x the largest tensor + 300 MB; and
the bytes of the sparse output against the dense file and the dense pruned
file gzipped.

    python bench/offline.py [--gb 1.0] [--dir DIR] [--repeat 3] [--json F]
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ANCHOR = r"""
import resource, sys, h5py, numpy as np
src, dst = sys.argv[1], sys.argv[2]
with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arr = obj[()]
            b.create_dataset(name, data=arr)
    a.visititems(visit)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import resource, sys
from sparsecore.cli import main
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def make_checkpoint(path, gb):
    """Keras-3 layout: layers/dense_i/vars/0 kernels (and small biases)."""
    rng = np.random.default_rng(0)
    shapes = []
    budget = int(gb * (1 << 30))
    big = [(4096, 4096)] * 8 + [(2048, 2048)] * 32 + [(1024, 4096)] * 16 + [(4096, 1024)] * 16
    total = 0
    for s in big:
        if total + 4 * s[0] * s[1] > budget:
            break
        shapes.append(s)
        total += 4 * s[0] * s[1]
    with h5py.File(path, "w") as h:
        for i, s in enumerate(shapes):
            g = h.create_group(f"layers/dense_{i}/vars")
            g.attrs["name"] = f"dense_{i}"
            g.create_dataset("0", data=(rng.standard_normal(s, dtype=np.float32) * (1 + i % 5)))
            g.create_dataset("1", data=np.zeros(s[1], np.float32))
    return shapes


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return dt, int(r.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="sparsecore-bench-", dir=args.dir)
    try:
        src = os.path.join(d, "model.weights.h5")
        shapes = make_checkpoint(src, args.gb)
        size = os.path.getsize(src)
        largest = 4 * max(a * b for a, b in shapes)
        print(f"checkpoint: {len(shapes)} kernels + {len(shapes)} biases, {size / 2**20:.0f} MiB, largest tensor "
              f"{largest / 2**20:.0f} MiB")
        common = ["--sparsity", "0.9", "--scope", "global", "--quiet", "--force"]
        sparse_out, dense_out, anchor_out = (os.path.join(d, n) for n in
                                             ("out.sparse.h5", "out.weights.h5", "copy.h5"))
        runs = {"sparse": [], "dense": [], "nosync": [], "anchor": []}
        rss = {"sparse": 0, "dense": 0, "nosync": 0, "anchor": 0}
        # warm-up: compiles or loads the cached kernels, fills the page cache
        timed([sys.executable, "-c", OURS, "prune", src, "-o", sparse_out, *common])
        for _ in range(args.repeat):
            for key, cmd in (("sparse", [sys.executable, "-c", OURS, "prune", src, "-o", sparse_out, *common]),
                             ("anchor", [sys.executable, "-c", ANCHOR, src, anchor_out]),
                             ("dense", [sys.executable, "-c", OURS, "prune", src, "-o", dense_out, *common]),
                             ("anchor", [sys.executable, "-c", ANCHOR, src, anchor_out]),
                             ("nosync", [sys.executable, "-c", OURS, "prune", src, "-o", dense_out, *common,
                                         "--no-sync"])):
                t, m = timed(cmd)
                runs[key].append(t)
                rss[key] = max(rss[key], m)
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"runs (s): {json.dumps({k: [round(x, 2) for x in v] for k, v in runs.items()})}")
        limit = 3 * largest + 300 * 2**20
        print("\n| run | median s | vs h5py read+write | peak RSS MiB | RSS limit MiB |")
        print("|---|---|---|---|---|")
        print(f"| h5py: read every tensor, write a new file | {med['anchor']:.2f} | 1.00x | "
              f"{rss['anchor'] / 2**20:.0f} | |")
        for k, label in (("sparse", "sparsecore prune, global 90% -> sparse HDF5"),
                         ("dense", "sparsecore prune, global 90% -> .weights.h5 (dense, zeros)"),
                         ("nosync", "the same, --no-sync (no fsync before the rename, like the anchor)")):
            print(f"| {label} | {med[k]:.2f} | {med[k] / med['anchor']:.2f}x (target <= 2x) | "
                  f"{rss[k] / 2**20:.0f} | {limit / 2**20:.0f} |")
        # the same work in this process, start-up (imports, Numba's runtime, cached kernels) excluded
        from sparsecore.io import prune_file

        def h5copy():
            with h5py.File(src, "r") as a, h5py.File(anchor_out, "w") as b:
                def visit(name, obj):
                    if isinstance(obj, h5py.Dataset):
                        b.create_dataset(name, data=obj[()])
                a.visititems(visit)

        inproc = {"sparse": [], "dense": [], "anchor": []}
        prune_file(src, sparse_out, sparsity=0.9, scope="global", force=True)
        for _ in range(args.repeat):
            for key, fn in (("sparse", lambda: prune_file(src, sparse_out, sparsity=0.9, scope="global", force=True)),
                            ("anchor", h5copy),
                            ("dense", lambda: prune_file(src, dense_out, sparsity=0.9, scope="global", force=True))):
                t = time.perf_counter()
                fn()
                inproc[key].append(time.perf_counter() - t)
        im = {k: statistics.median(v) for k, v in inproc.items()}
        print("\n| in one process (start-up excluded) | median s | vs h5py read+write |")
        print("|---|---|---|")
        print(f"| h5py read + write | {im['anchor']:.2f} | 1.00x |")
        print(f"| prune_file -> sparse HDF5 | {im['sparse']:.2f} | {im['sparse'] / im['anchor']:.2f}x |")
        print(f"| prune_file -> .weights.h5 (fsync included) | {im['dense']:.2f} | {im['dense'] / im['anchor']:.2f}x |")
        startup = timed([sys.executable, "-c", OURS, "info", src])[0]
        print(f"(a fresh `sparsecore info` on this file, mostly start-up: {startup:.2f} s)")
        comp_out = os.path.join(d, "out.gz.sparse.h5")
        t_comp = timed([sys.executable, "-c", OURS, "prune", src, "-o", comp_out, *common, "--compress", "gzip"])[0]
        gz = os.path.join(d, "dense.gz")
        t = time.perf_counter()
        with open(dense_out, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g, 1 << 22)
        t_gz = time.perf_counter() - t
        b = {"dense input": size, "pruned dense .weights.h5": os.path.getsize(dense_out),
             "pruned dense, gzip -6": os.path.getsize(gz), "sparse HDF5 (CSR)": os.path.getsize(sparse_out),
             f"sparse HDF5, --compress gzip ({t_comp:.1f} s)": os.path.getsize(comp_out)}
        print("\n| file | bytes | vs dense input |")
        print("|---|---|---|")
        for k, v in b.items():
            print(f"| {k} | {v:,} | {v / size:.3f} |")
        print(f"(gzip took {t_gz:.1f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"median_s": med, "runs": runs, "peak_rss": rss, "rss_limit": limit, "bytes": b}, f,
                          indent=1)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
