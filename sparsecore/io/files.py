"""``open_weights``: any weight file, read through the reader of its format."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .._atomic import AtomicPath
from . import _safetensors as st
from .errors import FormatError, UserError
from .formats import (
    H5File,
    KerasZip,
    NpzFile,
    Probe,
    SafeTensorsFile,
    TorchFile,
    WeightFile,
)
from .sharded import ShardedCheckpoint, is_checkpoint_path
from .sparse import SparseFile

__all__ = ["open_weights", "save_safetensors"]


#: The formats read, in the order they are asked to claim a file (those built on HDF5 or zip before the
#: plain ones): a new format is one class added here.
FORMATS = (SparseFile, KerasZip, TorchFile, NpzFile, SafeTensorsFile, H5File)


def open_weights(path) -> WeightFile:
    """Open a weight file for reading, whatever its format (see the module doc);
    a model folder or its ``*.index.json`` opens as one :class:`ShardedCheckpoint`."""
    if is_checkpoint_path(path):
        if not os.path.exists(path):
            raise FormatError(f"{path}: no such file")
        return ShardedCheckpoint(path)
    probe = Probe(path)
    for cls in FORMATS:
        if cls.sniff(probe):
            return cls(path)
    raise probe.unknown()


def save_safetensors(path, tensors: Mapping, metadata: Mapping | None = None, *, force: bool = False,
                     sync: bool = True) -> None:
    """Write ``tensors`` as a safetensors file, atomically (a killed run
    leaves no partial file) and in their order.

    Parameters
    ----------
    path : str or os.PathLike
    tensors : mapping
        Name -> array (any NumPy dtype safetensors has), or name ->
        ``(dtype, shape, producer)`` with ``producer()`` returning that array
        when it is written: one tensor in memory at a time, for files larger
        than memory. ``dtype`` ``"bfloat16"`` writes BF16 from ``uint16``
        bit patterns.
    metadata : mapping, optional
        The header's ``__metadata__`` (strings).
    force : bool
        Replace an existing file.
    sync : bool
        fsync before the rename.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not force:
        raise UserError(f"{path}: exists; pass force=True to replace it")
    items = []
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names are strings, got {name!r}")
        if isinstance(v, tuple):
            if len(v) != 3 or not callable(v[2]):
                raise TypeError(f"tensor {name!r}: give an array or (dtype, shape, producer), got a tuple of {len(v)}")
            dtype, shape, produce = v
        else:
            a = np.asarray(v)
            dtype, shape, produce = a.dtype, a.shape, (lambda a=a: a)
        items.append((name, "BF16" if isinstance(dtype, str) and dtype == "bfloat16" else st.dtype_name(dtype),
                      tuple(int(d) for d in shape), produce))
    with AtomicPath(path, sync, replace=force) as tmp, open(tmp, "wb") as f:
        st.write(f, items, metadata)
