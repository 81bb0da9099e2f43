"""Prune weight files offline: tensor by tensor, in bounded memory, atomically.

Selection is the engine's, so a file pruned here gets the masks that
:func:`sparsecore.prune` gives the same tensors in memory. Local selection
reads each tensor once. Global selection streams the tensors to find its one
exact threshold without holding them together: a strided sample of all keys
brackets the threshold and one more pass counts the keys below and collects
the few inside (or, with caps, a radix select of two histogram passes); then
the writing pass applies it. ``normalize`` adds one pass for the norms.

Output goes to a temporary file beside the target, is flushed and synced,
then renamed over the target: an interrupted run leaves no partial output,
and the input is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .. import _version
from .._atomic import AtomicDir, AtomicPath, remove_stale
from .._source import NORM_KINDS, NORM_NONE
from .._validate import flat
from ..csr import csr_of_mask
from ..patterns import ELEMENTS, NM
from ..prune import (
    TensorSummary,
    check_options,
    format_table,
    plan_selection,
)
from ..selection import each_source, norm_inverse
from . import _safetensors as st
from . import cluster
from .errors import FormatError, UserError
from .files import open_weights
from .formats import (
    CONVERTERS,
    PLACEHOLDER,
    H5File,
    KerasZip,
    WeightFile,
    kind_of_name,
    rebuild_h5,
    rebuild_into,
    to_float,
    write_keras_zip,
)
from .sharded import ShardedCheckpoint, is_checkpoint_path
from .sparse import ENCODINGS, SparseFile, SparseWriter, as_str
from .tensorwise import SmallBatches, lazy_sources, prune_one, tensor_summary

__all__ = ["FileResult", "densify_file", "prune_file"]


#: The per-tensor cap where caps bind (global scope, thresholds) unless one is given: no tensor is emptied.
SAFE_CAP = 0.99
#: A tensor pruned this far (and further than asked) is reported: it may no longer do its job.
HIGH_SPARSITY = 0.95


def default_max_sparsity(scope, threshold):
    """The per-tensor cap when none is given: :data:`SAFE_CAP` where caps bind (global scope,
    thresholds), 1 where each tensor gets exactly the sparsity asked."""
    return SAFE_CAP if (scope == "global" or threshold is not None) else 1.0


@dataclass
class FileResult:
    """What :func:`prune_file`, :func:`densify_file` and :func:`write_model` did."""

    source: str
    output: str
    format: str
    summary: list = field(default_factory=list)
    copied: list = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    moved_bytes: int = 0  # on a Dask cluster: pickled arguments and results between client and workers
    timings: dict = field(default_factory=dict)  # seconds by phase, where a caller measures them (calibrated)
    calibration: dict = field(default_factory=dict)  # what a calibrated prune was calibrated on
    ignored: list = field(default_factory=list)  # layers a calibrated prune left dense (outside the blocks)
    units: dict = field(default_factory=dict)  # whole units removed: group -> (kind, kept, of)
    parameters: tuple = ()  # (before, after) where units were removed

    def table(self):
        """The summary as a text table."""
        return format_table(self.summary, [])


def _real_outputs(dst):
    """Where writing ``dst`` lands, links resolved: its folder resolved and its own name (a link there is
    replaced, not followed), and also the link's target when ``dst`` is a link (never written through, but
    counted as the output all the same)."""
    a = os.path.abspath(dst)
    outs = [os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))]
    if os.path.islink(a):
        outs.append(os.path.realpath(a))
    return outs


def check_overlap(inputs, dst):
    """Refuse an output that is an input, holds one, or lies inside one: every
    path compared after resolving its links (the output's folder, the input,
    the scores, every file a model folder carries)."""
    outs = _real_outputs(dst)
    for p in inputs:
        real = os.path.realpath(p)
        for o in outs:
            common = os.path.commonpath([real, o])
            if common not in (real, o):
                continue
            via = "" if real == os.path.abspath(p) and o == os.path.abspath(dst) else " (after resolving links)"
            if real == o and not os.path.isdir(real):
                raise UserError(f"{dst}: the output would overwrite the input {p}{via}; give another output path")
            if common == o and real != o:
                raise UserError(f"{dst}: the input {p} lies inside the output folder{via}, which is replaced whole; "
                                f"give another path")
            raise UserError(f"{dst}: the output would overlap the input folder {p}{via}; give another path")


def _check_folder_name(dst):
    """A model folder is written as a folder: a name that says a single file is refused, never contradicted."""
    said = kind_of_name(dst)
    if said is not None:
        raise UserError(f"{dst}: the name says a {said} file, but a model folder is written as a folder of shards; "
                        f"name the output without a file extension (or end it in .sparse.h5 for one sparse file)")


def _check_paths(src, dst, force, folder=False, inputs=()):
    """``folder``: the output is a model folder (the input a sharded checkpoint, or its sparse file);
    ``inputs``: other files read (the scores)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src):
        raise UserError(f"{src}: no such file")
    remove_stale(dst)  # a killed run's leftovers first: an old output it had moved aside comes back
    check_overlap([src, *(os.fspath(p) for p in inputs if p is not None)], dst)
    if folder:
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise UserError(f"{dst}: a file; a sharded checkpoint is written as a folder: give a folder path")
        if os.path.exists(dst) and not force:
            raise UserError(f"{dst}: exists; pass force=True to replace it", cli=f"{dst}: exists; pass --force to "
                                                                                 f"replace it")
    elif os.path.exists(dst):
        if os.path.isdir(dst):
            raise UserError(f"{dst}: is a directory; give a file name for the output")
        if os.path.samefile(src, dst):
            raise UserError(f"{dst}: the output would overwrite the input; give another output path")
        if not force:
            raise UserError(f"{dst}: exists; pass force=True to replace it", cli=f"{dst}: exists; pass --force to "
                                                                                 f"replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UserError(f"{dst}: the folder {parent} does not exist")


def _background(fn, *args):
    """Run ``fn(*args)`` in a thread (hashlib releases the GIL); returns a
    callable that waits for the result."""
    out = {}

    def work():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()

    def result():
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    return result


def sha256_of(*files):
    """SHA-256 of a file, or of several read as one stream (a model folder's index and shards)."""
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _check_sparse_options(sparse, compression, encoding):
    """HDF5 compression and a packed encoding: known values, and only on sparse output."""
    if compression is not None and not sparse:
        raise UserError("compression applies to sparse HDF5 output (an output name ending in .sparse.h5)")
    if compression not in (None, "gzip", "lzf"):
        raise UserError(f"compression must be 'gzip' or 'lzf', got {compression!r}")
    if encoding != "auto" and not sparse:
        raise UserError("an encoding applies to sparse HDF5 output (an output name ending in .sparse.h5)")
    if encoding not in ENCODINGS:
        raise UserError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def prune_file(src, dst, *, sparsity=None, threshold=None, scope: str = "local", scores=None,
               criterion: str | None = None, min_sparsity=0.0, max_sparsity=None, normalize: str = "none",
               include: Iterable[str] = (), exclude: Iterable[str] = (), tensors: Iterable[str] | None = None,
               take_all: bool = False, any_rank: bool = False, format: str | None = None,
               sparse: bool | None = None, pattern: str | None = None,
               force: bool = False, progress: Callable[[int, int, str], None] | None = None,
               sync: bool = True, compression: str | None = None, encoding: str = "auto",
               client=None) -> FileResult:
    """Prune the weight file ``src`` into ``dst``.

    Parameters
    ----------
    src, dst : path
        Input in any format that :func:`open_weights` reads; the output is in
        the same format (dense, zeros where pruned), or sparsecore's sparse
        HDF5 when ``sparse`` is True (default: when ``dst`` ends in
        ``.sparse.h5``).
    sparsity, threshold, scope, min_sparsity, max_sparsity, normalize
        As for :func:`sparsecore.prune`, but ``max_sparsity`` defaults to
        :data:`SAFE_CAP` (0.99) where caps bind (global scope, thresholds),
        so that no tensor is emptied unless asked (``max_sparsity=1``).
    scores : path, optional
        A file of importance scores with the weights' names and shapes (any
        readable format, or ``.npz``); magnitude ``|w|`` without one.
    criterion : str, optional
        Names the scores' criterion in the output's provenance.
    include, exclude, take_all, any_rank
        Which tensors (see :meth:`WeightFile.select`): by default every float
        tensor with two or more dimensions, except optimizer state and what a
        user rarely means to prune (embeddings, depthwise and recurrent
        kernels, fixed bases; ``take_all`` takes them); ``any_rank`` adds 1-D
        tensors; ``include`` name patterns (fnmatch or substring) narrow the
        set, ``exclude`` patterns remove.
    tensors : iterable of str, optional
        Exact names to prune, instead of ``include``/``exclude``.
    pattern : "N:M", optional
        Keep ``n`` of every ``m`` consecutive entries along each tensor's
        axis 1 (its inputs, in PyTorch's ``(out, in, ...)`` layout), instead
        of a sparsity or threshold.
    force : bool
        Replace an existing ``dst``.
    progress : callable (done, total, name), optional
    format : {None, "safetensors", "torch"}
        Convert the output to this format; by default the output's name
        decides (``.safetensors``, ``.pt``/``.pth``/``.bin``; ``.keras`` and
        ``.h5`` for inputs of those formats) or, without a known extension,
        the input's format. A name that contradicts what is written is refused.
    compression : {None, "gzip", "lzf"}
        HDF5 filters (with byte shuffling) on the sparse output's arrays:
        smaller, several times slower to write.
    encoding : {"auto", "csr", "delta8", "bitmask", "nm"}
        How the sparse output stores each pruned tensor: ``"auto"`` the
        packed format of fewest bytes (``sparsecore.pack(..., "smallest")``; a 50% float32
        tensor in about half its dense bytes), or the one named (``"nm"``:
        2:4, every tensor must fit it); ``"csr"`` as version 1 did.
    sync : bool
        fsync the output before renaming it onto ``dst`` (durable across a
        power cut; the rename alone already makes it atomic for a killed run).
    client : distributed.Client, optional
        Run on this Dask cluster (``pip install 'sparsecore[dask]'``): a
        sharded checkpoint pruned into a model folder, each shard read,
        scored and written by a worker, only histograms, counts, rules and
        summaries crossing the network; the output is identical, bit for bit,
        to this function's without a client. The workers must see ``src``,
        ``scores`` and ``dst``'s folder at the same paths (a shared file
        system). See :mod:`sparsecore.io.cluster`.

    Returns
    -------
    FileResult
    """
    if max_sparsity is None:
        max_sparsity = default_max_sparsity(scope, threshold)
    try:  # prune()'s own checks and messages, before any file is read
        pattern = check_options(sparsity, threshold, scope, normalize, pattern)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if pattern is not ELEMENTS and not isinstance(pattern, NM):
        raise UserError(f"offline pruning takes N:M patterns ('2:4'), got {pattern!r}; select blocks or units in "
                        f"memory with sparsecore.prune")
    sharded = is_checkpoint_path(src)
    if sparse is None:
        sparse = os.fspath(dst).endswith(".sparse.h5")
    if sharded and not sparse:
        _check_folder_name(dst)
    _check_paths(src, dst, force, folder=sharded and not sparse, inputs=[scores])
    if client is not None and not (sharded and not sparse):
        raise UserError("a Dask cluster prunes a sharded checkpoint (a model folder or its index) into a model "
                        "folder; run without it for single files and sparse HDF5 output")
    _check_sparse_options(sparse, compression, encoding)
    include = [include] if isinstance(include, str) else list(include)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    # Python's cycle collector is held off while this process prunes: a file of 100,000 tiny tensors keeps
    # several objects per tensor alive (entries, sources, summaries), and each collection walked them all
    # (a third of the run); a whole run leaves fewer than 20 objects in cycles, in every format (measured).
    # A cluster's client keeps it: its threads are not ours.
    paused = st.gc_paused() if client is None else contextlib.nullcontext()
    with paused, open_weights(src) as reader:
        check_overlap(reader.input_files(), dst)  # every file a model folder carries, links resolved
        if isinstance(reader, SparseFile):
            raise UserError(f"{src}: already a sparsecore sparse file; densify it first "
                            f"('sparsecore densify {src} -o FILE'), then prune that")
        if sharded:
            copies = reader.weight_copies()
            if copies:
                raise UserError(f"{src}: the folder holds other copies of the weights besides its "
                                f"{reader.kind} shards ({', '.join(copies[:5])}"
                                f"{', ...' if len(copies) > 5 else ''}), which would be carried unpruned; move them "
                                f"out of the folder (or delete them) and prune again")
            if format is not None and format != reader.kind and not sparse:
                raise UserError(f"{src}: a model folder keeps its shards' format ({reader.kind}); format={format!r} "
                                f"converts single files only", cli=f"{src}: a model folder keeps its shards' format "
                                f"({reader.kind}); --format {format} converts single files only")
        if tensors is not None:
            names = list(tensors)
            bad = [n for n in names if n not in reader.entries or not reader.entries[n].is_float]
            if bad:
                raise UserError(f"{src}: no float tensor named {bad[0]!r}")
            names = [n for n in names if reader.entries[n].size]  # nothing to select in an empty tensor
        else:
            names = reader.select(include, exclude, take_all=take_all, any_rank=any_rank)
        if not names:
            raise UserError(f"{src}: no tensor to prune (float tensors with 2+ dimensions by default; "
                            f"the file has {len(reader.entries)} tensors; see --include)")
        kind = None if sparse or sharded else output_kind(dst, reader, format)  # before any tensor is read
        score_file = open_weights(scores) if scores is not None else None
        try:
            if score_file is not None:
                check_overlap(score_file.input_files(), dst)  # a scores checkpoint's every file too
            sources = lazy_sources(reader, names, score_file)
            srcs = [sources[n] for n in names]
            executor = None
            if client is not None:  # the same sources, their passes run on the workers
                executor = cluster.ShardExecutor(client, reader, names, srcs, scores)
            plan = (sources, _plan(srcs, names, sparsity, threshold, scope, min_sparsity, max_sparsity,
                                   normalize, pattern, executor), pattern)
            attrs = None
            if sparse:
                attrs = {"tool_version": _version.__version__,
                         "created": datetime.datetime.now(datetime.UTC).isoformat(),
                         "source_file": os.path.abspath(src), "source_format": reader.format,
                         "source_sha256": _background(sha256_of, *(reader.weight_files() if sharded else [src])),
                         "source_bytes": bytes_of(src),
                         "criterion": criterion or ("magnitude" if scores is None else "scores file"),
                         "scope": scope, "sparsity": json.dumps(sparsity), "threshold": json.dumps(threshold),
                         "normalize": normalize}
            result = FileResult(os.fspath(src), os.fspath(dst), "sparse" if sparse else reader.format)
            if kind is not None:
                result.format = kind
            with (AtomicDir if sharded and not sparse else AtomicPath)(dst, sync, replace=force) as tmp:
                if executor is not None:
                    executor.write(tmp, plan, result, progress)
                    result.moved_bytes = executor.moved
                else:
                    _write(reader, tmp, plan, result, sparse, attrs, progress, compression, kind, encoding)
        finally:
            if score_file is not None:
                score_file.close()
    result.input_bytes = bytes_of(src)
    result.output_bytes = bytes_of(dst)
    return result


#: The file a model folder written by :func:`write_model` records how it was made in.
RECIPE = "sparsecore_recipe.json"


def check_model_output(src, dst, *, sparse=None, force=False):
    """:func:`write_model`'s checks of the paths, for a caller to make before
    the long work that produces the tensors: the input exists, ``dst`` does
    not (unless ``force``), overlaps no input file, and a model folder is
    written under a folder's name. Returns whether the output is sparse."""
    if sparse is None:
        sparse = os.fspath(dst).endswith(".sparse.h5")
    folder = is_checkpoint_path(src) and not sparse
    if folder:
        _check_folder_name(dst)
    _check_paths(src, dst, force, folder=folder)
    with open_weights(src) as reader:
        check_overlap(reader.input_files(), dst)
    return sparse


def write_model(src, dst, tensors: Callable[[str], np.ndarray], names: Iterable[str], *, sparse: bool | None = None,
                force: bool = False, progress: Callable[[int, int, str], None] | None = None, sync: bool = True,
                compression: str | None = None, encoding: str = "auto",
                provenance: dict | None = None) -> FileResult:
    """Write the weight file or model folder ``src`` to ``dst`` with the
    tensors ``names`` replaced by ``tensors(name)``, the others as they are
    stored: what a framework that pruned and repaired a model in memory
    saves, in the input's own layout (a model folder's shards, names, dtypes,
    index and other files), or as sparse HDF5 (``sparse``, or a name ending
    in ``.sparse.h5``; zeros are the pruned entries).

    ``tensors(name)`` gives the new tensor as stored: the entry's shape and
    dtype (``uint16`` bit patterns for bfloat16), asked for one at a time
    in the order written. ``provenance`` (strings) is recorded: in the
    sparse file's attributes, or in a model folder's ``sparsecore_recipe.json``
    (:data:`RECIPE`). Atomic, as :func:`prune_file`.
    """
    sparse = check_model_output(src, dst, sparse=sparse, force=force)
    folder = is_checkpoint_path(src) and not sparse
    names = list(names)
    provenance = {str(k): str(v) for k, v in (provenance or {}).items()}
    _check_sparse_options(sparse, compression, encoding)
    with st.gc_paused(), open_weights(src) as reader:
        if isinstance(reader, SparseFile):
            raise UserError(f"{src}: already a sparsecore sparse file; densify it first")
        bad = [n for n in names if n not in reader.entries or not reader.entries[n].is_float]
        if bad:
            raise UserError(f"{src}: no float tensor named {bad[0]!r} to replace")

        def one(name, want_csr):
            e = reader.entries[name]
            raw = np.asarray(tensors(name))
            want = np.dtype(np.uint16) if e.dtype == "bfloat16" else np.dtype(e.dtype)
            if raw.dtype == np.int16 and want == np.uint16:
                raw = raw.view(np.uint16)
            if raw.shape != tuple(e.shape) or raw.dtype != want:
                raise ValueError(f"tensor {name!r}: the replacement is {raw.dtype} {raw.shape}, the file stores "
                                 f"{e.dtype} {tuple(e.shape)}")
            w = to_float(raw, e)
            mask = flat(w) != 0
            kept = int(np.count_nonzero(mask))
            a = csr_of_mask(w, mask, name=name) if want_csr else None
            csr_bytes = int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes) if a is not None else None
            return raw, a, mask, tensor_summary(e, kept, kept, w.dtype.itemsize, csr_bytes)

        attrs = None
        if sparse:
            attrs = {"tool_version": _version.__version__,
                     "created": datetime.datetime.now(datetime.UTC).isoformat(),
                     "source_file": os.path.abspath(src), "source_format": reader.format,
                     "source_bytes": bytes_of(src), "criterion": provenance.get("method", "given tensors"),
                     "scope": provenance.get("scope", "local"), "sparsity": provenance.get("sparsity", "null"),
                     "threshold": "null", "normalize": "none", **provenance}
        result = FileResult(os.fspath(src), os.fspath(dst), "sparse" if sparse else reader.format)
        with (AtomicDir if folder else AtomicPath)(dst, sync, replace=force) as tmp:
            _write_tensors(reader, tmp, one, names, result, sparse, attrs, progress, compression, None, encoding)
            if folder and provenance:
                _write_recipe(src, tmp, provenance)
    result.input_bytes = bytes_of(src)
    result.output_bytes = bytes_of(dst)
    return result


