"""The work on one tensor and on one shard that offline pruning does: in
this process (:mod:`sparsecore.io.offline`) or in a worker of a Dask cluster
(:mod:`sparsecore.io.cluster`), by the same code, so that both give the same
bytes."""

from __future__ import annotations

import math

import numpy as np

from .._kernels.cpu_pattern import keep_raw
from .._kernels.cpu_select import batch_keep
from .._kernels.keys import MODE_ABS, MODE_IDENTITY, MODE_SQUARE
from .._source import Source
from .._validate import flat
from ..patterns import ELEMENTS
from ..prune import TensorSummary, select_tensor
from . import _safetensors as st
from .errors import UserError
from .formats import to_float


class LazySource:
    """A selection source whose data is read from the file when used, so
    that only one tensor is in memory at a time: the floats of tensor
    ``name`` of the open reader ``file`` (the weights, or a scores file)."""

    role = "scores"
    original = None
    on_device = False
    __slots__ = ("name", "shape", "dtype", "file", "mode", "inv", "scaled", "size")  # one per tensor of a file

    def __init__(self, name, shape, dtype, file, mode):
        self.name, self.shape, self.dtype, self.file, self.mode = name, shape, dtype, file, mode
        self.inv, self.scaled = 1.0, False
        self.size = math.prod(shape)  # a Python int: np.prod costs ~10 us a tensor

    def load(self):
        """The scores, in their shape, read from the file now."""
        return self.file.floats(self.name)

    @property
    def data(self):
        """The scores, flat, read from the file now."""
        return flat(self.load())

    def joined_data(self, run):
        """The scores of the sources ``run`` (this one first), flat and laid end to end: one read for each
        stretch of them that are tensors of one file in one stored dtype."""
        f, entries = self.file, self.file.entries
        if any(src.file is not f for src in run):
            return np.concatenate([src.data for src in run])
        parts, start = [], 0
        for t in range(1, len(run) + 1):
            if t == len(run) or entries[run[t].name].dtype != entries[run[start].name].dtype:
                parts.append(to_float(f.raw_run([src.name for src in run[start:t]]), entries[run[start].name]))
                start = t
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def sample_data(self, m):
        """At least ``m`` scores from evenly spaced rows (read alone when the
        format allows), for the selection's sample."""
        if len(self.shape) < 2 or self.size == 0:
            return self.data
        row = self.size // self.shape[0]
        step = max(1, self.shape[0] // max(1, -(-m // row)))
        return flat(self.file.row_subset(self.name, step))

    def needs_wide(self):
        """Whether its keys need 64 bits (float64 scores, normalised, squared)."""
        return self.dtype == np.float64 or self.scaled or self.mode == MODE_SQUARE


_WIDENED = {"bfloat16": np.dtype(np.float32), "float16": np.dtype(np.float32)}


def float_dtype(entry):
    """The dtype a tensor's scores are compared in: float32 for 16-bit floats."""
    return _WIDENED.get(entry.dtype) or np.dtype(entry.dtype)


def lazy_sources(reader, names, score_file):
    """The selection sources of tensors ``names`` of ``reader``, by name: the
    magnitudes of the weights, or the scores in ``score_file`` (checked
    against the weights), each read from its file when used."""
    entries = reader.entries
    sources = {}
    if score_file is None:
        dtypes = {}  # float_dtype's answer, once per stored dtype
        with st.gc_paused():  # one object per tensor, and no cycles
            for n in names:
                e = entries[n]
                dt = dtypes.get(e.dtype)
                if dt is None:
                    dt = dtypes[e.dtype] = float_dtype(e)
                sources[n] = LazySource(n, e.shape, dt, reader, MODE_ABS)
        return sources
    for n in names:
        e = entries[n]
        if n not in score_file.entries:
            hint = ""
            if reader.format.startswith("keras") and any("/vars/" not in k for k in score_file.entries):
                hint = (" (names like 'dense/kernel' are the Keras adapter's: rename them with "
                        "sparsecore.adapters.keras.to_file_names(model, scores) before saving)")
            raise UserError(f"scores file {score_file.path} has no tensor {n!r}; it needs one per pruned tensor "
                            f"(same names as the weights){hint}")
        se = score_file.entries[n]
        if se.shape != e.shape:
            raise UserError(f"scores {n!r} have shape {se.shape} but weights {n!r} have shape {e.shape}")
        if not se.is_float:
            raise UserError(f"scores {n!r} have dtype {se.dtype}; scores must be floats")
        sources[n] = LazySource(n, e.shape, float_dtype(se), score_file, MODE_IDENTITY)
    return sources


def prune_one(reader, sources, plan, i, name, want_csr, pattern=ELEMENTS):
    """``(masked raw array, csr or None, flat mask, summary)`` of one tensor."""
    e = reader.entries[name]
    raw = reader.raw(name)
    w = to_float(raw, e)
    lazy = sources[name]
    if lazy.mode == MODE_ABS:  # magnitude: the weights just read are the scores
        src = Source(name, flat(w), e.shape, MODE_ABS, lazy.inv, lazy.scaled, role="weights", original=w)
    else:
        s = lazy.load()
        src = Source(name, flat(s), e.shape, MODE_IDENTITY, lazy.inv, lazy.scaled, original=s)
    try:
        a, mask, _, kept = select_tensor(src, w, plan, i, pattern, want_csr=want_csr)
    except ValueError as exc:
        raise UserError(f"{reader.path}: {exc}") from None
    nnz = int(keep_raw(_bits(raw.reshape(-1)), mask, flat(w)))  # w aliases ``raw`` for float32/64: it counts
    # before zeroing; ``raw`` is our own copy, written in place
    csr_bytes = int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes) if a is not None else None
    return raw, a, mask, tensor_summary(e, kept, nnz, w.dtype.itemsize, csr_bytes)


