"""GPU benchmarks of the CUDA backend (run by bench/gpu.sh on a machine with an NVIDIA GPU).

Medians of timed repeats after a warm-up, with torch.cuda.synchronize()
around each call; the anchors run in the same process, alternating.
"""

import argparse
import json
import statistics
import time

import torch

import sparsecore as sc
from sparsecore import cuda as scu

ROWS = []


def timed(fn, repeat=7):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def row(case, ours, anchor_name, anchor, unit="ms", note=""):
    ROWS.append({"case": case, "ours": ours, "anchor": anchor_name, "anchor_value": anchor, "unit": unit, "note": note})
    ratio = anchor / ours if unit == "ms" else ours / anchor
    print(f"| {case} | {ours:.4g} {unit} | {anchor_name}: {anchor:.4g} {unit} | {ratio:.2f}x | {note}", flush=True)


def bench_accumulate():
    print("\n### accumulation bandwidth (float32 per-sample gradients into float64 Σg²)\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    n, rows = 1 << 24, 8
    g = torch.randn(rows, n, device="cuda")
    acc = sc.GradientAccumulator(stats=("g2",), device="cuda")
    t_ours = timed(lambda: acc.update(g, per_sample=True))
    moved = g.numel() * 4 + n * 8 * 2  # read g, read and write the float64 sums
    src = torch.empty(moved // 8, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    bw_ours = moved / t_ours / 1e9
    bw_copy = 2 * src.numel() * 4 / t_copy / 1e9
    row("Σg² of 8 x 16M float32 rows", bw_ours, "device-to-device copy of as many bytes", bw_copy, "GB/s",
        f"{bw_ours / bw_copy:.0%} of the copy's bandwidth (target >= 70%)")


def bench_csr(n=4096):
    print(f"\n### CSR construction and products, {n} x {n} float32\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    w = torch.randn(n, n, device="cuda")
    for sp in (0.9, 0.95, 0.99):
        t = float(torch.quantile(w.abs().flatten()[: 1 << 24].float(), sp))
        masked = w * (w.abs() >= t)
        t_ours = timed(lambda: scu.to_csr(w, threshold=t))
        t_torch = timed(lambda: (w * (w.abs() >= t)).to_sparse_csr())
        row(f"to_csr by threshold, {sp:.0%}", t_ours * 1e3, "mask + Tensor.to_sparse_csr", t_torch * 1e3)
        t_exact = timed(lambda: scu.to_csr(w, sparsity=sp), repeat=3)
        row(f"to_csr exact sparsity {sp:.0%} (radix select on the device)", t_exact * 1e3,
            "mask + Tensor.to_sparse_csr", t_torch * 1e3)
        a = scu.to_csr(w, threshold=t)
        at = masked.to_sparse_csr()
        x = torch.randn(n, device="cuda")
        X = torch.randn(n, 64, device="cuda")
        assert torch.allclose(torch.as_tensor(scu.csr_matmul(a, X), device="cuda"), at @ X, rtol=1e-3, atol=1e-3)
        row(f"CSR @ x, {sp:.0%}", timed(lambda: scu.csr_matmul(a, x)) * 1e3, "torch.sparse.mm (cuSPARSE)",
            timed(lambda: torch.sparse.mm(at, x[:, None])) * 1e3)
        row(f"CSR @ x, {sp:.0%}", timed(lambda: scu.csr_matmul(a, x)) * 1e3, "dense cuBLAS W @ x",
            timed(lambda: masked @ x) * 1e3)
        row(f"CSR @ X (n x 64), {sp:.0%}", timed(lambda: scu.csr_matmul(a, X)) * 1e3, "torch.sparse.mm (cuSPARSE)",
            timed(lambda: torch.sparse.mm(at, X)) * 1e3)
        row(f"CSR @ X (n x 64), {sp:.0%}", timed(lambda: scu.csr_matmul(a, X)) * 1e3, "dense cuBLAS W @ X",
            timed(lambda: masked @ X) * 1e3)


def bench_mi(units=(1024, 4096), samples=10_000, budget_s=100):
    print("\n### pairwise MI, 16 x 16 bins\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    cpu_rate = 4.07e9  # pair-sample increments/s of the CPU kernel (bench/run.py, 2 cores)
    rate = None
    for u in units:
        if rate is not None and u * u * samples / rate > budget_s:
            print(f"| {u} x {u} units | skipped: about {u * u * samples / rate:.0f} s at the rate measured | | | |")
            continue
        a_in = torch.randn(samples, u, device="cuda")
        a_out = torch.tanh(a_in[:, :u] * 0.5 + torch.randn(samples, u, device="cuda"))
        bi = sc.fit_bins(a_in.cpu().numpy(), 16)
        bo = sc.fit_bins(a_out.cpu().numpy(), 16)
        t0 = time.perf_counter()
        scu.pairwise_mi(a_in, a_out, bi, bo)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if first * 3 > budget_s:
            print(f"| {u} x {u} units | one call took {first:.1f} s; not repeated | | | |")
            rate = u * u * samples / first
            row(f"{u} x {u} units, {samples} samples", rate, "CPU kernel, 2 cores", cpu_rate, "increments/s",
                "single call")
            continue
        t = timed(lambda: scu.pairwise_mi(a_in, a_out, bi, bo), repeat=3)
        rate = u * u * samples / t
        row(f"{u} x {u} units, {samples} samples", u * u * samples / t, "CPU kernel, 2 cores (bench/run.py)",
            cpu_rate, "increments/s", f"{t:.2f} s per call")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", nargs="*", default=["accumulate", "csr", "mi"])
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "accumulate" in args.only:
        bench_accumulate()
    if "csr" in args.only:
        bench_csr()
    if "mi" in args.only:
        bench_mi()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
