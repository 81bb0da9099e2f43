"""PyTorch adapter: weights, gradients and activations out; masks, CSR and smaller layers back.

The adapter converts and collects; the engine decides. Importing it imports
PyTorch (``pip install torch==2.13.0``); ``import sparsecore`` never does.

Out of PyTorch
    :func:`prunable`, :func:`weights` (NumPy views of CPU parameters, no
    copy), :func:`collect_gradients` (batch or per-sample gradients into a
    :class:`sparsecore.GradientAccumulator`), :func:`collect_activations`
    (per-unit MI against labels, pairwise MI between the two ends of each
    weight, input-feature norms for Wanda), :func:`masks_from_torch_prune`.
Into PyTorch
    :func:`apply_masks`, :class:`MaskHold` (pruned weights stay exactly zero
    through optimizer steps), :func:`to_torch_csr` / :func:`from_torch_csr`,
    :class:`SparseLinear` and :func:`swap_sparse_linear`, :func:`shrink_model`,
    :func:`masked_state_dict`, :func:`save_sparse`; :class:`PackedLinear`,
    :func:`sparsify` (packed weights where faster) and :func:`load_sparse`
    (a sparse HDF5 file straight into packed modules).

Batch gradients versus per-sample gradients: ``per_sample=False`` adds, per
batch, the gradient of the batch's mean loss, so ``Σ g²`` sums squared
batch means (its size depends on the batch size, and per-sample
disagreement cancels inside a batch). ``per_sample=True`` computes each
sample's own gradient with ``torch.func`` (``grad`` under ``vmap``) and sums
their squares: the empirical Fisher ``Σ_samples (∂L/∂w)²`` of the reference
article. Both leave the model as they found it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

import sparsecore as sc
from sparsecore.activations import ActivationStats, collect

from ._common import batches as _batches

__all__ = [
    "ActivationStats", "MaskHold", "PackedLinear", "SparseLinear", "apply_masks", "collect_activations",
    "collect_gradients", "from_torch_csr", "masked_state_dict", "masks_from_torch_prune", "outlier_sparsities",
    "prunable", "load_sparse", "prune_sequential", "save_sparse", "shrink_model", "sparsify", "swap_sparse_linear",
    "to_torch_csr", "weights",
]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _param_of(module, pname):
    """A module's parameter, or its ``_orig`` under ``torch.nn.utils.prune``."""
    p = module._parameters.get(pname)
    return p if p is not None else module._parameters.get(pname + "_orig")


