"""Repair what pruning leaves: update the kept weights of each layer so that
its outputs on calibration inputs change as little as possible.

For a layer ``y = W x`` with calibration inputs ``X`` (features x samples),
pruning to ``Ŵ`` (zero where the mask prunes) costs ``‖W X − Ŵ X‖²``, which
depends on ``X`` only through ``H = X Xᵀ`` (:class:`HessianAccumulator`,
streamed batch by batch). Two updates of the kept weights:

- the OBS sweep of SparseGPT (Frantar & Alistarh 2023): columns are pruned
  left to right and each pruning error is spread over the columns not yet
  processed through the Cholesky factor of ``H⁻¹`` (damped), in column
  blocks with lazy batched updates. The mask is given (any selection of the
  engine) or chosen inside the sweep by ``w² / [H⁻¹]ⱼⱼ²`` (:func:`sparsegpt`);
- the exact refit for a given mask: per row, the least-squares solution over
  the kept columns ``ŵ_K = (w H)_K (H_KK)⁻¹`` (Cholesky per row), or batched
  conjugate gradients over all rows where that costs too much.

Weights are ``(out, in)`` 2-D views by default (PyTorch ``Linear`` and
``OIHW`` convolutions, whose inputs are unfolded ``(C, kh, kw)`` patches), or
``layout="io"`` for Keras ``(in, out)`` kernels and ``HWIO`` convolutions
(patches ``(kh, kw, C)``). Arithmetic is float64 (LAPACK/BLAS through NumPy
and SciPy); results come back in each weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import scipy.linalg as la
from numpy.typing import ArrayLike

from ._kernels import cpu_reconstruct, cpu_select
from ._validate import as_float_array, check_fraction, is_integer, nonfinite_error
from .importance import Criterion, register_criterion
from .patterns import NM, pattern_of
from .prune import PruneResult, prune

__all__ = ["HessianAccumulator", "LayerProblem", "RepairMethod", "check_layer_options", "get_repair", "list_repairs",
           "obs_saliency", "prune_layer", "reconstruct", "register_repair", "sparsegpt", "unfold_patches"]

_LAYOUTS = ("oi", "io")
_CHUNK = 16384  # tokens converted to float64 at a time


class HessianAccumulator:
    """``H = Σ x xᵀ`` over the inputs ``x`` of one layer, streamed and mergeable.

    Parameters
    ----------
    features : int
        Input features of the layer (``d_in``; for a convolution
        ``C * kh * kw``, see :func:`unfold_patches`). ``H`` takes ``d_in²``
        float64 entries.
    memory_limit : int
        Bytes ``H`` may take; more is refused when the accumulator is built.
    name : str
        Names the layer in error messages.
    precision : {"mixed", "float64"}
        ``"mixed"``: float32 inputs are multiplied in float32, a chunk of
        16,384 tokens at a time (twice the speed of float64 BLAS), and the
        chunks summed in float64; float64 inputs in float64. ``"float64"``:
        every product in float64.
    cross : bool
        Also keep ``G = Σ (x − x̂) x̂ᵀ`` between the inputs ``x̂`` the layer gets
        in the partly pruned model and the inputs ``x`` it gets in the dense
        one (``update(x̂, dense=x)``; ``d_in²`` more entries). With it the
        repair aims at the dense model's outputs, ``‖W X − Ŵ X̂‖²``, rather
        than at the layer's own outputs on the pruned model's inputs
        (SparseGPT's ``‖W X̂ − Ŵ X̂‖²``), correcting the errors of the layers
        pruned before it; see :func:`reconstruct`.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> acc = sc.HessianAccumulator(3)
    >>> acc.update(np.eye(3)).update(np.ones((2, 3))).count
    5
    >>> acc.hessian()
    array([[3., 2., 2.],
           [2., 3., 2.],
           [2., 2., 3.]])
    """

    #: Inputs multiplied in float32 at a time ("mixed" precision) before their product joins the float64 sum.
    chunk = _CHUNK

    def __init__(self, features: int, *, memory_limit: int = 4 << 30, name: str = "layer",
                 precision: str = "mixed", cross: bool = False):
        if not is_integer(features) or features < 1:
            raise ValueError(f"features of {name!r} must be a positive integer, got {features!r}")
        if precision not in ("mixed", "float64"):
            raise ValueError(f"precision must be 'mixed' or 'float64', got {precision!r}")
        if not isinstance(cross, (bool, np.bool_)):
            raise TypeError(f"cross must be True or False, got {cross!r}")
        self.precision = precision
        need = int(features) ** 2 * 8 * (2 if cross else 1)
        if need > memory_limit:
            what = "and the cross term G need 2 x " if cross else "needs "
            raise ValueError(f"the Hessian of {name!r} {what}{features}² float64 = {need / 2**20:.1f} MiB, over "
                             f"memory_limit={memory_limit / 2**20:.1f} MiB; raise memory_limit, or leave the "
                             f"layer out of the reconstruction")
        self.features, self.name = int(features), name
        self._upper = np.zeros((self.features, self.features), np.float64, order="F")  # sum in the upper triangle
        # G = Σ (x − x̂) x̂ᵀ, Fortran-ordered like the sum (None: the objective of SparseGPT)
        self._cross = np.zeros((self.features, self.features), np.float64, order="F") if cross else None
        self.count = 0
        self._memo = {}  # H and its inverse factors, for the layers that share this accumulator

    @property
    def has_cross(self) -> bool:
        """Whether the accumulator keeps the cross term ``G`` (``cross=True``)."""
        return self._cross is not None

    def _rows(self, x, mask, what):
        a = as_float_array(x, self.name, what)
        if a.ndim == 0 or a.shape[-1] != self.features:
            raise ValueError(f"{what} of {self.name!r} have shape {a.shape}; the last axis must hold "
                             f"{self.features} features")
        a = a.reshape(-1, self.features)
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.size != a.shape[0]:
                raise ValueError(f"mask for {self.name!r} must be bool with one entry per token "
                                 f"({a.shape[0]}), got {m.dtype} of shape {m.shape}")
            a = a[m.reshape(-1)]
        a = np.ascontiguousarray(a)
        _refuse_nonfinite(a, self.name, what)
        return a

    def update(self, x: ArrayLike, mask: ArrayLike | None = None, *, dense: ArrayLike | None = None
               ) -> "HessianAccumulator":
        """Add inputs ``x`` of shape ``(..., features)`` (every leading axis
        is samples or tokens); ``mask`` (shaped like ``x`` without its last
        axis, True = real) leaves padding tokens out. ``dense``: with
        ``cross=True`` (and only then), the same inputs as the dense model
        gives them, shaped like ``x``."""
        if (dense is None) == self.has_cross:
            raise ValueError(f"the accumulator of {self.name!r} " + (
                "keeps the cross term (cross=True): pass dense=, the dense model's inputs" if self.has_cross else
                "has no cross term: dense= needs HessianAccumulator(..., cross=True)"))
        a = self._rows(x, mask, "inputs")
        if dense is not None:
            d = self._rows(dense, mask, "dense inputs")
            if d.shape != a.shape:
                raise ValueError(f"dense inputs of {self.name!r} have {d.shape[0]} tokens, the inputs "
                                 f"{a.shape[0]}; give the same tokens twice")
        if a.size:
            single = a.dtype == np.float32 and self.precision == "mixed"
            if dense is not None:
                single = single and d.dtype == np.float32
            for t0 in range(0, a.shape[0], _CHUNK):  # copies of bounded size
                part = np.ascontiguousarray(a[t0:t0 + _CHUNK], np.float32 if single else np.float64)
                # part.T is Fortran-ordered (features, tokens): syrk forms part.T @ part in the upper triangle
                if single:
                    self._upper += la.blas.ssyrk(1.0, part.T, trans=0, lower=0)
                else:
                    la.blas.dsyrk(1.0, part.T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1)
                if dense is not None:  # the difference first: x − x̂ is small, x xᵀ − x̂ x̂ᵀ would cancel
                    delta = np.asarray(d[t0:t0 + _CHUNK], part.dtype) - part
                    self._cross += delta.T @ part
        self.count += a.shape[0]
        self._memo = {}
        return self

    def update_gram(self, gram: ArrayLike, count: int, cross: ArrayLike | None = None, *,
                    triangle: str = "both") -> "HessianAccumulator":
        """Add ``Σ x xᵀ`` of ``count`` inputs formed elsewhere: by a framework
        in its own thread pool (the PyTorch adapter does, so that BLAS and
        the framework do not fight over the cores), or on a GPU, where only
        the ``d_in²`` product crosses to the host. ``gram``: ``(features,
        features)``, symmetric (``triangle="both"``: one triangle is read),
        or only its ``"upper"`` or ``"lower"`` triangle (with the diagonal)
        holds the sum, as BLAS ``syrk`` leaves it, and the other is not read:
        no copy is made to mirror it. ``cross``: with ``cross=True`` (and only
        then), ``Σ (x − x̂) x̂ᵀ`` of the same inputs."""
        if triangle not in ("both", "upper", "lower"):
            raise ValueError(f"triangle must be 'both', 'upper' or 'lower', got {triangle!r}")
        g = self._square(gram, "Gram matrix", None)
        # the sum is kept in the upper triangle, Fortran-ordered: add gram or its transpose, whichever holds
        # the sum there, in that memory order when it may choose (a strided add runs several times slower)
        if _any_nonfinite(g):  # one scan when all is finite
            if triangle != "both":  # only a value in the triangle read is an error
                g = np.tril(g) if triangle == "lower" else np.triu(g)
            _refuse_nonfinite(g, self.name, "inputs (their Gram matrix)")
        t = g.T if triangle == "lower" or (triangle == "both" and g.flags.c_contiguous) else g
        if not is_integer(count) or count < 0:
            raise ValueError(f"count for {self.name!r} must be an integer >= 0, got {count!r}")
        if (cross is None) == self.has_cross:
            raise ValueError(f"the accumulator of {self.name!r} " + (
                "keeps the cross term (cross=True): pass cross=, the sum of (x_dense - x) x^T" if self.has_cross
                else "has no cross term: cross= needs HessianAccumulator(..., cross=True)"))
        c = None if cross is None else self._square(cross, "cross term", "inputs (their cross term)")
        self._upper += t  # below the diagonal of the sum: never read
        if c is not None:
            self._cross += c
        self.count += int(count)
        self._memo = {}
        return self

    def _square(self, m, what, bad_what):
        """``m`` as a float array of the accumulator's square shape; checked for finite values unless
        ``bad_what`` is None."""
        g = as_float_array(m, self.name, what)
        if g.shape != (self.features, self.features):
            raise ValueError(f"the {what} of {self.name!r} has shape {g.shape}; ({self.features}, "
                             f"{self.features}) needed")
        if bad_what is not None:
            _refuse_nonfinite(g, self.name, bad_what)
        return g

    def cached(self, key, make):
        """``make()``, made once and kept until the next update or merge: what
        is derived from the sum (the whole ``H``, a damped inverse factor,
        ``G``) for the layers that share these inputs."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def upper(self) -> np.ndarray:
        """The sum as kept, read-only: ``Σ x xᵀ`` in the upper triangle (and
        the diagonal) of a Fortran-ordered array; below it, undefined."""
        v = self._upper.view()
        v.flags.writeable = False
        return v

    def hessian(self) -> np.ndarray:
        """``Σ x xᵀ`` as a new symmetric float64 array."""
        return cpu_reconstruct.symmetric_from_upper(self._upper)  # only the upper triangle holds the sum

    def cross_term(self) -> np.ndarray:
        """``G = Σ (x − x̂) x̂ᵀ`` as a new float64 array (``cross=True``)."""
        if self._cross is None:
            raise ValueError(f"the accumulator of {self.name!r} keeps no cross term (cross=False)")
        return np.array(self._cross, order="C")

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Add another accumulator of the same layer (another data shard); returns ``self``."""
        if not isinstance(other, HessianAccumulator) or other.features != self.features:
            raise ValueError(f"can merge only a HessianAccumulator of {self.features} features into {self.name!r}")
        if other.has_cross != self.has_cross:
            raise ValueError(f"can merge only accumulators that both keep the cross term, or neither, into "
                             f"{self.name!r} (cross={self.has_cross})")
        self._upper += np.triu(other._upper)
        if self._cross is not None:
            self._cross += other._cross
        self.count += other.count
        self._memo = {}
        return self

    def state_dict(self) -> dict:
        """A plain dict of arrays: ``{"hessian": H, "count": n}``, and ``"cross": G`` when kept."""
        d = {"hessian": self.hessian(), "count": np.array(self.count, np.int64)}
        if self._cross is not None:
            d["cross"] = self.cross_term()
        return d

    @classmethod
    def from_state_dict(cls, d: Mapping, *, memory_limit: int = 4 << 30, name: str = "layer"):
        """Rebuild an accumulator saved by :meth:`state_dict`."""
        h = np.asarray(d["hessian"], np.float64)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"hessian of {name!r} must be square, got shape {h.shape}")
        acc = cls(h.shape[0], memory_limit=memory_limit, name=name, cross="cross" in d)
        acc._upper[...] = np.triu(h)
        if "cross" in d:
            c = np.asarray(d["cross"], np.float64)
            if c.shape != h.shape:
                raise ValueError(f"cross of {name!r} must have the Hessian's shape {h.shape}, got {c.shape}")
            acc._cross[...] = c
        acc.count = int(d["count"])
        acc._memo = {}
        return acc


def _any_nonfinite(a):
    """Whether ``a`` holds a NaN or an Inf: one pass, without the d² mask ``np.isfinite`` would allocate."""
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return cpu_select.first_nonfinite(a.ravel(order="K"))[0] > 0  # a view of a contiguous array
    return not np.isfinite(a).all()


def _refuse_nonfinite(a, name, what):
    """A ValueError naming ``name``, ``what`` and the first NaN or Inf of ``a`` (in C order), if it holds
    one."""
    if a.size and _any_nonfinite(a):
        bad, first = cpu_select.first_nonfinite(np.ascontiguousarray(a).reshape(-1))
        raise nonfinite_error(name, what, a, bad, first)


def unfold_patches(x: ArrayLike, kernel_size, *, stride=1, padding=0, dilation=1, layout: str = "nchw"):
    """The input patches a convolution multiplies: ``(samples * positions,
    C * kh * kw)``, in the order of the flattened weight (``(C, kh, kw)`` for
    ``layout="nchw"`` and ``OIHW`` weights, ``(kh, kw, C)`` for ``"nhwc"``
    and ``HWIO`` kernels), so that :class:`HessianAccumulator` sees what the
    layer sees.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.unfold_patches(np.arange(9.0).reshape(1, 1, 3, 3), 2).tolist()
    [[0.0, 1.0, 3.0, 4.0], [1.0, 2.0, 4.0, 5.0], [3.0, 4.0, 6.0, 7.0], [4.0, 5.0, 7.0, 8.0]]
    """
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    a = as_float_array(x, "inputs", "inputs")
    if a.ndim != 4:
        raise ValueError(f"convolution inputs must be 4-D (samples, C, H, W) or (samples, H, W, C), got {a.shape}")
    if layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation")
    a = np.pad(a, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, w = a.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a kernel of {(kh, kw)} with dilation {(dh, dw)} does not fit inputs of {(h, w)}")
    s = a.strides
    view = np.lib.stride_tricks.as_strided(a, (n, oh, ow, c, kh, kw),
                                           (s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw))
    if layout == "nhwc":
        view = view.transpose(0, 1, 2, 4, 5, 3)
    return np.ascontiguousarray(view).reshape(n * oh * ow, c * kh * kw)


def _pair(v, what, lo=1):
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or any(not is_integer(i) or i < lo for i in t):
        raise ValueError(f"{what} must be an integer >= {lo} or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


# --- the layer's (out, in) view and its Hessian -------------------------------

def _rows_of(w, layout, name):
    """A float64 ``(out, in)`` copy of weights in ``layout``."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout of {name!r} must be 'oi' (out, in...) or 'io' (...in, out), got {layout!r}")
    a = np.asarray(w)
    if a.ndim < 2:
        raise ValueError(f"weights {name!r} of shape {a.shape} are not a layer: 2 or more dimensions needed")
    if layout == "oi":
        return a.reshape(a.shape[0], -1).astype(np.float64)
    return a.reshape(-1, a.shape[-1]).T.astype(np.float64)


