"""Whole heads and channels removed from a real decoder: SmolLM2-135M, one-shot.

The model's attention heads (each key/value head with its 3 query heads) and
MLP channels (``sparsecore.adapters.hf_units``), removed to take 20% and 50%
of the non-embedding parameters away, in two mixes: channels only, and one
key/value head of the three in every layer plus channels. The same count in
every layer (what a stock Llama config describes), kept channels rounded to a
multiple of 64. Scored by the weights' magnitude or by FLAP's fluctuation of
each unit's inputs to its consumer; repaired by nothing, by FLAP's bias
compensation, or by the least-squares refit of the consumer's kept columns
with its bias (``sparsecore.refit_inputs``), from the dense model's input
statistics on 32 x 512 calibration tokens of real Wikipedia text (collected
once), or (order "block", channels mix only: a run takes minutes) scored and
refitted block by block on the inputs the blocks already cut give.
Perplexity on 16 x 1024 disjoint tokens; the dense model in the same run.
Then the smaller model against the dense one: greedy decode of ``--tokens``
tokens at batch 1 (tokens/s) and the prefill of 512 tokens,
alternating, medians of ``--repeats``; and the folder written by
``save_pretrained`` loaded back by a plain ``from_pretrained``.

Then FLAP (its authors' pruning code, bench/_flap.py, glue for transformers 5
marked there) against ours at the very same number of MLP channels removed in
every layer: FLAP's head pruning cannot run under grouped-query attention, so
that table is channels only; its last row ranks every layer's channels
together (z-scored per layer, as FLAP's adaptive structure does), counts
then differing by layer. SliceGPT and Torch-Pruning are not run here yet.

Model and text as bench/llm.py fetches them (bench/data.py).

    python bench/units.py [--targets 0.2,0.5] [--tokens 64] [--repeats 3] [--json F]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402  (alternate: the timing loop of the packed-weights speed benchmark)
import llm  # noqa: E402  (model, text, windows and perplexity, shared with the weight-pruning benchmark)

from sparsecore.adapters import hf_units as hfu  # noqa: E402

ROWS = [("magnitude", "none", "model"), ("fluctuation", "none", "model"), ("fluctuation", "bias", "model"),
        ("fluctuation", "refit+bias", "model"), ("magnitude", "refit+bias", "model"),
        ("fluctuation", "refit+bias", "block")]


def body_params(model):
    """Parameters of the decoder layers (the non-embedding ones; the head is tied to the embedding)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def mixes(model, target):
    """``{mix: sparsity per unit kind}`` removing about ``target`` of the layers' parameters."""
    cfg = model.config
    d, hd, kv, q, ff = (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads,
                        cfg.intermediate_size)
    attn = d * hd * (2 * q + 2 * kv)
    mlp = 3 * d * ff
    out = {"channels": {"heads": 0.0, "channels": min(0.95, target * (attn + mlp) / mlp)}}
    one_head = attn / kv  # one key/value head with its query heads
    rest = target * (attn + mlp) - one_head
    if rest > 0:
        out["1 kv head + channels"] = {"heads": 1 / kv, "channels": min(0.95, rest / mlp)}
    return out


def peers(dense, calib, ev, stats, base, targets, results):
    """FLAP (the authors' code, bench/_flap.py) against ours at the very same count of MLP channels removed per
    layer (no rounding). FLAP's head pruning cannot run under grouped-query attention, so channels only."""
    import _flap

    cfg = dense.config
    d, ff = cfg.hidden_size, cfg.intermediate_size
    per_layer = body_params(dense) / cfg.num_hidden_layers
    print(f"\nagainst FLAP (CASIA-IVA-Lab/FLAP@3bb57db, its own pruning code), MLP channels only, the same count "
          f"removed in every layer; calibration {tuple(calib.shape)}")
    print(f"{'target':>6}  {'removed':>7}  {'channels':>8}  {'method':>44}  {'perplexity':>10}  {'to FLAP':>7}  "
          f"{'s':>6}")
    for target in targets:
        r = round(target * per_layer / (3 * d))  # channels removed per layer
        ratio = (r + 0.5) / ((4 * d + 3 * ff) / 3)  # what FLAP's cal_remove_neuron turns into r (UL-MM)
        rows = []
        for name in ("FLAP UL-MM WIFV (bias compensation)", "FLAP AL-MM WIFV (adaptive per layer)",
                     "ours: fluctuation + bias, order model", "ours: fluctuation + refit+bias, order model",
                     "ours: fluctuation + refit+bias, order block",
                     "ours: fluctuation + refit+bias, global, order model"):
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            if name.startswith("FLAP"):
                _flap.run_flap(m, calib, pruning_ratio=ratio, structure=name.split()[1], metrics="WIFV",
                               remove_heads=0)
            else:
                repair = "bias" if "+ bias" in name else "refit+bias"
                order = name.rsplit(" ", 1)[1]
                kw = dict(data=[w[None] for w in calib]) if order == "block" else dict(stats=stats)
                hfu.prune_units(m, {"channels": r / ff}, units="channels", score="fluctuation", repair=repair,
                                order=order, scope="global" if "global" in name else "local", **kw)
            secs = time.perf_counter() - t
            kept = sorted({layer.mlp.down_proj.in_features for layer in m.model.layers})
            removed = 1 - body_params(m) / body_params(dense)
            rows.append((name, llm.perplexity(m, ev), removed, kept, secs))
        flap = rows[0][1]
        for name, ppl, removed, kept, secs in rows:
            ch = str(kept[0]) if len(kept) == 1 else f"{kept[0]}-{kept[-1]}"
            print(f"{target:>6.0%}  {removed:>7.1%}  {ch:>8}  {name:>44}  {ppl:>10.2f}  {ppl / flap:>7.2f}  "
                  f"{secs:>6.1f}")
            results["rows"].append(dict(target=target, peer_table=True, method=name, perplexity=ppl,
                                        removed=removed, channels=kept, seconds=secs))


