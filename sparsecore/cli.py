"""The ``sparsecore`` command line: info, prune, densify, report, demo.

Every failure prints one line (``sparsecore: error: ...``) and exits with
status 1 (2 for bad usage, 130 when interrupted); ``--debug`` shows the
traceback instead. Nothing is left half-written. Names and strings read from
files are printed with their control characters escaped (a tensor name
cannot retitle or clear the terminal) and long strings cut.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
from numba.core import event as _numba_event

from . import __version__
from ._atomic import AtomicPath
from ._demo import default_model_path, default_test_accuracy
from ._demo import main as demo
from .importance import get_criterion, list_criteria
from .io import UserError, cluster, densify_file, open_weights, prune_file
from .io.calibration import SAMPLES, SEQ_LEN, CalibratedPrune, calibrator
from .io.formats import EMPTY
from .io.offline import HIGH_SPARSITY, SAFE_CAP, bytes_of, check_overlap, default_max_sparsity, tensor_stats
from .io.sharded import is_checkpoint_path
from .patterns import pattern_of
from .prune import TensorSummary, format_table
from .reconstruct import list_repairs

_EPILOG = """examples:
  sparsecore prune                                  prune the embedded default model (90%, global)
  sparsecore info model.keras
  sparsecore prune model.keras -o pruned.keras --sparsity 0.8 --scope global --max-sparsity 0.95
  sparsecore prune model.safetensors -o model.sparse.h5 --sparsity 0.9
  sparsecore prune model.weights.h5 -o out.weights.h5 --scores fisher.npz --criterion fisher --sparsity 0.5
  sparsecore densify model.sparse.h5 -o model.safetensors
  sparsecore report model.sparse.h5 --plot sparsity.png