def _back(rows, like, layout):
    """``rows`` (out, in) in the shape, layout and dtype of ``like``."""
    a = rows if layout == "oi" else rows.T
    return np.ascontiguousarray(a.reshape(like.shape)).astype(like.dtype, copy=False)


def _source(h, name, features):
    """``h`` checked: an accumulator that has seen inputs of ``features``
    features (its values were checked as they came in; ``H`` is formed only
    when a step needs it whole), or an array as a checked float64 ``(features,
    features)`` array."""
    if isinstance(h, HessianAccumulator):
        if h.count == 0:
            raise ValueError(f"the Hessian of {name!r} has seen no inputs: update it with calibration inputs first")
        _check_shape((h.features, h.features), name, features)  # another layer sharing it may read others
        return h
    return _hessian_of(h, name, features)


def _hessian_of(h, name, features):
    """``h`` (an accumulator or an array) as a checked float64 ``(features, features)`` array. An
    accumulator's is formed once (read-only) for every layer that shares it until it is updated."""
    if isinstance(h, HessianAccumulator):
        _source(h, name, features)
        return h.cached("H", lambda: _read_only(h.hessian()))  # a new array, of values checked on the way in
    H = as_float_array(h, name, "Hessian").astype(np.float64)
    _check_shape(H.shape, name, features)
    _refuse_nonfinite(H, name, "Hessian")
    return H