def _write_recipe(src, folder, provenance):
    if os.path.lexists(os.path.join(folder, RECIPE)):
        raise UserError(f"{src}: holds a {RECIPE} of its own, which the output's record would replace; move it out "
                        f"of the folder")
    with open(os.path.join(folder, RECIPE), "w") as f:
        json.dump({"tool": f"sparsecore {_version.__version__}", **provenance}, f, indent=1)


def write_folder(src, dst, fill: Callable[[str], None], *, force: bool = False, sync: bool = True,
                 provenance: dict | None = None) -> FileResult:
    """Write a new model folder ``dst`` from the model folder ``src`` whose
    tensors changed shape (a model with whole heads and channels removed):
    ``fill(folder)`` writes the framework's own files into an empty folder
    (``save_pretrained``: config and weights), then every other file of
    ``src`` that it did not write (tokenizer, generation config, ...) is
    copied, links checked as a prune's are, and ``provenance`` recorded in
    :data:`RECIPE`. Atomic, as :func:`prune_file`: ``dst`` appears whole or
    not at all, and the input is never touched."""
    if not is_checkpoint_path(src) or not os.path.isdir(os.fspath(src)):
        raise UserError(f"{src}: a model whose tensors change shape is written as a model folder; give the folder")
    check_model_output(src, dst, sparse=False, force=force)
    provenance = {str(k): str(v) for k, v in (provenance or {}).items()}
    with open_weights(src) as reader:
        copies = reader.weight_copies()
        if copies:
            raise UserError(f"{src}: the folder holds other copies of the weights ({copies[0]}, ...), which would "
                            f"be carried with the old shapes; move them out of the folder")
        others = [rel for rel in reader.other_files() if rel != RECIPE]
        with AtomicDir(dst, sync, replace=force) as tmp:
            fill(tmp)
            for rel in others:
                target = os.path.join(tmp, rel)
                if not os.path.lexists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(os.path.join(reader.folder, rel), target)
            if provenance:  # the input's own record, if any, is replaced by this one
                _write_recipe(src, tmp, provenance)
    result = FileResult(os.fspath(src), os.fspath(dst), "folder")
    result.input_bytes = bytes_of(src)
    result.output_bytes = bytes_of(dst)
    return result