def _bits(flat_raw):
    """The stored values as unsigned integers of their width (their bit patterns), a view."""
    return flat_raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[flat_raw.dtype.itemsize])


def tensor_summary(entry, kept, nnz, itemsize, csr_bytes=None):
    """A pruned tensor's summary line; ``csr_bytes`` when no CSR was built: what int32 indices and
    ``itemsize``-byte values of its 2-D view would take."""
    return _summary_line(entry.name, entry.shape, entry.size, entry.nbytes, kept, nnz, itemsize, csr_bytes)


def _summary_line(name, shape, size, nbytes, kept, nnz, itemsize, csr_bytes=None):
    """:func:`tensor_summary` from the entry's fields, for a caller that has them at hand."""
    if csr_bytes is None:  # rows of the 2-D view (csr.matrix_shape): the first axis, or one row
        csr_bytes = nnz * (itemsize + 4) + 4 * ((shape[0] if len(shape) >= 2 else 1) + 1)
    return TensorSummary(name, shape, size, size - kept, nnz, nbytes, csr_bytes)


#: Tensors of at most this many entries are pruned in batches (:class:`SmallBatches`).
SMALL = 1 << 12
#: Entries of one batch, at most.
BATCH = 1 << 20


class SmallBatches:
    """Prunes the small tensors of a plan many at a time: what :func:`prune_one`
    gives each, bit for bit, without its per-tensor cost (a file of 100,000
    tiny tensors spent most of its time there). A batch is a run of small
    tensors, consecutive in the plan's order (the order files are written
    in), that share their dtype and their scores' form, of at most
    :data:`BATCH` entries; the batches are laid out once, and the first
    tensor asked for runs its whole batch: its bytes read in one piece, one
    kernel selecting and zeroing them all. Only unstructured selection by
    whole tensor (no pattern, no row scope) is batched; :meth:`take` answers
    None for any other tensor."""

    def __init__(self, reader, sources, plan, pattern=ELEMENTS):
        self.reader, self.sources, self.plan = reader, sources, plan
        self.batch_of = {}  # name -> (first, end) indices of its batch in the plan's order
        self.names = list(sources)
        self.done = {}
        if pattern is not ELEMENTS or plan.row_fractions is not None:
            return
        entries, rules = reader.entries, plan.rules
        run, form, total = [], None, 0
        for i, name in enumerate(self.names):
            src = sources[name]
            size = src.size
            f = None
            if 0 < size <= SMALL:
                rule = rules[i]
                f = (entries[name].dtype, src.mode, rule.wide if rule is not None else src.needs_wide(),
                     src.scaled)
            if f is None or f != form or total + size > BATCH:
                self._close(run)
                run, form, total = [], f, 0
            if f is not None:
                run.append(i)
                total += size
        self._close(run)

    def _close(self, run):
        if run:
            span = (run[0], run[-1] + 1)
            for i in run:
                self.batch_of[self.names[i]] = span

    def take(self, name):
        """``(masked raw array, summary)`` of tensor ``name``, or None when it is not batched."""
        got = self.done.pop(name, None)
        if got is None:
            span = self.batch_of.get(name)
            if span is None:
                return None
            self._run(range(*span))
            got = self.done.pop(name)
        return got

    def _run(self, batch):
        reader, plan = self.reader, self.plan
        names = self.names[batch.start:batch.stop]
        srcs = [self.sources[n] for n in names]
        first = srcs[0]
        entry = reader.entries[names[0]]
        raw = reader.raw_run(names)
        w = to_float(raw, entry)  # aliases ``raw`` for float32/64: the kernel reads an entry before it zeroes it
        s = w if first.mode == MODE_ABS else np.concatenate([flat(src.load()) for src in srcs])
        sizes = [src.size for src in srcs]
        offs = np.zeros(len(batch) + 1, np.int64)
        np.cumsum(sizes, out=offs[1:])
        rules = plan.rules[batch.start:batch.stop]
        rule_key = np.array([r.key if r is not None else 0 for r in rules], np.uint64)
        quota = np.array([r.quota if r is not None else 0 for r in rules], np.int64)
        count = np.array([-1 if r is not None else plan.counts[i] for i, r in zip(batch, rules)], np.int64)
        inv = np.array([src.inv for src in srcs], np.float64)
        kept, nnz, bad = (np.zeros(len(batch), np.int64) for _ in range(3))
        batch_keep(w, s, offs, first.mode, inv, bool(first.scaled), rules[0].wide if rules[0] is not None else
                   first.needs_wide(), rule_key, quota, count, plan.lo[batch.start:batch.stop],
                   plan.hi[batch.start:batch.stop], bool(plan.capped), _bits(raw), kept, nnz, bad)
        if bad.any():  # the one-tensor path names the tensor and the first non-finite entry
            t = int(np.flatnonzero(bad)[0])
            prune_one(reader, self.sources, plan, batch[t], names[t], False)
        # each summary as tensor_summary gives it, without its per-tensor entry lookups (a batch holds one
        # dtype: the stored bytes are its itemsize times the size)
        item, stored = w.dtype.itemsize, raw.dtype.itemsize
        done = self.done
        for src, b, size, k, z in zip(srcs, offs.tolist(), sizes, kept.tolist(), nnz.tolist()):
            done[src.name] = (raw[b:b + size].reshape(src.shape),
                              _summary_line(src.name, src.shape, size, size * stored, k, z, item))
