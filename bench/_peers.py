"""The peers as their authors' code does them, reimplemented in our words
(float32, PyTorch), for models llmcompressor does not take.

SparseGPT: IST-DASLab/sparsegpt ``sparsegpt.py``, ``SparseGPT.fasterprune``,
commit 5e3e2d19. Wanda: locuslab/wanda ``lib/prune.py``, ``prune_wanda``,
commit 069ac970. Both run layer by layer from the inputs the already pruned
layers produce (Wanda's ``--use_variant``-free path, SparseGPT's sequential
order); convolutions through unfolded patches, as the same authors' GPTQ
``add_batch`` does (their code takes Linear layers). Calibration batches are
tensors, or dicts of a Hugging Face model's keyword inputs, whose padding
tokens (``attention_mask`` 0) are left out of the statistics.
"""

import torch
from torch import nn


class _Caught(Exception):
    """Stops the forward pass once the layer's inputs are caught."""


def layer_inputs(model, name, calib):
    """The inputs of layer ``name`` over ``calib`` as rows (tokens, samples or patches), float32;
    convolutions unfolded as GPTQ's add_batch does (nn.Unfold: channel-major patches)."""
    layer = model.get_submodule(name)
    seen, keep = [], [None]

    def hook(m, args):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            x = nn.functional.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            x = x.transpose(1, 2)
        if keep[0] is not None and x.dim() == 3:
            x = x[keep[0].bool()]
        seen.append(x.reshape(-1, x.shape[-1]).float())
        raise _Caught

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in calib:
                try:
                    if isinstance(batch, dict):
                        keep[0] = batch.get("attention_mask")
                        model(**batch)
                    else:
                        model(batch)
                except _Caught:
                    pass
    finally:
        h.remove()
    return torch.cat(seen)


def _matrix(layer):
    return layer.weight.data.reshape(layer.weight.shape[0], -1)


def sparsegpt(model, names, calib, target, blocksize=128, percdamp=0.01):
    """SparseGPT.fasterprune, layer by layer: H = 2/n Σ x xᵀ, dead inputs, damping, the upper Cholesky
    factor of H⁻¹, per column block the mask by w²/d² (a fraction of the block, or n:m per row) and the
    OBS updates, lazily batched."""
    prunen, prunem = (2, 4) if target == "2:4" else (0, 0)
    for name in names:
        layer = model.get_submodule(name)
        X = layer_inputs(model, name, calib)
        H = 2.0 / X.shape[0] * (X.T @ X)
        W = _matrix(layer).clone().float()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        cols = W.shape[1]
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * target)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        layer.weight.data = W.reshape(layer.weight.shape).to(layer.weight.dtype)


def wanda(model, names, calib, target):
    """prune_wanda, layer by layer: scaler_row = mean of x² per input feature, metric |W|·sqrt(scaler_row),
    per output row the int(s·cols) lowest pruned (n:m: per group of m, the m - n lowest)."""
    for name in names:
        layer = model.get_submodule(name)
        X = layer_inputs(model, name, calib)
        scaler_row = (X ** 2).sum(0) / X.shape[0]
        W = _matrix(layer)
        metric = W.abs() * torch.sqrt(scaler_row.reshape(1, -1))
        mask = torch.zeros_like(metric, dtype=torch.bool)  # True = pruned
        if target == "2:4":
            for ii in range(0, metric.shape[1], 4):
                tmp = metric[:, ii:ii + 4].float()
                mask.scatter_(1, ii + torch.topk(tmp, 2, dim=1, largest=False)[1], True)
        else:
            order = torch.sort(metric, dim=-1, stable=True)[1]
            mask.scatter_(1, order[:, :int(metric.shape[1] * target)], True)
        W[mask] = 0
