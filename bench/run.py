"""sparsecore benchmarks: ours against the anchor in the same run, with ratios.

Run ``python bench/run.py`` (``--quick`` for smaller sizes, ``--json F`` to
save the numbers). Every case warms up first (JIT compilation is not timed),
alternates ours with the anchor, and reports medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange

import sparsecore as sc

ROWS = []


def timeit(fns, repeat, inner=3, pause=0.12, block=0.02):
    """Median seconds per call of each callable.

    Rounds alternate the callables; in a round each one gets a pause (so
    that the worker threads of whatever ran before, which spin-wait after a
    call in OpenBLAS, OpenMP and PyTorch, have gone idle), an untimed call,
    then at least ``inner`` timed calls, more for quick ones so that a block
    lasts about ``block`` seconds (up to 200 calls).
    """
    counts = []
    for f in fns:
        f()
        t = time.perf_counter()
        f()
        once = time.perf_counter() - t
        counts.append(max(inner, min(200, int(block / max(once, 1e-9)))))
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            time.sleep(pause)
            f()
            for _ in range(counts[i]):
                t = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def report(case, ours, anchor_name, anchor, target=None, extra=""):
    ratio = anchor / ours
    ok = "" if target is None else ("yes" if ratio >= target else "NO")
    ROWS.append({"case": case, "ours_ms": ours * 1e3, "anchor": anchor_name, "anchor_ms": anchor * 1e3,
                 "ratio": ratio, "target": target, "met": ok, "note": extra})
    tgt = "" if target is None else f">= {target:g}x"
    print(f"| {case:<42} | {ours * 1e3:>10.2f} | {anchor_name:<34} | {anchor * 1e3:>10.2f} | {ratio:>6.2f}x "
          f"| {tgt:<8} | {ok:<3} | {extra}")


def header(title):
    print(f"\n### {title}\n")
    print(f"| {'case':<42} | {'ours ms':>10} | {'anchor':<34} | {'anchor ms':>10} | {'ratio':>7} | "
          f"{'target':<8} | met | note")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 36}|{'-' * 12}|{'-' * 9}|{'-' * 10}|-----|-----")


@njit(parallel=True, cache=True)
def _triad(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


def triad_bandwidth(n, repeat):
    a = np.zeros(n)
    b = np.ones(n)
    c = np.ones(n)
    (t,) = timeit([lambda: _triad(a, b, c, 3.0)], repeat)
    return 3 * 8 * n / t / 1e9


def bench_accumulate(n, batches, repeat, torch):
    header(f"Accumulating sum g**2 and sum w*g: {batches} batches of {n / 2**20:.0f}M float32 "
           "(float64 accumulators everywhere)")
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal(n, dtype=np.float32) for _ in range(4)]
    w = rng.standard_normal(n, dtype=np.float32)
    acc = sc.GradientAccumulator(stats=("g2", "wg"))
    a_g2 = np.zeros(n)
    a_wg = np.zeros(n)
    tmp = np.empty(n, np.float32)

    def ours():
        acc.reset()
        for i in range(batches):
            acc.update(gs[i % 4], w)

    def numpy_inplace(a_g2, a_wg):
        def run():
            a_g2[:] = 0
            a_wg[:] = 0
            for i in range(batches):
                g = gs[i % 4]
                np.multiply(g, g, out=tmp)
                np.add(a_g2, tmp, out=a_g2)
                np.multiply(w, g, out=tmp)
                np.add(a_wg, tmp, out=a_wg)
        return run

    fns = [ours, numpy_inplace(a_g2, a_wg)]
    if torch is not None:
        tg = [torch.from_numpy(g) for g in gs]
        tw = torch.from_numpy(w)
        t_g2 = torch.zeros(n, dtype=torch.float64)
        t_wg = torch.zeros(n, dtype=torch.float64)
        ttmp = torch.empty(n, dtype=torch.float32)

        def torch_inplace():
            t_g2.zero_()
            t_wg.zero_()
            for i in range(batches):
                g = tg[i % 4]
                torch.mul(g, g, out=ttmp)
                t_g2.add_(ttmp)
                torch.mul(tw, g, out=ttmp)
                t_wg.add_(ttmp)

        fns.append(torch_inplace)
    fns.append(numpy_inplace(np.zeros(n, np.float32), np.zeros(n, np.float32)))
    res = timeit(fns, repeat, inner=1)
    np.testing.assert_allclose(acc.state()["g2"], a_g2, rtol=1e-6)
    bw = triad_bandwidth(n, repeat)
    # bytes per element per batch: read g and w (8), read+write two float32
    # partials (16), and every 16 batches a flush of each (read 4 + 16, write 4)
    ours_bw = (8 + 16 + 2 * 24 / 16) * n * batches / res[0] / 1e9
    report("accumulate g2+wg", res[0], "NumPy in-place, float64 sums", res[1], 3,
           f"ours {ours_bw:.1f} GB/s moved; triad {bw:.1f} GB/s")
    if torch is not None:
        report("accumulate g2+wg", res[0], "PyTorch in-place ops, float64 sums", res[2], 4)
    report("accumulate g2+wg", res[0], "NumPy in-place, float32 sums (drifts)", res[-1], None,
           "less precise than ours: no target")


def bench_threshold(n, repeat):
    header(f"Exact threshold of {n / 2**20:.0f}M magnitude scores at 90% sparsity")
    rng = np.random.default_rng(1)
    w = rng.standard_normal(n, dtype=np.float32)
    k = round(0.9 * n)
    out = {}

    def ours():
        out["ours"] = sc.select_threshold(w, 0.9, absolute=True)

    def anchor():
        out["np"] = float(np.partition(np.abs(w), k - 1)[k - 1])

    res = timeit([ours, anchor], repeat)
    assert out["ours"] == out["np"], (out["ours"], out["np"])
    report("select_threshold |w|, 90%", res[0], "np.abs + np.partition", res[1], 10, "same k-th value")


def bench_global(n_each, repeat, torch):
    if torch is None:
        return
    from torch.nn.utils import prune as tprune

    header(f"Global magnitude pruning, 4 x {n_each / 2**20:.0f}M float32 at 80% (masks and CSR for ours)")
    rng = np.random.default_rng(2)
    rows = 2048
    ws = {f"l{i}": rng.standard_normal((rows, n_each // rows), dtype=np.float32) for i in range(4)}
    mods = []
    for w in ws.values():
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w))
        mods.append(m)
    out = {}

    def ours():
        out["r"] = sc.prune(ws, sparsity=0.8, scope="global")

    def anchor():
        for m in mods:
            if hasattr(m, "weight_orig"):
                tprune.remove(m, "weight")
                with torch.no_grad():
                    m.weight.copy_(torch.from_numpy(ws[f"l{mods.index(m)}"]))
        tprune.global_unstructured([(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured,
                                   amount=0.8)

    res = timeit([ours, anchor], repeat, inner=1)
    # 16M float32 draws hold equal magnitudes: masks may differ only among
    # entries tied at the threshold, which torch's topk orders its own way.
    t = sc.select_threshold(np.concatenate([w.ravel() for w in ws.values()]), 0.8, absolute=True)
    differ = 0
    for i, m in enumerate(mods):
        ours_m = out["r"].masks[f"l{i}"]
        theirs = m.weight_mask.numpy().astype(bool)
        off = ours_m != theirs
        assert np.all(np.abs(ws[f"l{i}"][off]) == np.float32(t))
        differ += int(off.sum())
    assert sum(int(out["r"].masks[k].sum()) for k in ws) == sum(int(m.weight_mask.sum()) for m in mods)
    report("prune(scope='global') masks+CSR", res[0], "torch global_unstructured L1", res[1], 80,
           f"same masks but {differ} entries tied at the threshold")


def bench_csr_build(repeat):
    header("CSR from a 4096x4096 float32 weight and its scores")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    s = rng.random((4096, 4096), dtype=np.float32)
    for sparsity in (0.9, 0.99):
        t = sc.select_threshold(s, sparsity)
        masked = np.where(s > t, w, np.float32(0))
        out = {}

        def ours_sparsity():
            out["a"] = sc.to_csr(w, scores=s, sparsity=sparsity)

        def ours_threshold():
            out["t"] = sc.to_csr(w, scores=s, threshold=np.nextafter(np.float32(t), np.float32(2)))

        def anchor():
            out["b"] = sp.csr_array(masked)

        res = timeit([ours_sparsity, ours_threshold, anchor], repeat)
        a, b = out["t"], out["b"]
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        assert out["a"].nnz == w.size - round(sparsity * w.size)
        report(f"to_csr(sparsity={sparsity}) incl. exact select", res[0], "scipy csr_array(masked dense)",
               res[2], 10, "exact count, ties by index")
        report(f"to_csr(threshold) at {sparsity:.0%}", res[1], "scipy csr_array(masked dense)", res[2], 10,
               "same CSR as scipy")


def bench_matmul(repeat, torch):
    header("CSR products, 4096x4096 float32 (x: 4096; X: 4096x64)")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    x = rng.standard_normal(4096, dtype=np.float32)
    X = rng.standard_normal((4096, 64), dtype=np.float32)
    dense_v = None
    crossover = {}
    for sparsity in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        a = sc.to_csr(w, sparsity=sparsity)
        wm = a.toarray()
        y = np.empty(4096, np.float32)
        Y = np.empty((4096, 64), np.float32)
        fns = [lambda: sc.csr_matmul(a, x, out=y), lambda: a @ x, lambda: wm @ x,
               lambda: sc.csr_matmul(a, X, out=Y), lambda: a @ X, lambda: wm @ X]
        if torch is not None:
            ta = torch.sparse_csr_tensor(torch.from_numpy(a.indptr.astype(np.int64)),
                                         torch.from_numpy(a.indices.astype(np.int64)),
                                         torch.from_numpy(a.data), size=a.shape)
            tx = torch.from_numpy(x)[:, None].contiguous()
            tX = torch.from_numpy(X)
            fns += [lambda: torch.sparse.mm(ta, tx), lambda: torch.sparse.mm(ta, tX)]
        res = timeit(fns, repeat)
        np.testing.assert_allclose(sc.csr_matmul(a, X), wm @ X, rtol=1e-3, atol=1e-3)
        if sparsity >= 0.9:
            report(f"csr_matmul x, {sparsity:.0%}", res[0], "scipy CSR @ x", res[1], 1.5)
            if torch is not None:
                report(f"csr_matmul x, {sparsity:.0%}", res[0], "torch.sparse.mm (CSR, x as 4096x1)", res[6], 1.2)
            report(f"csr_matmul x, {sparsity:.0%}", res[0], "NumPy dense W @ x", res[2])
            report(f"csr_matmul X, {sparsity:.0%}", res[3], "scipy CSR @ X", res[4], 2)
            if torch is not None:
                report(f"csr_matmul X, {sparsity:.0%}", res[3], "torch.sparse.mm (CSR)", res[7], 1.2)
            report(f"csr_matmul X, {sparsity:.0%}", res[3], "NumPy dense W @ X", res[5])
        for kind, ours_t, dense_t in (("x", res[0], res[2]), ("X", res[3], res[5])):
            if ours_t < dense_t and kind not in crossover:
                crossover[kind] = sparsity
    for kind in ("x", "X"):
        where = f"{crossover[kind]:.0%}" if kind in crossover else "not within 50-99%"
        print(f"\nours beats NumPy's dense product for {kind} from sparsity {where} (grid 50/70/80/90/95/99%)")
    return dense_v


def bench_mi(repeat):
    try:
        from sklearn.metrics import mutual_info_score
    except ImportError:
        print("scikit-learn not installed: the mutual-information anchors are skipped")
        return
    header("Mutual information, 16 equal-width bins, 10,000 samples")
    rng = np.random.default_rng(5)
    n, units = 10_000, 256
    a = rng.standard_normal((n, units), dtype=np.float32)
    y = rng.integers(0, 10, n)
    a[:, :16] += y[:, None]  # some relevant units
    codes = sc.fit_bins(a, 16).codes(a)
    out = {}

    def ours():
        out["ours"] = sc.unit_mi(a, y, bins=16)

    def sk_loop():
        out["sk"] = np.array([mutual_info_score(codes[u], y) for u in range(units)])

    def hist_loop():
        res = np.empty(units)
        for u in range(units):
            h, _, _ = np.histogram2d(a[:, u], y, bins=[16, 10])
            p = h / n
            px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
            nz = p > 0
            res[u] = (p[nz] * np.log(p[nz] / (px @ py)[nz])).sum()
        out["hist"] = res

    res = timeit([ours, sk_loop, hist_loop], repeat, inner=1)
    np.testing.assert_allclose(out["ours"], out["sk"], atol=1e-12)
    report("unit_mi 256 units x 10 classes (binning incl.)", res[0], "sklearn mutual_info_score loop (pre-binned)",
           res[1], 200)
    report("unit_mi 256 units x 10 classes (binning incl.)", res[0], "np.histogram2d loop", res[2], 40)

    b = np.tanh(a @ rng.standard_normal((units, units), dtype=np.float32) / 16)
    cb = sc.fit_bins(b, 16).codes(b)
    pairs = [(int(o), int(i)) for o, i in zip(rng.integers(0, units, 256), rng.integers(0, units, 256))]

    def ours_pair():
        out["pair"] = sc.pairwise_mi(a, b, bins=16)

    def sk_pairs():
        out["skp"] = [mutual_info_score(cb[o], codes[i]) for o, i in pairs]

    res = timeit([ours_pair, sk_pairs], repeat, inner=1)
    np.testing.assert_allclose([out["pair"][o, i] for o, i in pairs], out["skp"], atol=1e-12)
    rate = units * units * n / res[0]
    report("pairwise_mi 256 x 256 units (65,536 pairs)", res[0], "mutual_info_score x 65,536 (extrapolated)",
           res[1] * units * units / len(pairs), 300, f"{rate:.2e} pair-sample increments/s (target 3e9)")

    code = ("import resource, time, numpy as np, sparsecore as sc; "
            "r = np.random.default_rng(6); a = r.standard_normal((10000, 1024), dtype=np.float32); "
            "b = r.standard_normal((10000, 1024), dtype=np.float32); sc.pairwise_mi(a[:50, :8], b[:50, :8]); "
            "m0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.perf_counter(); "
            "sc.pairwise_mi(a, b, bins=16); t = time.perf_counter() - t; "
            "print(t, m0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t, m0, m1 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    print(f"\npairwise_mi 1024 x 1024 units over 10,000 samples (16 bins): {float(t):.2f} s, "
          f"{1024 * 1024 * n / float(t):.2e} pair-sample increments/s; peak RSS {int(m1) / 1024:.0f} MiB "
          f"(inputs 2 x 39 MiB), {max(int(m1) - int(m0), 0) / 1024:.0f} MiB above the process before the call")


def bench_patterns(n, repeat):
    header(f"Structured patterns on a {n} x {n} float32 weight (magnitude scores)")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, n), dtype=np.float32)
    out = {}

    def ours_nm():
        out["ours"] = sc.nm_mask(w, 2, 4, absolute=True)

    def numpy_nm():
        g = np.abs(w).reshape(-1, 4)
        order = np.argsort(g, axis=1, kind="stable")
        mask = np.ones(g.shape, bool)
        np.put_along_axis(mask, order[:, :2], False, axis=1)
        out["np"] = mask.reshape(w.shape)

    res = timeit([ours_nm, numpy_nm], repeat)
    assert np.array_equal(out["ours"], out["np"])
    report("2:4 mask (nm_mask)", res[0], "np.abs + argsort + put_along_axis", res[1], 10, "same mask")

    nb = n // 4
    k = round(0.5 * nb * nb)

    def ours_block():
        out["ours"] = sc.block_mask(w, (4, 4), "mean", sparsity=0.5, absolute=True)

    def numpy_block():
        pooled = np.abs(w).reshape(nb, 4, nb, 4).mean(axis=(1, 3))
        keep = np.ones(nb * nb, bool)
        keep[np.argpartition(pooled.ravel(), k - 1)[:k]] = False
        out["np"] = np.repeat(np.repeat(keep.reshape(nb, nb), 4, axis=0), 4, axis=1)

    res = timeit([ours_block, numpy_block], repeat)
    assert np.array_equal(out["ours"], out["np"])
    report("4x4 blocks, mean, 50% (block_mask)", res[0], "reshape-mean + argpartition + repeat", res[1], 10,
           "same mask")

    def ours_block_csr():
        out["ours"] = sc.prune({"w": w}, sparsity=0.5, pattern=sc.Blocks((4, 4))).csr["w"]

    def numpy_block_csr():
        numpy_block()
        out["np"] = sp.csr_array(np.where(out["np"], w, 0))

    res = timeit([ours_block_csr, numpy_block_csr], repeat)
    assert (out["ours"] != out["np"]).nnz == 0
    report("4x4 blocks 50% -> CSR (prune)", res[0], "NumPy mask + np.where + csr_array", res[1], None,
           "same CSR")


def bench_units(n, repeat):
    header(f"Neuron selection and shrink of a 4-layer MLP of width {n} (float32)")
    rng = np.random.default_rng(5)
    sizes = [n, n, n, n, 10]
    chain = {f"fc{i}": sc.Layer(rng.standard_normal((b, a), dtype=np.float32), np.zeros(b, np.float32))
             for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
    hidden = ["fc0", "fc1", "fc2"]
    out = {}

    def ours():
        keep = {k: sc.sparsity_mask(sc.unit_scores(chain[k].weight, reduce="l2"), 0.5) for k in hidden}
        out["ours"] = sc.shrink(chain, keep)

    def numpy_ref():
        res, prev = {}, None
        for k, lay in chain.items():
            w = lay.weight
            if k in hidden:
                scores = np.sqrt((w.astype(np.float64) ** 2).sum(axis=1))
                keep = np.ones(w.shape[0], bool)
                keep[np.argsort(scores, kind="stable")[: round(0.5 * w.shape[0])]] = False
                idx = np.flatnonzero(keep)
            else:
                idx = None
            nw = w if idx is None else w[idx]
            nw = nw if prev is None else nw[:, prev]
            res[k] = (nw, lay.bias if idx is None else lay.bias[idx])
            prev = idx
        out["np"] = res

    res = timeit([ours, numpy_ref], repeat, inner=1)
    for k in chain:
        assert np.array_equal(out["ours"][k].weight, out["np"][k][0])
    report("unit L2 scores + 50% per layer + shrink", res[0], "NumPy norms + argsort + fancy indexing", res[1],
           None, "same arrays")


def bench_startup():
    header("Start-up: a small prune() in a fresh process (import + run), first call vs cached")
    code = ("import time, numpy as np; t=time.perf_counter(); import sparsecore as sc; "
            "w={'a': np.random.default_rng(0).standard_normal((64, 32))}; "
            "sc.prune(w, sparsity=0.5, scope='global'); sc.prune(w, threshold=0.1); "
            "print(time.perf_counter()-t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        first = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
        cached = statistics.median(
            float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3))
    report("small prune(), cached kernels", cached, "the same, first call (compiles)", first)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--only", nargs="*", help="cases: accumulate threshold global csr matmul mi patterns units startup")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch not installed: its anchors are skipped (pip install -e '.[bench]')")
    big = 1 << (22 if args.quick else 24)
    rep = 2 if args.quick else 3
    print(f"sparsecore {sc.__version__}, numba {numba.__version__} with {numba.get_num_threads()} threads, "
          f"numpy {np.__version__}, scipy {sp.__name__ and __import__('scipy').__version__}"
          + (f", torch {torch.__version__} with {torch.get_num_threads()} threads" if torch else ""))
    cases = args.only or ["accumulate", "threshold", "global", "csr", "matmul", "mi", "patterns", "units",
                          "startup"]
    if "accumulate" in cases:
        bench_accumulate(big, 8 if args.quick else 32, rep, torch)
    if "threshold" in cases:
        bench_threshold(big, rep)
    if "global" in cases:
        bench_global(big // 4, rep, torch)
    if "csr" in cases:
        bench_csr_build(rep)
    if "matmul" in cases:
        bench_matmul(rep, torch)
    if "mi" in cases:
        bench_mi(rep)
    if "patterns" in cases:
        bench_patterns(2048 if args.quick else 4096, rep)
    if "units" in cases:
        bench_units(1024 if args.quick else 4096, rep)
    if "startup" in cases:
        bench_startup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
