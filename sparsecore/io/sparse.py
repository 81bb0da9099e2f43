"""sparsecore's sparse HDF5 format (``format = "sparsecore-sparse-hdf5"``, version 2; version 1 still read).

Layout::

    /                       attrs: format, format_version, tool_version, created (UTC ISO 8601),
                                   source_file, source_format, source_sha256, source_bytes,
                                   criterion, scope, sparsity, threshold, normalize (JSON text, null if unset)
    /tensors/<k>            one group per pruned tensor, k = 0, 1, ... in processing order
        attrs: name, shape, dtype (NumPy name or "bfloat16"), csr_shape = (shape[0], prod(shape[1:])),
               nnz, kept (entries the mask keeps; kept entries that are exactly zero are not stored),
               source_path (the dataset's path in the source HDF5, if any)
               encoding (version 2): "csr", or a packed format of ``sparsecore.pack``:
               "delta8", "bitmask", "nm" (with attrs n, m)
        data                (csr) the stored values, the tensor's dtype (bfloat16 as float32, exactly)
        indices, indptr     (csr) CSR of the 2-D view, canonical (sorted, no duplicates), int32 or int64
        vals                (packed) the values in the tensor's dtype (bfloat16 as its uint16 bits)
        ptr                 (delta8, bitmask) int64 row offsets into vals
        deltas              (delta8) uint8 column steps
        words               (bitmask, nm) uint64 bits or positions, one row per matrix row
                            (every array optionally with HDF5's shuffle + gzip or lzf filters)
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
csr_shape).toarray().reshape(shape)`` (a packed one: ``PackedMatrix(...).to_csr()``
first, checked by ``sparsecore.check_packed``); its mask is ``mask`` unpacked
when present, else the sparsity pattern. Version 2 writes the packed
encoding with the fewest bytes (``sparsecore.pack(..., "smallest")``): a 50%
sparse float32 tensor takes about half its dense bytes, where CSR with int32
indices took all of them.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from ..packed import FORMATS as PACKED_FORMATS
from ..packed import PackedMatrix, check_packed, pack
from .errors import FormatError
from .formats import SPARSE_TAG, Entry, H5File, WeightFile, check_h5, entry_of

FORMAT_VERSION = 2
READS = (1, 2)  # the versions this sparsecore reads
ENCODINGS = ("auto", "csr") + PACKED_FORMATS
# Tensor dtypes the packed encodings hold (others are stored as CSR).
_PACKABLE = ("float32", "float64", "float16", "bfloat16")
#: The source formats a sparse file rebuilds (its container's ``kind``).
KINDS = ("hdf5", "keras", "safetensors", "torch", "sharded")


def f32_to_bf16(x):
    """float32 values that came from bfloat16 back to their bit patterns."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


