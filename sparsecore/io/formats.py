"""Weight files: format detection, readers, and writers that keep the format.

Every reader lists its tensors in file order (:class:`Entry`) and reads one
at a time, so memory stays bounded by the largest tensor. Formats:

* ``keras``: Keras 3 ``.keras`` zip (``model.weights.h5``, ``config.json``,
  ``metadata.json``, maybe ``assets/``); tensors are named by their HDF5
  path inside ``model.weights.h5`` (``layers/dense/vars/0``; nested models
  nest: ``layers/functional/layers/dense/vars/0``).
* ``keras-weights``: a standalone Keras 3 ``.weights.h5``, same names.
* ``keras-legacy``: Keras 2 HDF5, full model (``model_weights`` group) or
  weights only; tensors are listed by the ``layer_names`` attribute and each
  layer's ``weight_names`` (bytes or str, split into ``layer_names0``,
  ``layer_names1``, ... when large) and named ``<layer>/<weight name>``.
* ``hdf5``: any other HDF5 file; every dataset, named by its path.
* ``safetensors``: read and written with NumPy (see ``_safetensors``).
* ``torch``: a PyTorch state dict (``.pt``, ``.bin``), read with
  ``torch.load(weights_only=True, mmap=True)`` when PyTorch is installed.
* ``sparse``: sparsecore's own sparse HDF5 (see ``sparse``).

Optimizer state (Keras ``optimizer/`` and ``optimizer_weights``) is copied
through and never pruned by default.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass

import h5py
import numpy as np

from . import _safetensors as st
from .errors import FormatError, UserError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
SPARSE_TAG = "sparsecore-sparse-hdf5"

# Keras' own rule against decompression and shape bombs (CWE-409), for archive members and HDF5 datasets: a
# member or dataset that declares more than BOMB_FLOOR bytes and more than BOMB_RATIO times what the file
# stores for it is refused before a byte of it is read or written (DEFLATE cannot pass ~1032:1, Keras and
# PyTorch store members uncompressed, and real weights barely compress).
BOMB_FLOOR = 256 << 20
BOMB_RATIO = 100
#: Groups nested deeper than this (or a group that holds itself through a hard link) are refused.
MAX_DEPTH = 256


@dataclass(slots=True)
class Entry:
    """One tensor of a weight file."""

    name: str
    shape: tuple
    dtype: str  # NumPy dtype name, or "bfloat16"
    is_float: bool
    default: bool  # pruned unless --include/--exclude say otherwise
    left_out: str = ""  # why a float tensor of 2+ dimensions is not pruned by default ("embedding", ...)

    @property
    def size(self):
        """Entries of the tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self):
        """Bytes of the tensor as stored."""
        return self.size * (2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize)


# Tensors a user rarely means to prune, left out of the default set (by name; ``--take-all`` takes them):
# pruning an embedding table removes whole tokens' meanings, a depthwise kernel holds each channel's only
# filter, recurrent kernels compound their error at every time step, and fixed bases (STFT, mel, windows)
# are not learned at all.
_LEFT_OUT = [
    ("embedding", re.compile(r"embed|(^|[./])(wte|wpe|shared)([./]|$)", re.I)),
    ("depthwise kernel", re.compile(r"depthwise|dw_?conv", re.I)),
    ("recurrent kernel", re.compile(r"recurrent|weight_hh", re.I)),
    ("fixed basis", re.compile(r"stft|basis|(^|[._/])window([._/]|$)|mel_?filter|filterbank|fbank", re.I)),
]


#: Why a tensor with no entries is never pruned (nothing to select; copied as it is).
EMPTY = "no entries"


# One search for all of them (a file may hold 100,000 tensors); the group that matched names the reason.
_ANY_LEFT_OUT = re.compile("|".join(f"(?P<g{i}>{p.pattern})" for i, (_, p) in enumerate(_LEFT_OUT)), re.I)


# The words every pattern above needs, lower case: an ASCII name without any of them matches none (searching
# for them alone costs a tenth of the full search, and most names have none).
_HINT = re.compile("embed|wte|wpe|shared|depthwise|dw_?conv|recurrent|weight_hh|stft|basis|window|mel_?filter|"
                   "filterbank|fbank")


def left_out_reason(name):
    """Why a tensor named ``name`` is left out of the default set, or ``""``."""
    if name.isascii() and _HINT.search(name.lower()) is None:
        return ""
    m = _ANY_LEFT_OUT.search(name)
    if m is None:
        return ""
    return next(_LEFT_OUT[i][0] for i in range(len(_LEFT_OUT)) if m.group(f"g{i}") is not None)


