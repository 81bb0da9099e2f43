"""Hugging Face adapter: the command line's calibrated pruning of a model folder.

``sparsecore prune MODEL_DIR -o OUT --method sparsegpt --calibration FILE``
lands in :func:`prune` (registered as the ``sparsecore.calibrators`` entry
point ``hf``; ``pip install 'sparsecore[hf]'`` brings PyTorch and
transformers). It loads the folder's model with transformers, in the dtype
its weights are stored in, reads the calibration file
(:mod:`sparsecore.io.calibration`), runs
:func:`sparsecore.adapters.torch.prune_sequential` block by block, and
writes the folder again through the engine
(:func:`sparsecore.io.offline.write_model`): each shard under its own name,
dtype and order, the pruned layers replaced, everything else copied as it
is stored; or one sparse HDF5 file. Nothing is fetched from a hub: the
folder holds the config, the weights and (for text) the tokenizer.

What it holds: the model in its stored dtype, one block's activations for
the calibration samples, a block's dense weights (only with a dense target)
and one layer's ``d × d`` statistics; no copy of the pruned layers.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from sparsecore.io.calibration import SEQ_LEN, CalibratedPrune, digest, read_calibration, windows
from sparsecore.io.errors import UserError
from sparsecore.io.files import open_weights
from sparsecore.io.offline import check_model_output, write_folder, write_model

from . import torch as sct

__all__ = ["CalibratedPrune", "load_model", "prune"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def _folder(src):
    src = os.fspath(src)
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _stored_dtype(src):
    """The float dtype that holds most of the folder's weight bytes (its tensors' own dtype)."""
    with open_weights(src) as reader:
        size = {}
        for e in reader.entries.values():
            if e.is_float:
                size[e.dtype] = size.get(e.dtype, 0) + e.nbytes
    if not size:
        raise UserError(f"{src}: no float tensor in the model's weights")
    return max(size, key=size.get)


def load_model(src):
    """``(model, config, causal)``: the folder's model class as its config names it
    (``architectures``), in its weights' stored dtype, on the CPU, in eval mode."""
    import transformers

    folder = _folder(src)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{src}: calibrated pruning runs the model, and the folder has no config.json (a Hugging "
                        f"Face model folder: config, weights, tokenizer)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder}/config.json: transformers cannot read it ({' '.join(str(exc).split())[:200]})") \
            from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    dtype = _TORCH_DTYPES.get(_stored_dtype(src), torch.float32)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # our own lines only
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{folder}: transformers cannot load the model ({' '.join(str(exc).split())[:300]})") \
            from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    causal = bool(archs) and archs[0].endswith(("ForCausalLM", "LMHeadModel"))
    return model.eval(), config, causal


def _samples(request, folder, config, causal, say):
    """The calibration token ids: a list of 1-D int64 arrays (a decoder's of ``seq_len`` each)."""
    limit = getattr(config, "max_position_embeddings", None)
    seq_len = request.seq_len
    if seq_len is None:
        seq_len = min(SEQ_LEN, limit) if isinstance(limit, int) and limit > 1 else SEQ_LEN
    elif isinstance(limit, int) and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the model's {limit} positions "
                        f"(max_position_embeddings); lower it")
    cal = read_calibration(request.calibration, lines=not causal)
    streams, rows = cal.ids, cal.rows
    if cal.texts is not None:
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{folder}: no tokenizer to read the text of {cal.path} with "
                            f"({' '.join(str(exc).split())[:160]}); put the model's tokenizer in the folder, or "
                            f"give token ids (.npy, or JSON lines with \"input_ids\")") from None
        if causal:  # the documents end to end: tokenised a chunk at a time until there are enough tokens
            def stream():
                for text in cal.texts:
                    yield np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
            streams = stream()
        else:  # an encoder's sample: one document, with its special tokens, cut at seq_len
            streams = []
            for text in cal.texts:
                streams.append(np.asarray(tok(text, truncation=True, max_length=seq_len)["input_ids"],
                                          np.int64))
                if len(streams) == request.samples:
                    break
    what = f"{cal.path}"
    if causal:
        out = list(windows(streams, request.samples, seq_len, rows=rows, what=what))
    else:
        out = [np.asarray(s[:seq_len], np.int64) for s in streams if len(s)][:request.samples]
        if len(out) < request.samples:
            raise UserError(f"{what} has {len(out)} samples, {request.samples} needed; lower --samples")
    vocab = getattr(config, "vocab_size", None)
    top = max(int(s.max()) for s in out)
    if isinstance(vocab, int) and top >= vocab:
        raise UserError(f"{what}: token id {top} is outside the model's vocabulary of {vocab}")
    return out


