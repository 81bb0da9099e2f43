"""Are the packed batch-1 kernels bound by bytes or by instructions? Rates in cycles, and what the compiler emitted.

For each packed format sparsecore's ``auto`` picks (delta8, bitmask, 2:4
N:M; float32 values) at the sparsities it picks them for:

1. **In cache, one thread**: a 128 x 1024 matrix (its packed bytes fit
   in L2), the serial product with a vector called over and over: kept
   weights per cycle, packed bytes per cycle and cycles per 64 columns of a
   row. The clock is measured in the same run by a chain of dependent
   integer add/xor pairs (2 cycles an iteration), so the cycle figures hold
   whatever frequency the core runs at.
2. **From memory, all threads**: a 4096 x 4096 matrix (packed bytes far past
   the caches) through ``sparsecore.packed_matmul``: GB/s of packed bytes
   against the STREAM triad bandwidth of the same run, beside dense
   ``numpy`` ``W @ x`` (float32 BLAS gemv) timed right after (not call by
   call: OpenBLAS's idle threads poll for a while after each call and slow
   whatever runs next). A read-only stream can pass the triad, which also
   writes. ``compute
   floor`` is the time the in-cache rate would need on every core (the
   instruction bound), ``byte floor`` the time the triad bandwidth would
   need; the larger is what bounds the kernel.
3. **The emitted code**: the innermost loops of each serial kernel's x86
   assembly (Numba's ``inspect_asm``), with their instructions, fused
   multiply-adds (``ss`` scalar, ``ps`` 8 lanes) and loads per iteration.

Usage::

    python bench/kernels.py [--repeats 21] [--json F]
"""

import argparse
import collections
import json
import re
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit

import sparsecore as sc

CASES = [("delta8", 0.5), ("delta8", 0.7), ("delta8", 0.9), ("bitmask", 0.5), ("bitmask", 0.7), ("nm", "2:4")]


@njit(cache=True)
def _chain(n, k):
    s = k
    for i in range(n):
        s = (s + i) ^ k  # add then xor, each waiting for the last: 2 cycles an iteration
    return s


def clock_ghz():
    """Core cycles per ns: the dependent add/xor chain's rate, median of 7."""
    n = 50_000_000
    _chain(1000, 7)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        _chain(n, 7)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def triad_gbs():
    """STREAM triad over 3 x 64 MiB float32 arrays (all threads): GB/s, median of 10."""
    from decode import triad_gbs as triad  # one definition, shared with bench/decode.py

    return triad()