def bytes_of(path):
    """Bytes of a weight file, or of every file in a model folder (an index: its folder)."""
    path = os.fspath(path)
    if is_checkpoint_path(path):
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    return os.path.getsize(path)


def _plan(srcs, names, sparsity, threshold, scope, min_sparsity, max_sparsity, normalize, pattern, executor=None):
    """``prune``'s own :class:`SelectionPlan` over the sources ``srcs`` of
    ``names``, in order (local sparsities are found when each tensor is
    written, so it is read once). Every pass over the data goes through
    :func:`~sparsecore.selection.each_source`, in this process or on a
    cluster's workers."""
    try:
        if NORM_KINDS[normalize] != NORM_NONE:
            for src, inv in zip(srcs, each_source(srcs, norm_inverse, [(normalize,)] * len(srcs), executor)):
                src.inv, src.scaled = inv, True
        plan = plan_selection(srcs, names, sparsity=sparsity, threshold=threshold, scope=scope,
                              min_sparsity=min_sparsity, max_sparsity=max_sparsity, pattern=pattern,
                              executor=executor)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return plan


FORMATS = tuple(CONVERTERS)  # what any input converts to (--format)


def output_kind(dst, reader, fmt=None):
    """What ``dst`` is written as: ``fmt`` if given ("safetensors", "torch"),
    else what its name says (``.safetensors``, ``.pt``/``.pth``/``.bin``,
    ``.keras``, ``.h5``), else the input's own format. A name that says a
    format the input cannot be written as is refused, never contradicted."""
    native = reader.native
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"format must be one of {list(FORMATS)} (or sparse HDF5: a name ending in .sparse.h5), "
                            f"got {fmt!r}")
        return fmt
    said = kind_of_name(dst)
    if said is None or said == native:
        if native is None:
            raise UserError(f"{reader.path}: writing the {reader.format} format is not supported; write "
                            f"safetensors (--format safetensors) or sparse HDF5 (an output name ending in .sparse.h5)")
        return native
    if said in FORMATS:
        return said
    like = {"keras": "name the output .keras", "hdf5": "name the output .h5"}.get(native, "keep the input's "
                                                                                         "extension")
    raise UserError(f"{dst}: the name says {said}, but a {reader.format} input is written as "
                    f"{native or 'another format'}; {like}, or pass --format safetensors/torch to convert")