"""


# C0 and C1 control characters (terminal escapes among them), and the invisible format characters that
# reorder or hide text (bidirectional overrides, zero-width marks)
_HIDDEN = r"\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff"
_CONTROL = re.compile(rf"[\x00-\x1f{_HIDDEN}]")
_CONTROL_BUT_NEWLINE = re.compile(rf"[\x00-\x09\x0b-\x1f{_HIDDEN}]")
#: A string from a file (a provenance field) is cut to this many characters when printed.
LONGEST = 200


def _clean(text, limit=None, newlines=False):
    """``text`` safe to print: control characters shown as escapes (``\\x1b``), newlines too unless
    ``newlines``; cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if text.isprintable():  # holds none of them (each is Unicode "Other"): the common case, ten times cheaper
        return text
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _Progress:
    """A one-line progress bar on stderr, only when it is a terminal."""

    def __init__(self, enabled):
        self.enabled = enabled and sys.stderr.isatty()
        self.start, self.first = time.monotonic(), 0

    def __call__(self, done, total, name):
        if not self.enabled:
            return
        now = time.monotonic()
        if done <= 1 and total > 1:  # a new bar (the work before the first item is not its pace)
            self.start, self.first = now, done
        width = 30
        filled = width * done // max(total, 1)
        spent = now - self.start
        eta = ""
        if done < total and done > self.first and spent > 2:
            left = spent / (done - self.first) * (total - done)
            eta = f" ETA {int(left // 60)}:{int(left % 60):02d}"
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {_clean(name, 40):<40}{eta:<10}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _parser():
    p = argparse.ArgumentParser(prog="sparsecore", description="Prune neural-network weight files offline, with "
                                "no framework installed: Keras .keras / .weights.h5 / legacy .h5, safetensors, "
                                "PyTorch state dicts, and sparsecore's sparse HDF5.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sparsecore {__version__}")
    p.add_argument("--debug", action="store_true", help="on a failure, show the traceback instead of one line")
    debug = argparse.ArgumentParser(add_help=False)  # accepted after the command too
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on a failure, show the traceback instead of one line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("info", parents=[debug], help="tensors, shapes, dtypes, sparsity and bytes of a weight file")
    q.add_argument("file")

    q = sub.add_parser("prune", parents=[debug], help="prune a weight file (no input: the embedded default model)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune a weight file into the same format (dense, zeros where pruned) or "
                                   "into sparse HDF5 (an output name ending in .sparse.h5, or --sparse). "
                                   "With no input, the embedded default model (an MLP 64-128-10) is pruned.")
    q.add_argument("input", nargs="?", help="weight file (default: the embedded model)")
    q.add_argument("-o", "--output", help="output file (required with an input)")
    how = q.add_mutually_exclusive_group()
    how.add_argument("--sparsity", type=float, help="fraction to prune, exactly round(s*n) entries")
    how.add_argument("--threshold", type=float, help="prune where the score is below this")
    how.add_argument("--pattern", metavar="N:M",
                     help="keep N of every M consecutive entries along each tensor's inputs (axis 1), e.g. 2:4")
    q.add_argument("--scope", choices=["local", "global", "row"], default=None,
                   help="per tensor (default), one threshold across tensors, or within each output row")
    q.add_argument("--scores", help="importance scores file (same tensor names); default: magnitude |w|")
    q.add_argument("--criterion", help="the scores' criterion, recorded in sparse output")
    q.add_argument("--min-sparsity", type=float, default=0.0, help="per-tensor lower cap (default 0)")
    q.add_argument("--max-sparsity", type=float, default=None,
                   help=f"per-tensor upper cap (default {SAFE_CAP} in global scope and with --threshold, so "
                        f"that no tensor is emptied; 1 allows it)")
    q.add_argument("--normalize", choices=["none", "l1", "l2", "max"], default="none",
                   help="divide each tensor's scores by their norm (for global scope)")
    q.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="prune only tensors matching (fnmatch or substring; repeatable)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="never prune these")
    q.add_argument("--take-all", action="store_true",
                   help="also prune what the default set leaves out: embeddings, depthwise and recurrent kernels, "
                        "fixed bases (see 'info')")
    q.add_argument("--any-rank", action="store_true",
                   help="also prune 1-D tensors (biases, norms), which are left out otherwise")
    q.add_argument("--sparse", action="store_true", help="write sparse HDF5 whatever the output's name")
    q.add_argument("--format", choices=["safetensors", "torch"],
                   help="convert the output to this format (default: what the output's name says, .safetensors, "
                        ".pt/.bin, else the input's format)")
    q.add_argument("--compress", choices=["gzip", "lzf"],
                   help="HDF5 filters on the sparse output's arrays (smaller, slower)")
    q.add_argument("--encoding", choices=["auto", "csr", "delta8", "bitmask", "nm"], default="auto",
                   help="how a sparse output stores each pruned tensor: the packed format of fewest bytes (auto), "
                        "one named (nm: 2:4), or CSR (default: %(default)s)")
    q.add_argument("--force", action="store_true", help="replace an existing output")
    q.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    q.add_argument("--no-sync", action="store_true",
                   help="skip the fsync before the rename (faster; still atomic, not durable on power loss)")
    cal = q.add_argument_group(
        "calibrated pruning", "a Hugging Face model folder pruned with its own inputs: each layer repaired from "
        "what the layers before it give, block by block (needs pip install 'sparsecore[hf]': PyTorch and "
        "transformers run the model); magnitude alone ruins a language model, --method sparsegpt keeps it")
    cal.add_argument("--method", default="magnitude", choices=list_repairs("mask"),
                     help="how each layer's mask is chosen: magnitude (default; with --calibration only to "
                          "repair), or from calibration: sparsegpt (the mask chosen while the kept weights are "
                          "updated), wanda (|w|*||x||), obs")
    cal.add_argument("--calibration", metavar="FILE",
                     help="calibration data: plain text, JSON lines ({\"text\": ...} or {\"input_ids\": [...]}) or "
                          ".npy token ids")
    cal.add_argument("--samples", type=int, metavar="N", help=f"calibration samples (default {SAMPLES})")
    cal.add_argument("--seq-len", type=int, metavar="N",
                     help=f"tokens per sample (default {SEQ_LEN}, or the model's positions where fewer; an encoder's "
                          f"samples are lines, cut there)")
    cal.add_argument("--update", choices=["obs", "refit", "obs+refit"],
                     help="with wanda, obs or magnitude: how the kept weights are repaired (default: not)")
    cal.add_argument("--order", choices=["block", "layer"],
                     help="block (default): a block's layers from one pass; layer: each on the pruned ones before it")
    cal.add_argument("--dense-target", type=float, metavar="A",
                     help="0 (default): each layer reproduces its own outputs; 1: the dense model's (about twice "
                          "the forward passes); between: a blend")
    cal.add_argument("--dense-batches", type=int, metavar="N",
                     help="with --dense-target: run the dense model on the first N samples only")
    cal.add_argument("--dense-layers", action="append", metavar="PATTERN",
                     help="with --dense-target: only these layers aim at the dense model (repeatable)")
    cal.add_argument("--allocation", choices=["uniform", "owl"],
                     help="uniform (default): every layer at --sparsity; owl: blocks with more outliers pruned "
                          "less, --sparsity on average")
    cal.add_argument("--units", metavar="KINDS",
                     help="remove whole units instead of weights: heads, channels or heads,channels (attention "
                          "heads, a key/value head with its query heads; MLP channels), the same count in every "
                          "layer, into a smaller dense model that from_pretrained loads; --sparsity is the fraction "
                          "of units removed")
    cal.add_argument("--unit-score", choices=["fluctuation", "magnitude"],
                     help="with --units: FLAP's fluctuation of each unit's inputs (default) or weight magnitude")
    cal.add_argument("--unit-repair", choices=["refit+bias", "refit", "bias", "none"],
                     help="with --units: how each consumer (o_proj, down_proj) is repaired: least-squares refit of "
                          "its kept inputs with a fitted bias (default), without, FLAP's bias compensation, none")
    cal.add_argument("--unit-order", choices=["block", "model"],
                     help="with --units: block (default): each block scored and repaired on what the blocks cut "
                          "before it give; model: all from one pass of the dense model (faster)")
    cal.add_argument("--multiple", type=int, metavar="N",
                     help="with --units: kept counts rounded down to a multiple of N (64: shapes hardware tiles)")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--dask", metavar="ADDRESS",
                       help="run on the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786): a sharded "
                            "checkpoint into a model folder, each shard read and written by a worker; the paths "
                            "must be the same on every machine (needs: pip install 'sparsecore[dask]')")
    where.add_argument("--workers", type=int, metavar="N",
                       help="run on a new local Dask cluster of N worker processes (as --dask); at most one per "
                            "usable core and one per 320 MiB of available memory")
    q.add_argument("--dask-log", metavar="FILE",
                   help="with --dask or --workers: keep Dask's own logs (scheduler, nannies, workers) in FILE; "
                        "without it they stay off the terminal")

    q = sub.add_parser("densify", parents=[debug], help="turn a sparse HDF5 file back into its source format")
    q.add_argument("input")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--force", action="store_true")
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("report", parents=[debug], help="per-tensor sparsity table (and a PNG plot with matplotlib)")
    q.add_argument("file")
    q.add_argument("--plot", metavar="PNG", help="write a bar chart of per-tensor sparsity")
    q.add_argument("--force", action="store_true", help="replace an existing --plot file")

    q = sub.add_parser("demo", parents=[debug],
                       help="the engine on raw arrays: train, prune by OBD, fine-tune, run CSR")
    q.add_argument("--sparsity", type=float, default=0.9)
    q.add_argument("--seed", type=int, default=0)
    return p


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _rows(path, plot=None):
    """``(format, [(name, entry, sparsity)], provenance)`` of a weight file; ``plot``: a path that must not
    be any file the reader reads (checked before anything is written)."""

    rows = []
    with open_weights(path) as r:
        if plot is not None:
            check_overlap(r.input_files(), plot)  # the plot never replaces what it reports on, nor any file of it
        for name, e in r.entries.items():
            zeros, size = tensor_stats(r, name)
            rows.append((name, e, zeros / size if size else 0.0))
        fmt = r.format
        made = r.provenance() if hasattr(r, "provenance") else {}
        stored = {n: (r.encoding(n), r.stored_bytes(n)) for n in r.pruned} if hasattr(r, "pruned") else {}
    return fmt, rows, made, stored


