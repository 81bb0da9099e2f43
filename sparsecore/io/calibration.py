"""Calibration data from a file, for pruning a model folder from the command line.

``sparsecore prune MODEL_DIR -o OUT --method sparsegpt --calibration FILE``
reads ``FILE`` here, framework-free, and hands the request to the plug-in
that runs the model (``sparsecore[hf]``: PyTorch and transformers), found
through the ``sparsecore.calibrators`` entry point, so that the engine never
imports a framework. Three kinds of file:

- **token ids**: ``.npy`` (an integer array: 1-D, one stream cut into
  windows; 2-D, one sample per row), read without pickles;
- **JSON lines**: ``.jsonl``/``.json``, one JSON value per line: a string,
  or an object with ``"text"`` (a string) or ``"input_ids"`` (integers);
- **plain text**: any other name, UTF-8.

Text is tokenised by the model's own tokenizer. A decoder's windows are
consecutive ``seq_len`` tokens of the documents joined end to end (as
SparseGPT's and llmcompressor's calibration do); an encoder's are one
document (a line of plain text) each, cut at ``seq_len``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError

#: Characters of plain text read at a time (the tokenizer sees a few paragraphs per call).
CHUNK = 1 << 20
#: The entry-point group a framework plug-in registers its calibrated pruning under.
GROUP = "sparsecore.calibrators"
#: The calibration's default size: SparseGPT's 128 x 2048 tokens takes hours on a CPU; 32 x 512 keeps
#: SmolLM2-135M within a point of perplexity of it (bench/llm.py) in about two minutes. The length is cut to
#: the model's positions where they are fewer.
SAMPLES, SEQ_LEN = 32, 512


@dataclass
class CalibratedPrune:
    """One calibrated pruning of a model folder, as the command line asks for
    it: what a plug-in's ``prune(request)`` receives. The options are those
    of :func:`sparsecore.prune_sequential`; ``allocation`` is ``"uniform"``
    (every layer at ``sparsity``) or ``"owl"`` (OWL's outlier-weighted
    sparsities, mean ``sparsity``); ``say(line)`` prints a status line and
    ``progress(done, total, name)`` draws the bar."""

    src: str
    dst: str
    calibration: str
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    update: str | None = None
    scope: str | None = None
    order: str = "block"
    dense_target: float = 0.0
    dense_batches: int | None = None
    dense_layers: list | None = None
    allocation: str = "uniform"
    samples: int = SAMPLES
    seq_len: int | None = None  # None: SEQ_LEN, or the model's positions where they are fewer
    include: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    damp: float = 0.01
    blocksize: int = 128
    refit: str | None = None
    sparse: bool | None = None
    force: bool = False
    sync: bool = True
    compression: str | None = None
    encoding: str = "auto"
    progress: Callable | None = None
    say: Callable[[str], None] = print
    # whole units instead of weights (``--units``): "heads", "channels"; scored and repaired as
    # ``sparsecore.adapters.hf_units.prune_units`` does, kept counts rounded to ``multiple``
    units: list | None = None
    unit_score: str = "fluctuation"
    unit_repair: str = "refit+bias"
    unit_order: str = "block"
    multiple: int = 1


@dataclass
class CalibrationFile:
    """A calibration file read: ``texts`` (an iterator of documents) or
    ``ids`` (a list of 1-D int64 arrays: one stream per document, or one
    sample per row of a 2-D ``.npy``, ``rows`` True)."""

    path: str
    kind: str  # "text", "jsonl text", "jsonl ids", "npy"
    texts: Iterator[str] | None = None
    ids: list | None = None
    rows: bool = False


def read_calibration(path, *, lines: bool = False) -> CalibrationFile:
    """The calibration file ``path`` (see the module doc). Plain text comes
    as an iterator of chunks of about :data:`CHUNK` characters ending at a
    paragraph break (``lines``: one non-empty line each, an encoder's
    samples), read as they are asked for."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such calibration file", cli=f"--calibration {path}: no such file")
    low = path.lower()
    if low.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path}: not a NumPy .npy array of token ids ({exc})") from None
        if a.dtype.kind not in "iu" or a.ndim not in (1, 2) or a.size == 0:
            raise UserError(f"{path}: token ids must be a non-empty 1-D or 2-D integer array, got {a.dtype} "
                            f"{a.shape}")
        a = np.asarray(a, np.int64)
        if (a < 0).any():
            raise UserError(f"{path}: token ids must be >= 0, found {int(a.min())}")
        return CalibrationFile(path, "npy", ids=list(a) if a.ndim == 2 else [a], rows=a.ndim == 2)
    if low.endswith((".jsonl", ".json")):
        return _read_jsonl(path)
    return CalibrationFile(path, "text", texts=_text_lines(path) if lines else _text_chunks(path))