def _write(reader, tmp, plan, result, sparse, attrs, progress, compression=None, kind=None, encoding="auto"):
    sources, plan, pattern = plan
    index = {n: i for i, n in enumerate(sources)}
    # small tensors many at a time, where the output is written in the plan's order (not an HDF5 rebuild,
    # whose order is the file's groups')
    rebuilt = reader.file_order and (kind is None or kind == reader.native)
    batches = None if sparse or rebuilt else SmallBatches(reader, sources, plan, pattern)

    def one(name, want_csr):
        got = batches.take(name) if batches is not None and not want_csr else None
        if got is not None:
            raw, summary = got
            return raw, None, None, summary
        return prune_one(reader, sources, plan, index[name], name, want_csr, pattern)

    _write_tensors(reader, tmp, one, list(sources), result, sparse, attrs, progress, compression, kind, encoding)


def _write_tensors(reader, tmp, one, names, result, sparse, attrs, progress, compression=None, kind=None,
                   encoding="auto"):
    """The output of ``reader`` with the tensors ``names`` as ``one(name, want_csr)`` gives them
    (``(raw, csr or None, flat mask or None, summary)``: CSR and mask are asked for sparse output) and
    the others as read; in the input's layout, converted to ``kind``, or sparse HDF5."""
    pruned = set(names)
    total = len(names)

    def step(name, want_csr):
        raw, a, mask, summary = one(name, want_csr)
        result.summary.append(summary)
        if progress is not None:
            progress(len(result.summary), total, name)
        return raw, a, mask

    result.copied = [n for n in reader.entries if n not in pruned]
    if sparse:
        _write_sparse(reader, tmp, step, pruned, attrs, compression, encoding)
    elif kind is not None and kind != reader.native:  # converted (a folder keeps its own format: kind None)
        CONVERTERS[kind].write_stream(tmp, reader.entries, lambda n: step(n, False)[0] if n in pruned else
                                      reader.raw(n), source=reader.path)
    else:
        reader.write_like(tmp, lambda n: step(n, False)[0], pruned)


