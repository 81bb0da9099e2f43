"""GPU benchmarks of the CUDA backend (run by bench/gpu.sh on a machine with an NVIDIA GPU).

Medians of timed repeats after a warm-up, with torch.cuda.synchronize()
around each call; the anchors run in the same process, alternating.
``--smoke`` runs every case once at toy sizes on the CPU side of torch and
Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), to check the script
itself before a GPU is lent.
"""

import argparse
import json
import statistics
import time

import torch

import sparsecore as sc
from sparsecore import cuda as scu

ROWS = []
DEV = "cuda"
SMOKE = False


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat=7):
    if SMOKE:
        repeat = 1
    fn()
    sync()
    ts = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def row(case, ours, anchor_name, anchor, unit="ms", note=""):
    ROWS.append({"case": case, "ours": ours, "anchor": anchor_name, "anchor_value": anchor, "unit": unit, "note": note})
    ratio = anchor / ours if unit == "ms" else ours / anchor
    print(f"| {case} | {ours:.4g} {unit} | {anchor_name}: {anchor:.4g} {unit} | {ratio:.2f}x | {note}", flush=True)


def bench_accumulate():
    print("\n### accumulation bandwidth (float32 per-sample gradients into float64 Σg²)\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    n, rows = (1 << 10, 2) if SMOKE else (1 << 24, 8)
    g = torch.randn(rows, n, device=DEV)
    acc = sc.GradientAccumulator(stats=("g2",), device=DEV)
    t_ours = timed(lambda: acc.update(g, per_sample=True))
    moved = g.numel() * 4 + n * 8 * 2  # read g, read and write the float64 sums
    src = torch.empty(moved // 8, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    bw_ours = moved / t_ours / 1e9
    bw_copy = 2 * src.numel() * 4 / t_copy / 1e9
    row("Σg² of 8 x 16M float32 rows", bw_ours, "device-to-device copy of as many bytes", bw_copy, "GB/s",
        f"{bw_ours / bw_copy:.0%} of the copy's bandwidth (target >= 70%)")


def bench_csr(n=4096):
    n = 32 if SMOKE else n
    print(f"\n### CSR construction and products, {n} x {n} float32\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    w = torch.randn(n, n, device=DEV)
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
        x = torch.randn(n, device=DEV)
        X = torch.randn(n, 64, device=DEV)
        assert torch.allclose(torch.as_tensor(scu.csr_matmul(a, X), device=DEV), at @ X, rtol=1e-3, atol=1e-3)
        row(f"CSR @ x, {sp:.0%}", timed(lambda: scu.csr_matmul(a, x)) * 1e3, "torch.sparse.mm (cuSPARSE)",
            timed(lambda: torch.sparse.mm(at, x[:, None])) * 1e3)
        row(f"CSR @ x, {sp:.0%}", timed(lambda: scu.csr_matmul(a, x)) * 1e3, "dense cuBLAS W @ x",
            timed(lambda: masked @ x) * 1e3)
        row(f"CSR @ X (n x 64), {sp:.0%}", timed(lambda: scu.csr_matmul(a, X)) * 1e3, "torch.sparse.mm (cuSPARSE)",
            timed(lambda: torch.sparse.mm(at, X)) * 1e3)
        row(f"CSR @ X (n x 64), {sp:.0%}", timed(lambda: scu.csr_matmul(a, X)) * 1e3, "dense cuBLAS W @ X",
            timed(lambda: masked @ X) * 1e3)


def bench_prune(n=4096, layers=8):
    n, layers = (16, 2) if SMOKE else (n, layers)
    print(f"\n### sc.prune on the device: {layers} tensors {n} x {n} float32 (masks and CSR)\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    g = torch.Generator(device=DEV).manual_seed(0)
    ws = {f"l{i}": torch.randn(n, n, device=DEV, generator=g) * (i + 1) for i in range(layers)}
    total = layers * n * n
    k = round(0.9 * total)

    def torch_global():  # torch.nn.utils.prune.global_unstructured's way: one cat, one k-th value
        s = torch.cat([(w.abs() / w.norm()).flatten() for w in ws.values()])
        t = s.kthvalue(k).values
        return {name: (w.abs() / w.norm()) > t for name, w in ws.items()}

    def torch_local():  # l1_unstructured's way: topk of the smallest per tensor
        out = {}
        for name, w in ws.items():
            m = torch.ones(w.numel(), dtype=torch.bool, device=DEV)
            m[torch.topk(w.abs().flatten(), round(0.9 * w.numel()), largest=False).indices] = False
            out[name] = m.view_as(w)
        return out

    def torch_24():
        out = {}
        for name, w in ws.items():
            grp = w.abs().reshape(-1, 4)
            m = torch.zeros_like(grp, dtype=torch.bool)
            m.scatter_(1, grp.topk(2, dim=1).indices, True)
            out[name] = m.view_as(w)
        return out

    def ours(**kw):
        return timed(lambda: sc.prune(ws, device="cuda", **kw), repeat=3) * 1e3

    glob = dict(sparsity=0.9, scope="global", normalize="l2")
    got = sc.prune(ws, device="cuda", **glob)
    want = torch_global()
    agree = sum(int((torch.as_tensor(got.masks[k2], device=DEV) == want[k2]).sum()) for k2 in ws) / total
    t_global = ours(**glob)
    row("global 90%, l2-normalised", t_global, "torch cat + kthvalue + masks (no CSR)",
        timed(torch_global, repeat=3) * 1e3, "ms", f"masks agree on {agree:.6%} of entries (ties/rounding)")
    row("global 90%, l2, max_sparsity 0.95 per tensor", ours(max_sparsity=0.95, **glob),
        "torch cat + kthvalue + masks (no caps, no CSR)", timed(torch_global, repeat=3) * 1e3)
    row("local 90% exact", ours(sparsity=0.9), "torch topk per tensor + masks (no CSR)",
        timed(torch_local, repeat=3) * 1e3)
    row("2:4", ours(pattern="2:4"), "torch topk(2) per group of 4 + masks (no CSR)", timed(torch_24, repeat=3) * 1e3)
    row("4x4 blocks mean, global 80%", ours(pattern=sc.Blocks((4, 4)), sparsity=0.8, scope="global"),
        "torch avg_pool2d (pooling only)",
        timed(lambda: [torch.nn.functional.avg_pool2d(w.abs()[None], 4) for w in ws.values()], repeat=3) * 1e3)
    host = {name: w.cpu().numpy() for name, w in ws.items()}
    t_cpu = timed(lambda: sc.prune(host, **glob), repeat=1)
    row("global 90%, l2-normalised", t_global, "our CPU kernels on this machine's cores", t_cpu * 1e3)


def bench_mi(units=(1024, 4096), samples=10_000, budget_s=100):
    units, samples = ((8,), 50) if SMOKE else (units, samples)
    print("\n### pairwise MI, 16 x 16 bins\n")
    print("| case | ours | anchor | ratio | note |\n|---|---|---|---|---|")
    cpu_rate = 4.07e9  # pair-sample increments/s of the CPU kernel (bench/run.py, 2 cores)
    rate = None
    for u in units:
        if rate is not None and u * u * samples / rate > budget_s:
            print(f"| {u} x {u} units | skipped: about {u * u * samples / rate:.0f} s at the rate measured | | | |")
            continue
        a_in = torch.randn(samples, u, device=DEV)
        a_out = torch.tanh(a_in[:, :u] * 0.5 + torch.randn(samples, u, device=DEV))
        bi = sc.fit_bins(a_in, 16)  # ranges on the device
        bo = sc.fit_bins(a_out, 16)
        t0 = time.perf_counter()
        scu.pairwise_mi(a_in, a_out, bi, bo)
        sync()
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
    ap.add_argument("--only", nargs="*", default=["accumulate", "csr", "prune", "mi"])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CUDA simulator (no GPU)")
    args = ap.parse_args()
    global DEV, SMOKE
    if args.smoke:
        from sparsecore import cuda as scu

        DEV, SMOKE = "cpu", True
        scu.set_block_threads(32, 8)
    print(f"GPU: {torch.cuda.get_device_name() if DEV == 'cuda' else 'none (smoke run)'}, torch {torch.__version__}")
    if "accumulate" in args.only:
        bench_accumulate()
    if "csr" in args.only:
        bench_csr()
    if "prune" in args.only:
        bench_prune()
    if "mi" in args.only:
        bench_mi()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