def left_out_hints(names):
    """The names of ``names`` that may have a :func:`left_out_reason` (the others have none): one search over
    all of them joined, not one per name (a file may hold 100,000)."""
    text = "\0".join(names)  # no pattern matches across the separator: they match letters and '_' only
    if not text.isascii():  # lower() keeps every length only for ASCII
        return set(names)
    starts = np.cumsum([0] + [len(n) + 1 for n in names])
    at = np.searchsorted(starts, [m.start() for m in _HINT.finditer(text.lower())], "right") - 1
    return {names[i] for i in at.tolist()}


_DTYPES = {}  # dtype -> (name, is float): entry_of is called once per tensor of a file


def _dtype_info(dtype):
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        pass
    if dtype == "bfloat16":
        info = "bfloat16", True
    else:
        d = np.dtype(dtype)
        info = d.name, d.kind == "f" and d.itemsize in (2, 4, 8)
    try:
        _DTYPES[dtype] = info
    except TypeError:  # not hashable
        pass
    return info


def entry_of(name, shape, dtype, optimizer=False, hinted=True):
    """The :class:`Entry` of a tensor read from a file (float or not, pruned by default or not).
    ``hinted=False``: :func:`left_out_hints` found no word of a left-out rule in its name (not searched
    again)."""
    dt, is_float = _dtype_info(dtype)
    shape = tuple(map(int, shape))
    reason = "optimizer state" if optimizer else \
        left_out_reason(name) if is_float and len(shape) >= 2 and hinted else ""
    if is_float and 0 in shape:
        reason = EMPTY
    return Entry(name, shape, dt, is_float, is_float and len(shape) >= 2 and not reason, reason)


def to_float(raw, entry):
    """The values of a raw tensor as float32/float64 (bfloat16 widened exactly)."""
    if entry.dtype == "bfloat16":
        return st.bf16_to_f32(raw)
    if raw.dtype == np.float16:
        return raw.astype(np.float32)
    return raw


class WeightFile:
    """A weight file open for reading: ``entries`` (name -> Entry, file order),
    ``raw(name)`` (stored form) and ``floats(name)`` (for scoring).

    A format describes itself: ``format`` (what it reads), ``native`` (the
    kind its own writer gives, None without one), ``extensions`` (the file
    name endings that say that kind), ``file_order`` (its writer rebuilds the
    file in its own order, not tensor by tensor), and :meth:`write_like`;
    a format any input converts to also has ``write_stream`` (see
    :data:`CONVERTERS`). A new format is one class, listed in
    ``sparsecore.io.files.FORMATS``; :meth:`sniff` claims a file from its bytes."""

    format = "?"
    native: str | None = None
    extensions: tuple = ()
    file_order = False

    @classmethod
    def sniff(cls, probe) -> bool:
        """Whether the file :class:`Probe` ``probe`` describes is in this format (from its bytes, not its name)."""
        return False

    def write_like(self, path, tensor, pruned=None):
        """A file like this one at ``path``: the tensors named in ``pruned``
        (all if None) given by ``tensor(name)``, one in memory at a time,
        the others carried as they are stored."""
        raise UserError(f"{self.path}: writing the {self.format} format is not supported; write sparse HDF5 (an "
                        f"output name ending in .sparse.h5)")

    def __init__(self, path):
        self.path = os.fspath(path)
        self.entries = {}

    def raw(self, name):
        """The tensor as stored (its own dtype), as a new array."""
        raise NotImplementedError  # every concrete reader defines it

    def floats(self, name):
        """The tensor as float32/float64 (bfloat16 and float16 widened to float32)."""
        return to_float(self.raw(name), self.entries[name])

    def raw_run(self, names):
        """The tensors ``names`` as stored (one dtype), flat and laid end to end in one new array."""
        return np.concatenate([self.raw(n).reshape(-1) for n in names])

    def row_subset(self, name, step):
        """Every ``step``-th row (first-axis entry) of a tensor, as floats; a
        reader that can read a strided selection reads only those."""
        return to_float(np.ascontiguousarray(self.raw(name)[::step]), self.entries[name])

    def close(self):
        """Release the file."""
        pass

    def input_files(self):
        """Every path the reader reads (a model folder lists its files too)."""
        return [self.path]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def select(self, include=(), exclude=(), *, take_all=False, any_rank=False):
        """Names to prune: float tensors only; by default those with two or
        more dimensions, outside optimizer state and the tensors a user rarely
        means to prune (embeddings, depthwise and recurrent kernels, fixed
        bases: :attr:`Entry.left_out`; ``take_all`` takes them, optimizer
        state excepted); 1-D tensors (biases, norms) too with ``any_rank``.
        ``include`` patterns (fnmatch, or a substring) narrow that set to the
        matching tensors, ``exclude`` patterns remove."""
        def hit(name, pats):
            return any(fnmatch.fnmatchcase(name, p) or p in name for p in pats)
        out = []
        for e in self.entries.values():
            if not e.is_float or (len(e.shape) < 2 and not any_rank):
                continue
            reason = e.left_out or (left_out_reason(e.name) if len(e.shape) < 2 else "")
            take = not reason or (take_all and reason not in ("optimizer state", EMPTY))
            if take and (not include or hit(e.name, include)) and not (exclude and hit(e.name, exclude)):
                out.append(e.name)
        return out


