"""safetensors, read and written with NumPy alone.

The format (huggingface/safetensors): an 8-byte little-endian unsigned
header length N, N bytes of UTF-8 JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, possibly padded
with spaces), then the byte buffer; offsets are relative to the buffer's start.
Tensors are little-endian and C-ordered. ``BF16`` has no NumPy dtype: it is
read as its uint16 bit patterns (``raw_float`` widens it to float32 exactly).
"""

import contextlib
import gc
import json
import math
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
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector held off for a block that builds many objects and no cycles (a header of
    100,000 tensors): each collection it would start walks every object built so far, and that made parsing
    such a header take twice as long, and vary as much."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _no_duplicates(pairs):
    """``dict(pairs)``, refusing a name given twice (JSON allows it; the last would silently win).

    Called once per JSON object (a header of 100,000 tensors has 100,001), so the common case is one ``dict``
    and one length comparison."""
    d = dict(pairs)
    if len(d) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise FormatError(f"the safetensors header names {dup!r} twice")
    return d


def read_header(path):
    """``(entries, metadata, data_start, header_bytes)``; entries keep file order.

    Every structural rule of the format is enforced, each refusal naming the
    file and the tensor: a header length within the file, a JSON object with
    unique names, ``__metadata__`` a map of strings to strings, a known dtype,
    a shape of integers >= 0, integer offsets ``[begin, end]`` that hold
    exactly the bytes the dtype and shape need, and tensors that tile the
    byte buffer from its start to its end with neither gaps nor overlaps.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too short for safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    with gc_paused():
        return _parse(path, raw, size, n)


def _parse(path, raw, size, n):
    """:func:`read_header`'s parse and checks of the ``n`` header bytes ``raw`` of a file of ``size`` bytes."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, got {str(meta)[:80]}")
    start = 8 + n
    buffer = size - start
    entries = {}
    ordered, end = True, 0  # tensors written one after the other need no sort to check the tiling
    for name, info in header.items():  # exact types (``type(x) is int`` also refuses True and 1.0): it runs
        # once per tensor, and a file may hold 100,000
        if type(info) is not dict or len(info) != 3 or not _FIELDS.issuperset(info):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry {str(info)[:120]} (needs "
                              f"exactly dtype, shape and data_offsets)")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        item = DTYPES.get(dt) if type(dt) is str else None
        if item is None:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dt!r}")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r} has shape {shape!r}; dimensions must be integers >= 0")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or offsets[0] < 0):
            raise FormatError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; two integers >= 0 needed")
        b, e = offsets
        shape = tuple(shape)
        count = math.prod(shape)
        if count == 0 and item.itemsize * math.prod(max(d, 1) for d in shape) >= 1 << 62:  # even an empty
            # array of it cannot be made
            raise FormatError(f"{path}: tensor {name!r} has shape {shape}; its dimensions multiply past "
                              f"2**62 bytes")
        want = item.itemsize * count
        if e < b or e - b != want or e > buffer:
            raise FormatError(f"{path}: tensor {name!r} spans bytes [{b}, {e}) of a {buffer}-byte buffer, "
                              f"but dtype {dt} and shape {shape} need {want}; the file is truncated or "
                              f"corrupt")
        entries[name] = (dt, shape, b, e)
        if b != end:
            ordered = False
        end = e
    if not ordered:
        end = 0
        for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if b != end:
                raise FormatError(f"{path}: tensor {name!r} starts at byte {b} of the buffer, but the tensors "
                                  f"before it end at {end}: " + ("they overlap" if b < end else "a gap") +
                                  "; the format requires tensors that tile the buffer")
            end = e
    if end != buffer:
        raise FormatError(f"{path}: the tensors end at byte {end} of a {buffer}-byte buffer; the format requires "
                          f"them to cover it exactly")
    return entries, meta, start, raw


def read_tensor(path, entry, start, fd):
    """One tensor's bytes as a new array, by positioned reads through the open descriptor ``fd`` of ``path``."""
    dt, shape, b, e = entry
    arr = np.empty(shape, DTYPES[dt])
    view, got = memoryview(arr.reshape(-1).view(np.uint8)), 0
    while got < e - b:  # one call reads at most about 2 GiB
        n = os.preadv(fd, [view[got:]], start + b + got)
        if n == 0:
            break
        got += n
    if got != e - b:
        raise FormatError(f"{path}: tensor ended after {got} of {e - b} bytes; the file is truncated")
    return arr


def bf16_to_f32(raw):
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def write(f, tensors, metadata=None, header=None):
    """Write an ordered iterable of ``(name, safetensors dtype, array)`` to the
    open binary file ``f``. Arrays are consumed one at a time; the header is
    computed from their shapes first, so ``tensors`` is a list of
    ``(name, dtype, shape, producer)`` where ``producer()`` returns the array.

    ``header``: the header's bytes as a file already holds them, for tensors
    of the same names, dtypes and shapes laid in the same order (what
    :func:`in_order` checks): written as they are, not built and dumped again
    (for a file of 100,000 tiny tensors that is most of the write)."""
    if header is None:
        header = _header(tensors, metadata)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for name, dt, shape, produce in tensors:
        arr = produce()
        if type(arr) is not np.ndarray or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        if arr.shape != shape and arr.shape != tuple(shape) or arr.dtype.itemsize != DTYPES[dt].itemsize:
            raise ValueError(f"tensor {name!r}: got {arr.dtype} {arr.shape}, header says {dt} {tuple(shape)}")
        f.write(arr.data if arr.ndim else arr.reshape(1).data)  # its bytes, in C order


def _header(tensors, metadata):
    """The header bytes of ``(name, dtype, shape, _)`` laid end to end, padded to 8 bytes."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dt, shape, _ in tensors:
        shape = list(map(int, shape))
        nbytes = DTYPES[dt].itemsize * math.prod(shape)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # align the buffer to 8 bytes


def in_order(entries):
    """Whether the tensors of parsed ``entries`` lie in the buffer in their header's order (as every writer
    lays them), so that a file of the same tensors in that order has the very same header."""
    end = 0
    for _, _, b, e in entries.values():
        if b != end:
            return False
        end = e
    return True


def dtype_name(dtype):
    """The safetensors name of a NumPy dtype."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"safetensors has no dtype for {np.dtype(dtype)}") from None