def _print_provenance(made):
    """A sparse file's record of how it was made, one line per field."""
    if made:
        print("made by " + ", ".join(f"{k}={_clean(v, LONGEST)}" for k, v in made.items()))


def _widths(rows):
    """The name and shape columns, as wide as their longest entry (48 and 20 at least)."""
    return (max([48] + [len(_clean(n, LONGEST)) for n, _, _ in rows]),
            max([20] + [len(str(e.shape)) for _, e, _ in rows]))


def _info(args):

    fmt, rows, made, stored = _rows(args.file)

    print(f"{_clean(args.file)}: {fmt}, {len(rows)} tensors, {_fmt_bytes(bytes_of(args.file))} on disk")
    _print_provenance(made)
    nw, sw = _widths(rows)
    # a sparse file: how each pruned tensor is stored (encoding) and its arrays' bytes; dense tensors as stored
    enc = (f" {'stored as':<9} {'stored':>12}") if stored else ""
    print(f"{'tensor':<{nw}} {'shape':<{sw}} {'dtype':<9} {'bytes':>12}{enc} {'sparsity':>9}  pruned by default")
    for name, e, sp in rows:
        why = "yes" if e.default else (f"no: {e.left_out}" + ("" if e.left_out in ("optimizer state", EMPTY) else
                                                              " (--take-all)") if e.left_out else "")
        how, nbytes = stored.get(name, ("dense", e.nbytes))
        col = f" {how:<9} {nbytes:>12}" if stored else ""
        print(f"{_clean(name, LONGEST):<{nw}} {str(e.shape):<{sw}} {e.dtype:<9} {e.nbytes:>12}{col} {sp:>9.2%}  "
              f"{_clean(why, LONGEST)}")
    total = f" {'':<9} {sum(stored.get(n, ('', e.nbytes))[1] for n, e, _ in rows):>12}" if stored else ""
    print(f"{'total':<{nw}} {'':<{sw}} {'':<9} {sum(e.nbytes for _, e, _ in rows):>12}{total}")
    return 0