def _json_dataset(group, name, value):
    """JSON as a uint8 dataset: no 64 KiB limit, as attributes have."""
    group.create_dataset(name, data=np.frombuffer(json.dumps(value).encode(), np.uint8))


def _stream_into(group, name, fin, size, what):
    """The ``size`` bytes of the open binary file ``fin`` as a uint8 dataset, 1 MiB at a time;
    more bytes than declared are refused (``what`` names the source)."""
    ds = group.create_dataset(name, (size,), np.uint8)
    done = 0
    while chunk := fin.read(1 << 20):
        if done + len(chunk) > size:
            raise UserError(f"{what} holds more bytes than its declared {size}")
        ds[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
        done += len(chunk)
    return ds


def _write_sparse(reader, tmp, step, pruned, attrs, compression=None, encoding="auto"):
    w = SparseWriter(tmp, attrs, compression, encoding)
    try:
        c = w.container
        if isinstance(reader, ShardedCheckpoint):  # one file for the model; densify rebuilds the folder
            c.attrs["kind"] = "sharded"
            c.attrs["shard_kind"] = reader.kind
            _json_dataset(c, "order", list(reader.entries))
            layout = {}
            for shard in reader.shards:
                names = reader.names_in(shard)
                src = reader.reader(shard)
                layout[shard] = {"names": names, "metadata": getattr(src, "metadata", None) or None,
                                 "dtypes": {n: src.header[n][0] for n in names} if reader.kind == "safetensors"
                                 else None}
            _json_dataset(c, "shards", layout)
            files = c.create_group("files")
            for i, rel in enumerate(([reader.index_name] if reader.index_name else []) + reader.other_files()):
                path = os.path.join(reader.folder, rel)
                with open(path, "rb") as fin:
                    _stream_into(files, str(i), fin, os.path.getsize(path), path).attrs["path"] = rel
            _tensors_into(w, c, reader, step, pruned)
            return
        if isinstance(reader, H5File) and reader.format != "sparse":
            c.attrs["kind"] = "keras" if isinstance(reader, KerasZip) else "hdf5"
            by_path = {reader.dataset_path(n): n for n in pruned}

            def replace(path):
                if path not in by_path:
                    return None
                name = by_path[path]
                _, a, mask = step(name, True)
                w.add(reader.entries[name], _csr_for_file(a, reader.entries[name]), mask, source_path=path)
                return PLACEHOLDER

            rebuild_into(reader.h5, c.create_group("h5"), replace)
            if isinstance(reader, KerasZip):
                c.attrs["members"] = json.dumps(reader.members)
                z = c.create_group("zip")
                with zipfile.ZipFile(reader.zip_path) as zf:
                    for i, (name, _) in enumerate(reader.members):
                        if name != "model.weights.h5":  # streamed into the dataset, 1 MiB at a time
                            try:
                                with zf.open(name) as fin:
                                    _stream_into(z, str(i), fin, zf.getinfo(name).file_size,
                                                 f"{reader.zip_path}: member {name}")
                            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                                raise UserError(f"{reader.zip_path}: member {name} cannot be read ({exc}); the "
                                                f"archive is truncated or corrupt") from None
            return
        # what densify writes back: the input's own format, or a PyTorch state dict for a format without a
        # writer of its own (npz)
        c.attrs["kind"] = reader.native if reader.native in CONVERTERS else "torch"
        c.attrs["order"] = json.dumps(list(reader.entries))
        hdr = getattr(reader, "header_bytes", None)  # dtypes and metadata, as they were
        if hdr is not None:
            c.create_dataset("header", data=np.frombuffer(hdr, np.uint8))
        _tensors_into(w, c, reader, step, pruned)
    finally:
        w.close()


def _tensors_into(w, c, reader, step, pruned):
    """Every tensor of a flat (non-HDF5) reader, in its order: the pruned ones as CSR, the others
    as they are stored (``raw/<index>``, named)."""
    raw_g = c.create_group("raw")
    for i, (name, e) in enumerate(reader.entries.items()):
        if name in pruned:
            _, a, mask = step(name, True)
            w.add(e, _csr_for_file(a, e), mask)
        else:
            ds = raw_g.create_dataset(str(i), data=reader.raw(name))
            ds.attrs["name"] = name
            ds.attrs["dtype"] = e.dtype


def _csr_for_file(a, entry):
    """CSR to store: float16 data goes back to float16 (exactly); bfloat16 stays float32."""
    if entry.dtype == "float16":
        a.data = a.data.astype(np.float16)
    return a


def densify_file(src, dst, *, force: bool = False, sync: bool = True) -> FileResult:
    """Write a sparse HDF5 file back in the format it was pruned from
    (dense, zeros where pruned): bit for bit the masked weights."""
    with open_weights(src) as reader:
        folder = isinstance(reader, SparseFile) and reader.kind == "sharded"
        if folder:
            _check_folder_name(dst)
        _check_paths(src, dst, force, folder=folder)
        if not isinstance(reader, SparseFile):
            raise UserError(f"{src}: a {reader.format} file, not a sparsecore sparse file; densify reads the "
                            f"output of 'sparsecore prune ... -o X.sparse.h5'")
        result = FileResult(os.fspath(src), os.fspath(dst), reader.kind)
        h = reader.h5
        c = h["container"]
        try:
            with (AtomicDir if reader.kind == "sharded" else AtomicPath)(dst, sync, replace=force) as tmp:
                if reader.kind == "sharded":
                    _densify_folder(reader, c, tmp)
                elif reader.kind in ("hdf5", "keras"):
                    paths = {as_str(g.attrs["source_path"]): n for n, g in reader.pruned.items()}

                    def replace(path):
                        return reader.raw(paths[path]) if path in paths else None

                    if reader.kind == "hdf5":
                        rebuild_h5(c["h5"], tmp, replace)
                    else:
                        members = [tuple(m) for m in reader.json(c.attrs["members"])]
                        with tempfile.TemporaryFile(prefix="sparsecore-keras-") as h5tmp:
                            rebuild_h5(c["h5"], h5tmp, replace)
                            data = {name: (c["zip"][str(i)].shape[0], _dataset_writer(c["zip"][str(i)]))
                                    for i, (name, _) in enumerate(members) if name != "model.weights.h5"}
                            write_keras_zip(members, None, h5tmp, tmp, member_bytes=data)
                else:  # a flat file: its tensors in order, safetensors dtypes and metadata as they were
                    hdr = reader.json(c["header"]) if "header" in c and reader.kind == "safetensors" else {}
                    meta = hdr.pop("__metadata__", None)
                    CONVERTERS[reader.kind].write_stream(tmp, reader.entries, reader.raw, source=reader.path,
                                                         dtypes={n: h["dtype"] for n, h in hdr.items()},
                                                         metadata=meta)
        except (UserError, FormatError):
            raise
        except (KeyError, AttributeError, TypeError, IndexError, NotImplementedError, RecursionError, ValueError,
                zipfile.BadZipFile) as exc:  # a damaged container, whatever part of it: one line naming the file
            msg = " ".join(str(exc).split())[:300]
            raise UserError(f"{src}: a damaged sparsecore sparse file ({type(exc).__name__}: {msg}); nothing was "
                            f"written") from None
        result.summary = [TensorSummary(n, e.shape, e.size, e.size - int(reader.mask(n).sum()), reader.nnz(n),
                                        e.nbytes, 0) for n, e in reader.entries.items() if n in reader.pruned]
    result.input_bytes = os.path.getsize(src)
    result.output_bytes = bytes_of(dst)
    return result


def _densify_folder(reader, c, tmp):
    """The model folder a sharded checkpoint's sparse file was made from: every shard under its
    own name (safetensors dtypes and metadata as they were), the index and the other files."""
    layout = reader.json(c["shards"])
    kind = as_str(c.attrs["shard_kind"])
    if not isinstance(layout, dict) or kind not in CONVERTERS:
        raise UserError(f"{reader.path}: the shard layout is not a mapping of shards (kind {kind!r}); the file is "
                        f"damaged")
    for shard, info in layout.items():
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise UserError(f"{reader.path}: shard name {shard!r} is not a plain file name; the file is damaged")
        names = info.get("names") if isinstance(info, dict) else None
        dtypes = info.get("dtypes") if kind == "safetensors" else {}
        if not isinstance(names, list) or not isinstance(dtypes, dict):
            raise UserError(f"{reader.path}: shard {shard!r} lists no tensor names; the file is damaged")
        for n in names:
            if not isinstance(n, str) or n not in reader.entries or (kind == "safetensors" and n not in dtypes):
                raise UserError(f"{reader.path}: shard {shard!r} names the tensor {n!r}, which the file does not "
                                f"hold; the file is damaged")
    carried = [as_str(c["files"][k].attrs["path"]) for k in c["files"]]
    clash = set(layout) & {os.path.normpath(r) for r in carried} or \
        {os.path.normpath(r) for r in carried if carried.count(r) > 1}
    if clash:
        raise UserError(f"{reader.path}: the carried file {sorted(clash)[0]!r} would overwrite a shard or another "
                        f"carried file; the file is damaged")
    for shard, info in layout.items():
        CONVERTERS[kind].write_stream(os.path.join(tmp, shard), {n: reader.entries[n] for n in info["names"]},
                                      reader.raw, source=reader.path, dtypes=info.get("dtypes"),
                                      metadata=info.get("metadata"))
    for key in c["files"]:
        ds = c["files"][key]
        rel = as_str(ds.attrs["path"])
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or ".." in parts:
            raise UserError(f"{reader.path}: carried file {rel!r} would leave the output folder; the file is damaged")
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
        with open(os.path.join(tmp, rel), "wb") as f:
            _dataset_writer(ds)(f)


def _dataset_writer(ds):
    """``write(file)``: the bytes of a 1-D uint8 dataset, 1 MiB at a time."""
    def write(f):
        for i in range(0, ds.shape[0], 1 << 20):
            f.write(ds[i:i + (1 << 20)].tobytes())
    return write


def tensor_stats(reader: WeightFile, name: str) -> tuple[int, int]:
    """``(zeros, size)`` of one tensor (stored entries for a sparse file)."""
    e = reader.entries[name]
    if isinstance(reader, SparseFile) and name in reader.pruned:
        g = reader.pruned[name]
        return e.size - int(g.attrs["kept"]), e.size
    vals = reader.floats(name)
    return int(vals.size - np.count_nonzero(vals)), int(vals.size)