def _read_jsonl(path):
    texts, ids = [], []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                v = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise UserError(f"{path}: line {no} is not JSON ({' '.join(str(exc).split())[:120]})") from None
            if isinstance(v, dict) and "text" in v:
                v = v["text"]
            if isinstance(v, str):
                texts.append(v)
            elif isinstance(v, dict) and isinstance(v.get("input_ids"), list) and v["input_ids"] and all(
                    type(t) is int and t >= 0 for t in v["input_ids"]):
                ids.append(np.asarray(v["input_ids"], np.int64))
            else:
                raise UserError(f"{path}: line {no} is neither a string, nor an object with \"text\" (a string) or "
                                f"\"input_ids\" (integers >= 0): {raw[:80]!r}")
            if texts and ids:
                raise UserError(f"{path}: line {no} mixes token ids with text; give one or the other")
    if not texts and not ids:
        raise UserError(f"{path}: no calibration sample (an empty file)")
    return CalibrationFile(path, "jsonl ids", ids=ids) if ids else CalibrationFile(path, "jsonl text",
                                                                                       texts=iter(texts))


def _decode(path, raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text at byte {exc.start} (plain text, .jsonl or .npy token "
                        f"ids)") from None


def _text_chunks(path):
    """Chunks of about :data:`CHUNK` characters, each cut after a paragraph (or line) break."""
    with open(path, "rb") as f:
        rest = b""
        while True:
            raw = f.read(CHUNK)
            if not raw:
                break
            raw = rest + raw
            cut = raw.rfind(b"\n\n")
            cut = raw.rfind(b"\n") if cut < 0 else cut + 2
            if cut <= 0:
                rest = raw
                continue
            text, rest = _decode(path, raw[:cut]), raw[cut:]
            if text.strip():
                yield text
        if rest.strip():
            yield _decode(path, rest)


def _text_lines(path):
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                yield _decode(path, raw).strip()


def windows(streams, samples: int, seq_len: int, *, rows: bool = False, what: str = "the calibration") -> np.ndarray:
    """``samples`` windows of ``seq_len`` token ids, an int64 array
    ``(samples, seq_len)``: consecutive tokens of the ``streams`` joined end
    to end, from the start; with ``rows``, the first ``seq_len`` tokens of
    each of the first ``samples`` streams (each at least that long). Too few
    tokens are refused, saying how many there are and how many are needed."""
    need = samples * seq_len
    if rows:
        long = [s for s in streams if len(s) >= seq_len]
        if len(long) < samples:
            raise UserError(f"{what} has {len(long)} samples of {seq_len} tokens or more, {samples} needed; lower "
                            f"--samples or --seq-len")
        return np.stack([np.asarray(s[:seq_len], np.int64) for s in long[:samples]])
    got, parts = 0, []
    for s in streams:
        parts.append(np.asarray(s[:need - got], np.int64))
        got += len(parts[-1])
        if got >= need:
            break
    if got < need:
        raise UserError(f"{what} gives {got:,} tokens; --samples {samples} x --seq-len {seq_len} needs {need:,}: "
                        f"give a longer file or lower --samples or --seq-len")
    return np.concatenate(parts).reshape(samples, seq_len)


def digest(samples) -> str:
    """SHA-256 of the token ids the model was calibrated on (each sample as little-endian int64, in order,
    a sample's length before it): the same data gives the same hash whatever file it came from."""
    h = hashlib.sha256()
    for s in samples:
        s = np.ascontiguousarray(s, "<i8")
        h.update(np.int64(s.size).tobytes())
        h.update(s.tobytes())
    return h.hexdigest()


def calibrator():
    """The installed plug-in's ``prune(request: CalibratedPrune)``, or a
    :class:`UserError` saying what to install."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=GROUP))
    if not found:
        raise UserError("calibrated pruning runs the model: install PyTorch and transformers with pip install "
                        "'sparsecore[hf]'")
    try:
        return found[0].load()
    except ImportError as exc:
        raise UserError(f"calibrated pruning runs the model through PyTorch and transformers, which do not import "
                        f"here ({exc}); pip install 'sparsecore[hf]'") from None