def _report(args):
    if args.plot:  # asked for a plot: no matplotlib is an error, found before the file is read
        try:
            import matplotlib
        except ImportError:

            raise UserError("report --plot needs matplotlib (pip install matplotlib); nothing was written")
    fmt, rows, made, stored = _rows(args.file, args.plot)
    if args.plot and os.path.lexists(args.plot) and not args.force:  # a plot never replaces a file unasked
        raise UserError(f"{args.plot}: exists; pass --force to replace it (--plot)")
    _print_provenance(made)
    total = sum(e.size for _, e, _ in rows if e.is_float)
    zeros = sum(sp * e.size for _, e, sp in rows if e.is_float)
    # what prune counts: the tensors it pruned (a sparse file), or those it takes by default
    counted = [(n, e, sp) for n, e, sp in rows if (n in stored if stored else e.is_float and e.default)]
    c_total = sum(e.size for _, e, _ in counted)
    c_zeros = sum(sp * e.size for _, e, sp in counted)
    nw, sw = _widths(rows)
    nw = max(nw, 34)
    print(f"{'tensor':<{nw}} {'shape':<{sw}} {'sparsity':>9}")
    for name, e, sp in rows:
        if e.is_float:
            print(f"{_clean(name, LONGEST):<{nw}} {str(e.shape):<{sw}} {sp:>9.2%}")
    what = "the pruned tensors" if stored else "the tensors prune takes"
    print(f"{what:<{nw}} {'':<{sw}} {c_zeros / c_total if c_total else 0.0:>9.2%}  ({len(counted)} tensors: what "
          f"'prune' reports)")
    print(f"{'all float tensors':<{nw}} {'':<{sw}} {zeros / total if total else 0.0:>9.2%}  "
          f"({sum(1 for _, e, _ in rows if e.is_float)} tensors: embeddings, norms and biases too)")
    if args.plot:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names, values = _plot_rows(counted)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
        ax.barh(range(len(names)), values)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("sparsity" + (" (each block's tensors together)" if len(names) < len(counted) else ""))
        ax.invert_yaxis()
        ax.set_title(f"{os.path.basename(args.file)} ({fmt})")
        fig.tight_layout()

        with AtomicPath(args.plot, replace=args.force) as tmp:
            fig.savefig(tmp, format="png")
        print(f"plot written to {args.plot}")
    return 0


#: Bars in a plot, at most: past this the tensors are drawn a block at a time.
PLOT_ROWS = 60
_BLOCK = re.compile(r"^(.*?[._/]\d+)[._/]")


def _block_of(name):
    """The block a tensor belongs to, ``model.layers.12.*`` (its name up to its first number), or its own
    name outside blocks: how long tables and plots group a model's tensors."""
    m = _BLOCK.match(name)
    return m.group(1) + ".*" if m else name


def _group(items, name):
    """``items`` by :func:`_block_of` their ``name(item)``, blocks in order of first appearance."""
    out = {}
    for it in items:
        out.setdefault(_block_of(name(it)), []).append(it)
    return out


def _plot_rows(rows):
    """``(labels, sparsities)`` of the plot: one bar per tensor, or, for more than :data:`PLOT_ROWS`, one
    per block (:func:`_block_of`), its tensors' zeros over their size, the tensors outside blocks on their
    own; at most :data:`PLOT_ROWS` bars either way (the rest said)."""
    if len(rows) > PLOT_ROWS:
        pairs = []
        for key, part in _group(rows, lambda r: r[0]).items():
            n = sum(e.size for _, e, _ in part)
            pairs.append((key, sum(sp * e.size for _, e, sp in part) / n if n else 0.0))
    else:
        pairs = [(n, sp) for n, _, sp in rows]
    if len(pairs) > PLOT_ROWS:
        left = len(pairs) - PLOT_ROWS + 1
        pairs = pairs[:PLOT_ROWS - 1] + [(f"... and {left} more", 0.0)]
    return [_clean(k, 80) for k, _ in pairs], [v for _, v in pairs]


def _by_block(summary):
    """The summary lines of a model's layers summed per block (:func:`_block_of`), in order; a line outside
    blocks as it is."""
    return [TensorSummary(_clean(k, LONGEST), f"{len(ts)} tensors" if len(ts) > 1 else "1 tensor",
                          *(sum(getattr(t, f) for t in ts) for f in ("size", "pruned", "nnz", "dense_bytes",
                                                                     "csr_bytes")))
            for k, ts in _group(summary, lambda t: t.name).items()]