def prunable(model: nn.Module, include: Iterable[str] | None = None,
             exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Parameters to prune, by name (``"fc1.weight"``).

    By default the ``weight`` of every ``Linear`` and ``Conv1d/2d/3d``; with
    ``include`` (fnmatch patterns on the names of ``named_parameters``) those
    instead, e.g. ``["*.weight"]`` or ``["embed.weight", "fc*.weight"]``.
    ``exclude`` removes names. A module pruned with ``torch.nn.utils.prune``
    is listed under its plain name; its ``weight_orig`` is the parameter.
    """
    out = {}
    if include is None:
        for mname, m in model.named_modules():
            if isinstance(m, PRUNABLE_TYPES):
                p = _param_of(m, "weight")
                if p is not None:
                    out[f"{mname}.weight" if mname else "weight"] = p
    else:
        pats = [include] if isinstance(include, str) else list(include)
        for name, p in model.named_parameters():
            plain = name[:-5] if name.endswith("_orig") else name
            if any(fnmatch.fnmatchcase(plain, pat) for pat in pats):
                out[plain] = p
        if not out:
            raise ValueError(f"include={pats} matches no parameter; the model has "
                             f"{[n for n, _ in model.named_parameters()][:8]}...")
    ex = [exclude] if isinstance(exclude, str) else list(exclude)
    return {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, pat) for pat in ex)}


def _dev_float(t):
    """A detached contiguous float32/float64 tensor left on its device (for
    the CUDA backend; other float dtypes widened, as :func:`_host` does)."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.contiguous()


def _host(t):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def weights(model: nn.Module, include=None, exclude=(), *, device: str = "cpu") -> dict:
    """The prunable weights as arrays, by name.

    ``device`` as the engine's: ``"cpu"``, NumPy arrays (for CPU
    float32/float64 parameters views of the parameters, no copy: do not
    write into them; others copied to the host, bfloat16 widened to
    float32); ``"cuda"``, the detached tensors themselves, which expose
    ``__cuda_array_interface__`` on a GPU (for the CUDA backend);
    ``"auto"``, the tensors when the parameters are on a GPU, else NumPy
    arrays. (``"host"`` and ``"device"``, the former spellings of ``"cpu"``
    and ``"cuda"``, still work, with a ``DeprecationWarning``.)
    """
    if device in _OLD_DEVICE_NAMES:
        warnings.warn(f"weights(device={device!r}) is now device={_OLD_DEVICE_NAMES[device]!r}, as in the engine",
                      DeprecationWarning, stacklevel=2)
        device = _OLD_DEVICE_NAMES[device]
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    params = prunable(model, include, exclude)
    if device == "auto":
        device = "cuda" if any(p.is_cuda for p in params.values()) else "cpu"
    if device == "cuda":
        return {k: p.detach() for k, p in params.items()}
    return {k: _host(_effective(model, k, p)) for k, p in params.items()}


_OLD_DEVICE_NAMES = {"host": "cpu", "device": "cuda"}


def _effective(model, name, p):
    """The weight the forward pass uses: ``weight_orig * weight_mask`` under torch prune."""
    mname, _, pname = name.rpartition(".")
    m = model.get_submodule(mname) if mname else model
    if hasattr(m, pname + "_mask"):
        return getattr(m, pname)
    return p


def masks_from_torch_prune(model: nn.Module) -> dict:
    """Keep-masks of a model pruned with ``torch.nn.utils.prune`` (its
    ``<name>_mask`` buffers), by parameter name, as bool arrays."""
    out = {}
    for mname, m in model.named_modules():
        for bname, buf in m.named_buffers(recurse=False):
            if bname.endswith("_mask") and (bname[:-5] + "_orig") in m._parameters:
                key = f"{mname}.{bname[:-5]}" if mname else bname[:-5]
                out[key] = _host(buf) != 0
    return out


@contextlib.contextmanager
def _preserved(model, mode):
    """Restore train/eval mode, requires_grad and .grad of every parameter,
    and remove hooks registered inside, also when an exception is raised."""
    training = {m: m.training for m in model.modules()}
    req = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    hooks = []
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        elif mode != "keep":
            raise ValueError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
        yield hooks
    finally:
        for h in hooks:
            h.remove()
        for m, t in training.items():
            m.training = t
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = grads[p]


def collect_gradients(model: nn.Module, data: Iterable, loss_fn, *, include=None, exclude=(),
                      accumulator: sc.GradientAccumulator | None = None, stats=("g2",),
                      per_sample: bool = False, max_batches: int | None = None,
                      mode: str = "eval", device: str = "auto"):
    """Feed gradients of ``loss_fn(model(x), y)`` over ``data`` to an accumulator.

    Parameters
    ----------
    model : nn.Module
    data : iterable of (inputs, targets)
        A ``DataLoader`` or any iterable of batches (tensors on the model's device).
    loss_fn : callable (outputs, targets) -> scalar
        With ``per_sample``, it is called on batches of one sample.
    include, exclude
        Which parameters (see :func:`prunable`).
    accumulator : GradientAccumulator, optional
        Continue one; else a new one with ``stats`` (add ``"wg"`` for Taylor).
    per_sample : bool
        True per-sample gradients via ``torch.func`` (the empirical Fisher);
        else one gradient of the mean loss per batch. See the module notes.
    max_batches : int, optional
    mode : {"eval", "train", "keep"}
        The mode to run the model in (``eval``: batch norm uses its running
        statistics, which per-sample gradients need). Restored afterwards.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with the parameters on a GPU) keeps the
        gradients and the sums on the GPU: a :class:`sparsecore.cuda.DeviceAccumulator`
        fed the gradient tensors without host copies.

    Returns
    -------
    GradientAccumulator, or DeviceAccumulator on the GPU
    """
    params = prunable(model, include, exclude)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    on_gpu = device == "cuda" or (device == "auto" and any(p.is_cuda for p in params.values()))
    if on_gpu:
        from sparsecore.cuda import DeviceAccumulator

        acc = accumulator if accumulator is not None else DeviceAccumulator(stats=stats)
        conv = _dev_float  # tensors stay where they are
    else:
        acc = accumulator if accumulator is not None else sc.GradientAccumulator(stats=stats)
        conv = _host
    need_w = "wg" in acc.stats or "wg2" in acc.stats
    with _preserved(model, mode):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        if per_sample:
            from torch.func import functional_call, grad, vmap

            names = list(params)
            full = dict(model.named_parameters())
            bufs = dict(model.named_buffers())
            keys = {k: (k + "_orig" if k + "_orig" in full else k) for k in names}

            def loss_one(sel, x1, y1):
                p_all = {k: v.detach() for k, v in full.items()}
                p_all.update({keys[k]: v for k, v in sel.items()})
                out = functional_call(model, (p_all, bufs), (x1.unsqueeze(0),))
                return _scalar_loss(loss_fn(out, y1.unsqueeze(0)))

            per = vmap(grad(loss_one), in_dims=(None, 0, 0))
            for x, y in _batches(data, max_batches):
                g = per({k: params[k].detach() for k in names}, x, y)
                w = {k: conv(_effective(model, k, params[k])) for k in names} if need_w else None
                acc.update({k: conv(g[k]) for k in names}, weights=w, per_sample=True)
        else:
            for x, y in _batches(data, max_batches):
                for p in params.values():
                    p.grad = None
                _scalar_loss(loss_fn(model(x), y)).backward()
                w = {k: conv(_effective(model, k, p)) for k, p in params.items()} if need_w else None
                acc.update({k: conv(p.grad) for k, p in params.items()}, weights=w)
    return acc


def _scalar_loss(loss):
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn returned {shape}; it must return one number per batch (a loss with "
                         f"reduction='mean' or 'sum', not 'none')")
    return loss


def collect_activations(model: nn.Module, data: Iterable, modules: Iterable[str] | None = None, *,
                        n_classes: int | None = None, bins: int = 16, unit: bool = True,
                        pairwise: bool = False, feature_norms: bool = False,
                        max_batches: int | None = None, mode: str = "eval", device: str = "auto") -> ActivationStats:
    """Activations by module name through forward hooks, fed to the engine.

    Two passes over ``data`` (so a re-iterable: a ``DataLoader`` or a list):
    the first finds each unit's range (equal-width ``bins`` over it), the
    second counts. Convolution maps are reduced to one
    value per channel (the spatial mean).

    Parameters
    ----------
    modules : names, optional
        Modules whose outputs are the units (default: every Linear and Conv).
    n_classes : int
        Labels are 0 .. n_classes - 1 (the targets of ``data``); needed for ``unit``.
    unit : bool
        Per-unit MI of each module's output against the labels.
    pairwise : bool
        For each Linear/Conv module, MI between every input feature (channel)
        and every output unit: an ``(out, in)`` matrix, the ``mutual_info``
        criterion's state for its weight.
    feature_norms : bool
        The L2 norm over samples of each input feature of each Linear/Conv
        module (per input channel, over positions too, for a convolution):
        the ``wanda`` criterion's state.
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` (or ``"auto"`` with the model on a GPU) bins and counts on
        the GPU (equal-width bins; per-unit ranges and norms come back as
        small vectors); the MI tables are finished on the host.
    """
    if iter(data) is data:
        raise TypeError("collect_activations reads data twice (ranges, then counts): pass a DataLoader or a "
                        "list of batches, not a generator or an iterator")
    names = list(modules) if modules is not None else [n for n, m in model.named_modules()
                                                         if isinstance(m, PRUNABLE_TYPES)]
    mods = {n: model.get_submodule(n) for n in names}
    weight_of = {n: (f"{n}.weight" if n else "weight") for n, m in mods.items() if isinstance(m, PRUNABLE_TYPES)}
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" or (device == "auto" and any(p.is_cuda for p in model.parameters())):
        return _collect_on_device(model, data, mods, weight_of, n_classes, bins, unit, pairwise, feature_norms,
                                  max_batches, mode)
    run = _hooked_runner(model, mods, data, max_batches, mode,
                         _host, lambda y: _host(y).astype(np.int64, copy=False).reshape(-1))
    return collect(run, weight_of, n_classes=n_classes, bins=bins, unit=unit, pairwise=pairwise,
                   feature_norms=feature_norms)


def _hooked_runner(model, mods, data, max_batches, mode, convert, labels):
    """``run(pass_fn)``: one pass over ``data`` with forward hooks on ``mods``,
    calling ``pass_fn({module: (input, output, is_linear)}, labels)`` per
    batch, the tensors passed through ``convert`` and the targets through
    ``labels``; the model's state is restored afterwards."""
    captured = {}

    def hook_for(name):
        def hook(module, inputs, output):
            captured[name] = (convert(inputs[0]), convert(output), isinstance(module, nn.Linear))
        return hook

    def run(pass_fn):
        with _preserved(model, mode) as hooks, torch.no_grad():
            for n, m in mods.items():
                hooks.append(m.register_forward_hook(hook_for(n)))
            for x, y in _batches(data, max_batches):
                captured.clear()
                model(x)
                pass_fn(captured, labels(y))

    return run


def _collect_on_device(model, data, mods, weight_of, n_classes, bins, unit, pairwise, feature_norms,
                       max_batches, mode):
    """collect_activations with the reductions, binning and counting on the GPU."""
    run = _hooked_runner(model, mods, data, max_batches, mode, _dev_float,
                         lambda y: y.detach().reshape(-1).to(torch.int64).contiguous())
    return collect(run, weight_of, n_classes=n_classes, bins=bins, unit=unit, pairwise=pairwise,
                   feature_norms=feature_norms, device=True)


# --- into PyTorch -----------------------------------------------------------------

def _target(model, name):
    mname, _, pname = name.rpartition(".")
    try:
        m = model.get_submodule(mname) if mname else model
    except AttributeError:
        m = None
    p = None if m is None else _param_of(m, pname)
    if p is None:
        known = [n for n, _ in model.named_parameters()]
        raise ValueError(f"the model has no parameter {name!r} (masks are keyed like weights(model): "
                         f"{known[:4]}{' ...' if len(known) > 4 else ''})")
    return m, pname, p


def _mask_tensor(mask, p, name):
    m = torch.as_tensor(np.asarray(mask))
    if m.dtype != torch.bool:
        raise TypeError(f"mask {name!r} has dtype {m.dtype}; pass a bool array (True = kept)")
    if tuple(m.shape) != tuple(p.shape):
        raise ValueError(f"mask {name!r} has shape {tuple(m.shape)} but the parameter has {tuple(p.shape)}")
    return m.to(p.device)


def apply_masks(model: nn.Module, masks: Mapping) -> nn.Module:
    """Zero the pruned weights in place (``masks``: name -> bool array, True = kept)."""
    with torch.no_grad():
        for name, mask in masks.items():
            _, _, p = _target(model, name)
            p.mul_(_mask_tensor(mask, p, name).to(p.dtype))
    return model


class MaskHold:
    """Keep pruned weights exactly zero while fine-tuning, until :meth:`remove`.

    The masks are applied at once; gradient hooks zero the gradients of
    pruned weights (so momentum and Adam moments stay zero there), and a
    post-step hook on each optimizer zeroes the pruned weights again after
    every step (weight decay, or optimizer state from before the pruning,
    cannot move them). Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, masks: Mapping, optimizers):
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.model = model
        self.params = []
        for name, mask in masks.items():
            _, _, p = _target(model, name)
            self.params.append((p, _mask_tensor(mask, p, name)))
        apply_masks(model, masks)
        self.handles = []
        for p, m in self.params:
            keep = m.to(p.dtype)
            self.handles.append(p.register_hook(lambda g, keep=keep: g * keep))
        for opt in optimizers:
            self.handles.append(opt.register_step_post_hook(lambda *_: self._zero()))

    def _zero(self):
        with torch.no_grad():
            for p, m in self.params:
                p.masked_fill_(~m, 0)

    def remove(self):
        """Remove the hooks: the masks are no longer held."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def to_torch_csr(a) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` sharing ``a``'s arrays (scipy CSR, int32 or int64 indices)."""
    import scipy.sparse as sp

    if not (sp.issparse(a) and a.format == "csr"):
        what = f"{type(a).__name__} of {getattr(a, 'dtype', '?')}"
        raise TypeError(f"to_torch_csr takes a scipy CSR array (sparsecore.to_csr(weights, mask), or a "
                        f"PruneResult's csr), got {what}" + (": a mask alone holds no values; pass "
                                                             "to_csr(weights, mask)" if getattr(a, "dtype", None)
                                                             == np.bool_ else ""))
    if a.indices.dtype != a.indptr.dtype:
        raise ValueError(f"CSR indices ({a.indices.dtype}) and indptr ({a.indptr.dtype}) must share a dtype")
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # our CSR is canonical (check_csr's rules); torch's own check would rescan it
        return torch.sparse_csr_tensor(torch.from_numpy(a.indptr), torch.from_numpy(a.indices),
                                       torch.from_numpy(a.data), size=a.shape, check_invariants=False)


def from_torch_csr(t: torch.Tensor):
    """``scipy.sparse.csr_array`` viewing a CPU sparse CSR tensor's arrays (no copy)."""
    import scipy.sparse as sp

    if t.layout != torch.sparse_csr:
        raise TypeError(f"expected a sparse CSR tensor, got layout {t.layout}")
    t = t.detach().cpu()
    a = sp.csr_array((t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                     shape=tuple(t.shape), copy=False)
    return a


class SparseLinear(nn.Module):
    """A drop-in ``nn.Linear`` whose weight is a sparse CSR tensor.

    ``y = x @ W.T + b`` computed as ``W @ x.T`` with ``torch.sparse.mm``; it
    gives the masked dense layer's outputs (to float rounding). Inference
    only: the weight is a buffer, not a parameter.
    """

    def __init__(self, weight_csr: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight_csr.layout != torch.sparse_csr:
            raise TypeError("weight_csr must be a sparse CSR tensor (to_torch_csr)")
        self.out_features, self.in_features = weight_csr.shape
        self.register_buffer("weight", weight_csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask=None) -> SparseLinear:
        """A :class:`SparseLinear` of a dense ``nn.Linear``, kept where ``mask`` is True (non-zeros without one)."""
        w = _host(linear.weight)
        a = sc.to_csr(w, None if mask is None else np.asarray(mask))
        t = to_torch_csr(a).to(linear.weight.device)
        return cls(t, linear.bias)

    def forward(self, x):
        """``x @ W.T + b`` with the sparse weight."""
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self):
        """Shape and stored entries, for ``print(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight._nnz()}"


class PackedLinear(nn.Module):
    """A drop-in ``nn.Linear`` (or Hugging Face ``Conv1D``) whose weight is a
    :class:`sparsecore.PackedMatrix`: ``y = x @ W.T + b`` with sparsecore's
    packed kernels, on the CPU.

    One token (batch 1: the decode step) is one product with a vector; a few
    rows of ``x`` are one product with a matrix. Many rows (a prefill of
    ``DENSE_FROM`` tokens or more) of a weight that keeps at least
    ``DENSE_DENSITY`` of its entries run as ``F.linear`` on a dense copy
    written straight from the packed arrays for that call: there the dense
    GEMM's arithmetic beats the sparse product (measured on 2 AMD EPYC cores:
    512 tokens at 50-70% ran 0.6-0.9x dense through the packed matrix
    product, 2.4x at 90%). The input is read as float32
    (float64 for float64 weights) and the output given back in the input's
    dtype. Inference only: the weight is not a parameter, and an input that
    requires a gradient (with gradients enabled) is refused.
    """

    DENSE_FROM = 32
    DENSE_DENSITY = 0.2

    def __init__(self, packed: sc.PackedMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(packed, sc.PackedMatrix):
            raise TypeError(f"packed must be a sparsecore.PackedMatrix, got {type(packed).__name__}")
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # the products without their checks (forward checks once): a decode step calls each layer once
        self._vector, self._matrix = packed.product(True), packed.product(False)
        self._work = torch.float64 if packed.dtype == "float64" else torch.float32
        self._np_work = np.float64 if packed.dtype == "float64" else np.float32
        self._bias = None if self.bias is None else self.bias.to(self._work).numpy()  # the buffer, as NumPy
        self._dense_route = packed.nnz >= self.DENSE_DENSITY * packed.shape[0] * packed.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Module, mask=None, *, format: str = "auto") -> PackedLinear:
        """A :class:`PackedLinear` of an ``nn.Linear`` or ``Conv1D``, kept where
        ``mask`` is True (its non-zeros without one); values keep the weight's dtype."""
        w, dtype = _weight_matrix(linear)
        if mask is not None:
            mask = np.asarray(mask)
            if _is_conv1d(linear):
                mask = mask.T
        return cls(sc.pack(w, format, mask=mask, dtype=dtype), linear.bias)

    def forward(self, x):
        """``x @ W.T + b`` with the packed weight."""
        if x.requires_grad:
            if torch.is_grad_enabled():
                raise RuntimeError("PackedLinear is for inference: run it under torch.no_grad() or "
                                   "torch.inference_mode()")
            x = x.detach()
        if not x.is_cpu:
            raise RuntimeError(f"PackedLinear runs on the CPU; the input is on {x.device}")
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"PackedLinear takes inputs of {self.in_features} features, got shape {tuple(shape)}")
        if x.dtype == self._work and x.numel() == self.in_features != 0 and x.is_contiguous():
            # one token of the working dtype (a decode step): the fewest calls (each costs a microsecond)
            y = self._vector(x.numpy().reshape(-1), np.empty(self.out_features, self._np_work))
            if self._bias is not None:
                y += self._bias
            return torch.from_numpy(y.reshape(shape[:-1] + (self.out_features,)))
        lead = shape[:-1]
        xn = (x if x.dtype == self._work else x.to(self._work)).numpy().reshape(math.prod(lead), self.in_features)
        tokens = xn.shape[0]
        if tokens == 1:  # one token: the product with a vector
            y = self._vector(np.ascontiguousarray(xn[0]), np.empty(self.out_features, xn.dtype))[None]
        elif tokens == 0 or self.in_features == 0 or self.out_features == 0:
            y = np.zeros((tokens, self.out_features), xn.dtype)
        elif tokens >= self.DENSE_FROM and self._dense_route:
            w = torch.from_numpy(self.packed.toarray())
            bias = None if self.bias is None else self.bias.to(w.dtype)
            y = nn.functional.linear(torch.from_numpy(xn), w, bias)
            return y.reshape(*lead, self.out_features).to(x.dtype)
        else:
            y = self._matrix(np.ascontiguousarray(xn.T), np.empty((self.out_features, tokens), xn.dtype)).T
        if self._bias is not None:
            y += self._bias  # NumPy's add: a torch op costs microseconds more per call
        y = torch.from_numpy(y.reshape(*lead, self.out_features))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self):
        """Shape, format and bytes, for ``print(model)``."""
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={p.format}, "
                f"dtype={p.dtype}, nnz={p.nnz}, nbytes={p.nbytes}")


