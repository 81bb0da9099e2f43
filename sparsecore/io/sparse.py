"""sparsecore's sparse HDF5 format (``format = "sparsecore-sparse-hdf5"``, version 1).

Layout::

    /                       attrs: format, format_version, tool_version, created (UTC ISO 8601),
                                   source_file, source_format, source_sha256, source_bytes,
                                   criterion, scope, sparsity, threshold, normalize (JSON text, null if unset)
    /tensors/<k>            one group per pruned tensor, k = 0, 1, ... in processing order
        attrs: name, shape, dtype (NumPy name or "bfloat16"), csr_shape = (shape[0], prod(shape[1:])),
               nnz, kept (entries the mask keeps; kept entries that are exactly zero are not stored),
               source_path (the dataset's path in the source HDF5, if any)
        data                the stored values, the tensor's dtype (bfloat16 as float32, exactly)
        indices, indptr     CSR of the 2-D view, canonical (sorted, no duplicates), int32 or int64
                            (data, indices, indptr optionally with HDF5's shuffle + gzip or lzf filters)
        mask                only when kept != nnz: the keep-mask, np.packbits of the flat C-order mask
    /container              what rebuilds the source format; attrs: kind = "hdf5" | "keras" |
                            "safetensors" | "torch"
        h5/                 (hdf5, keras) the source HDF5's groups, attributes and unpruned datasets,
                            bit for bit; each pruned dataset is an empty placeholder with its shape,
                            dtype, chunking and filters (no storage allocated)
        members             (keras) JSON list of [name, compress_type] of the archive, in order
        zip/<i>             (keras) bytes (uint8) of every archive member but model.weights.h5
        header              (safetensors) the source header's JSON bytes (uint8), metadata included
        order               (safetensors, torch) JSON list of tensor names, in file order
        raw/<i>             (safetensors, torch) each unpruned tensor as stored (attrs: name, dtype)

Reading one back: a pruned tensor is ``csr_array((data, indices, indptr),
csr_shape).toarray().reshape(shape)``; its mask is ``mask`` unpacked when
present, else the CSR's sparsity pattern.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from .errors import FormatError
from .formats import SPARSE_TAG, Entry, H5File, WeightFile, check_h5, entry_of

FORMAT_VERSION = 1
#: The source formats a sparse file rebuilds (its container's ``kind``).
KINDS = ("hdf5", "keras", "safetensors", "torch", "sharded")


def f32_to_bf16(x):
    """float32 values that came from bfloat16 back to their bit patterns."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


class SparseWriter:
    """Writes a sparse HDF5 file tensor by tensor."""

    def __init__(self, path, attrs, compression=None):
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        self.filters = {} if compression is None else dict(
            compression=compression, compression_opts=1 if compression == "gzip" else None, shuffle=True)
        self.h5 = h5py.File(path, "w")
        self.h5.attrs["format"] = SPARSE_TAG
        self.h5.attrs["format_version"] = FORMAT_VERSION
        self.deferred = {}
        for k, v in attrs.items():
            if callable(v):  # computed while the tensors are written (a checksum)
                self.deferred[k] = v
            else:
                self.h5.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
        self.tensors = self.h5.create_group("tensors")
        self.container = self.h5.create_group("container")
        self.count = 0

    def add(self, entry, csr, mask, source_path=None):
        """One pruned tensor: ``csr`` a scipy CSR of the 2-D view, ``mask`` flat bool."""
        g = self.tensors.create_group(str(self.count))
        self.count += 1
        kept = int(np.count_nonzero(mask))
        g.attrs["name"] = entry.name
        g.attrs["shape"] = np.asarray(entry.shape, np.int64)
        g.attrs["dtype"] = entry.dtype
        g.attrs["csr_shape"] = np.asarray(csr.shape, np.int64)
        g.attrs["nnz"] = int(csr.nnz)
        g.attrs["kept"] = kept
        if source_path is not None:
            g.attrs["source_path"] = source_path
        for key, arr in (("data", csr.data), ("indices", csr.indices), ("indptr", csr.indptr)):
            g.create_dataset(key, data=arr, **(self.filters if arr.size else {}))
        if kept != csr.nnz:
            g.create_dataset("mask", data=np.packbits(mask))

    def close(self):
        """Write the container's attributes and close the file."""
        try:
            for k, v in self.deferred.items():
                self.h5.attrs[k] = v()
        finally:
            self.h5.close()