def _check_prune_flags(args, parser):
    """Every flag's value, before any file is read; an error names the flag (exit 2)."""
    for flag, value in (("--sparsity", args.sparsity), ("--min-sparsity", args.min_sparsity),
                        ("--max-sparsity", args.max_sparsity)):
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            parser.error(f"prune: {flag} must lie in [0, 1], got {value}")
    if args.max_sparsity is None:  # safe by default: where the caps bind, no tensor is emptied
        args.max_sparsity = default_max_sparsity(args.scope, args.threshold)
        if args.scope == "global" and args.sparsity is not None and args.sparsity > SAFE_CAP:
            parser.error(f"prune: --sparsity {args.sparsity} in global scope is above the default per-tensor cap "
                         f"{SAFE_CAP}; pass --max-sparsity 1 to allow tensors to be emptied")
    if args.pattern is not None:
        try:
            pattern_of(args.pattern)
        except (TypeError, ValueError) as exc:
            parser.error(f"prune: --pattern {exc}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        parser.error(f"prune: --threshold must be a finite number, got {args.threshold}")
    if args.min_sparsity > args.max_sparsity:
        parser.error(f"prune: --min-sparsity {args.min_sparsity} exceeds --max-sparsity {args.max_sparsity}")
    scope = args.scope or "local"
    if args.sparsity is not None and scope != "global" and \
            not args.min_sparsity <= args.sparsity <= args.max_sparsity:
        parser.error(f"prune: --sparsity {args.sparsity} lies outside --min-sparsity {args.min_sparsity} .. "
                     f"--max-sparsity {args.max_sparsity}; in {scope} scope every tensor is pruned to exactly "
                     f"--sparsity (the caps bind in --scope global and with --threshold)")
    if args.criterion is not None:
        if args.criterion not in list_criteria():
            parser.error(f"prune: --criterion {args.criterion!r} is not a known criterion; known: "
                         f"{', '.join(list_criteria())}")
        if args.scores is None:
            try:  # does it score from the weights alone (magnitude) or need statistics?
                get_criterion(args.criterion)(np.ones((2, 2), np.float32), {})
            except (ValueError, KeyError, TypeError):
                parser.error(f"prune: --criterion {args.criterion} needs statistics that a weight file does not "
                             f"hold (gradients, activations, Hessians): compute its scores in Python "
                             f"(sparsecore.get_criterion) and pass them with --scores FILE")


#: Flags of the calibrated path only (dest, flag).
_CALIBRATION_FLAGS = (("samples", "--samples"), ("seq_len", "--seq-len"), ("update", "--update"),
                      ("order", "--order"), ("dense_target", "--dense-target"),
                      ("dense_batches", "--dense-batches"), ("dense_layers", "--dense-layers"),
                      ("allocation", "--allocation"))
#: Flags of the plain path that a calibrated prune does not take (dest, flag, its default).
_PLAIN_FLAGS = (("threshold", "--threshold", None), ("scores", "--scores", None), ("criterion", "--criterion", None),
                ("scope", "--scope global", "global"), ("min_sparsity", "--min-sparsity", 0.0),
                ("max_sparsity", "--max-sparsity", None), ("normalize", "--normalize", "none"),
                ("take_all", "--take-all", False), ("any_rank", "--any-rank", False), ("format", "--format", None),
                ("dask", "--dask", None), ("workers", "--workers", None), ("dask_log", "--dask-log", None))


#: Flags of whole-unit removal only (dest, flag).
_UNIT_FLAGS = (("unit_score", "--unit-score"), ("unit_repair", "--unit-repair"), ("unit_order", "--unit-order"),
               ("multiple", "--multiple"))


def _check_unit_flags(args, parser):
    """``--units`` and its flags: which units, with calibration, and none of the weight path's own flags."""
    if args.units is None:
        given = [flag for dest, flag in _UNIT_FLAGS if getattr(args, dest) is not None]
        if given:
            parser.error(f"prune: {given[0]} applies with --units")
        return
    kinds = [k.strip() for k in args.units.split(",") if k.strip()]
    if not kinds or any(k not in ("heads", "channels") for k in kinds):
        parser.error(f"prune: --units takes heads, channels or heads,channels, got {args.units!r}")
    args.units = kinds
    if args.calibration is None:
        parser.error("prune: --units removes whole heads and channels, which needs calibration to keep the model "
                     "(scores and repair from its inputs): pass --calibration FILE")
    for dest, flag in (("pattern", "--pattern"), ("update", "--update"), ("dense_target", "--dense-target"),
                       ("allocation", "--allocation"), ("sparse", "--sparse")):
        if getattr(args, dest) not in (None, False):
            parser.error(f"prune: {flag} applies to pruning weights; --units removes whole units")
    if args.method != "magnitude":
        parser.error(f"prune: --method {args.method} chooses weights; --units removes whole units (--unit-score "
                     f"chooses them)")
    if args.sparsity is None or not 0 <= args.sparsity < 1:
        parser.error(f"prune: --units takes --sparsity in [0, 1) (the fraction of units removed), got "
                     f"{args.sparsity}")
    if args.multiple is not None and args.multiple < 1:
        parser.error(f"prune: --multiple must be 1 or more, got {args.multiple}")


def _check_calibrated_flags(args, parser):
    """The calibrated path's flags (exit 2 naming the flag): calibration given where it is needed and only
    there, sizes and fractions in range, no flag of the plain path that it would ignore."""
    _check_unit_flags(args, parser)
    calibrated = args.calibration is not None or args.method != "magnitude"
    if not calibrated:
        given = [flag for dest, flag in _CALIBRATION_FLAGS if getattr(args, dest) is not None]
        if given:
            parser.error(f"prune: {given[0]} applies to calibrated pruning; pass --calibration FILE (and a --method)")
        return False
    if args.calibration is None:
        parser.error(f"prune: --method {args.method} chooses the mask from the model's inputs: pass --calibration FILE "
                     f"(plain text such as a few hundred kB of Wikipedia, JSON lines, or .npy token ids)")
    if args.input is None:
        parser.error("prune: calibrated pruning takes a Hugging Face model folder: give it, and -o OUT")
    for dest, flag, default in _PLAIN_FLAGS:
        value = getattr(args, dest)
        if value is not None and value != default if dest != "scope" else value == "global":
            parser.error(f"prune: {flag.split()[0]} does not apply to calibrated pruning"
                         + ("; --allocation owl spreads the sparsity over the blocks" if dest == "scope" else ""))
    if args.sparsity is None and args.pattern is None:
        parser.error("prune: calibrated pruning takes --sparsity or --pattern")
    for dest, flag, low in (("samples", "--samples", 1), ("seq_len", "--seq-len", 2), ("dense_batches",
                                                                                      "--dense-batches", 1)):
        value = getattr(args, dest)
        if value is not None and value < low:
            parser.error(f"prune: {flag} must be {low} or more, got {value}")
    if args.dense_target is not None and not 0.0 <= args.dense_target <= 1.0:
        parser.error(f"prune: --dense-target must lie in [0, 1], got {args.dense_target}")
    if (args.dense_batches is not None or args.dense_layers) and not args.dense_target:
        parser.error(f"prune: {'--dense-batches' if args.dense_batches is not None else '--dense-layers'} applies "
                     f"with --dense-target above 0")
    if args.allocation == "owl" and args.sparsity is None:
        parser.error("prune: --allocation owl spreads a --sparsity over the blocks; give --sparsity")
    if args.update is not None and args.method == "sparsegpt":
        parser.error("prune: --update applies to wanda, obs and magnitude: sparsegpt updates the weights itself")
    if args.scope == "row" and args.method == "sparsegpt":
        parser.error("prune: --scope row applies to wanda, obs and magnitude (sparsegpt chooses within each row "
                     "block as it goes)")
    return True


def _peak_memory():
    """This process's peak resident memory in bytes: Linux's high-water mark of its own address space
    (``getrusage``'s maximum survives ``exec``: a child of a large process would report its parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _calibrated(args, parser):
    """A model folder pruned with calibration, through the installed plug-in (``sparsecore[hf]``)."""
    run = calibrator()  # says what to install, before any file is read
    progress = _Progress(not args.quiet)
    say = (lambda line: None) if args.quiet else (lambda line: print(_clean(line, 2000), flush=True))
    request = CalibratedPrune(
        src=args.input, dst=args.output, calibration=args.calibration, method=args.method, sparsity=args.sparsity,
        pattern=args.pattern, update=args.update, scope=args.scope, order=args.order or "block",
        dense_target=args.dense_target or 0.0, dense_batches=args.dense_batches, dense_layers=args.dense_layers,
        allocation=args.allocation or "uniform", samples=args.samples or SAMPLES,
        seq_len=args.seq_len, include=args.include, exclude=args.exclude,
        sparse=True if args.sparse else None, force=args.force, sync=not args.no_sync, compression=args.compress,
        encoding=args.encoding, progress=progress, say=say, units=args.units,
        unit_score=args.unit_score or "fluctuation", unit_repair=args.unit_repair or "refit+bias",
        unit_order=args.unit_order or "block", multiple=args.multiple or 1)
    t0 = time.perf_counter()
    res = run(request)
    took = time.perf_counter() - t0
    if args.quiet:
        return 0
    if args.units:
        kept, layers = {}, {}  # kind -> the (kept, of) counts of its layers (one pair: the same in every layer)
        for kind, k, of in res.units.values():
            kept.setdefault(kind, set()).add((k, of))
            layers[kind] = layers.get(kind, 0) + 1
        before, after = res.parameters
        said = [f"{kind} {' / '.join(f'{k} of {of}' for k, of in sorted(v))} kept in each of {layers[kind]} layers"
                for kind, v in kept.items()]
        print(f"{_clean(args.input)}: {', '.join(said)}; parameters {before / 1e6:.1f} M -> {after / 1e6:.1f} M "
              f"({1 - after / before:.1%} fewer)")
        print(_run_line(res, took, ""))
        print(f"written: {_clean(args.output)} (a smaller model: from_pretrained loads it; how it was made: "
              f"sparsecore_recipe.json)")
        return 0
    print(f"pruned {_clean(args.input)} with {args.method}"
          + (f" + {args.update}" if args.update else "") + f": {len(res.summary)} layers, "
          f"{len(res.ignored)} left dense outside the blocks")
    print(_clean(format_table(_by_block(res.summary) if len(res.summary) > PLOT_ROWS else
                              [t if (c := _clean(t.name, LONGEST)) == t.name else dataclasses.replace(t, name=c)
                               for t in res.summary]), newlines=True))
    print(_run_line(res, took, f" ({res.format})") + f" (the model folder: {_fmt_bytes(res.input_bytes)})")
    print(f"written: {_clean(args.output)} (how it was made: "
          + ("the file's attributes" if res.format == "sparse" else "sparsecore_recipe.json") + ")")
    return 0


def _run_line(res, took, kind):
    """A calibrated run's bytes in and out (``kind`` after them), its time by phase and its peak memory."""
    return (f"{_fmt_bytes(res.input_bytes)} in -> {_fmt_bytes(res.output_bytes)} out{kind}; {took:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items()) + f"); peak memory "
            f"{_fmt_bytes(_peak_memory())}")