def weights(shape, target, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    keep = sc.nm_mask(np.abs(w), 2, 4) if target == "2:4" else sc.sparsity_mask(np.abs(w), target)
    return np.where(keep, w, 0).astype(np.float32)


def median_seconds(fn, repeats, inner=1):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def serial_kernel(p):
    """``(dispatcher, call)``: the one-thread product with a vector that ``PackedMatrix.product`` runs."""
    kern, head, tail, width, _ = p.kernel(True, threads=1)

    def call(x, out):
        xp = x if width == x.size else np.concatenate([x, np.zeros(width - x.size, x.dtype)])
        return kern(*head, xp, out, *tail)

    return kern, call


_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_JUMP = re.compile(r"^\s+(j[a-z]+)\s+(\.LBB\d+_\d+)")


def inner_loops(asm):
    """The innermost loops of an assembly listing: ``[(instructions, Counter of mnemonics)]``,
    a loop being a label and a later jump back to it with no such pair inside."""
    lines = [ln for ln in asm.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", ".cfi", ".p2align"))]
    where = {}
    loops = []
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln)
        if m:
            where[m.group(1)] = i
        m = _JUMP.match(ln)
        if m and m.group(2) in where:
            loops.append((where[m.group(2)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in inner:
        ops = [ln.split()[0] for ln in lines[a:b + 1] if not _LABEL.match(ln) and not ln.lstrip().startswith(".")]
        out.append((len(ops), collections.Counter(ops), lines[a:b + 1]))
    return out


def describe(kern):
    """The hot inner loops (those with a fused multiply-add) of a dispatcher's first signature."""
    opts = {k: v for k, v in kern.targetoptions.items() if k not in ("cache", "nopython")}  # cached: not inspectable
    fresh = njit(**opts)(kern.py_func)
    fresh.compile(kern.signatures[0])
    asm = fresh.inspect_asm(kern.signatures[0])
    rows = []
    for n, ops, body in inner_loops(asm):
        fma_ss = sum(v for k, v in ops.items() if k.startswith("vfmadd") and k.endswith("ss"))
        fma_ps = sum(v for k, v in ops.items() if k.startswith("vfmadd") and k.endswith("ps"))
        if not fma_ss + fma_ps:
            continue
        loads = sum(1 for ln in body if "(" in ln and not ln.split()[0].startswith(("lea", "nop")))
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        rows.append({"instructions": n, "fma_scalar": fma_ss, "fma_8lane": fma_ps, "memory_operands": loads,
                     "top": top})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    rng = np.random.default_rng(0)
    ghz = clock_ghz()
    gbs = triad_gbs()
    threads = numba.get_num_threads()
    print(f"clock {ghz:.2f} GHz (dependent add/xor chain), triad {gbs:.1f} GB/s, {threads} Numba threads")
    results = []
    for fmt, target in CASES:
        small = sc.pack(weights((128, 1024), target, rng), fmt)
        kern, call = serial_kernel(small)
        x = rng.standard_normal(1024).astype(np.float32)
        out = np.empty(128, np.float32)
        call(x, out)
        np.testing.assert_allclose(out, sc.packed_matmul(small, x), rtol=1e-4, atol=1e-4)
        t = median_seconds(lambda: call(x, out), a.repeats, inner=50)
        cycles = t * ghz * 1e9
        big_w = weights((4096, 4096), target, rng)
        big = sc.pack(big_w, fmt)
        xb = rng.standard_normal(4096).astype(np.float32)
        ob = np.empty(4096, np.float32)
        # packed first, then BLAS, then a pause: OpenBLAS's idle threads keep polling for ~0.1 s after a call,
        # which slowed the Numba kernels run next by up to 2x (measured), so the two are not alternated
        tb = median_seconds(lambda: sc.packed_matmul(big, xb, ob), 3 * a.repeats)
        td = median_seconds(lambda: big_w @ xb, 3 * a.repeats)
        time.sleep(0.3)
        rate = small.nnz / cycles  # kept weights per cycle, one core
        compute_floor = big.nnz / (rate * threads * ghz * 1e9)
        byte_floor = big.nbytes / (gbs * 1e9)
        r = {"format": fmt, "sparsity": target, "cache_weights_per_cycle": rate,
             "cache_bytes_per_cycle": small.nbytes / cycles, "cycles_per_64_columns": cycles / (128 * 1024 / 64),
             "memory_us": tb * 1e6, "memory_gbs": big.nbytes / tb / 1e9, "of_triad": big.nbytes / tb / 1e9 / gbs,
             "dense_us": td * 1e6, "speedup": td / tb, "byte_bound": 4096 * 4096 * 4 / big.nbytes,
             "compute_floor_us": compute_floor * 1e6, "byte_floor_us": byte_floor * 1e6,
             "bound_by": "instructions" if compute_floor > byte_floor else "bytes", "loops": describe(kern)}
        results.append(r)
    print("\nIn cache, one thread (128 x 1024), and from memory, all threads (4096 x 4096), float32 values")
    print(f"{'format':8} {'sparsity':>8} {'w/cycle':>7} {'B/cycle':>7} {'cyc/64col':>9} | {'us':>7} {'GB/s':>6} "
          f"{'of triad':>8} {'dense us':>8} {'speedup':>7} {'bound':>6} | {'compute':>7} {'bytes':>7}  bound by")
    for r in results:
        print(f"{r['format']:8} {str(r['sparsity']):>8} {r['cache_weights_per_cycle']:7.2f} "
              f"{r['cache_bytes_per_cycle']:7.2f} {r['cycles_per_64_columns']:9.1f} | {r['memory_us']:7.0f} "
              f"{r['memory_gbs']:6.1f} {r['of_triad']:8.0%} {r['dense_us']:8.0f} {r['speedup']:6.2f}x "
              f"{r['byte_bound']:5.2f}x | {r['compute_floor_us']:7.0f} {r['byte_floor_us']:7.0f}  {r['bound_by']}")
    print("\nEmitted inner loops with a fused multiply-add (serial kernels; per iteration)")
    seen = set()
    for r in results:
        if r["format"] in seen:
            continue
        seen.add(r["format"])
        for lp in r["loops"]:
            print(f"{r['format']:8} {lp['instructions']:4} instructions, FMA {lp['fma_scalar']} scalar + "
                  f"{lp['fma_8lane']} x 8 lanes, {lp['memory_operands']} memory operands: {lp['top']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ghz": ghz, "triad_gbs": gbs, "threads": threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
