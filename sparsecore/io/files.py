"""``open_weights``: any weight file, read through the reader of its format."""

from __future__ import annotations

import os

import h5py

from .errors import FormatError
from .formats import (
    SPARSE_TAG,
    H5File,
    KerasZip,
    NpzFile,
    SafeTensorsFile,
    TorchFile,
    WeightFile,
    detect,
)
from .sharded import ShardedCheckpoint, is_checkpoint_path
from .sparse import SparseFile

__all__ = ["open_weights"]


def open_weights(path) -> WeightFile:
    """Open a weight file for reading, whatever its format (see the module doc);
    a model folder or its ``*.index.json`` opens as one :class:`ShardedCheckpoint`."""
    if is_checkpoint_path(path):
        if not os.path.exists(path):
            raise FormatError(f"{path}: no such file")
        return ShardedCheckpoint(path)
    kind = detect(path)
    if kind == "keras":
        return KerasZip(path)
    if kind == "torch":
        return TorchFile(path)
    if kind == "safetensors":
        return SafeTensorsFile(path)
    if kind == "npz":
        return NpzFile(path)
    try:
        with h5py.File(path, "r") as h:
            tag = h.attrs.get("format")
    except OSError as exc:
        raise FormatError(f"{path}: HDF5 signature but unreadable ({exc}); the file is truncated or corrupt") from None
    if isinstance(tag, bytes):
        tag = tag.decode()
    if tag == SPARSE_TAG:
        return SparseFile(path)
    return H5File(path)