class SparseWriter:
    """Writes a sparse HDF5 file tensor by tensor."""

    def __init__(self, path, attrs, compression=None, encoding="auto"):
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
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
        p = self._packed(entry, csr)
        g.attrs["encoding"] = "csr" if p is None else p.format
        if p is None:
            arrays = (("data", csr.data), ("indices", csr.indices), ("indptr", csr.indptr))
        else:
            vals = p.vals.view(np.float16) if p.dtype == "float16" else p.vals  # an HDF5 reader sees halves
            arrays = [(k, v) for k, v in (("vals", vals), ("ptr", p.ptr), ("deltas", p.deltas), ("words", p.words))
                      if v is not None]
            if p.format == "nm":
                g.attrs["n"], g.attrs["m"] = p.n, p.m
        for key, arr in arrays:
            g.create_dataset(key, data=arr, **(self.filters if arr.size else {}))
        if kept != csr.nnz:
            g.create_dataset("mask", data=np.packbits(mask))

    def _packed(self, entry, csr):
        """The tensor's packed encoding (``None``: stored as CSR)."""
        if self.encoding == "csr" or entry.dtype not in _PACKABLE:
            return None
        data = csr.data.astype(np.float32) if csr.data.dtype == np.float16 else csr.data
        a = type(csr)((data, csr.indices, csr.indptr), shape=csr.shape)
        return pack(a, "smallest" if self.encoding == "auto" else self.encoding, dtype=entry.dtype, name=entry.name)

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

    @classmethod
    def sniff(cls, probe):
        """An HDF5 file tagged as sparsecore's."""
        return probe.is_hdf5 and probe.h5_tag == SPARSE_TAG

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
        if version not in READS:
            raise FormatError(f"{self.path}: sparse format version {version}; this sparsecore reads versions "
                              f"{', '.join(map(str, READS))}")
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
            encoding = as_str(g.attrs.get("encoding", "csr"))
            keys = ("data", "indices", "indptr") if encoding == "csr" else \
                {"delta8": ("vals", "ptr", "deltas"), "bitmask": ("vals", "ptr", "words"),
                 "nm": ("vals", "words")}.get(encoding, ())
            lens = {k: g[k].shape for k in keys}
        except (KeyError, TypeError, ValueError) as exc:
            raise self._damaged(f"tensor {name!r}: {exc}") from None
        size = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or rows < 0 or cols < 0 or rows * cols != size or \
                (shape and rows != shape[0]):
            raise self._damaged(f"tensor {name!r}: CSR shape {(rows, cols)} does not fit shape {shape}")
        if not (0 <= nnz <= kept <= size):
            raise self._damaged(f"tensor {name!r}: nnz {nnz}, kept {kept} of {size} do not agree")
        if dtype != "bfloat16" and (dtype not in np.sctypeDict or np.dtype(dtype).kind != "f"):
            raise self._damaged(f"tensor {name!r}: dtype {dtype!r} (a float dtype needed)")
        if encoding == "csr":
            if lens["data"] != (nnz,) or lens["indices"] != (nnz,) or lens["indptr"] != (rows + 1,):
                raise self._damaged(f"tensor {name!r}: nnz {nnz}, data {lens['data']}, indices {lens['indices']}, "
                                    f"indptr {lens['indptr']} do not agree")
            if g["indices"].dtype.kind not in "iu" or g["indptr"].dtype.kind not in "iu" or \
                    g["data"].dtype.kind != "f":
                raise self._damaged(f"tensor {name!r}: dtypes data {g['data'].dtype}, indices {g['indices'].dtype}, "
                                    f"indptr {g['indptr'].dtype} (floats and integers needed)")
        elif encoding in PACKED_FORMATS:
            self._check_packed_shapes(name, g, encoding, lens, rows, cols, nnz, dtype)
        else:
            raise self._damaged(f"tensor {name!r}: unknown encoding {encoding!r}")
        if "mask" in g and g["mask"].shape != ((size + 7) // 8,):
            raise self._damaged(f"tensor {name!r}: mask of {g['mask'].shape} bytes for {size} entries")

    def _check_packed_shapes(self, name, g, encoding, lens, rows, cols, nnz, dtype):
        """A packed tensor's arrays have the lengths its shape allows (a file cannot make us read more)."""
        want = {"float16": np.float16, "bfloat16": np.uint16}.get(dtype, dtype)
        if g["vals"].dtype != np.dtype(want) or len(lens["vals"]) != 1:
            raise self._damaged(f"tensor {name!r}: values of dtype {g['vals'].dtype}, shape {lens['vals']} for a "
                                f"{dtype} tensor")
        nvals = lens["vals"][0]
        if encoding in ("delta8", "bitmask") and lens["ptr"] != (rows + 1,):
            raise self._damaged(f"tensor {name!r}: {lens['ptr']} row offsets for {rows} rows")
        if encoding == "delta8":
            most = rows * cols + rows * (-(-cols // 255))  # every column kept, and the fillers of the gaps
            if lens["deltas"] != (nvals,) or not nnz <= nvals <= most:
                raise self._damaged(f"tensor {name!r}: {nvals} values, steps {lens['deltas']}, nnz {nnz}")
        elif encoding == "bitmask":
            if lens["words"] != (rows, -(-cols // 64)) or not nnz <= nvals <= rows * cols + 64:
                raise self._damaged(f"tensor {name!r}: words {lens['words']}, {nvals} values for {(rows, cols)}")
        else:
            try:
                n, m = int(g.attrs["n"]), int(g.attrs["m"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._damaged(f"tensor {name!r}: N:M pattern: {exc}") from None
            if not 1 <= n < m <= 1 << 16 or nvals != rows * (-(-cols // m)) * n or len(lens["words"]) != 2 \
                    or lens["words"][0] != rows:
                raise self._damaged(f"tensor {name!r}: {n}:{m} with {nvals} values, words {lens['words']}")

    def packed(self, name) -> PackedMatrix:
        """A pruned tensor's packed matrix as stored (no CSR, no dense copy), checked
        (``sparsecore.check_packed``); a CSR-encoded tensor is packed on the way."""
        g = self.pruned[name]
        encoding = as_str(g.attrs.get("encoding", "csr"))
        dtype = as_str(g.attrs["dtype"])
        if encoding == "csr":
            return pack(self.csr(name), dtype=dtype if dtype in _PACKABLE else None, name=name)
        vals = g["vals"][()]
        if vals.dtype == np.float16:
            vals = vals.view(np.uint16)
        arrays = {k: g[k][()] for k in ("ptr", "deltas", "words") if k in g}
        nm = (int(g.attrs["n"]), int(g.attrs["m"])) if encoding == "nm" else (0, 0)
        p = PackedMatrix(encoding, tuple(int(v) for v in g.attrs["csr_shape"]), dtype, vals, arrays.get("ptr"),
                         arrays.get("deltas"), arrays.get("words"), *nm)
        try:
            check_packed(p, f"tensor {name!r}")
        except (TypeError, ValueError) as exc:
            raise self._damaged(str(exc)) from None
        if p.nnz != int(g.attrs["nnz"]):
            raise self._damaged(f"tensor {name!r}: {p.nnz} stored values, nnz {int(g.attrs['nnz'])}")
        return p

    def encoding(self, name):
        """How a pruned tensor is stored: ``"csr"`` (version 1 files too) or a packed format."""
        return as_str(self.pruned[name].attrs.get("encoding", "csr"))

    def stored_bytes(self, name):
        """Bytes of a pruned tensor's arrays as stored (before HDF5's filters), mask excluded."""
        g = self.pruned[name]
        return sum(g[k].size * g[k].dtype.itemsize for k in ("data", "indices", "indptr", "vals", "ptr", "deltas",
                                                               "words") if k in g)

    def _csr_parts(self, g):
        """``(data, indices, indptr)`` of a pruned tensor, checked: indptr from 0 to nnz without going back,
        every index in [0, columns) and rising within its row (a negative or too large index would mirror or
        misplace weights)."""
        if as_str(g.attrs.get("encoding", "csr")) != "csr":
            a = self.packed(as_str(g.attrs["name"])).to_csr()
            data, indices, indptr = a.data, a.indices, a.indptr
        else:
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