def _prune(args, parser):
    if _check_calibrated_flags(args, parser):
        return _calibrated(args, parser)
    embedded = args.input is None
    if embedded:
        args.input = default_model_path()
        if args.sparsity is None and args.threshold is None and args.pattern is None:
            args.sparsity = 0.9
        args.scope = args.scope or "global"
    elif args.output is None:
        parser.error("prune: give an output file with -o (input and output are never the same file)")
    if args.sparsity is None and args.threshold is None and args.pattern is None:
        parser.error("prune: give --sparsity, --threshold or --pattern")
    _check_prune_flags(args, parser)
    if args.workers is not None and args.workers < 1:
        parser.error(f"prune: --workers must be 1 or more, got {args.workers}")
    on_cluster = args.dask is not None or args.workers is not None
    if args.dask_log is not None and not on_cluster:
        parser.error("prune: --dask-log keeps a cluster's logs: it applies with --dask or --workers")
    if on_cluster:
        flag = "--dask" if args.dask is not None else "--workers"
        if not is_checkpoint_path(args.input) or args.sparse or args.output.endswith(".sparse.h5"):
            parser.error(f"prune: {flag} prunes a sharded checkpoint (a model folder or its index) into a model "
                         f"folder; {_clean(args.input)} -> {_clean(args.output)} runs without it")
        cluster.require()  # says what to install, before any file is read
    tmpdir = None
    out = args.output
    if out is None:
        tmpdir = tempfile.mkdtemp(prefix="sparsecore-")
        out = os.path.join(tmpdir, "pruned.safetensors")
    try:
        with (cluster.connect(args.dask, args.workers, log=args.dask_log) if on_cluster else
              contextlib.nullcontext()) as client:
            res = prune_file(args.input, out, sparsity=args.sparsity, threshold=args.threshold,
                             scope=args.scope or "local", scores=args.scores, criterion=args.criterion,
                             min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity,
                             normalize=args.normalize, include=args.include, exclude=args.exclude,
                             take_all=args.take_all, any_rank=args.any_rank, format=args.format,
                             sparse=True if args.sparse else None, pattern=args.pattern, force=args.force,
                             progress=_Progress(not args.quiet), sync=not args.no_sync,
                             compression=args.compress, encoding=args.encoding, client=client)
        if not args.quiet:
            where = "the embedded default model (MLP 64-128-10)" if embedded else args.input
            print(f"pruned {_clean(where)}: {len(res.summary)} tensors, {len(res.copied)} copied unchanged")
            print(_clean(format_table([t if (c := _clean(t.name, LONGEST)) == t.name else dataclasses.replace(t, name=c)
                                       for t in res.summary]), newlines=True))
            print(f"{_fmt_bytes(res.input_bytes)} in -> {_fmt_bytes(res.output_bytes)} out ({res.format})"
                  + (f"; {_fmt_bytes(res.moved_bytes)} moved between the client and the workers" if client else
                     ""))
            if embedded:

                with open_weights(args.input) as a, open_weights(out) as b:
                    before = default_test_accuracy({k: a.raw(k) for k in a.entries})
                    after = default_test_accuracy({k: b.raw(k) for k in b.entries})
                print(f"test accuracy: dense {before:.3f} | pruned {after:.3f} (no fine-tuning)")
                if tmpdir:
                    print("the output was not kept: pass -o FILE to write it")
            else:
                print(f"written: {_clean(args.output)}")
        asked = args.sparsity if args.sparsity is not None and args.scope != "global" else None
        high = [t for t in res.summary if t.size and t.pruned / t.size >= HIGH_SPARSITY
                and (asked is None or t.pruned > round(asked * t.size))]
        if high:  # tensors far sparser than asked may no longer work: say so, even when quiet
            shown = ", ".join(f"{_clean(t.name, 80)} {t.pruned / t.size:.2%}"
                              + (" (emptied)" if t.pruned == t.size else "") for t in high[:6]) \
                + (f", and {len(high) - 6} more" if len(high) > 6 else "")
            print(f"sparsecore: warning: {len(high)} tensor{'s end' if len(high) > 1 else ' ends'} at "
                  f"{HIGH_SPARSITY:.0%} sparsity or more (cap {args.max_sparsity:g}): {shown}; check the model "
                  f"still works, or lower --max-sparsity", file=sys.stderr)
    finally:
        if tmpdir:

            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def _densify(args):

    res = densify_file(args.input, args.output, force=args.force)
    if not args.quiet:
        print(f"{_clean(args.input)} ({_fmt_bytes(res.input_bytes)}, sparse) -> {_clean(args.output)} "
              f"({_fmt_bytes(res.output_bytes)}, {res.format})")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, schedulers), unwound like Ctrl-C."""


class _CompileSafeInterrupt(_numba_event.Listener):
    """Ctrl-C and SIGTERM that wait for Numba to leave its compiler before they interrupt.

    Numba compiles through LLVM, which calls back into Python through ctypes; a
    ``KeyboardInterrupt`` raised inside that callback is printed as "Exception
    ignored" with a traceback and then lost, and the run goes on as if nobody had
    pressed Ctrl-C. While Numba holds its compiler lock (compiling, or loading a
    kernel from its cache) the handler only notes the signal; the interrupt is
    raised the moment the lock is released, in plain Python code. SIGTERM raises
    :class:`_Terminated`, so that it unwinds (temporary files removed) as Ctrl-C does.
    """

    kind = "numba:compiler_lock"
    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.depth = 0
        self.pending = None

    @staticmethod
    def _raise(signum):
        raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def on_start(self, event):
        self.depth += 1

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum)

    def handle(self, signum, frame):
        if self.depth > 0:
            self.pending = signum
        else:
            self._raise(signum)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; leave them alone
            return
        previous = {s: signal.signal(s, self.handle) for s in self.signals}
        _numba_event.register(self.kind, self)
        try:
            yield
        finally:
            _numba_event.unregister(self.kind, self)
            for s, handler in previous.items():
                signal.signal(s, handler)


class _CompileNotice(_numba_event.Listener):
    """Says once, on stderr, that kernels are being compiled (a first run, or a
    new machine or Numba): Numba reports real compilations only, not cache loads."""

    kind = "numba:compile"

    def __init__(self):
        self.said = False
        self.line = "sparsecore: compiling kernels for this machine (first run only: they are cached for the next)"

    def on_start(self, event):
        if not self.said:
            self.said = True
            print(self.line, file=sys.stderr, flush=True)

    def on_end(self, event):
        pass


def _compile_ahead(progress):
    """Compile, once per machine, the kernels the command line's other common cases need: float32,
    float16 and bfloat16 files pruned locally, globally, by row, by threshold and 2:4, into dense and
    sparse outputs (about 25 s on 2 cores). Run after a command that compiled (a cold cache), so that the
    next command, a real model's first prune, neither compiles again nor sits silent; float64 files and
    rarer options still compile on first use."""
    from .io import save_safetensors

    rng = np.random.default_rng(0)
    runs = [(dict(sparsity=0.5), "o.safetensors"), (dict(sparsity=0.5, scope="global"), "o.safetensors"),
            (dict(sparsity=0.5, scope="row"), "o.safetensors"), (dict(threshold=0.1), "o.safetensors"),
            (dict(pattern="2:4"), "o.safetensors"), (dict(sparsity=0.5), "o.sparse.h5"),
            (dict(pattern="2:4", encoding="nm"), "o.sparse.h5")]
    kinds = {"float32": lambda x: x, "float16": lambda x: x.astype(np.float16),
             "bfloat16": lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)}
    total, done = len(runs) * len(kinds), 0
    with tempfile.TemporaryDirectory(prefix="sparsecore-warm-") as d:
        for dt, conv in kinds.items():
            arrays = [rng.standard_normal(shape).astype(np.float32)  # small ones batched, a large one threaded
                      for shape in ((16, 32), (4, 8), (80, 64), (640, 576))]
            src = os.path.join(d, f"{dt}.safetensors")
            save_safetensors(src, {f"t{i}": (dt, a.shape, lambda a=a: conv(a)) for i, a in enumerate(arrays)})
            for kw, out in runs:
                prune_file(src, os.path.join(d, out), force=True, sync=False, **kw)
                done += 1
                progress(done, total, f"{dt} {' '.join(f'{k}={v}' for k, v in kw.items())}")


def main(argv=None):
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); returns the exit code."""
    try:
        with _CompileSafeInterrupt().installed():
            return _main(argv)
    except _Terminated:
        print("sparsecore: terminated; no output was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("sparsecore: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sparsecore info x | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
        return 128 + signal.SIGPIPE


def _failure(exc):
    """One line for any failure: the message of an error the code raises on purpose (bad input, files);
    for anything else its kind and message and where to look further."""
    msg = " ".join(str(getattr(exc, "cli", None) or exc).split())  # a message in the command line's words
    if isinstance(exc, (ValueError, TypeError, OSError)) and msg:  # UserError and FormatError among them
        return _clean(msg, 2000)
    if isinstance(exc, MemoryError):
        return ("out of memory" + (f" ({_clean(msg, 500)})" if msg else "") + "; no output was written (a file "
                "that declares more than it stores is refused: rerun with --debug and report it)")
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read; no output was written (--debug shows where)"
    return (f"{type(exc).__name__}: {_clean(msg, 500)}; no output was written (an unexpected failure: rerun with "
            f"--debug for the traceback)")


def _main(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    notice = None if getattr(args, "quiet", False) else _CompileNotice()
    if notice is not None:
        _numba_event.register(notice.kind, notice)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "report":
            return _report(args)
        if args.command == "prune":
            code = _prune(args, parser)
            if notice is not None and notice.said and code == 0:  # a cold cache: the rest, once, now
                t0 = time.perf_counter()
                notice.said, notice.line = False, ("sparsecore: compiling the kernels other weight files need "
                                                   "(first run only, about 25 s)")
                _compile_ahead(_Progress(True))
                if notice.said:
                    print(f"sparsecore: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            return code
        if args.command == "densify":
            return _densify(args)
        if not 0.0 <= args.sparsity <= 1.0:
            parser.error(f"--sparsity must lie in [0, 1], got {args.sparsity}")

        demo(sparsity=args.sparsity, seed=args.seed)
        return 0
    except BrokenPipeError:
        raise  # not the user's error: main() ends quietly
    except Exception as exc:  # the one place that turns a failure into one line
        if args.debug:
            raise
        print(f"sparsecore: error: {_failure(exc)}", file=sys.stderr)
        return 1
    finally:
        if notice is not None:
            _numba_event.unregister(notice.kind, notice)