def _is_conv1d(m):
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _weight_matrix(m):
    """``(weight as (out, in) host array, packed dtype name)``; bfloat16 kept as its bits' dtype name."""
    w = m.weight.detach()
    if w.device.type != "cpu":
        w = w.cpu()
    if _is_conv1d(m):
        w = w.T
    if w.dtype == torch.bfloat16:
        return w.contiguous().float().numpy(), "bfloat16"  # float32 of bfloat16 values: exact
    if w.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"weight of {type(m).__name__} has dtype {w.dtype}; PackedLinear takes float16, bfloat16, "
                        f"float32 or float64")
    return w.contiguous().numpy(), str(w.dtype).removeprefix("torch.")


def _median_seconds(fn, repeats):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def sparsify(model: nn.Module, format: str = "auto", *, include: Iterable[str] | None = None,
             measure: bool = True, min_speedup: float = 1.0, repeats: int = 9) -> dict:
    """Swap each pruned ``nn.Linear`` (and ``Conv1D``) for a :class:`PackedLinear`
    where that is faster, in place; the rest stays dense.

    Parameters
    ----------
    model : torch.nn.Module
        On the CPU.
    format : {"auto", "delta8", "bitmask", "nm"}
        The packed format of every swapped layer; ``"auto"`` takes each
        weight's fewest bytes (:func:`sparsecore.pack`).
    include : iterable of str, optional
        Module names (``fnmatch`` patterns) to consider; all by default.
    measure : bool
        Time each layer's batch-1 product both ways (median of ``repeats``
        after a warm-up, on the threads the process has) and swap where the
        packed one is at least ``min_speedup`` times faster. Without it, swap
        where the packed weight reads fewer bytes than the dense one
        ``min_speedup`` times over.
    min_speedup : float
        The speed-up (or byte ratio) a layer must reach to be swapped.

    Returns
    -------
    dict
        Module name -> ``{"format", "nbytes", "dense_nbytes", "speedup",
        "swapped"}`` for every layer considered (``speedup`` is ``None``
        without ``measure``). Layers without a zero weight are not
        considered.
    """
    chosen = {}
    for name, m in list(model.named_modules()):
        if not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if m.weight.device.type != "cpu":
            raise ValueError(f"sparsify: {name!r} is on {m.weight.device}; the packed kernels run on the CPU")
        if bool(torch.count_nonzero(m.weight.detach()) == m.weight.numel()):
            continue  # nothing pruned: nothing to gain
        new = PackedLinear.from_linear(m, format=format)
        dense_nbytes = m.weight.numel() * m.weight.element_size()
        speedup = None
        with torch.no_grad():
            if measure:
                x = torch.randn(1, new.in_features, generator=torch.Generator().manual_seed(0)).to(m.weight.dtype)
                t_dense = _median_seconds(lambda: m(x), repeats)
                t_packed = _median_seconds(lambda: new(x), repeats)
                speedup = t_dense / t_packed
                swap = speedup >= min_speedup
            else:
                swap = dense_nbytes >= min_speedup * new.packed.nbytes
        chosen[name] = {"format": new.packed.format, "nbytes": new.packed.nbytes, "dense_nbytes": dense_nbytes,
                        "speedup": speedup, "swapped": swap}
        if swap:
            _set_module(model, name, new)
    return chosen