def generate(model, prompt, tokens):
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.2,0.5")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="leave FLAP's rows out")
    ap.add_argument("--peers-only", action="store_true", help="the dense model and FLAP's table only")
    a = ap.parse_args()
    llm.fetch()
    dense, tok = llm.model_and_tokenizer()
    calib, ev = llm.windows(tok, llm.wiki_text())
    torch.manual_seed(0)
    t = time.perf_counter()
    stats = hfu.input_stats(dense, [w[None] for w in calib], [hfu.consumer(g) for g in hfu.unit_groups(dense)])
    print(f"input statistics of the 60 consumers on {calib.numel()} tokens: {time.perf_counter() - t:.1f} s "
          f"(order 'model' rows: their seconds leave this out)")
    base = llm.perplexity(dense, ev)
    n0 = body_params(dense)
    print(f"dense: perplexity {base:.2f}, {n0 / 1e6:.1f} M layer parameters")
    results = {"dense": base, "rows": []}
    best = {}
    for target in [] if a.peers_only else [float(x) for x in a.targets.split(",")]:
        print(f"\n{target:.0%} of the layers' parameters removed")
        print(f"{'mix':>22}  {'score':>11}  {'repair':>10}  {'order':>5}  {'removed':>7}  {'heads':>5}  "
              f"{'channels':>8}  {'perplexity':>10}  {'to dense':>8}  {'s':>6}")
        for mix, frac in mixes(dense, target).items():
            for score, repair, order in ROWS:
                if order == "block" and mix != "channels":
                    continue
                m = copy.deepcopy(dense)
                t = time.perf_counter()
                if order == "block":
                    hfu.prune_units(m, frac, score=score, repair=repair, data=[w[None] for w in calib],
                                    order="block", multiple=64)
                else:
                    hfu.prune_units(m, frac, score=score, repair=repair, stats=stats, multiple=64)
                secs = time.perf_counter() - t
                ppl = llm.perplexity(m, ev)
                removed = 1 - body_params(m) / n0
                row = dict(target=target, mix=mix, score=score, repair=repair, order=order, removed=removed,
                           perplexity=ppl, heads=m.config.num_attention_heads, channels=m.config.intermediate_size,
                           seconds=secs)
                results["rows"].append(row)
                print(f"{mix:>22}  {score:>11}  {repair:>10}  {order:>5}  {removed:>7.1%}  {row['heads']:>5}  "
                      f"{row['channels']:>8}  {ppl:>10.2f}  {ppl / base:>8.2f}  {secs:>6.1f}")
                if target not in best or ppl < best[target][0]:
                    best[target] = (ppl, m, row)
    if a.peers or a.peers_only:
        peers(dense, calib, ev, stats, base, [float(x) for x in a.targets.split(",")], results)
    if a.peers_only:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    prompt = tok("The history of the city", return_tensors="pt").input_ids
    ids = ev[0][:512][None]
    print(f"\nspeed at batch 1, {torch.get_num_threads()} threads, medians of {a.repeats} alternating runs")
    print(f"{'model':>34}  {'decode tok/s':>12}  {'to dense':>8}  {'prefill 512 s':>13}  {'to dense':>8}")
    dd, dp = [], []
    for target, (ppl, m, row) in best.items():
        with torch.no_grad():  # dense and smaller in turn, each warmed up first (bench/decode.py's alternate)
            d0, d1, p0, p1 = decode.alternate([lambda: generate(dense, prompt, a.tokens),
                                               lambda: generate(m, prompt, a.tokens),
                                               lambda: dense(ids), lambda: m(ids)], a.repeats)
        dd.append(d0)
        dp.append(p0)
        name = f"{row['removed']:.0%} removed ({row['mix']})"
        print(f"{name:>34}  {a.tokens / d1:>12.1f}  {d0 / d1:>8.2f}  {p1:>13.3f}  {p0 / p1:>8.2f}")
        results[f"speed {target}"] = dict(decode_dense=a.tokens / d0, decode=a.tokens / d1, prefill_dense=p0,
                                          prefill=p1)
        with tempfile.TemporaryDirectory() as folder:
            hfu.save_check(m)
            m.save_pretrained(folder)
            from transformers import AutoModelForCausalLM

            back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            print(f"{'':>34}  saved and loaded back: perplexity {llm.perplexity(back, ev[:4]):.2f} "
                  f"(first 4 windows; the model in memory: {llm.perplexity(m, ev[:4]):.2f})")
    print(f"{'dense':>34}  {a.tokens / statistics.median(dd):>12.1f}  {1:>8.2f}  {statistics.median(dp):>13.3f}  "
          f"{1:>8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