# --- HDF5 -------------------------------------------------------------------

def _attr_strings(obj, key):
    """A list-of-strings attribute, bytes or str, possibly split in chunks
    ``key0``, ``key1``, ... (Keras 2 does that for large ones)."""
    if key in obj.attrs:
        vals = list(obj.attrs[key])
    elif f"{key}0" in obj.attrs:
        vals, i = [], 0
        while f"{key}{i}" in obj.attrs:
            vals.extend(obj.attrs[f"{key}{i}"])
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in vals]


def inflated(declared, stored):
    """Whether ``declared`` bytes from ``stored`` bytes on disk break the bomb rule (:data:`BOMB_RATIO`)."""
    return declared > BOMB_FLOOR and declared > BOMB_RATIO * stored


def check_h5(root, display, placeholders=()):
    """Refuse an HDF5 file (or group) that would bring other files' bytes into
    an output or inflate in memory: external links, datasets with external raw
    storage or a virtual layout (their bytes live in other files), datasets
    that declare far more than they store (:func:`inflated`; ``placeholders``:
    paths of datasets left unwritten on purpose), groups nested deeper than
    :data:`MAX_DEPTH`. Each refusal names the file, the dataset and the rule."""
    def link(name, lk):
        if isinstance(lk, h5py.ExternalLink):
            return (f"{display}: {name!r} is a link to {lk.filename!r}, another file; sparsecore reads only what "
                    f"the file itself holds")
        if name.count("/") >= MAX_DEPTH:
            return f"{display}: {name[:80]!r}... nests groups deeper than {MAX_DEPTH}"
        return None

    def dataset(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return None
        if obj.is_virtual:
            return (f"{display}: dataset {name!r} is virtual (its bytes are mapped from other files); refused: "
                    f"sparsecore reads only what the file itself holds")
        if obj.external:
            return (f"{display}: dataset {name!r} keeps its bytes in the external file {obj.external[0][0]!r}; "
                    f"refused: sparsecore reads only what the file itself holds")
        if name in placeholders:
            return None
        declared = int(np.prod(obj.shape, dtype=np.float64) * obj.dtype.itemsize) if obj.shape else 0
        stored = obj.id.get_storage_size()
        total[0] += declared
        if inflated(declared, stored):
            return (f"{display}: dataset {name!r} declares {declared} bytes but the file stores {stored} for it; "
                    f"refused as a decompression or shape bomb (over {BOMB_FLOOR} bytes and {BOMB_RATIO}x what "
                    f"is stored)")
        return None

    # a visit ends at the first callback that answers something (an exception inside one is not for h5py)
    total = [0]
    problem = root.visititems_links(link) or root.visititems(dataset)
    if problem:
        raise FormatError(problem)
    size = root.file.id.get_filesize()
    if inflated(total[0], size):  # many datasets each under the floor
        raise FormatError(f"{display}: its datasets declare {total[0]} bytes in all from a {size}-byte file; "
                          f"refused as a decompression or shape bomb (over {BOMB_FLOOR} bytes and {BOMB_RATIO}x "
                          f"the file)")


class H5File(WeightFile):
    """Keras 3 ``.weights.h5``, Keras 2 legacy HDF5, or any HDF5 file (or an
    HDF5 group laid out like one: ``group=``, which whoever opened its file
    has held to :func:`check_h5`). ``path`` may be an open binary file object."""

    native, extensions, file_order = "hdf5", (".h5", ".hdf5"), True

    @classmethod
    def sniff(cls, probe):
        """Any HDF5 file (asked last: the formats built on HDF5 first)."""
        return probe.is_hdf5

    def write_like(self, path, tensor, pruned=None):
        """The file rebuilt group by group (attributes, layout), the datasets of ``pruned`` replaced."""
        rebuild_h5(self.h5, path, self._replacer(tensor, pruned))

    def _replacer(self, tensor, pruned):
        by_path = {self.dataset_path(n): n for n in (self.entries if pruned is None else pruned)}
        return lambda p: tensor(by_path[p]) if p in by_path else None

    def __init__(self, path, display=None, group=None):
        super().__init__(path if isinstance(path, (str, os.PathLike)) else display)
        try:
            self.h5 = h5py.File(path, "r") if group is None else group
        except OSError as exc:
            raise FormatError(f"{display or path}: not a readable HDF5 file ({exc}); the file may be "
                              f"truncated or corrupt") from None
        self.prefix = ""
        try:
            if group is None:
                check_h5(self.h5, display or self.path)
            self._list()
        except FormatError:
            self.h5.close()
            raise
        except (OSError, KeyError, RuntimeError) as exc:
            self.h5.close()
            raise FormatError(f"{display or path}: cannot read the HDF5 structure ({exc}); the file may be "
                              f"truncated or corrupt") from None

    def _list(self):
        h = self.h5
        root = h["model_weights"] if isinstance(h.get("model_weights"), h5py.Group) else h
        layers = _attr_strings(root, "layer_names")
        if layers is not None:
            self.format = "keras-legacy"
            self.prefix = "model_weights/" if root is not h else ""
            for lname in layers:
                if lname not in root:
                    raise FormatError(f"{self.path}: layer {lname!r} is listed in layer_names but missing")
                g = root[lname]
                for wname in _attr_strings(g, "weight_names") or []:
                    ds = g.get(wname)
                    if not isinstance(ds, h5py.Dataset):
                        raise FormatError(f"{self.path}: weight {wname!r} of layer {lname!r} is listed but missing")
                    self.entries[f"{lname}/{wname}"] = entry_of(f"{lname}/{wname}", ds.shape, ds.dtype)
            return
        self.format = "keras-weights" if ("layers" in h or "vars" in h) else "hdf5"

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiub":
                opt = self.format == "keras-weights" and name.startswith("optimizer/")
                self.entries[name] = entry_of(name, obj.shape, obj.dtype, optimizer=opt)

        h.visititems(visit)

    def raw(self, name):
        """The tensor as stored (its own dtype), as a new array."""
        ds = self.h5[self.prefix + name]
        out = np.empty(ds.shape, ds.dtype)
        if out.size:
            ds.read_direct(out)
        return out

    def row_subset(self, name, step):
        """Every ``step``-th row of the tensor as floats (a cheap sample for selection)."""
        ds = self.h5[self.prefix + name]
        return to_float(ds[::step] if ds.ndim else ds[()], self.entries[name])

    def close(self):
        """Release the file."""
        if isinstance(self.h5, h5py.File):
            self.h5.close()

    def dataset_path(self, name):
        """The HDF5 path of tensor ``name``."""
        return self.prefix + name


def _copy_attrs(src, dst):
    for k in src.attrs:
        aid = src.attrs.get_id(k)
        dst.attrs.create(k, src.attrs[k], dtype=aid.dtype)


# ``replace`` answers this to leave a dataset allocated but unwritten (no storage).
PLACEHOLDER = object()


def rebuild_h5(src, dst_path, replace):
    """Write ``dst_path`` (a path or an open binary file) with ``src``'s groups,
    datasets and attributes; the datasets whose path ``replace(path)`` answers
    with an array get that array instead (same dtype, shape, chunking and
    filters)."""
    with h5py.File(dst_path, "w") as out:
        rebuild_into(src, out, replace)


def rebuild_into(src, out, replace):
    """:func:`rebuild_h5` into an open group ``out``."""
    _copy_attrs(src, out)
    _rebuild_group(src, out, "", replace, 0)


def _rebuild_group(g, out, base, replace, depth):
    if depth > MAX_DEPTH:  # a hard link back to an ancestor would recurse forever
        raise FormatError(f"{g.file.filename}: {base[:80]!r}...: groups nested deeper than {MAX_DEPTH}, or a "
                          f"group that holds itself")
    for key in g:
        link = g.get(key, getlink=True)
        if isinstance(link, h5py.SoftLink):
            out[key] = h5py.SoftLink(link.path)
            continue
        if isinstance(link, h5py.ExternalLink):  # check_h5 refuses them on input: never reached
            raise FormatError(f"{base}{key}: a link to another file")
        obj = g[key]
        path = f"{base}{key}"
        if isinstance(obj, h5py.Group):
            sub = out.create_group(key)
            _copy_attrs(obj, sub)
            _rebuild_group(obj, sub, path + "/", replace, depth + 1)
            continue
        new = replace(path)
        if new is None:
            g.copy(obj, out, name=key)
            continue
        ds = out.create_dataset(key, shape=obj.shape, dtype=obj.dtype, chunks=obj.chunks,
                                compression=obj.compression, compression_opts=obj.compression_opts,
                                shuffle=obj.shuffle, fletcher32=obj.fletcher32)
        if new is not PLACEHOLDER and new.size:
            ds.write_direct(np.ascontiguousarray(new, obj.dtype))
        _copy_attrs(obj, ds)


# --- .keras zip ---------------------------------------------------------------

def check_members(zf, path):
    """Refuse an archive with a member that inflates far past what it stores (:func:`inflated`, Keras' rule),
    before anything of it is extracted."""
    total = 0
    for info in zf.infolist():
        if inflated(info.file_size, info.compress_size):
            raise FormatError(f"{path}: member {info.filename!r} declares {info.file_size} bytes but stores "
                              f"{info.compress_size}; refused as a decompression bomb (over {BOMB_FLOOR} bytes "
                              f"and {BOMB_RATIO}x its stored size), as Keras refuses it")
        total += info.file_size
    size = os.path.getsize(path)
    if inflated(total, size):  # many members each under the floor
        raise FormatError(f"{path}: its members declare {total} bytes in all from a {size}-byte archive; refused "
                          f"as a decompression bomb (over {BOMB_FLOOR} bytes and {BOMB_RATIO}x the archive)")


class KerasZip(H5File):
    """A Keras 3 ``.keras`` archive; its ``model.weights.h5`` is extracted into
    an anonymous temporary file (no name on disk: nothing survives the
    process, even killed), after every member is checked against its stored
    size (:func:`check_members`)."""

    native, extensions = "keras", (".keras",)

    @classmethod
    def sniff(cls, probe):
        """A zip archive holding ``model.weights.h5``."""
        return probe.is_zip and "model.weights.h5" in probe.zip_names

    def write_like(self, path, tensor, pruned=None):
        """The archive rewritten: its weights rebuilt, every other member copied."""
        with tempfile.TemporaryFile(prefix="sparsecore-keras-") as h5tmp:  # no name: gone with the process
            rebuild_h5(self.h5, h5tmp, self._replacer(tensor, pruned))
            write_keras_zip(self.members, self.zip_path, h5tmp, path)

    def __init__(self, path):
        self.zip_path = os.fspath(path)
        self.tmpfile = None
        try:
            with zipfile.ZipFile(self.zip_path) as z:
                names = z.namelist()
                if "model.weights.h5" not in names:
                    raise FormatError(f"{path}: a zip archive without model.weights.h5 is not a Keras "
                                      f"3 .keras file (members: {names[:5]})")
                check_members(z, path)
                self.members = [(i.filename, i.compress_type) for i in z.infolist()]
                self.tmpfile = tempfile.TemporaryFile(prefix="sparsecore-keras-")
                try:
                    with z.open("model.weights.h5") as src:
                        shutil.copyfileobj(src, self.tmpfile, 1 << 22)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                    raise FormatError(f"{path}: cannot extract model.weights.h5 ({exc}); the archive is "
                                      f"truncated or corrupt") from None
        except zipfile.BadZipFile as exc:
            self._drop()
            raise FormatError(f"{path}: not a readable zip archive ({exc})") from None
        except BaseException:
            self._drop()
            raise
        self.tmpfile.seek(0)
        try:
            super().__init__(self.tmpfile, display=f"{path} (model.weights.h5)")
        except BaseException:
            self._drop()
            raise
        self.path = self.zip_path
        self.format = "keras"

    def _drop(self):
        if self.tmpfile is not None:
            self.tmpfile.close()
            self.tmpfile = None

    def close(self):
        """Release the file and the archive's temporary copy."""
        super().close()
        self._drop()


_ZIP64 = (1 << 31) - (1 << 20)  # members this large need zip64 records, which must be asked for when streaming


def _member_info(info, ctype):
    """A fresh ZipInfo for writing a copy of member ``info`` with compression ``ctype``."""
    out = zipfile.ZipInfo(info.filename, info.date_time)
    out.compress_type, out.external_attr, out.comment = ctype, info.external_attr, info.comment
    return out


def write_keras_zip(members, src_zip, weights_h5, dst_path, member_bytes=None):
    """A ``.keras`` archive at ``dst_path``: every member of ``src_zip`` (or,
    from ``member_bytes``, ``name -> (size, write(file))``) in order, streamed,
    with ``model.weights.h5`` taken from ``weights_h5`` (an open binary file,
    read from its start)."""
    with zipfile.ZipFile(dst_path, "w") as out:
        src = zipfile.ZipFile(src_zip) if src_zip else None  # held to check_members when it was opened
        try:
            for name, ctype in members:
                if name == "model.weights.h5":
                    weights_h5.seek(0, os.SEEK_END)
                    size = weights_h5.tell()
                    weights_h5.seek(0)
                    with out.open(_member_info(zipfile.ZipInfo(name), ctype), "w",
                                  force_zip64=size >= _ZIP64) as fout:
                        shutil.copyfileobj(weights_h5, fout, 1 << 22)
                elif src is not None:  # streamed: a member's size never decides the memory taken
                    info = src.getinfo(name)
                    try:
                        with src.open(info) as fin, out.open(_member_info(info, ctype), "w",
                                                             force_zip64=info.file_size >= _ZIP64) as fout:
                            shutil.copyfileobj(fin, fout, 1 << 20)
                    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                        raise FormatError(f"{src_zip}: member {name} cannot be read ({exc}); the archive is "
                                          f"truncated or corrupt") from None
                else:  # (size, write(file object)) from a sparse file's copy of the archive
                    size, write = member_bytes[name]
                    with out.open(_member_info(zipfile.ZipInfo(name), ctype), "w",
                                  force_zip64=size >= _ZIP64) as fout:
                        write(fout)
        finally:
            if src is not None:
                src.close()


# --- safetensors ----------------------------------------------------------------

class SafeTensorsFile(WeightFile):
    """A safetensors file, read with NumPy (no framework)."""
    format = native = "safetensors"
    extensions = (".safetensors",)

    @classmethod
    def sniff(cls, probe):
        """An 8-byte header length, then the JSON header's brace (never a zip or HDF5 file)."""
        return not (probe.is_zip or probe.is_hdf5) and len(probe.head) >= 9 and probe.head[8:9] == b"{"

    def write_like(self, path, tensor, pruned=None):
        """The same header order, dtypes and metadata."""
        items = [(n, dt, shape, (lambda n=n: tensor(n)) if pruned is None or n in pruned else
                  (lambda n=n: self.raw(n))) for n, (dt, shape, _, _) in self.header.items()]
        with open(path, "wb") as f:  # the header as it was: same names, dtypes, shapes, order and metadata
            st.write(f, items, self.metadata, self.header_bytes if st.in_order(self.header) else None)

    @staticmethod
    def write_stream(path, entries, tensor, *, dtypes=None, metadata=None, source="input"):
        """A safetensors file of ``entries`` (name -> Entry, in order), each
        tensor ``tensor(name)``; ``dtypes``: safetensors dtype names to keep
        (by name), the others from the entries."""
        items = []
        for n, e in entries.items():
            if dtypes is not None and n in dtypes:
                dt = dtypes[n]
            else:
                try:
                    dt = "BF16" if e.dtype == "bfloat16" else st.dtype_name(e.dtype)
                except TypeError:
                    raise UserError(f"{source}: tensor {n!r} of dtype {e.dtype} has no safetensors dtype; keep the "
                                    f"input's format") from None
            items.append((n, dt, e.shape, lambda n=n: tensor(n)))
        with open(path, "wb") as f:
            st.write(f, items, metadata)

    def __init__(self, path):
        super().__init__(path)
        self.header, self.metadata, self.start, self.header_bytes = st.read_header(self.path)
        hinted = left_out_hints(list(self.header))  # one name search for the file (it may hold 100,000)
        with st.gc_paused():  # one Entry per tensor, and no cycles
            for name, (dt, shape, _, _) in self.header.items():
                e = entry_of(name, shape, "bfloat16" if dt == "BF16" else st.DTYPES[dt], hinted=name in hinted)
                if dt.startswith("F8"):
                    e.is_float, e.default, e.left_out = False, False, ""  # 8-bit floats pass through
                self.entries[name] = e

        self._fd = None

    def raw(self, name):
        """The tensor as stored (its own dtype), as a new array (read through one descriptor, kept open)."""
        return st.read_tensor(self.path, self.header[name], self.start, self._descriptor())

    def _descriptor(self):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def raw_run(self, names):
        """The tensors ``names`` laid end to end: one read where the file holds them so (as tensors written
        one after the other are), else one read each."""
        spans = [self.header[n] for n in names]
        dt = spans[0][0]
        if any(s[0] != dt for s in spans) or any(a[3] != b[2] for a, b in zip(spans, spans[1:])):
            return super().raw_run(names)
        b, e = spans[0][2], spans[-1][3]
        return st.read_tensor(self.path, (dt, ((e - b) // st.DTYPES[dt].itemsize,), b, e), self.start,
                              self._descriptor())

    def close(self):
        """Release the file."""
        fd, self._fd = getattr(self, "_fd", None), None  # also when __init__ failed before opening
        if fd is not None:
            os.close(fd)

    __del__ = close  # a reader dropped without close() does not keep its descriptor


class NpzFile(WeightFile):
    """``np.savez`` archives (for scores files); read only."""

    format = "npz"

    @classmethod
    def sniff(cls, probe):
        """A zip archive of ``.npy`` members only."""
        return probe.is_zip and bool(probe.zip_names) and all(n.endswith(".npy") for n in probe.zip_names)

    def __init__(self, path):
        super().__init__(path)
        self.z = np.load(self.path, allow_pickle=False)
        for k in self.z.files:
            with self.z.zip.open(k + ".npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            self.entries[k] = entry_of(k, shape, dtype)

    def raw(self, name):
        """The array as stored, as a new array."""
        return self.z[name]

    def close(self):
        """Release the file."""
        self.z.close()


# --- PyTorch ---------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        raise FormatError("this is a PyTorch file; reading and writing it needs PyTorch "
                          "(pip install torch==2.13.0)") from None
    return torch


def _torch_load_error(path, exc):
    """One plain line for a file ``torch.load(weights_only=True)`` refused: what
    it holds besides tensors, without PyTorch's terminal escapes or its advice
    to turn the safety off."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"{path}: refused: the pickle holds {found.group(1)!s}, which is not a tensor; sparsecore loads "
                f"PyTorch files with weights_only=True and never runs a pickle's code (save a plain state dict)")
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "weights_only" not in ln]
    first = lines[0].strip() if lines else "the file holds more than tensors"
    return (f"{path}: PyTorch cannot load it with weights_only=True ({type(exc).__name__}: {first}); sparsecore "
            f"never turns that safety off")


class TorchFile(WeightFile):
    """A PyTorch state dict (``.pt``/``.bin``), loaded with ``weights_only=True``."""
    format = native = "torch"
    extensions = (".pt", ".pth", ".bin")

    @classmethod
    def sniff(cls, probe):
        """A zip archive with a ``data.pkl``, or a legacy pickle under a PyTorch name."""
        if probe.is_zip:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in probe.zip_names)
        return probe.head[:1] == b"\x80" and probe.path.endswith(cls.extensions)

    def write_like(self, path, tensor, pruned=None):
        """The state dict's items in order, what is not a tensor carried as it is."""
        write_torch(((n, tensor(n) if n in self.entries and (pruned is None or n in pruned) else self.sd[n],
                      self.entries.get(n)) for n in self.sd), path)

    @staticmethod
    def write_stream(path, entries, tensor, *, dtypes=None, metadata=None, source="input"):
        """A state dict of ``entries`` (name -> Entry, in order), each tensor ``tensor(name)``."""
        write_torch(((n, tensor(n), e) for n, e in entries.items()), path)

    def __init__(self, path):
        super().__init__(path)
        torch = _torch()
        archive = zipfile.is_zipfile(self.path)
        if archive:  # storages that inflate far past the file are refused before torch reads them
            try:
                with zipfile.ZipFile(self.path) as z:
                    check_members(z, path)
            except zipfile.BadZipFile as exc:
                raise FormatError(f"{path}: not a readable zip archive ({exc})") from None
        try:
            # memory-mapped: a tensor's bytes are read when used, one at a time; only the legacy (non-zip)
            # format cannot be mapped, and only it is loaded whole
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=archive)
        except Exception as exc:
            raise FormatError(_torch_load_error(path, exc)) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
            raise FormatError(f"{path}: not a PyTorch state dict (a mapping name -> tensor)")
        self.sd = sd
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                continue
            dtype = "bfloat16" if v.dtype == torch.bfloat16 else torch.empty(0, dtype=v.dtype).numpy().dtype
            self.entries[k] = entry_of(k, tuple(v.shape), dtype)

    def raw(self, name):
        """The tensor as a NumPy array of its own dtype (bfloat16 as its 16-bit patterns)."""
        t = self.sd[name].detach().cpu().contiguous()
        if t.dtype == _torch().bfloat16:
            return t.view(_torch().int16).numpy().view(np.uint16).copy()
        return t.numpy().copy()


def write_torch(items, dst_path):
    """``torch.save`` a state dict from ``(name, tensor or raw array, Entry)`` items."""
    torch = _torch()
    out = {}
    for name, value, entry in items:
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if isinstance(value, np.ndarray):
            if entry is not None and entry.dtype == "bfloat16":
                value = torch.from_numpy(np.array(value, order="C").view(np.int16)).view(torch.bfloat16)
            else:
                value = torch.from_numpy(np.array(value, order="C"))
        out[name] = value
    try:
        torch.save(out, dst_path)
    except RuntimeError as exc:  # PyTorch reports a failed write (a full disk) as a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{dst_path}: PyTorch could not write the file ({first}); nothing was written") from None


# --- detection --------------------------------------------------------------------

class Probe:
    """What format sniffing reads of a file, each part read once when first
    asked for: ``head`` (its first 16 bytes), ``ext``, ``zip_names`` (None
    unless a zip archive), ``h5_tag`` (the ``format`` attribute of an HDF5
    file's root). A damaged zip or HDF5 file is refused here, in one line."""

    def __init__(self, path):
        path = self.path = os.fspath(path)
        if not os.path.exists(path):
            raise FormatError(f"{path}: no such file")
        if os.path.isdir(path):
            raise FormatError(f"{path}: is a directory, not a weight file")
        with open(path, "rb") as f:
            self.head = f.read(16)
        self.ext = os.path.splitext(path)[1]
        self.is_hdf5 = self.head.startswith(HDF5_MAGIC)
        self.is_zip = self.head.startswith((b"PK\x03\x04", b"PK\x05\x06"))
        self._zip_names = self._tag = None

    @property
    def zip_names(self):
        """The member names of a zip archive (None otherwise)."""
        if self.is_zip and self._zip_names is None:
            try:
                with zipfile.ZipFile(self.path) as z:
                    self._zip_names = z.namelist()
            except zipfile.BadZipFile as exc:
                raise FormatError(f"{self.path}: looks like a zip archive but cannot be read ({exc}); "
                                  f"truncated?") from None
        return self._zip_names

    @property
    def h5_tag(self):
        """The root ``format`` attribute of an HDF5 file ("" without one; None otherwise)."""
        if self.is_hdf5 and self._tag is None:
            try:
                with h5py.File(self.path, "r") as h:
                    tag = h.attrs.get("format")
            except OSError as exc:
                raise FormatError(f"{self.path}: HDF5 signature but unreadable ({exc}); the file is truncated or "
                                  f"corrupt") from None
            self._tag = (tag.decode() if isinstance(tag, bytes) else tag) or ""
        return self._tag

    def unknown(self):
        """The error for a file no format claims."""
        if self.is_zip:
            return FormatError(f"{self.path}: a zip archive without model.weights.h5 (not a Keras 3 .keras file) "
                               f"and without data.pkl (not a PyTorch file)")
        hint = {".h5": "an .h5 name but no HDF5 signature", ".hdf5": "an .hdf5 name but no HDF5 signature",
                ".keras": "a .keras name but not a zip archive",
                ".safetensors": "not a valid safetensors header"}.get(self.ext)
        return FormatError(f"{self.path}: unknown weight-file format" + (f" ({hint})" if hint else "")
                           + "; sparsecore reads .keras, .weights.h5, Keras 2 .h5, safetensors, PyTorch .pt/.bin "
                             "and its own sparse HDF5")


CONVERTERS = {cls.native: cls for cls in (SafeTensorsFile, TorchFile)}  # what any input converts to (--format)
READERS = (SafeTensorsFile, TorchFile, H5File, KerasZip)  # formats that write themselves, for the names


def kind_of_name(path):
    """The kind an output name says (its extension), or None."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return next((cls.native for cls in READERS if ext in cls.extensions), None)
