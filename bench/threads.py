"""The kernels on a busy machine: default threads against one thread, and many tiny tensors.

Two tables, each on an idle machine and on one loaded by two busy processes
(``python -c 'while True: pass'``, killed after):

1. The global magnitude prune of 4 tensors of 2048 x 2048 float32 at 90%
   (``sparsecore.prune``, in memory) with the default Numba threads and with
   ``NUMBA_NUM_THREADS=1``, each in a fresh process, alternating.
2. ``prune_file`` (what ``sparsecore prune`` runs) of a safetensors file of
   100,000 tensors of 4 x 8 float32, locally and globally at 50%, beside a
   file holding one tensor of the same bytes (400,000 x 8), alternating;
   and two anchors on the many-tensor file: the ``safetensors`` library (the
   format's reference, in Rust) loading it and saving it back, and Python's
   ``json`` parsing and dumping its header alone (what any reader of the
   format pays per tensor: 8 MB of header for 12.8 MB of data).

Every timed process first prunes a small input (the kernels load from
Numba's cache: no timed run compiles), then times one run. Medians and
ratios are printed. The whole run takes about 4 minutes on 2 cores;
``--quick`` (10,000 tiny tensors, 3 repeats) about 1.

    python bench/threads.py [--repeats 5] [--file-repeats 1] [--tiny 100000] [--quick] [--json F]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys, time
import numpy as np
import sparsecore as sc
what = sys.argv[1]
rng = np.random.default_rng(0)
if what == "memory":
    w = {f"layer{i}": rng.standard_normal((2048, 2048)).astype(np.float32) for i in range(4)}
    sc.prune({"a": w["layer0"][:64, :64], "b": w["layer1"][:8, :8]}, "magnitude", sparsity=0.9, scope="global")
    t = time.perf_counter()
    sc.prune(w, "magnitude", sparsity=0.9, scope="global")
elif what == "reference":  # the format's own library reads the file and writes it back; its header's JSON alone
    import json, struct
    from safetensors.numpy import load_file, save_file
    src, dst, part = sys.argv[2:5]
    t = time.perf_counter()
    if part == "json":
        with open(src, "rb") as f:
            head = f.read(struct.unpack("<Q", f.read(8))[0])
        json.dumps(json.loads(head), separators=(",", ":"))
    else:
        save_file(load_file(src), dst)
else:
    from sparsecore.io.offline import prune_file
    src, scope, dst, warm = sys.argv[2:6]
    prune_file(warm, dst, sparsity=0.5, scope=scope, force=True)
    t = time.perf_counter()
    prune_file(src, dst, sparsity=0.5, scope=scope, force=True)
print(time.perf_counter() - t)
"""