class SparseFile(WeightFile):
    """A sparse HDF5 file read like any weight file: pruned tensors come back dense."""

    format = "sparse"

    def __init__(self, path):
        super().__init__(path)
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise FormatError(f"{path}: a damaged sparsecore sparse file ({exc})") from None
        try:
            self._list()
        except FormatError:
            self.h5.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RecursionError) as exc:
            self.h5.close()
            raise FormatError(f"{path}: a damaged sparsecore sparse file ({type(exc).__name__}: {exc})") from None

    def _damaged(self, what):
        return FormatError(f"{self.path}: a damaged sparsecore sparse file: {what}")

    def json(self, ds):
        """A JSON dataset (uint8 bytes) or attribute of the container, parsed."""
        text = ds[()].tobytes().decode() if isinstance(ds, h5py.Dataset) else as_str(ds)
        try:
            return json.loads(text)
        except RecursionError:
            raise self._damaged("JSON nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise self._damaged(f"unreadable JSON ({exc})") from None

    PROVENANCE = ("tool_version", "created", "source_file", "source_format", "source_sha256", "source_bytes",
                  "criterion", "scope", "sparsity", "threshold", "normalize")

    def provenance(self) -> dict:
        """What the file records of how it was made (the root attributes), as strings."""
        return {k: as_str(self.h5.attrs[k]) if isinstance(self.h5.attrs[k], (bytes, str)) else str(self.h5.attrs[k])
                for k in self.PROVENANCE if k in self.h5.attrs}

    def _list(self):
        h = self.h5
        version = int(h.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise FormatError(f"{self.path}: sparse format version {version}; this sparsecore reads version "
                              f"{FORMAT_VERSION}")
        self.kind = as_str(h["container"].attrs["kind"])
        if self.kind not in KINDS:
            raise self._damaged(f"container kind {self.kind!r} is none of {', '.join(KINDS)}")
        self.pruned = {}
        for key in sorted(h["tensors"], key=int):
            g = h["tensors"][key]
            name = as_str(g.attrs["name"])
            if name in self.pruned:
                raise self._damaged(f"tensor {name!r} is stored twice")
            self._check_group(name, g)
            self.pruned[name] = g
        c = h["container"]
        holes = {as_str(g.attrs["source_path"]) for g in self.pruned.values() if "source_path" in g.attrs}
        check_h5(h, self.path, {f"container/h5/{p}" for p in holes})  # nothing external, nothing inflated
        self.raw_groups = {}
        if self.kind in ("hdf5", "keras"):
            self.inner = H5File(self.path, group=c["h5"])  # held to check_h5 with the whole file above
            self.entries = dict(self.inner.entries)
            missing = [n for n, g in self.pruned.items() if as_str(g.attrs.get("source_path", "")) not in holes
                       or n not in self.entries]
            if missing:
                raise self._damaged(f"pruned tensor {missing[0]!r} has no place in the rebuilt file")
        else:
            order = self.json(c["order"] if "order" in c else c.attrs["order"])
            if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
                raise self._damaged("the tensor order is not a list of names")
            for key in c.get("raw", {}):
                g = c["raw"][key]
                self.raw_groups[as_str(g.attrs["name"])] = g
            for n in order:
                if n in self.pruned:
                    g = self.pruned[n]
                    self.entries[n] = entry_of(n, tuple(g.attrs["shape"]), as_str(g.attrs["dtype"]))
                elif n in self.raw_groups:
                    ds = self.raw_groups[n]
                    dt = as_str(ds.attrs["dtype"])
                    self.entries[n] = entry_of(n, ds.shape, "bfloat16" if dt == "bfloat16" else ds.dtype)
                else:
                    raise self._damaged(f"tensor {n!r} is listed but stored nowhere")
            if len(self.entries) != len(order) or any(n not in self.entries for n in self.pruned):
                raise self._damaged("the tensor order lists a name twice or leaves a stored tensor out")
        for n, g in self.pruned.items():  # pruned tensors report their own dtype
            e = self.entries[n]
            self.entries[n] = Entry(n, e.shape, as_str(g.attrs["dtype"]), e.is_float, e.default, e.left_out)

    def _check_group(self, name, g):
        """A pruned tensor's attributes and dataset shapes agree (read at open: no data read)."""
        try:
            shape = tuple(int(v) for v in g.attrs["shape"])
            rows, cols = (int(v) for v in g.attrs["csr_shape"])
            nnz, kept = int(g.attrs["nnz"]), int(g.attrs["kept"])
            dtype = as_str(g.attrs["dtype"])
            lens = {k: g[k].shape for k in ("data", "indices", "indptr")}
        except (KeyError, TypeError, ValueError) as exc:
            raise self._damaged(f"tensor {name!r}: {exc}") from None
        size = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or rows < 0 or cols < 0 or rows * cols != size or \
                (shape and rows != shape[0]):
            raise self._damaged(f"tensor {name!r}: CSR shape {(rows, cols)} does not fit shape {shape}")
        if not (0 <= nnz <= kept <= size) or lens["data"] != (nnz,) or lens["indices"] != (nnz,) or \
                lens["indptr"] != (rows + 1,):
            raise self._damaged(f"tensor {name!r}: nnz {nnz}, kept {kept} of {size}, data {lens['data']}, indices "
                                f"{lens['indices']}, indptr {lens['indptr']} do not agree")
        if g["indices"].dtype.kind not in "iu" or g["indptr"].dtype.kind not in "iu" or \
                (dtype != "bfloat16" and np.dtype(dtype).kind != "f") or g["data"].dtype.kind != "f":
            raise self._damaged(f"tensor {name!r}: dtypes data {g['data'].dtype}, indices {g['indices'].dtype}, "
                                f"indptr {g['indptr'].dtype} (floats and integers needed), tensor {dtype}")
        if "mask" in g and g["mask"].shape != ((size + 7) // 8,):
            raise self._damaged(f"tensor {name!r}: mask of {g['mask'].shape} bytes for {size} entries")

    def _csr_parts(self, g):
        """``(data, indices, indptr)`` of a pruned tensor, checked: indptr from 0 to nnz without going back,
        every index in [0, columns) and rising within its row (a negative or too large index would mirror or
        misplace weights)."""
        data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
        cols = int(g.attrs["csr_shape"][1])
        name = as_str(g.attrs["name"])
        if indptr[0] != 0 or indptr[-1] != data.size or (indptr.size > 1 and np.any(np.diff(indptr) < 0)):
            raise self._damaged(f"tensor {name!r}: row pointers do not run from 0 to {data.size} without going back")
        if indices.size and (indices.min() < 0 or indices.max() >= cols):
            raise self._damaged(f"tensor {name!r}: column indices from {indices.min()} to {indices.max()} leave "
                                f"[0, {cols})")
        if indices.size > 1:
            rising = np.diff(indices.astype(np.int64)) > 0
            rising[indptr[1:-1][(indptr[1:-1] > 0) & (indptr[1:-1] < indices.size)] - 1] = True  # rows' starts
            if not rising.all():
                raise self._damaged(f"tensor {name!r}: column indices repeat or fall within a row")
        return data, indices, indptr

    def nnz(self, name):
        """Stored entries of a pruned tensor (None for one stored dense)."""
        g = self.pruned.get(name)
        return None if g is None else int(g.attrs["nnz"])

    def csr(self, name):
        """The stored CSR of a pruned tensor (``scipy.sparse.csr_array``)."""
        import scipy.sparse as sp

        g = self.pruned[name]
        data, indices, indptr = self._csr_parts(g)
        if data.dtype == np.float16:  # scipy does not take float16
            data = data.astype(np.float32)
        return sp.csr_array((data, indices, indptr), shape=tuple(int(v) for v in g.attrs["csr_shape"]))

    def _dense(self, g):
        """The stored tensor, dense, in its stored dtype (exactly the stored bits)."""
        shape = tuple(int(s) for s in g.attrs["shape"])
        rows, cols = (int(v) for v in g.attrs["csr_shape"])
        data, indices, indptr = self._csr_parts(g)
        out = np.zeros((rows, cols), data.dtype)
        if data.size:
            out[np.repeat(np.arange(rows), np.diff(indptr)), indices] = data
        return out.reshape(shape)

    def mask(self, name):
        """The keep-mask of a pruned tensor, shaped like it."""
        g = self.pruned[name]
        shape = tuple(int(s) for s in g.attrs["shape"])
        if "mask" in g:
            n = int(np.prod(shape, dtype=np.int64))
            return np.unpackbits(g["mask"][()], count=n).astype(bool).reshape(shape)
        return self._dense(g) != 0

    def raw(self, name):
        """The tensor as it was written (zeros where pruned), in its own dtype."""
        if name in self.pruned:
            g = self.pruned[name]
            dense = self._dense(g)
            if as_str(g.attrs["dtype"]) == "bfloat16":
                return f32_to_bf16(dense)
            return dense.astype(as_str(g.attrs["dtype"]), copy=False)
        if self.kind in ("hdf5", "keras"):
            return self.inner.raw(name)
        return np.asarray(self.raw_groups[name][()])

    def close(self):
        """Release the file."""
        self.h5.close()


def as_str(v):
    """An HDF5 attribute as text."""
    return v.decode() if isinstance(v, bytes) else str(v)