def _file_tensor(f, name):
    """A tensor of an open weight file as a CPU torch tensor of its stored dtype."""
    a = f.raw(name)
    if f.entries[name].dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def load_sparse(model: nn.Module, path, *, format: str | None = None, include: Iterable[str] | None = None,
                strict: bool = True) -> dict:
    """Load a sparsecore sparse HDF5 file (``sparsecore prune --sparse``,
    :func:`save_sparse`) into ``model``, in place: each pruned weight of an
    ``nn.Linear`` (or ``Conv1D``) becomes a :class:`PackedLinear` built
    straight from the stored packed arrays (no dense copy of the weight;
    a ``Conv1D``'s, stored ``(in, out)``, and a format-1 CSR pass through
    a CSR), every other tensor is copied into the model's own.

    All of the file is read and checked before the model is touched: a
    missing or extra name, a shape that differs, or a damaged file raises
    and leaves the model as it was.

    Parameters
    ----------
    model : torch.nn.Module
        Built with the file's architecture, on the CPU.
    path : str or os.PathLike
        The sparse HDF5 file; tensor names are the model's state-dict keys.
    format : {"auto", "smallest", "delta8", "bitmask", "nm"}, optional
        Repack every swapped weight in this format; as stored by default.
    include : iterable of str, optional
        Module names (``fnmatch`` patterns) to swap; every pruned Linear by
        default. The others' weights are loaded dense (zeros where pruned).
        A layer whose packed weight would read as many bytes as its dense
        one stays dense too.
    strict : bool
        Refuse a file that lacks one of the model's tensors (tied copies of
        a loaded tensor excepted) or holds one the model lacks.

    Returns
    -------
    dict
        Module name -> ``{"format", "nbytes", "dense_nbytes", "swapped"}``
        for every pruned Linear of the file.
    """
    from sparsecore.io import open_weights
    from sparsecore.io.sparse import SparseFile

    f = open_weights(path)
    try:
        if not isinstance(f, SparseFile):
            raise ValueError(f"load_sparse: {os.fspath(path)} is a {f.format} file, not a sparsecore sparse file; "
                             f"load it with model.load_state_dict")
        state = model.state_dict(keep_vars=True)
        extra = [n for n in f.entries if n not in state]
        if extra and strict:
            raise ValueError(f"load_sparse: {len(extra)} tensor(s) of {os.fspath(path)} are not in the model, "
                             f"first {extra[0]!r} (strict=False skips them)")
        packed, report = {}, {}
        for mname, m in model.named_modules():
            key = f"{mname}.weight" if mname else "weight"
            if key not in f.pruned or not (isinstance(m, nn.Linear) or _is_conv1d(m)):
                continue
            if m.weight.device.type != "cpu" and not m.weight.is_meta:
                raise ValueError(f"load_sparse: {mname!r} is on {m.weight.device}; the packed kernels run on the CPU")
            if tuple(f.entries[key].shape) != tuple(m.weight.shape):
                raise ValueError(f"load_sparse: tensor {key!r} has shape {tuple(f.entries[key].shape)} in the file, "
                                 f"{tuple(m.weight.shape)} in the model")
            p = f.packed(key)
            dense_nbytes = m.weight.numel() * torch.empty(0, dtype=m.weight.dtype).element_size()
            wanted = format or p.format
            if _is_conv1d(m):
                p = sc.pack(p.to_csr().T.tocsr(), wanted, dtype=p.dtype, name=key)
            elif wanted != p.format:
                p = sc.pack(p.to_csr(), wanted, dtype=p.dtype, name=key)
            swap = (include is None or any(fnmatch.fnmatchcase(mname, pat) for pat in include)) \
                and p.nbytes < dense_nbytes
            report[mname] = {"format": p.format, "nbytes": p.nbytes, "dense_nbytes": dense_nbytes, "swapped": swap}
            if swap:
                packed[mname] = p
        values = {}
        for name, e in f.entries.items():
            if name not in state or name.rpartition(".")[0] in packed and name.endswith(".weight"):
                continue
            if tuple(e.shape) != tuple(state[name].shape):
                raise ValueError(f"load_sparse: tensor {name!r} has shape {tuple(e.shape)} in the file, "
                                 f"{tuple(state[name].shape)} in the model")
            values[name] = _file_tensor(f, name)
    finally:
        f.close()
    loaded = {id(state[n]) for n in values} | {id(state[f"{m}.weight"]) for m in packed}
    missing = [n for n, t in state.items() if n not in values and id(t) not in loaded
               and not (n.endswith(".weight") and n.rpartition(".")[0] in packed)]
    if missing and strict:
        raise ValueError(f"load_sparse: {len(missing)} tensor(s) of the model are not in {os.fspath(path)}, "
                         f"first {missing[0]!r} (strict=False leaves them as they are)")
    with torch.no_grad():
        for name, v in values.items():
            t = state[name]
            if t.is_meta:
                owner, _, leaf = name.rpartition(".")
                mod = model.get_submodule(owner) if owner else model
                new = v.to(t.dtype).clone() if v.dtype != t.dtype or not v.is_contiguous() else v
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                setattr(mod, leaf, new)
            else:
                t.copy_(v)
    for mname, p in packed.items():
        m = model.get_submodule(mname)
        bias = None
        if m.bias is not None:
            bias = values.get(f"{mname}.bias", m.bias).detach()
        _set_module(model, mname, PackedLinear(p, bias))
    return report