#: An encoder's samples per batch (padded to the longest; the padding left out of the statistics).
ENCODER_BATCH = 16


def _batches(samples, causal, pad):
    """The model's calibration batches: a decoder's windows one per batch (as the Python path's examples
    and ``bench/llm.py`` run them); an encoder's sentences :data:`ENCODER_BATCH` at a time, padded, with
    their attention mask (a batch of one sentence per forward pass took twice the time on MiniLM)."""
    if causal:
        return [{"input_ids": torch.tensor(s)[None]} for s in samples]  # (a copy: the ids may be a read-only map)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    out = []
    for k in range(0, len(samples), ENCODER_BATCH):
        part = samples[k:k + ENCODER_BATCH]
        longest = max(len(s) for s in part)
        ids = torch.full((len(part), longest), pad, dtype=torch.int64)
        mask = torch.zeros((len(part), longest), dtype=torch.int64)
        for i, s in enumerate(part):
            ids[i, :len(s)] = torch.as_tensor(np.array(s))
            mask[i, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _stored(param, entry):
    """A parameter as the file stores its tensor: the entry's dtype (bfloat16 as its bit patterns)."""
    t = param.detach().cpu()
    if entry.dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.to(_TORCH_DTYPES.get(entry.dtype, torch.float32)).contiguous().numpy().astype(entry.dtype, copy=False)


class _Run:
    """What both calibrated paths start with: the output's paths checked, the folder's model loaded and the
    calibration read, tokenised and batched (said in one line); :meth:`record` puts the phases' seconds and
    the calibration used on the result."""

    def __init__(self, request, sparse):
        check_model_output(request.src, request.dst, sparse=sparse, force=request.force)
        self.t0 = time.perf_counter()
        self.model, self.config, causal = load_model(request.src)
        samples = _samples(request, _folder(request.src), self.config, causal, request.say)
        self.samples, self.sha = samples, digest(samples)
        lengths = sorted({len(x) for x in samples})
        request.say(f"calibration: {len(samples)} samples of "
                    f"{lengths[0] if len(lengths) == 1 else f'{lengths[0]}-{lengths[-1]}'} tokens from "
                    f"{request.calibration} (sha256 {self.sha[:16]})")
        self.data = _batches(samples, causal, getattr(self.config, "pad_token_id", None))
        self.loaded = time.perf_counter()

    def record(self, result, calibrated):
        """``result`` with ``timings`` (load, calibrate: until ``calibrated``, write: until now) and
        ``calibration``."""
        result.timings = {"load": self.loaded - self.t0, "calibrate": calibrated - self.loaded,
                          "write": time.perf_counter() - calibrated}
        result.calibration = {"sha256": self.sha, "samples": len(self.samples),
                              "tokens": sum(map(len, self.samples))}
        return result


def _prune_units(request):
    """``--units``: whole heads and channels removed (:mod:`sparsecore.adapters.hf_units`), the smaller model
    written by ``save_pretrained`` into a new folder (:func:`sparsecore.io.offline.write_folder`)."""
    from . import hf_units

    if request.sparse:
        raise UserError("--units writes a smaller dense model: a model folder, not a sparse file")
    if request.sparsity is None or request.pattern is not None:
        raise UserError("--units takes --sparsity (the fraction of units removed), not --pattern")
    run = _Run(request, sparse=False)
    model = run.model
    before = sum(p.numel() for p in model.parameters())
    try:
        kinds = {g.name: (kind, g.units) for kind in request.units for g in hf_units.unit_groups(model, kind)}
        counts = hf_units.prune_units(model, request.sparsity, units=request.units, score=request.unit_score,
                                      repair=request.unit_repair, order=request.unit_order, data=run.data,
                                      multiple=request.multiple, damp=request.damp)
        hf_units.save_check(model)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{request.src}: {exc}") from None
    calibrated = time.perf_counter()
    provenance = {"units": ",".join(request.units), "sparsity": repr(request.sparsity),
                  "score": request.unit_score, "repair": request.unit_repair, "order": request.unit_order,
                  "multiple": str(request.multiple), "calibration_file": os.path.abspath(request.calibration),
                  "calibration_sha256": run.sha, "calibration_samples": str(len(run.samples)),
                  "source": os.path.abspath(request.src)}
    result = run.record(write_folder(request.src, request.dst, model.save_pretrained, force=request.force,
                                     sync=request.sync, provenance=provenance), calibrated)
    result.units = {name: (kind, counts[name], of) for name, (kind, of) in kinds.items()}
    result.parameters = (before, sum(p.numel() for p in model.parameters()))
    return result


def prune(request: CalibratedPrune):
    """Prune the model folder ``request.src`` into ``request.dst`` with
    calibration (see the module doc); returns the engine's
    :class:`~sparsecore.io.offline.FileResult`, with ``timings`` (seconds of
    loading, calibration and writing) and ``calibration`` (what was used)."""
    say = request.say
    if request.units:
        return _prune_units(request)
    run = _Run(request, request.sparse)
    model, data, samples, sha = run.model, run.data, run.samples, run.sha
    with open_weights(request.src) as reader:
        entries = dict(reader.entries)
    include = [f"*{p}*" if not any(c in p for c in "*?[") else p for p in request.include] or None
    exclude = [f"*{p}*" if not any(c in p for c in "*?[") else p for p in request.exclude]
    chosen = sct.prunable(model, include, exclude)
    foreign = [n for n in chosen if n not in entries]
    if foreign and len(foreign) == len(chosen):
        raise UserError(f"{request.src}: the model's layers ({foreign[0]}, ...) are not named as in its files "
                        f"({next(iter(entries))}, ...); calibrated pruning needs the names transformers saves")
    sparsity = request.sparsity
    if request.allocation == "owl":
        if sparsity is None:
            raise UserError("--allocation owl spreads a --sparsity over the blocks; give --sparsity")
        sparsity = sct.outlier_sparsities(model, data, sparsity, include=include, exclude=exclude)
        say(f"OWL allocation: sparsities {min(sparsity.values()):.3f} to {max(sparsity.values()):.3f} per block")
    try:
        res = sct.prune_sequential(model, data, sparsity=sparsity, pattern=request.pattern, method=request.method,
                                   update=request.update, scope=request.scope, include=include, exclude=exclude,
                                   damp=request.damp, blocksize=request.blocksize, refit=request.refit,
                                   order=request.order, dense_target=request.dense_target,
                                   dense_batches=request.dense_batches, dense_layers=request.dense_layers,
                                   progress=request.progress, keep="summary", restore=False)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    calibrated = time.perf_counter()
    names = [s.name for s in res.summary]
    missing = [n for n in names if n not in entries]
    if missing:
        raise UserError(f"{request.src}: the pruned layer {missing[0]!r} has no tensor of that name in the files; "
                        f"nothing was written")
    params = dict(model.named_parameters())
    provenance = {"method": request.method, "update": request.update or "none",
                  "sparsity": repr(request.sparsity) if request.pattern is None else "null",
                  "pattern": request.pattern or "none", "allocation": request.allocation,
                  "order": request.order, "dense_target": repr(request.dense_target),
                  "dense_batches": repr(request.dense_batches), "scope": request.scope or "default",
                  "calibration_file": os.path.abspath(request.calibration), "calibration_sha256": sha,
                  "calibration_samples": str(len(samples)), "calibration_tokens": str(sum(map(len, samples))),
                  "source": os.path.abspath(request.src)}
    result = run.record(write_model(request.src, request.dst, lambda n: _stored(params[n], entries[n]), names,
                                    sparse=request.sparse, force=request.force, sync=request.sync,
                                    compression=request.compression, encoding=request.encoding,
                                    provenance=provenance), calibrated)
    result.ignored = list(res.ignored)
    return result
