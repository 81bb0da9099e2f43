"""Input checks shared by the public modules.

Errors name the tensor, the rule broken and the offending value. Nothing here
writes into a caller's array: conversions return new arrays.
"""

import math
from collections.abc import Mapping

import numpy as np

_FLOAT_HINT = "pass a floating-point array (float32 or float64), e.g. a.astype(np.float32)"


def as_float_array(a, name, role="weights"):
    """Return ``a`` as a float32 or float64 ndarray (float16 upcast to float32).

    Raises ``TypeError`` for integer, bool, complex, object and other
    non-float dtypes. The result may share memory with ``a``: callers read
    it and never write into it.
    """
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - the message names what failed
        raise TypeError(f"{role} {name!r} cannot be read as an array: {exc}") from exc
    dt = arr.dtype
    if dt == np.float32 or dt == np.float64:
        return arr
    if dt == np.float16:
        return arr.astype(np.float32)
    if dt.kind == "f":
        raise TypeError(f"{role} {name!r} have dtype {dt}, which the kernels do not take; {_FLOAT_HINT}")
    what = {
        "b": "bool", "i": "integer", "u": "unsigned integer", "c": "complex", "O": "object",
    }.get(dt.kind, f"non-float ({dt})")
    raise TypeError(f"{role} {name!r} have {what} dtype {dt}; {_FLOAT_HINT}")


def flat(arr):
    """A flat C-ordered view of ``arr``, copying only if it is not C-contiguous."""
    return np.ascontiguousarray(arr).reshape(-1)


def out_array(out, shape, dtype):
    """``out`` checked as a product's result (an ndarray of ``shape`` and
    ``dtype``, C-contiguous, writeable), or a new one when it is None."""
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} ndarray of shape {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


def nonfinite_error(name, role, arr, count, first, hint=""):
    """The ``ValueError`` for ``count`` NaN/Inf values, the first at flat ``first``."""
    shape = np.shape(arr)
    index = tuple(int(i) for i in np.unravel_index(first, shape)) if shape else ()
    value = np.asarray(arr).reshape(-1)[first] if np.size(arr) else float("nan")
    kind = "NaN" if math.isnan(value) else ("Inf" if math.isinf(value) else "non-finite")
    msg = (f"{role} {name!r} hold {count} NaN or Inf value{'s' if count != 1 else ''} "
           f"(first: {kind} at index {index})")
    return ValueError(msg + (f"; {hint}" if hint else ""))


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_fraction(value, name, what="sparsity"):
    """A float in [0, 1]; ``ValueError`` naming the value otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} for {name!r} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{what} for {name!r} must lie in [0, 1], got {value!r}")
    return v


def check_threshold(value, name):
    """A real, non-NaN threshold."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"threshold for {name!r} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"threshold for {name!r} is NaN; pass a real number (scores below it are pruned)")
    return v


def per_name(value, names, what, check):
    """Expand a scalar or a mapping name -> value into a dict over ``names``."""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"{what} names unknown tensors {unknown}; known: {sorted(names)}")
        missing = [k for k in names if k not in value]
        if missing:
            raise ValueError(f"{what} misses tensors {missing}; give a value for each, or one number for all")
        return {k: check(value[k], k) for k in names}
    names = list(names)
    if not names:
        return {}
    return dict.fromkeys(names, check(value, names[0]))  # one number for all: checked once


def no_positions_error(name, shape) -> ValueError:
    """Activation maps with samples and channels but no positions to reduce per channel."""
    return ValueError(f"activations {name!r} have shape {tuple(shape)}: no positions to reduce per channel")
