"""Device importance: the built-in gradient criteria (the CPU computes them
with NumPy) and the fused gradient sums of ``GradientAccumulator(device="cuda")``."""

from __future__ import annotations

import numpy as np

from .. import _device
from .._kernels import cuda_accumulate, cuda_importance
from .arrays import empty, launch, raise_bad

# What criterion_scores computes from the weights w and the statistic a.
TAYLOR_G = cuda_importance.TAYLOR_G  # |w * sum g|
TAYLOR_SQUARED_G2 = cuda_importance.TAYLOR_SQUARED_G2  # w**2 * sum g**2
OBD = cuda_importance.OBD  # 0.5 * w**2 * sum g**2
WANDA = cuda_importance.WANDA  # |w| * ||x_j|| of the input feature j = (i // B) % L
ABS = cuda_importance.ABS  # |a|


def criterion_scores(kind, w, a, L=1, B=1):
    """Float64 device scores of flat weights ``w`` and flat statistic ``a``,
    with the CPU's float64 operations in the CPU's order."""
    out = _device.cuda().device_array(w.size, np.float64)
    if w.size:
        cuda_importance.criterion_scores[launch(w.size)](w, a, L, B, out, kind)
    return out


def accumulate(prepared, totals, spares, stats):
    """One update of an accumulator on the GPU, all or nothing: for each
    ``(name, shape, n, g2d, w, g_original, w_original)`` of ``prepared``,
    ``spares[name][stat] = totals[name][stat] + terms`` (``stats`` in the
    kernel's order) in one fused pass that also checks the gradients and
    weights; raises the CPU's ``ValueError`` for the first tensor with NaN/Inf
    (the caller then keeps ``totals``)."""
    e = empty()
    init = np.zeros((len(prepared), 4), np.int64)  # one counter block for the update: one copy each way
    init[:, 1] = [max(p[3].size, 1) for p in prepared]
    init[:, 3] = [max(p[2], 1) for p in prepared]
    bad = _device.cuda().to_device(init)
    for t, (name, _, n, g2d, w, _, _) in enumerate(prepared):
        if n and g2d.shape[0]:
            tot, new = totals[name], spares[name]
            cuda_accumulate.accumulate[launch(n)](g2d, w, *(tot.get(s, e) for s in stats),
                                                  *(new.get(s, e) for s in stats), bad[t])
        else:
            for s in totals[name]:
                spares[name][s].copy_to_device(totals[name][s])
    got = bad.copy_to_host() if prepared else init
    for t, (name, *_, ga, wa) in enumerate(prepared):
        label = name or "grads"
        if got[t, 2]:
            raise_bad(label, "weights", wa, got[t, 2], got[t, 3])
        if got[t, 0]:
            raise_bad(label, "gradients", ga, got[t, 0], got[t, 1])


def add_into(dst, src):
    """``dst += src`` for flat float64 device arrays."""
    if dst.size:
        cuda_accumulate.add_into[launch(dst.size)](dst, _device.to_device(src))