def _full(src, name, features):
    """The whole ``H`` of a source checked by :func:`_source`."""
    return _hessian_of(src, name, features) if isinstance(src, HessianAccumulator) else src


def _check_shape(shape, name, features):
    if shape != (features, features):
        raise ValueError(f"the Hessian of {name!r} has shape {shape}, but its weights read {features} input "
                         f"features: ({features}, {features}) needed")


def _inverse_factor(src, damp, name):
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H`` damped: ``damp``
    times its mean diagonal added, dead inputs (zero diagonal) made
    independent; ``H⁻¹ = UᵀU``), as SparseGPT sweeps with, and the dead
    inputs; ``src`` checked by :func:`_source`. An accumulator's is kept for
    the layers that share it, and formed from the triangle of its sum (the
    whole ``H`` is not needed).

    Without forming ``H⁻¹``: with ``J`` the reversal of the columns and
    ``JHJ = MMᵀ`` (Cholesky, ``M`` lower), ``U = J M⁻¹ J`` is upper triangular
    and ``UᵀU = J M⁻ᵀ M⁻¹ J = H⁻¹``: one Cholesky and one triangular inverse
    (LAPACK potrf, trtri, in place on one Fortran-ordered copy), half the
    work of inverting ``H`` and factoring the inverse.
    """
    if damp < 0 or not math.isfinite(damp):
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    acc = isinstance(src, HessianAccumulator)

    def make():
        # the upper triangle of a Fortran-ordered H: the accumulator's sum, or a symmetric C-ordered H transposed
        upper = src.upper() if acc else np.ascontiguousarray(src).T
        A, dead = cpu_reconstruct.damped_reversed(upper, float(damp))
        M, info = la.lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info > 0:
            raise ValueError(f"the Hessian of {name!r} is singular" + (" without damping; pass damp > 0 (e.g. 0.01)"
                             if damp == 0 else f" even with damp={damp}; raise damp or calibrate on more inputs"))
        Minv, info = la.lapack.dtrtri(M, lower=1, overwrite_c=1)
        if info:
            raise np.linalg.LinAlgError(f"potrf/trtri of the Hessian of {name!r} failed (LAPACK info {info})")
        # U = J M⁻¹ J: Minv's buffer reversed in place is that matrix, Fortran-ordered like Minv, upper
        # (potrf with clean=1 and trtri leave M's upper part zero)
        flat = Minv.reshape(-1, order="F")  # a view: LAPACK's output is Fortran-ordered
        cpu_reconstruct.reverse(flat)
        return _read_only(flat.reshape(Minv.shape, order="F")), dead

    return src.cached(("factor", damp), make) if acc else make()


def _read_only(a):
    a.flags.writeable = False
    return a


def obs_saliency(weights: ArrayLike, hessian, *, damp: float = 0.01, layout: str = "oi",
                 name: str = "weights") -> np.ndarray:
    """The OBS saliency ``w² / [H⁻¹]ⱼⱼ²`` of each weight (the error its
    removal alone adds to the layer's output), shaped like ``weights``; also
    the ``"obs"`` criterion (``state={"hessian": H}``).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> sc.obs_saliency(np.array([[1.0, -2.0]]), np.eye(2), damp=0.0)
    array([[1., 4.]])
    """
    w = as_float_array(weights, name)
    rows = _rows_of(w, layout, name)
    U, _ = _inverse_factor(_source(hessian, name, rows.shape[1]), damp, name)
    hinv_diag = np.einsum("ij,ij->j", U, U)  # diag(UᵀU)
    return _back(rows ** 2 / hinv_diag[None, :] ** 2, np.empty(w.shape, np.float64), layout)


def _obs_criterion(weights, state):
    if "hessian" not in state:
        raise ValueError("criterion 'obs' needs state['hessian'], the layer's H = sum of x x^T over its inputs "
                         "(a HessianAccumulator), and optionally state['layout'] ('oi' or 'io') and "
                         "state['damp']")
    return obs_saliency(weights, state["hessian"], damp=float(state.get("damp", 0.01)),
                        layout=state.get("layout", "oi"))


register_criterion(Criterion("obs", _obs_criterion, (), "w**2 / [H^-1]_jj**2 (Optimal Brain Surgeon, SparseGPT)"))


def _check_dense_target(a):
    if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)) or not 0 <= a <= 1:
        raise ValueError(f"dense_target must be a number in [0, 1], got {a!r}")
    return float(a)


def _target_rows(rows, source, damp, name, a):
    """The weights the repair aims at: ``rows`` itself, or, when ``source``
    keeps the cross term ``G = Σ (x − x̂) x̂ᵀ``, the dense layer that best gives
    the target ``T = W X̂ + a·W (X − X̂)`` (``a = 1``: the dense model's
    outputs) from the pruned model's inputs, ``W* = W + a·W G (Ĥ + λI)⁻¹``:
    since ``‖T − Ŵ X̂‖² = ‖(W* − Ŵ) X̂‖² + const`` (normal equations), the
    sweep and the refit, run on ``W*`` with ``Ĥ``, minimise the error
    against ``T`` (the asymmetric calibration of GPTAQ, Li et al. 2025,
    taken out of the sweep; its authors weigh the correction by 0.25)."""
    if not (isinstance(source, HessianAccumulator) and source.has_cross) or a == 0:
        return rows
    U, _ = _inverse_factor(source, damp, name)
    G = source.cached("G", source.cross_term)
    # (W G)(Uᵀ U) with U triangular: two BLAS trmm, half the work of two full products
    Z = la.blas.dtrmm(1.0, U, np.asfortranarray(rows @ G), side=1, lower=0, trans_a=1)
    Z = la.blas.dtrmm(1.0, U, Z, side=1, lower=0, trans_a=0, overwrite_b=1)
    return rows + a * Z


# --- the OBS sweep --------------------------------------------------------------

def _lowest(sal, k):
    """Bool, shaped like ``sal``: its ``k`` lowest entries, ties to the lower
    flat index (as a stable sort would take them), in linear time."""
    flat = sal.reshape(-1)
    out = np.zeros(flat.size, np.bool_)
    if k >= flat.size:
        out[:] = True
    elif k > 0:
        t = np.partition(flat, k - 1)[k - 1]
        out = flat < t
        ties = np.flatnonzero(flat == t)
        out[ties[:k - int(np.count_nonzero(out))]] = True
    return out.reshape(sal.shape)


def _sweep(W, U, prune=None, *, sparsity=None, nm=None, blocksize=128):
    """SparseGPT's sweep over the columns of ``W`` (out, in) with ``U`` the
    upper Cholesky factor of ``H⁻¹``: each column's pruning error spreads
    over the columns to its right. ``prune`` (bool, True = pruned) is given,
    or chosen per column block: the ``round(sparsity * entries)`` lowest
    ``w² / Uⱼⱼ²`` of the block (ties: lower flat index first), or ``nm = (n,
    m)``: per row, the ``m - n`` lowest of every ``m`` columns. Returns
    ``(W updated, prune)``."""
    W = W.copy()
    rows, cols = W.shape
    chosen = np.zeros((rows, cols), np.bool_) if prune is None else prune
    n, m = nm if nm is not None else (0, 0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = np.asfortranarray(W[:, i1:i2])  # columns contiguous for the kernel's inner loops
        U1 = np.ascontiguousarray(U[i1:i2, i1:i2])
        E1 = np.zeros_like(W1)
        block = np.ascontiguousarray(chosen[:, i1:i2])
        if prune is None and nm is None:
            d = np.diag(U1)
            block = _lowest(W1 ** 2 / d[None, :] ** 2, round(sparsity * W1.size))
            chosen[:, i1:i2] = block
        cpu_reconstruct.sweep_block(W1, U1, block, E1, i1, n, m)
        if nm is not None:
            chosen[:, i1:i2] = block
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    W[chosen] = 0.0
    return W, chosen


# --- the exact refit ------------------------------------------------------------

_EXACT_BUDGET = 2e10  # flops of per-row Cholesky solves above which the refit iterates


def _refit(W, H, prune, damp, method, start=None, tol=1e-10, max_iter=None):
    """Per row, ``argmin ‖(w − ŵ) X‖²`` with ``ŵ`` zero where ``prune``:
    ``ŵ_K = (w H)_K (H_KK + λI)⁻¹`` (``λ = damp · mean diag H``)."""
    rows, cols = W.shape
    lam = damp * float(np.mean(np.diag(H))) if cols else 0.0
    keep = ~prune
    B = W @ H
    kept = keep.sum(axis=1)
    if method == "auto":
        method = "exact" if float(np.sum(kept.astype(np.float64) ** 3)) / 3 <= _EXACT_BUDGET else "cg"
    out = np.zeros_like(W)
    if method == "exact":
        for r in range(rows):
            K = np.flatnonzero(keep[r])
            if K.size == 0:
                continue
            A = H[np.ix_(K, K)]
            if lam:
                A = A + lam * np.eye(K.size)
            try:
                out[r, K] = la.cho_solve(la.cho_factor(A, lower=True, check_finite=False), B[r, K],
                                         check_finite=False)
            except la.LinAlgError:  # rank-deficient H_KK: the least-squares solution of minimum norm
                out[r, K] = la.lstsq(A, B[r, K], check_finite=False)[0]
        return out
    # Batched conjugate gradients over all rows at once: one (rows x cols) @ H per iteration.
    x = np.where(keep, start if start is not None else W, 0.0)
    b = np.where(keep, B, 0.0)

    def apply(p):
        return np.where(keep, p @ H + lam * p, 0.0)

    r = b - apply(x)
    p = r.copy()
    rs = np.einsum("ij,ij->i", r, r)
    bnorm = np.maximum(np.einsum("ij,ij->i", b, b), 1e-300)
    for _ in range(max_iter or 4 * cols):
        if np.all(rs <= tol ** 2 * bnorm):
            break
        Ap = apply(p)
        pAp = np.einsum("ij,ij->i", p, Ap)
        alpha = np.where(pAp > 0, rs / np.where(pAp > 0, pAp, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        rs_new = np.einsum("ij,ij->i", r, r)
        p = r + (rs_new / np.maximum(rs, 1e-300))[:, None] * p
        rs = rs_new
    return x


# --- repair methods: one interface, a registry ------------------------------------

class LayerProblem:
    """One layer's repair problem, as a :class:`RepairMethod` sees it.

    ``rows``: the float64 ``(out, in)`` weights the repair aims at (the dense
    layer, or with a cross term the dense target ``W*``; read-only).
    ``source``: ``H`` (a checked :class:`HessianAccumulator` or array);
    :meth:`hessian` gives it whole, :meth:`inverse_factor` the upper Cholesky
    factor ``U`` of the damped ``H⁻¹`` (shared by the layers that share the
    accumulator). ``sparsity`` (a fraction) or ``nm`` (``(n, m)`` along the
    inputs) is the target of a method that chooses its mask; ``refit`` the
    refit's solver (None: a mask-choosing method does not refit).
    """

    def __init__(self, name, rows, source, *, damp=0.01, blocksize=128, refit=None, sparsity=None, nm=None,
                 factor=None):
        self.name, self.rows, self.source = name, _read_only(rows), source
        self.damp, self.blocksize, self.refit, self.sparsity, self.nm = damp, blocksize, refit, sparsity, nm
        self._factor = factor

    def hessian(self) -> np.ndarray:
        """``H`` whole, float64, read-only."""
        return _full(self.source, self.name, self.rows.shape[1])

    def inverse_factor(self) -> np.ndarray:
        """``U`` with ``UᵀU = (H + λI)⁻¹``, upper triangular, read-only."""
        if self._factor is None:
            self._factor = _inverse_factor(self.source, self.damp, self.name)[0]
        return self._factor


class RepairMethod:
    """A repair method: from a layer's :class:`LayerProblem`, its kept
    weights and the mask. One class, registered with :func:`register_repair`,
    is usable wherever a method or an update is named (:func:`prune_layer`,
    :func:`reconstruct`, ``prune_sequential`` in the engine and the adapters).

    A method plays one or more roles, each a method to override:

    - ``"choose"`` — :meth:`choose`: picks the mask while it updates the
      weights (SparseGPT's sweep; an ADMM search would);
    - ``"select"`` — ``criterion`` (a registered importance criterion) and
      :meth:`state`: the engine selects with it (scope, N:M, per layer);
    - ``"update"`` — :meth:`update`: the kept weights for a given mask.

    ``default_scope``: the selection's scope unless one is given;
    ``needs_kept_per_row``: the update solves per output row, so a row the
    mask empties is refused.
    """

    name: str = ""
    doc: str = ""
    roles: frozenset = frozenset()
    criterion: str | None = None
    default_scope: str = "local"
    needs_kept_per_row: bool = False

    def choose(self, problem: LayerProblem):
        """``(weights, prune)``: the updated ``(out, in)`` rows and the bool
        mask of what is pruned (True = pruned), for ``problem.sparsity`` or
        ``problem.nm``."""
        raise NotImplementedError(f"repair method {self.name!r} does not choose a mask")

    def state(self, problem: LayerProblem) -> dict:
        """The criterion's state for this layer (``"select"``)."""
        return {}

    def update(self, problem: LayerProblem, prune: np.ndarray) -> np.ndarray:
        """The kept weights ``(out, in)`` for the mask ``prune`` (True =
        pruned); entries under the mask are set to zero by the caller."""
        raise NotImplementedError(f"repair method {self.name!r} does not update the kept weights")


_REPAIRS: dict[str, RepairMethod] = {}


def register_repair(method: RepairMethod, *, overwrite: bool = False) -> RepairMethod:
    """Add a repair method under its ``name`` (``overwrite=True`` replaces
    one of that name); returns it.

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> class Halfway(sc.RepairMethod):
    ...     name, roles = "halfway", frozenset({"update"})
    ...     def update(self, problem, prune):  # halfway between the kept weights and their exact refit
    ...         return 0.5 * (problem.rows + sc.get_repair("refit").update(problem, prune))
    >>> _ = sc.register_repair(Halfway(), overwrite=True)
    >>> "halfway" in sc.list_repairs("update")
    True
    """
    if not isinstance(method, RepairMethod):
        raise TypeError(f"register_repair takes a RepairMethod, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name:
        raise ValueError(f"a repair method needs a non-empty name, got {method.name!r}")
    bad = set(method.roles) - {"choose", "select", "update"}
    if bad or not method.roles:
        raise ValueError(f"repair method {method.name!r}: roles must be a non-empty subset of "
                         f"{{'choose', 'select', 'update'}}, got {sorted(method.roles)}")
    if "select" in method.roles and method.criterion is None:
        raise ValueError(f"repair method {method.name!r} selects but names no criterion")
    if method.name in _REPAIRS and not overwrite:
        raise ValueError(f"repair method {method.name!r} is already registered; pass overwrite=True to replace it")
    _REPAIRS[method.name] = method
    return method


def list_repairs(role: str | None = None) -> list[str]:
    """The registered repair methods' names, in the order registered: all,
    or those playing ``role`` (``"choose"``, ``"select"``, ``"update"``, or
    ``"mask"``: those that choose or select a mask)."""
    roles = {"choose", "select"} if role == "mask" else {role}
    return [n for n, m in _REPAIRS.items() if role is None or roles & m.roles]


def get_repair(name: str, role: str | None = None, what: str = "method") -> RepairMethod:
    """The registered method ``name`` (playing ``role``, as in :func:`list_repairs`); else a ValueError
    naming ``what`` and the valid names."""
    m = _REPAIRS.get(name) if isinstance(name, str) else None
    if m is None or name not in list_repairs(role):
        raise ValueError(f"{what} must be one of {list_repairs(role)}, got {name!r}")
    return m


class _SparseGPT(RepairMethod):
    name, doc, roles = "sparsegpt", "SparseGPT's OBS sweep choosing the mask (w²/[H⁻¹]ⱼⱼ² per block)", \
        frozenset({"choose"})

    def choose(self, problem):
        nm = problem.nm
        block = problem.blocksize if nm is None else max(nm[1], problem.blocksize // nm[1] * nm[1])  # whole groups
        new, prune = _sweep(problem.rows, problem.inverse_factor(), sparsity=problem.sparsity, nm=nm,
                            blocksize=block)
        if problem.refit is not None:  # a row the sweep emptied stays zero: nothing to refit there
            new = np.where(prune, 0.0, _refit(problem.rows, problem.hessian(), prune, problem.damp, problem.refit,
                                              start=new))
        return new, prune


class _Selection(RepairMethod):
    """A selection by an engine criterion; no update of its own."""

    roles = frozenset({"select"})

    def __init__(self, name, criterion, doc, state=None, default_scope="local"):
        self.name, self.criterion, self.doc, self._state, self.default_scope = name, criterion, doc, state, \
            default_scope

    def state(self, problem):
        return self._state(problem) if self._state is not None else {}


class _OBS(RepairMethod):
    name, doc, roles, criterion = "obs", "the OBS saliency w²/[H⁻¹]ⱼⱼ² to select; SparseGPT's sweep to update", \
        frozenset({"select", "update"}), "obs"

    def state(self, problem):
        return {"hessian": problem.source, "damp": problem.damp}

    def update(self, problem, prune):
        return _sweep(problem.rows, problem.inverse_factor(), prune, blocksize=problem.blocksize)[0]


class _Refit(RepairMethod):
    name, doc, roles, needs_kept_per_row = "refit", "the exact least-squares refit of each row's kept weights", \
        frozenset({"update"}), True

    def update(self, problem, prune, start=None):
        return _refit(problem.rows, problem.hessian(), prune, problem.damp, problem.refit or "auto", start=start)


class _ObsRefit(_Refit):
    name, doc = "obs+refit", "the refit started from the OBS sweep (never worse than either alone)"

    def update(self, problem, prune):
        return super().update(problem, prune, start=_OBS().update(problem, prune))


class _NoUpdate(RepairMethod):
    name, doc, roles = "none", "the kept weights as they are", frozenset({"update"})

    def update(self, problem, prune):
        return problem.rows


for _m in (_SparseGPT(),
           _Selection("wanda", "wanda", "|w|·‖x‖ (Wanda), ranked within each row by default",
                      lambda p: {"x_norm": np.sqrt(np.diag(p.hessian()))}, default_scope="row"),
           _Selection("magnitude", "magnitude", "|w|"),
           _OBS(), _Refit(), _ObsRefit(), _NoUpdate()):
    register_repair(_m)


def _updated(problem, method, prune):
    """``method``'s kept weights for ``prune``, zero where pruned."""
    return np.where(prune, 0.0, method.update(problem, prune))


# --- public entry points --------------------------------------------------------

def reconstruct(weights: Mapping[str, ArrayLike], hessians: Mapping, masks: Mapping[str, ArrayLike], *,
                method: str = "obs+refit", damp: float = 0.01, blocksize: int = 128,
                layouts: Mapping[str, str] | str = "oi", refit: str = "auto", dense_target: float = 1.0
                ) -> PruneResult:
    """Update the kept weights of each layer for a given mask, so that its
    outputs on the calibration inputs change as little as possible.

    Parameters
    ----------
    weights : mapping name -> array
        The dense layers (any float dtype; computed in float64, written back
        in their dtype).
    hessians : mapping name -> HessianAccumulator or (in, in) array
        ``H = Σ x xᵀ`` of each layer's inputs.
    masks : mapping name -> bool array
        Keep-masks shaped like the weights (True = kept): any selection of the
        engine (``sparsecore.prune(...).masks``: any criterion, N:M, blocks,
        global allocation with caps, thresholds).
    method : {"obs", "refit", "obs+refit", "none"} or a registered update
        The OBS sweep of SparseGPT, the exact least-squares refit, the refit
        started from the sweep (never worse than either alone), no update, or
        any :class:`RepairMethod` registered with the ``"update"`` role.
    damp : float
        Added to ``H``'s diagonal, relative to its mean (SparseGPT's 0.01).
    blocksize : int
        Columns per lazy batched update of the sweep.
    layouts : "oi", "io" or mapping name -> one of them
        ``"oi"``: ``(out, in...)`` weights (PyTorch); ``"io"``: ``(...in, out)``
        (Keras kernels).
    refit : {"auto", "exact", "cg"}
        Per-row Cholesky solves, or batched conjugate gradients (``"auto"``:
        exact while the solves cost under ~2e10 flops).
    dense_target : float in [0, 1]
        For a layer whose accumulator keeps the cross term
        (``HessianAccumulator(..., cross=True)``: its inputs ``X̂`` in the
        partly pruned model and ``X`` in the dense one), how far the target
        moves from the layer's own outputs on ``X̂`` (0, SparseGPT's) to the
        dense model's outputs (1): ``W X̂ + a·W (X − X̂)``. Ignored otherwise.

    Returns
    -------
    PruneResult
        The updated weights as canonical CSR, the masks, the summary.

    Notes
    -----
    Frantar & Alistarh, SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot, ICML 2023 (Algorithm 1).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((64, 8)); W = rng.standard_normal((4, 8))
    >>> acc = sc.HessianAccumulator(8).update(X)
    >>> m = sc.prune({"fc": W}, sparsity=0.5).masks
    >>> r = sc.reconstruct({"fc": W}, {"fc": acc}, m)
    >>> bool(np.linalg.norm(X @ (W - r.dense("fc")).T) < np.linalg.norm(X @ (W * m["fc"] - W).T))
    True
    """
    entry = get_repair(method, "update")
    dense_target = _check_dense_target(dense_target)
    if refit not in ("auto", "exact", "cg"):
        raise ValueError(f"refit must be 'auto', 'exact' or 'cg', got {refit!r}")
    _check_blocksize(blocksize)
    prepared = _prepare(weights, hessians, layouts)
    updated, out_masks = {}, {}
    for n, (w, rows, src, layout) in prepared.items():
        if n not in masks:
            raise ValueError(f"masks lack tensor {n!r}; give a mask for every layer to reconstruct")
        m = np.asarray(masks[n])
        if m.dtype != np.bool_ or m.shape != w.shape:
            raise ValueError(f"mask {n!r} must be bool of shape {w.shape}, got {m.dtype} {m.shape}")
        prune = ~_rows_of(m, layout, n).astype(np.bool_)
        _check_update(entry, n, prune, rows.shape[1], hessians[n])
        problem = LayerProblem(n, _target_rows(rows, src, damp, n, dense_target), src, damp=damp,
                               blocksize=blocksize, refit=refit)
        updated[n] = _back(_updated(problem, entry, prune), w, layout)
        out_masks[n] = _back(~prune, np.empty(w.shape, np.bool_), layout)
    return _result(weights, updated, out_masks)


def _check_update(entry, n, prune, features, hessian):
    if entry.needs_kept_per_row and np.any(prune.all(axis=1)) and features:
        r = int(np.argmax(prune.all(axis=1)))
        raise ValueError(f"mask {n!r} keeps nothing in output row {r}: the refit has nothing to solve for; "
                         f"keep at least one entry per row, or use method='obs'")
    if entry.name == "none" and isinstance(hessian, HessianAccumulator) and hessian.has_cross:
        raise ValueError(f"the accumulator of {n!r} keeps the cross term, which only an update uses; pass "
                         f"method='obs', 'refit' or 'obs+refit'")


def sparsegpt(weights: Mapping[str, ArrayLike], hessians: Mapping, *, sparsity=None, pattern=None,
              damp: float = 0.01, blocksize: int = 128, layouts: Mapping[str, str] | str = "oi",
              refit: str | None = None, dense_target: float = 1.0) -> PruneResult:
    """SparseGPT: the mask chosen inside the OBS sweep by ``w² / [H⁻¹]ⱼⱼ²``
    (per column block for a sparsity, per row and group for N:M) while the
    kept weights are updated; ``refit`` ("auto", "exact", "cg") adds the exact
    refit for the mask found. Parameters as :func:`reconstruct`; ``sparsity``
    (a fraction, or per layer) or ``pattern`` ("2:4", :class:`NM` along the
    input axis).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> acc = sc.HessianAccumulator(8).update(rng.standard_normal((64, 8)))
    >>> r = sc.sparsegpt({"fc": rng.standard_normal((4, 8))}, {"fc": acc}, pattern="2:4")
    >>> r.masks["fc"].sum(axis=1).tolist()
    [4, 4, 4, 4]
    """
    return _choosing(_REPAIRS["sparsegpt"], weights, hessians, sparsity=sparsity, pattern=pattern, damp=damp,
                     blocksize=blocksize, layouts=layouts, refit=refit, dense_target=dense_target)


def _choosing(entry, weights, hessians, *, sparsity, pattern, damp, blocksize, layouts, refit, dense_target):
    """A method that chooses its mask (``entry.choose``) over each layer."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity= and pattern=")
    nm = None
    if pattern is not None:
        p = pattern_of(pattern)
        if not isinstance(p, NM) or p.axis not in (None, 1):
            raise ValueError(f"{entry.name} takes an N:M pattern along the input axis, got {pattern!r}; for other "
                             f"patterns select with sparsecore.prune and update with reconstruct()")
        nm = (p.n, p.m)
    if refit not in (None, "auto", "exact", "cg"):
        raise ValueError(f"refit must be None, 'auto', 'exact' or 'cg', got {refit!r}")
    dense_target = _check_dense_target(dense_target)
    _check_blocksize(blocksize)
    prepared = _prepare(weights, hessians, layouts)
    updated, out_masks = {}, {}
    for n, (w, rows, src, layout) in prepared.items():
        s = None
        if nm is None:
            s = check_fraction(sparsity[n] if isinstance(sparsity, Mapping) else sparsity, n)
        elif rows.shape[1] % nm[1]:
            raise ValueError(f"{nm[0]}:{nm[1]} pattern of {n!r}: its {rows.shape[1]} input features are not a "
                             f"multiple of {nm[1]}")
        U, _ = _inverse_factor(src, damp, n)  # H singular: refused before the target is formed
        problem = LayerProblem(n, _target_rows(rows, src, damp, n, dense_target), src, damp=damp,
                               blocksize=blocksize, refit=refit, sparsity=s, nm=nm, factor=U)
        new, prune = entry.choose(problem)
        updated[n] = _back(new, w, layout)
        out_masks[n] = _back(~prune, np.empty(w.shape, np.bool_), layout)
    return _result(weights, updated, out_masks)


def _check_blocksize(blocksize):
    if not is_integer(blocksize) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")


def _prepare(weights, hessians, layouts):
    if not isinstance(weights, Mapping) or not isinstance(hessians, Mapping):
        raise TypeError("weights and hessians must be mappings name -> array")
    out = {}
    for n, w in weights.items():
        if n not in hessians:
            raise ValueError(f"hessians lack layer {n!r}; accumulate one per layer (HessianAccumulator)")
        layout = layouts.get(n, "oi") if isinstance(layouts, Mapping) else layouts
        a = np.asarray(w)
        if a.dtype.kind != "f":
            raise TypeError(f"weights {n!r} have dtype {a.dtype}; pass floating-point weights")
        arr = as_float_array(a, n)
        rows = _rows_of(arr, layout, n)
        _refuse_nonfinite(arr, n, "weights")
        out[n] = (a, rows, _source(hessians[n], n, rows.shape[1]), layout)
    return out


def _result(weights, updated, masks):
    return PruneResult.of_masks(updated, masks, itemsizes={n: np.asarray(weights[n]).dtype.itemsize for n in updated},
                                keep_arrays=True)


# --- one layer of a sequential calibration (what the framework adapters call) ---------

def check_layer_options(method, sparsity, pattern, scope, update, dense_target=0.0) -> str:
    """Check the options of a sequential calibration before any layer is
    touched; returns the scope (the method's default, ``"row"`` for wanda as
    its authors rank, ``"local"`` otherwise, unless given). ``method``: a
    registered repair method that chooses or selects a mask; ``update``:
    None or one that updates (not for a method that chooses its mask).
    ``dense_target`` above 0 works through the update, so a method that
    selects only needs ``update``."""
    entry = get_repair(method, "mask")
    updates = [None] + [n for n in list_repairs("update") if n != "none"]  # None: no update
    if update not in updates:
        raise ValueError(f"update must be one of {updates}, got {update!r}")
    if "choose" in entry.roles and update is not None:
        raise ValueError(f"method={method!r} updates the weights itself; update= is for the other methods")
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity= and pattern=")
    scope = scope or entry.default_scope
    if scope not in ("local", "row"):
        raise ValueError(f"scope must be 'local' or 'row' (global allocation needs every layer at once), got "
                         f"{scope!r}")
    if _check_dense_target(dense_target) and "choose" not in entry.roles and update is None:
        raise ValueError(f"dense_target reaches toward the dense model's outputs through the update of the kept "
                         f"weights; method={method!r} needs update= ('obs', 'refit' or 'obs+refit')")
    return scope


def prune_layer(name: str, weights: ArrayLike, hessian, *, method: str = "sparsegpt", sparsity=None, pattern=None,
                scope: str | None = None, update: str | None = None, damp: float = 0.01, blocksize: int = 128,
                refit: str | None = None, layout: str = "oi", dense_target: float = 1.0) -> PruneResult:
    """Prune one layer from the Hessian of its inputs and repair it.

    ``method``: ``"sparsegpt"`` (the mask chosen inside the OBS sweep, the
    kept weights updated, ``refit`` optional), or a selection by the engine,
    ``"wanda"`` (``|w|·‖x_j‖``, ``‖x_j‖ = sqrt(H_jj)``), ``"magnitude"`` or
    ``"obs"`` (``w²/[H⁻¹]ⱼⱼ²``), in ``scope`` ``"local"`` or ``"row"``, then
    ``update`` (None, "obs", "refit", "obs+refit"). ``sparsity`` is a
    fraction, or a mapping with one per layer name; ``pattern`` N:M along the
    layer's inputs. Selection runs on the ``(out, in)`` view of the weights
    (``layout`` as in :func:`reconstruct`).

    Examples
    --------
    >>> import numpy as np, sparsecore as sc
    >>> rng = np.random.default_rng(0)
    >>> acc = sc.HessianAccumulator(8).update(rng.standard_normal((64, 8)))
    >>> r = sc.prune_layer("fc", rng.standard_normal((4, 8)), acc, method="wanda", sparsity=0.5, update="obs")
    >>> r.masks["fc"].sum(axis=1).tolist()
    [4, 4, 4, 4]
    """
    scope = check_layer_options(method, sparsity, pattern, scope, update)
    if isinstance(sparsity, Mapping):
        if name not in sparsity:
            raise ValueError(f"sparsity names no fraction for layer {name!r}; give one per pruned layer")
        sparsity = sparsity[name]
    entry = get_repair(method, "mask")
    if "choose" in entry.roles:
        return _choosing(entry, {name: weights}, {name: hessian}, sparsity=sparsity, pattern=pattern, damp=damp,
                         blocksize=blocksize, refit=refit, layouts=layout, dense_target=dense_target)
    w = np.asarray(weights)
    rows = _rows_of(w, layout, name)  # (out, in): N:M groups and rows run along the layer's inputs
    src = _source(hessian, name, rows.shape[1])
    if isinstance(hessian, HessianAccumulator) and hessian.has_cross:
        if update is None:
            raise ValueError(f"the accumulator of {name!r} keeps the cross term, which only an update uses; pass "
                             f"update='obs', 'refit' or 'obs+refit'")
        rows = _target_rows(rows, hessian, damp, name, _check_dense_target(dense_target))  # select among
        # the weights the update aims at
    problem = LayerProblem(name, rows, src, damp=damp, blocksize=blocksize, refit=refit)
    kw = dict(pattern=pattern) if pattern is not None else dict(sparsity=sparsity, scope=scope)
    keep = prune({name: rows}, entry.criterion, state={name: entry.state(problem)}, **kw).masks[name]
    masks = {name: _back(keep, np.empty(w.shape, np.bool_), layout)}
    return reconstruct({name: w}, {name: hessian}, masks, method=update or "none", damp=damp, blocksize=blocksize,
                       refit=refit or "auto", layouts=layout, dense_target=dense_target)
