"""safetensors, read and written with NumPy alone.

The format (huggingface/safetensors): an 8-byte little-endian unsigned
header length N, N bytes of UTF-8 JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, possibly padded
with spaces), then the byte buffer; offsets are relative to the buffer's start.
Tensors are little-endian and C-ordered. ``BF16`` has no NumPy dtype: it is
read as its uint16 bit patterns (``raw_float`` widens it to float32 exactly).
"""

import json
import os
import struct

import numpy as np

from .errors import FormatError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
FLOATS = {"F64", "F32", "F16", "BF16"}
_NAMES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
          np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("<u8"): "U64",
          np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}
_MAX_HEADER = 100 << 20


def read_header(path):
    """``(entries, metadata, data_start, header_bytes)``; entries keep file order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too short for safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = {}
    for name, info in header.items():
        try:
            dt = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dt not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dt!r}")
        want = DTYPES[dt].itemsize * int(np.prod(shape, dtype=np.int64))
        if e - b != want or b < 0 or start + e > size:
            raise FormatError(f"{path}: tensor {name!r} spans bytes [{b}, {e}) of a {size - start}-byte buffer, "
                              f"but dtype {dt} and shape {shape} need {want}; the file is truncated or corrupt")
        entries[name] = (dt, shape, b, e)
    return entries, meta, start, raw


def read_tensor(path, entry, start):
    dt, shape, b, e = entry
    arr = np.empty(shape, DTYPES[dt])
    with open(path, "rb") as f:
        f.seek(start + b)
        got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
    if got != e - b:
        raise FormatError(f"{path}: tensor ended after {got} of {e - b} bytes; the file is truncated")
    return arr


def bf16_to_f32(raw):
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def write(f, tensors, metadata=None):
    """Write an ordered iterable of ``(name, safetensors dtype, array)`` to the
    open binary file ``f``. Arrays are consumed one at a time; the header is
    computed from their shapes first, so ``tensors`` is a list of
    ``(name, dtype, shape, producer)`` where ``producer()`` returns the array."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dt, shape, _ in tensors:
        nbytes = DTYPES[dt].itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the buffer to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dt, shape, produce in tensors:
        arr = np.asarray(produce(), order="C")
        if arr.shape != tuple(shape) or arr.dtype.itemsize != DTYPES[dt].itemsize:
            raise ValueError(f"tensor {name!r}: got {arr.dtype} {arr.shape}, header says {dt} {tuple(shape)}")
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def dtype_name(dtype):
    """The safetensors name of a NumPy dtype."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"safetensors has no dtype for {np.dtype(dtype)}") from None