def _set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_sparse_linear(model: nn.Module, masks: Mapping | None = None) -> nn.Module:
    """Replace ``nn.Linear`` modules by :class:`SparseLinear`, in place.

    With ``masks`` (name ``"fc.weight"`` -> keep-mask, or a ``PruneResult``),
    only those layers, pruned by their masks; without, every Linear, storing
    its non-zeros.
    """
    if isinstance(masks, sc.PruneResult):
        masks = masks.masks
    targets = {}
    for mname, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            key = f"{mname}.weight" if mname else "weight"
            if masks is None or key in masks:
                targets[mname] = (m, None if masks is None else masks[key])
    for mname, (m, mask) in targets.items():
        _set_module(model, mname, SparseLinear.from_linear(m, mask))
    return model


def _bn_dict(bn):
    return {"weight": _host(bn.weight) if bn.weight is not None else None,
            "bias": _host(bn.bias) if bn.bias is not None else None,
            "running_mean": _host(bn.running_mean), "running_var": _host(bn.running_var)}


def shrink_model(model: nn.Module, chain: Iterable[str], keep: Mapping) -> nn.Module:
    """A smaller copy of ``model`` with units removed from a chain of modules.

    Parameters
    ----------
    chain : module names in order
        ``Linear``, ``Conv1d/2d/3d`` (groups 1) and ``BatchNorm1d/2d/3d``
        modules, each conv/linear feeding the next (a batch norm follows the
        layer it normalises; activations and pooling in between are fine,
        a flatten over positions is not).
    keep : mapping layer name -> bool vector
        Units (output features, filters) to keep, e.g. ``PruneResult.groups``
        of ``prune(..., pattern=Units())`` keyed by ``"<module>.weight"`` or
        by module name.

    Returns
    -------
    nn.Module
        A deep copy with new, smaller modules; it computes what the masked
        model computes (removed units output zero).
    """
    chain = list(chain)
    model = copy.deepcopy(model)
    layers, bns, order = {}, {}, []
    for name in chain:
        m = model.get_submodule(name)
        if isinstance(m, PRUNABLE_TYPES):
            if getattr(m, "groups", 1) != 1:
                raise ValueError(f"module {name!r} is a grouped convolution (groups={m.groups}); "
                                 f"shrink handles groups=1")
            layout = "oi" if isinstance(m, nn.Linear) else "oi" + "hwd"[: m.weight.ndim - 2]
            layers[name] = sc.Layer(_host(m.weight), None if m.bias is None else _host(m.bias), layout)
            order.append(name)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not order:
                raise ValueError(f"batch norm {name!r} comes before any layer of the chain")
            layers[order[-1]].bn = {k: v for k, v in _bn_dict(m).items() if v is not None}
            bns[order[-1]] = name
        else:
            raise TypeError(f"module {name!r} is a {type(m).__name__}; a chain holds Linear, Conv and BatchNorm")
    k = {}
    for key, v in keep.items():
        lname = key[:-7] if key.endswith(".weight") else key
        if lname not in layers:
            raise ValueError(f"keep names {key!r}, which is not a Linear/Conv of the chain {order}")
        k[lname] = np.asarray(v)
    small = sc.shrink({n: layers[n] for n in order}, k)
    for name in order:
        old = model.get_submodule(name)
        lay = small[name]
        w = torch.from_numpy(np.ascontiguousarray(lay.weight)).to(old.weight.dtype)
        out_f, in_f = w.shape[0], w.shape[1]
        if isinstance(old, nn.Linear):
            new = nn.Linear(in_f, out_f, bias=old.bias is not None)
        else:
            new = type(old)(in_f, out_f, old.kernel_size, stride=old.stride, padding=old.padding,
                            dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if old.bias is not None:
                new.bias.copy_(torch.from_numpy(np.ascontiguousarray(lay.bias)))
        new.train(old.training)
        _set_module(model, name, new)
        if name in bns:
            ob = model.get_submodule(bns[name])
            nb = type(ob)(out_f, eps=ob.eps, momentum=ob.momentum, affine=ob.affine,
                          track_running_stats=ob.track_running_stats).to(device=old.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    if key in lay.bn and getattr(nb, key) is not None:
                        getattr(nb, key).copy_(torch.from_numpy(np.ascontiguousarray(lay.bn[key])))
                if ob.num_batches_tracked is not None:
                    nb.num_batches_tracked.copy_(ob.num_batches_tracked)
            nb.train(ob.training)
            _set_module(model, bns[name], nb)
    return model


def masked_state_dict(model: nn.Module, masks: Mapping | None = None) -> dict:
    """A state dict for the original architecture (loads with ``strict=True``):
    dense weights with zeros where pruned. ``torch.nn.utils.prune``'s
    ``weight_orig``/``weight_mask`` are folded into ``weight``."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("_orig"):
            base = k[:-5]
            sd[base] = (v * model.state_dict()[base + "_mask"]).detach().clone()
        elif k.endswith("_mask") and k[:-5] + "_orig" in model.state_dict():
            continue
        else:
            sd[k] = v.detach().clone()
    for name, mask in (masks or {}).items():
        if name not in sd:
            raise ValueError(f"masks name {name!r}, which is not in the model's state dict")
        sd[name] = sd[name] * _mask_tensor(mask, sd[name], name).to(sd[name].dtype)
    return sd


def save_sparse(model: nn.Module, path, masks: Mapping, *, criterion: str = "given masks",
                force: bool = False) -> sc.io.FileResult:
    """Write the model's state dict as sparsecore sparse HDF5: the masked
    tensors as CSR, everything else as stored. ``sparsecore densify`` turns
    it back into a ``.pt`` that loads with ``strict=True``."""
    from sparsecore.io import prune_file

    sd = masked_state_dict(model)
    with tempfile.TemporaryDirectory(prefix="sparsecore-") as d:
        src = os.path.join(d, "model.pt")
        torch.save(sd, src)
        np.savez(os.path.join(d, "masks.npz"), **{k: np.asarray(v, np.float32) for k, v in masks.items()})
        return prune_file(src, path, threshold=0.5, scores=os.path.join(d, "masks.npz"), criterion=criterion,
                          tensors=list(masks), sparse=True, force=force)


# --- sequential calibration: prune block by block, repairing each layer ---------------

def _stack_of(model):
    """The model's stack of repeated blocks (a transformer's layers): the
    ``nn.ModuleList`` holding the most prunable parameters whose every child
    holds a Linear or a convolution; ``(name, list)`` or ``(None, None)``."""
    best, best_size = (None, None), 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(
                any(isinstance(x, PRUNABLE_TYPES) for x in child.modules()) for child in m):
            size = sum(p.numel() for x in m.modules() if isinstance(x, PRUNABLE_TYPES) for p in x.parameters())
            if size > best_size:
                best, best_size = (name, m), size
    return best


def _forward(model, batch):
    """Run the model on a calibration batch: a dict of keyword inputs (a
    Hugging Face batch), a tuple/list (its first item is the input) or a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _stack_inputs(model, stack, data, max_batches=None):
    """Each calibration batch's call of the stack's first block, ``[args, kwargs, padding mask]``: the
    model run on the batch until a pre-hook there catches the call and stops it."""
    cache = []

    def catch(module, args, kwargs):
        cache.append([args, kwargs, None])
        raise sc.StopForward

    h = stack[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in _calibration(data, max_batches):
            try:
                _forward(model, batch)
            except sc.StopForward:
                cache[-1][2] = _token_mask(batch)
    finally:
        h.remove()
    return cache


@contextlib.contextmanager
def _no_kv_cache(model):
    """A Hugging Face model's ``config.use_cache`` off for a block (blocks run alone on cached inputs keep no
    key/value cache), put back after."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False
        yield
    finally:
        if use_cache is not None:
            config.use_cache = use_cache


def _token_mask(batch):
    """The 2-D padding mask of a Hugging Face batch (True = a real token), or None."""
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].detach().cpu().numpy().astype(bool)
    return None


def _hessian_feed(module, name):
    """``(features, rows(x, mask))``: a module's input ``x`` as the 2-D rows
    its weights multiply (convolutions: unfolded patches; padding tokens left
    out); ``None`` for layers the reconstruction leaves out."""
    if isinstance(module, nn.Linear):
        features = module.in_features

        def rows(x, mask):
            a = x.detach().reshape(-1, features)
            if mask is not None and mask.size == a.shape[0]:
                a = a[torch.as_tensor(mask.reshape(-1), device=a.device)]
            return a
        return features, rows
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and not isinstance(module.padding, str) \
            and module.padding_mode == "zeros":
        two = isinstance(module, nn.Conv2d)
        k = module.kernel_size if two else (1, module.kernel_size[0])
        st = module.stride if two else (1, module.stride[0])
        pd = module.padding if two else (0, module.padding[0])
        dl = module.dilation if two else (1, module.dilation[0])
        features = module.in_channels * k[0] * k[1]

        def rows(x, mask):
            a = x.detach() if two else x.detach()[:, :, None, :]
            patches = nn.functional.unfold(a, k, dilation=dl, padding=pd, stride=st)  # (N, C·kh·kw, L)
            return patches.transpose(1, 2).reshape(-1, features)
        return features, rows
    return None


_GRAM_TILE = 256  # columns per tile of the Gram products: one triangle of tiles is formed


class _GramSum:
    """``Σ aᵀa`` of a layer's input rows, formed by PyTorch in its own threads
    and where the inputs live (NumPy's BLAS threads, woken between the layers
    of a forward pass, would fight PyTorch's over the cores: twice the wall
    time on two): in float32 a chunk at a time unless the inputs are float64,
    summed in float64, as the accumulator's "mixed" precision does; handed to
    the :class:`sparsecore.HessianAccumulator` (which checks it) once. Only the
    tiles on and below the diagonal are multiplied (PyTorch has no ``syrk``):
    0.58 to 0.67 of the full product's work for 512 to 1,536 features."""

    def __init__(self, acc):
        self.acc, self.sum, self.cross, self.count, self.cross_count = acc, None, None, 0, 0
        d = acc.features
        self.tiles = [(t, min(t + _GRAM_TILE, d)) for t in range(0, d, _GRAM_TILE)]

    def add(self, a, dense=None):
        """Add rows ``a``; ``dense``: the same rows as the dense model gives
        them, for the cross term ``Σ (x − x̂) x̂ᵀ``."""
        single = a.dtype != torch.float64 and (dense is None or dense.dtype != torch.float64)
        a = a.float() if single else a.double()
        d = a.shape[1]
        if self.sum is None:
            self.sum = torch.zeros((d, d), dtype=torch.float64, device=a.device)
            if self.acc.has_cross:
                self.cross = torch.zeros((d, d), dtype=torch.float64, device=a.device)
        for t0 in range(0, a.shape[0], self.acc.chunk):
            part = a[t0:t0 + self.acc.chunk]
            for i, (r0, r1) in enumerate(self.tiles):  # the lower triangle of tiles
                left = part[:, r0:r1].T
                for c0, c1 in self.tiles[:i + 1]:
                    self.sum[r0:r1, c0:c1] += left @ part[:, c0:c1]
            if dense is not None:  # the difference first: x − x̂ is small, x xᵀ − x̂ x̂ᵀ would cancel
                self.cross += (dense[t0:t0 + self.acc.chunk].to(part.dtype) - part).T @ part
                self.cross_count += part.shape[0]
            self.count += part.shape[0]

    def flush(self):
        """Hand the sums over; a cross term formed on part of the tokens
        (``dense_batches``) is scaled to all of them."""
        if self.sum is not None and self.count:
            cross = None
            if self.cross is not None:
                cross = _host(self.cross) * (self.count / self.cross_count if self.cross_count else 0.0)
            self.acc.update_gram(_host(self.sum), self.count, cross, triangle="lower")  # no mirror copy
        self.sum, self.cross, self.count, self.cross_count = None, None, 0, 0
        return self.acc


class _TorchHooks(sc.SequentialHooks):
    """:func:`sparsecore.prune_sequential`'s hooks for a PyTorch model: a
    transformer's stack of blocks carried from block to block, or (no stack)
    every Linear and convolution reached by running the model up to it;
    inputs caught by forward pre-hooks, Gram sums formed by PyTorch where
    the inputs live, weights swapped without a copy for the dense passes."""

    def __init__(self, model, data, include, exclude, max_batches):
        self.model, self.data, self.include, self.exclude, self.max_batches = model, data, include, exclude, \
            max_batches
        self.leaves = None  # weight name -> (module, features, rows), found by layers()
        self.stack_name, self.stack, self._blocks = None, None, []

    def layers(self):
        chosen = prunable(self.model, self.include, self.exclude)
        self.leaves = {}
        for mname, m in self.model.named_modules():
            key = f"{mname}.weight" if mname else "weight"
            if key in chosen and isinstance(m, PRUNABLE_TYPES):
                feed = _hessian_feed(m, key)
                if feed is not None:
                    self.leaves[key] = (mname, m, *feed)
        if not self.leaves:
            raise ValueError("no Linear, Conv1d or Conv2d layer to prune (grouped and padding-mode convolutions "
                             "are left out)")
        self.stack_name, self.stack = _stack_of(self.model)
        self.carry = self.stack is not None
        return {key: sc.Feed(f, ("linear", f) if isinstance(m, nn.Linear) else None)
                for key, (_, m, f, _) in self.leaves.items()}

    def blocks(self):
        if not self.carry:  # MLPs, CNNs: each layer in turn, the model run up to it
            self._blocks = [[key] for key in self.leaves]
        else:  # the layers outside the stack (embeddings, a language model's head) are left alone
            self._blocks = [[key for key, (mname, *_) in self.leaves.items()
                             if mname.startswith(f"{self.stack_name}.{i}.")] for i in range(len(self.stack))]
        return self._blocks

    def inputs(self):
        if not self.carry:
            return _calibration(self.data, self.max_batches)
        return _stack_inputs(self.model, self.stack, self.data, self.max_batches)

    def run(self, block, item, catch):
        names = self._blocks[block]
        hooks = []
        if catch is not None:
            hooks = [self.leaves[n][1].register_forward_pre_hook(lambda m, a, n=n: catch(n, a[0])) for n in names]
        try:
            if self.carry:
                return self.stack[block](*item[0], **item[1])

            def stop(module, args):
                raise sc.StopForward
            hooks.append(self.leaves[names[-1]][1].register_forward_pre_hook(stop))  # after catch: sees x first
            return _forward(self.model, item)
        finally:
            for h in hooks:
                h.remove()

    def advance(self, item, output):
        return _advance(item, output)

    def rows(self, name, x, item):
        return self.leaves[name][3](x, item[2] if self.carry else _token_mask(item))

    def gram(self, acc):
        return _GramSum(acc)

    def read(self, name):
        w = _host(_param_of(self.leaves[name][1], "weight"))
        return w.astype(np.float32) if w.dtype == np.float16 else w

    def write(self, name, array):
        p = _param_of(self.leaves[name][1], "weight")
        with torch.no_grad():
            p.copy_(torch.as_tensor(array).to(dtype=p.dtype, device=p.device))

    def backup(self, name):
        return _param_of(self.leaves[name][1], "weight").detach().clone()

    def restore(self, name, saved):
        with torch.no_grad():
            _param_of(self.leaves[name][1], "weight").copy_(saved)

    @contextlib.contextmanager
    def dense_weights(self, saved):
        """The backups in place of the pruned weights (storage swapped, not copied)."""
        swapped = []
        try:
            for name, dense in saved.items():
                p = _param_of(self.leaves[name][1], "weight")
                swapped.append((p, p.data))
                p.data = dense
            yield
        finally:
            for p, pruned in swapped:
                p.data = pruned

    @contextlib.contextmanager
    def session(self):
        with _preserved(self.model, "eval"), torch.no_grad(), _no_kv_cache(self.model):
            yield


def prune_sequential(model: nn.Module, data: Iterable, *, sparsity=None, pattern=None, method: str = "sparsegpt",
                     update: str | None = None, scope: str | None = None, include=None, exclude=(),
                     max_batches: int | None = None, damp: float = 0.01, blocksize: int = 128,
                     refit: str | None = None, order: str = "block", dense_target: float = 0.0,
                     dense_batches: int | None = None, dense_layers=None, progress=None, keep: str = "all",
                     restore: bool = True) -> sc.PruneResult:
    """Prune a model block by block, each from the inputs that the already
    pruned blocks before it produce, and repair each layer (SparseGPT's
    sequential calibration, for any model).

    Blocks: the layers of a transformer (the ``nn.ModuleList`` of repeated
    blocks, found in the model: a Hugging Face decoder's or encoder's
    layers), whose calibration inputs are caught once at the first block and
    then carried from block to block, one block's activations held at a time;
    for other models (MLPs, CNNs) every Linear and convolution in turn, its
    inputs caught by running the model up to it. Within a block the layers
    are calibrated on one pass of the block (or, ``order="layer"``, each on
    what the layers pruned before it give: o_proj on the pruned q/k/v,
    down_proj on the pruned gate/up); layers fed the very same tensor (q/k/v,
    gate/up) share one H; the block is run once more for the next block's
    inputs. For each layer
    ``H = Σ x xᵀ`` of its inputs (convolutions: unfolded patches; padding
    tokens of a Hugging Face batch left out; the products formed by PyTorch)
    gives the mask and the update.

    Parameters
    ----------
    data : iterable of batches
        Calibration batches: dicts of keyword inputs (Hugging Face), tuples
        ``(inputs, ...)`` or input tensors. Read once per block (twice for a
        transformer's first block): a list or a ``DataLoader``.
    sparsity, pattern
        A fraction for every layer, or per layer (a mapping by weight name:
        a global allocation made beforehand), or an N:M pattern ("2:4").
    method : {"sparsegpt", "wanda", "magnitude", "obs"}
        ``"sparsegpt"``: the mask chosen inside the OBS sweep while the kept
        weights are updated. The others select with the engine
        (``|w|·‖x‖``, ``|w|``, ``w²/[H⁻¹]ⱼⱼ²``), then ``update``.
    update : {None, "obs", "refit", "obs+refit"}
        For the other methods: how the kept weights are repaired (None: not).
    scope : {"local", "row"}, optional
        Ranking within a layer or within each output row (default: "row" for
        wanda, as its authors do; "local" otherwise).
    include, exclude
        As :func:`prunable`: which layers (the ``weight`` of Linear and
        Conv1d/Conv2d modules; grouped convolutions are left out).
    damp, blocksize, refit
        As :func:`sparsecore.sparsegpt` and :func:`sparsecore.reconstruct`.
    order : {"block", "layer"}
        Within a transformer block, ``"block"``: all of the block's layers
        from one pass of the block as it was before any of them was pruned
        (as SparseGPT's reference code and llmcompressor do); ``"layer"``:
        each group of layers calibrated on what the ones pruned before it
        give (one pass of the block per group: about 1.35 times the time on
        SmolLM2, where it did better at 50% but worse at 2:4 and 70%; see
        ``bench/llm.py``).
    dense_target : float in [0, 1]
        What each layer's repair reproduces, from the inputs ``X̂`` the
        pruned layers before it give: 0, its own outputs ``W X̂``
        (SparseGPT's objective ``‖W X̂ − Ŵ X̂‖²``); 1, the dense model's
        outputs ``W X`` (so that each layer also makes up for the errors of
        those before it); between, ``W X̂ + a·W (X − X̂)``. Above 0 the blocks
        are also run with their dense weights, beside the pruned ones (about
        twice the forward passes, a second ``d_in²`` matrix per layer; see
        :class:`sparsecore.HessianAccumulator`'s ``cross``), and an update is
        needed (``method="sparsegpt"``, or ``update``).
    dense_batches : int, optional
        With ``dense_target``: run the dense model on the first
        ``dense_batches`` calibration batches only, and form the cross term
        on their tokens (scaled to all of them); ``H`` still comes from every
        batch. Fewer dense forward passes and products, a noisier cross
        term (None: every batch).
    dense_layers : iterable of str, optional
        With ``dense_target``: the layers (weight names, fnmatch patterns) whose
        repair aims toward the dense model; the others keep SparseGPT's
        objective and skip the cross products (None: all). A group of layers
        sharing one input follows its first layer.
    progress : callable (done, total, name), optional
    keep, restore
        As :func:`sparsecore.prune_sequential`: ``keep="summary"`` and
        ``restore=False`` hold no copy of the layers beside the model (for a
        caller that saves the model, and discards it on a failure).

    Returns
    -------
    sparsecore.PruneResult
        Masks, CSR of the new weights and the summary; the model's weights
        are replaced in place. If anything fails, every weight already
        changed is restored before the error is raised (a copy of the pruned
        weights is held meanwhile).
    """
    hooks = _TorchHooks(model, data, include, exclude, max_batches)
    return sc.prune_sequential(hooks, sparsity=sparsity, pattern=pattern, method=method, update=update,
                               scope=scope, damp=damp, blocksize=blocksize, refit=refit, order=order,
                               dense_target=dense_target, dense_batches=dense_batches, dense_layers=dense_layers,
                               progress=progress, keep=keep, restore=restore)


def outlier_sparsities(model: nn.Module, data: Iterable, sparsity: float, *, include=None, exclude=(),
                       max_batches: int | None = None, m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """OWL's per-layer sparsities for :func:`prune_sequential` (``sparsity=``
    this mapping): Wanda's ``|w|·‖x‖`` of each layer of the model's stack of
    blocks from one dense pass over ``data``, each block a group, handed to
    :func:`sparsecore.outlier_allocation` (``m``, ``lam``: OWL's M = 5 and
    λ = 0.08). The blocks with more outliers are pruned less; the mean over
    blocks is ``sparsity``. The scores are formed one block at a time."""
    stack_name, stack = _stack_of(model)
    if stack is None:
        raise ValueError("OWL's allocation groups the layers by block: the model has no stack of blocks")
    chosen = prunable(model, include, exclude)
    layers = {f"{n}.weight": mod for n, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and f"{n}.weight" in chosen and n.startswith(f"{stack_name}.")}
    if not layers:
        raise ValueError("no Linear layer in the model's blocks to allocate sparsities to")
    sumsq, handles = {}, []
    for key, mod in layers.items():
        def catch(module, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sumsq[key] = sumsq.get(key, 0) + (x * x).sum(0)
        handles.append(mod.register_forward_pre_hook(catch))
    try:
        with _preserved(model, "eval"), torch.no_grad():
            for batch in _calibration(data, max_batches):
                _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [k for k in layers if k not in sumsq]
    if missing:
        raise ValueError(f"the calibration batches never reach {missing[:3]}")

    class _Scores(Mapping):  # |w|·‖x‖ of one layer when asked for: a block's at a time, not the model's
        def __getitem__(self, key):
            w = _host(_param_of(layers[key], "weight"))
            return np.abs(w) * np.sqrt(_host(sumsq[key])).astype(w.dtype)[None, :]

        def __iter__(self):
            return iter(layers)

        def __len__(self):
            return len(layers)

    groups = {k: k[len(stack_name) + 1:].split(".")[0] for k in layers}
    return sc.outlier_allocation(_Scores(), sparsity, groups=groups, m=m, lam=lam)


def _advance(item, out):
    """The next block's cached call ``[args, kwargs, mask]``: ``item``'s with
    its hidden states replaced by the block's output ``out``."""
    out = out[0] if isinstance(out, tuple) else out
    if item[0]:
        return [(out,) + tuple(item[0][1:]), item[1], item[2]]
    return [item[0], {**item[1], "hidden_states": out}, item[2]]  # hidden states passed by keyword


def _calibration(data, max_batches):
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
