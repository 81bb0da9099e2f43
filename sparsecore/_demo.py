"""The embedded default job: the reference article's workflow on raw arrays.

A small MLP (64 -> 128 -> 10, PyTorch's (out, in) layout) is trained with
NumPy on generated data (ten overlapping Gaussian classes); importance is
OBD, 0.5 * w**2 times the empirical Fisher sum of squared per-sample
gradients, fed batch by batch to the accumulator; 90% of the weights are pruned globally with per-layer
caps; the survivors are fine-tuned with the masks held; the result is
exported as CSR and run with the CSR kernels.
"""

import time

import numpy as np

from .csr import csr_matmul
from .importance import GradientAccumulator
from .prune import prune

SIZES = (64, 128, 10)


def make_data(rng, n):
    """Ten overlapping Gaussian classes in 64 dimensions (learnable, not trivial)."""
    centers = rng.standard_normal((SIZES[2], SIZES[0])) * 0.35
    y = rng.integers(0, SIZES[2], n)
    x = (centers[y] + rng.standard_normal((n, SIZES[0]))).astype(np.float32)
    return x, y


def init(rng):
    p = {}
    for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:]), 1):
        p[f"fc{i}.weight"] = (rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        p[f"fc{i}.bias"] = np.zeros(fan_out, np.float32)
    return p


def forward(p, x):
    h = np.maximum(x @ p["fc1.weight"].T + p["fc1.bias"], 0)
    return h, h @ p["fc2.weight"].T + p["fc2.bias"]


def grads(p, x, y, per_sample=False):
    """Cross-entropy gradients; with ``per_sample`` a leading sample axis."""
    h, logits = forward(p, x)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    d2 = prob
    d2[np.arange(len(y)), y] -= 1
    d1 = (d2 @ p["fc2.weight"]) * (h > 0)
    if per_sample:  # each sample's own gradient, not divided by the batch size
        return {"fc1.weight": d1[:, :, None] * x[:, None, :], "fc1.bias": d1,
                "fc2.weight": d2[:, :, None] * h[:, None, :], "fc2.bias": d2}
    n = len(y)
    return {"fc1.weight": d1.T @ x / n, "fc1.bias": d1.mean(0),
            "fc2.weight": d2.T @ h / n, "fc2.bias": d2.mean(0)}


def accuracy(p, x, y):
    return float((forward(p, x)[1].argmax(axis=1) == y).mean())


def train(p, x, y, rng, steps, lr=0.1, masks=None):
    """Plain SGD with momentum; with ``masks`` the pruned weights stay zero."""
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for _ in range(steps):
        idx = rng.integers(0, len(y), 128)
        g = grads(p, x[idx], y[idx])
        for k in p:
            vel[k] = 0.9 * vel[k] + g[k]
            p[k] -= lr * vel[k]
            if masks is not None and k in masks:
                p[k] *= masks[k]
    return p


def main(sparsity=0.9, seed=0, out=print):
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x, y = make_data(rng, 6000)
    xtr, ytr, xte, yte = x[:5000], y[:5000], x[5000:], y[5000:]
    p = train(init(rng), xtr, ytr, rng, steps=1500, lr=0.05)
    acc_dense = accuracy(p, xte, yte)

    weights = {k: v for k, v in p.items() if k.endswith(".weight")}
    fisher = GradientAccumulator(stats=("g2",))
    for start in range(0, 2000, 250):
        g = grads(p, xtr[start:start + 250], ytr[start:start + 250], per_sample=True)
        fisher.update({k: g[k] for k in weights}, per_sample=True)

    # OBD: 0.5 * w**2 * sum of g**2, the Fisher statistic weighted by the weight's size
    result = prune(weights, "obd", state=fisher, sparsity=sparsity, scope="global", max_sparsity=0.97)
    pruned = dict(p)
    for k in weights:
        pruned[k] = np.where(result.masks[k], p[k], np.float32(0))
    acc_pruned = accuracy(pruned, xte, yte)
    masks = {k: result.masks[k].astype(np.float32) for k in weights}
    tuned = train(pruned, xtr, ytr, rng, steps=500, lr=0.05, masks=masks)
    acc_tuned = accuracy(tuned, xte, yte)

    final = prune({k: tuned[k] for k in weights}, {k: result.masks[k].astype(np.float32) for k in weights},
                  threshold=0.5)  # export exactly the held masks as CSR
    h = np.maximum(csr_matmul(final.csr["fc1.weight"], xte.T).T + tuned["fc1.bias"], 0)
    logits = csr_matmul(final.csr["fc2.weight"], h.T).T + tuned["fc2.bias"]
    acc_csr = float((logits.argmax(axis=1) == yte).mean())
    _, dense_logits = forward(tuned, xte)

    out("sparsecore demo: MLP 64-128-10 trained on generated data; global OBD pruning "
        f"(0.5 * w**2 * sum of per-sample g**2 over {fisher.count} samples) to {sparsity:.0%}, "
        "at most 97% per layer")
    out(final.table())
    out(f"test accuracy: dense {acc_dense:.3f} | pruned {acc_pruned:.3f} | "
        f"fine-tuned with masks held {acc_tuned:.3f} | CSR inference {acc_csr:.3f}")
    out(f"CSR logits vs masked dense logits: max |diff| = {np.abs(logits - dense_logits).max():.2e}")
    out(f"done in {time.perf_counter() - t0:.1f} s (the first run also compiles the kernels; later runs use the cache)")
    return {"dense": acc_dense, "pruned": acc_pruned, "tuned": acc_tuned, "csr": acc_csr,
            "summary": final.summary}


DEFAULT_SEED = 0


def default_model_path():
    """The embedded default model: the demo MLP trained with seed 0, as safetensors."""
    import importlib.resources as res

    return str(res.files("sparsecore") / "data" / "mlp-64-128-10.safetensors")


def build_default_model(path):
    """Train the embedded default model and write it (how the shipped file was made)."""
    from .io import _safetensors as st

    rng = np.random.default_rng(DEFAULT_SEED)
    x, y = make_data(rng, 6000)
    p = train(init(rng), x[:5000], y[:5000], rng, steps=1500, lr=0.05)
    meta = {"model": "MLP 64-128-10, ReLU, PyTorch (out, in) layout", "data": "sparsecore._demo.make_data, seed 0",
            "test_accuracy": f"{accuracy(p, x[5000:], y[5000:]):.4f}"}
    with open(path, "wb") as f:
        st.write(f, [(k, "F32", v.shape, lambda v=v: v) for k, v in p.items()], meta)


def default_test_accuracy(weights):
    """Accuracy of MLP weights (names as in the default model) on its held-out data."""
    rng = np.random.default_rng(DEFAULT_SEED)
    x, y = make_data(rng, 6000)
    p = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    return accuracy(p, x[5000:], y[5000:])