def child(args, env=None):
    """Seconds of one timed run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env={**os.environ, **(env or {})},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


class Load:
    """Two busy processes for the duration of a ``with`` block (none when ``busy`` is False)."""

    def __init__(self, busy):
        self.busy = busy
        self.procs = []

    def __enter__(self):
        if self.busy:
            self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def write_files(folder, count):
    """A file of ``count`` tensors of 4 x 8, one of a single tensor of the same bytes, and a small one."""
    from sparsecore.io import save_safetensors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 4, 8)).astype(np.float32)
    paths = {k: os.path.join(folder, f"{k}.safetensors") for k in ("many", "one", "warm")}
    save_safetensors(paths["many"], {f"layer{i}.weight": x[i] for i in range(count)}, force=True)
    save_safetensors(paths["one"], {"weight": x.reshape(count * 4, 8)}, force=True)
    big = rng.standard_normal((1024, 512)).astype(np.float32)  # the paths of a large tensor too
    save_safetensors(paths["warm"], {**{f"w{i}": x[i] for i in range(3)}, "big": big}, force=True)
    return paths


def table(title, head, rows):
    print(f"\n{title}")
    print("  ".join(f"{h:>{w}}" for h, w in head))
    for r in rows:
        print("  ".join(f"{v:>{w}}" for v, (_, w) in zip(r, head)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each variant (in-memory prune)")
    ap.add_argument("--file-repeats", type=int, default=1, help="alternating runs of each file variant")
    ap.add_argument("--tiny", type=int, default=100_000, help="tiny tensors in the many-tensor file")
    ap.add_argument("--quick", action="store_true", help="10,000 tiny tensors, 3 repeats")
    ap.add_argument("--json", help="write the timings here")
    a = ap.parse_args()
    if a.quick:
        a.tiny, a.repeats = min(a.tiny, 10_000), min(a.repeats, 3)
    threads = os.environ.get("NUMBA_NUM_THREADS") or str(os.cpu_count())
    print(f"{os.cpu_count()} cores; default threads: {threads}; waiting policy: "
          f"{os.environ.get('OMP_WAIT_POLICY', 'as sparsecore sets it (passive) unless set')}")
    results = {"memory": {}, "files": {}}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(folder, a.tiny)
        out = os.path.join(folder, "out.safetensors")
        child(["memory"])  # compiles once if the cache is cold
        child(["file", paths["warm"], "global", out, paths["warm"]])
        child(["file", paths["warm"], "local", out, paths["warm"]])
        for load in ("idle", "loaded"):
            with Load(load == "loaded"):
                got = {"default": [], "one thread": []}
                for _ in range(a.repeats):
                    got["default"].append(child(["memory"]))
                    got["one thread"].append(child(["memory"], {"NUMBA_NUM_THREADS": "1"}))
                results["memory"][load] = got
                files = {(k, s): [] for s in ("local", "global") for k in ("many", "one")}
                files.update({("many", r): [] for r in ("library", "json")})
                for _ in range(a.file_repeats):
                    for (k, s), ts in files.items():
                        if s in ("library", "json"):
                            ts.append(child(["reference", paths[k], out, s]))
                        else:
                            ts.append(child(["file", paths[k], s, out, paths["warm"]]))
                results["files"][load] = {f"{k} {s}": v for (k, s), v in files.items()}

    rows = []
    for load, got in results["memory"].items():
        d, o = statistics.median(got["default"]), statistics.median(got["one thread"])
        rows.append((load, f"{d * 1e3:.1f}", f"{o * 1e3:.1f}", f"{d / o:.2f}",
                     " ".join(f"{x * 1e3:.0f}" for x in got["default"]),
                     " ".join(f"{x * 1e3:.0f}" for x in got["one thread"])))
    table(f"global prune of 4 x 2048^2 float32 at 90% (sparsecore.prune), medians of {a.repeats} alternating runs",
          [("machine", 7), ("default ms", 10), ("1 thread ms", 11), ("ratio", 6), ("default runs", 28),
           ("1-thread runs", 28)], rows)
    rows = []
    for load, got in results["files"].items():
        lib, js = statistics.median(got["many library"]), statistics.median(got["many json"])
        for s in ("local", "global"):
            m, o = statistics.median(got[f"many {s}"]), statistics.median(got[f"one {s}"])
            rows.append((load, s, f"{m:.2f}", f"{o:.3f}", f"{m / o:.0f}", f"{m / a.tiny * 1e6:.1f}",
                         f"{lib:.2f}", f"{m / lib:.2f}", f"{js:.2f}"))
    table(f"prune_file at 50%: {a.tiny:,} tensors of 4 x 8 against one of {a.tiny * 4:,} x 8 (same bytes), "
          f"default threads, medians of {a.file_repeats}; the anchors on the many-tensor file: the safetensors "
          f"library's load_file + save_file, and json.loads + dumps of its header alone",
          [("machine", 7), ("scope", 6), ("many s", 8), ("one s", 8), ("ratio", 6), ("us/tensor", 9),
           ("library s", 9), ("to it", 6), ("json s", 7)], rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tiny": a.tiny, **results}, f, indent=1)


if __name__ == "__main__":
    main()
