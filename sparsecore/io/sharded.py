"""Sharded checkpoints: a Hugging Face model folder read and written as one model.

A model above a few GB is saved as a folder of shards
(``model-00001-of-00004.safetensors`` ...) with an index,
``model.safetensors.index.json`` (``pytorch_model.bin.index.json`` for PyTorch
``.bin`` shards): ``{"metadata": {...}, "weight_map": {tensor: shard}}``.
:class:`ShardedCheckpoint` opens the folder, its index, or a folder holding a
single unsharded ``model.safetensors`` / ``pytorch_model.bin``, lists every
tensor once across the shards (in shard order), reads one tensor at a time
(each shard's reader opened when first used) and knows the folder's other
files (``config.json``, the tokenizer), which an output folder carries over.

Links: a link inside the folder is followed where its target stays inside
the folder, or where the folder is a Hugging Face cache's snapshot
(``models--<org>--<name>/snapshots/<revision>``, or a folder below it) and
the target a file of that repository's ``blobs/`` (as ``huggingface_hub``
lays them out). Any other link that
leaves the folder, a link that loops, and anything that is not a regular
file or folder (a pipe, a device, a dangling link) is refused by name.

Tied weights: when ``config.json`` says ``tie_word_embeddings`` (the default
of most causal LMs), the output head shares the input embedding; if the
checkpoint stores it anyway, it is marked and left out of the default set
with the embedding, and never pruned on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .errors import FormatError
from .formats import SafeTensorsFile, TorchFile, WeightFile

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Names of other copies of the weights that Hugging Face folders carry (exports, the other format).
_COPY = re.compile(r"(^|/)(model|pytorch_model|tf_model|flax_model|consolidated)([-.][^/]*)?"
                   r"\.(safetensors|bin|h5|msgpack|pth|pt)$|\.(onnx|gguf|tflite)$")
SINGLE = ("model.safetensors", "pytorch_model.bin")
_HEAD = ("lm_head.weight", "embed_out.weight", "output.weight")
_HUB_REPOS = ("models--", "datasets--", "spaces--")  # how huggingface_hub names a repository's cache folder


def is_checkpoint_path(path) -> bool:
    """Whether ``path`` names a sharded checkpoint: a folder, or a ``*.index.json``."""
    path = os.fspath(path)
    return os.path.isdir(path) or path.endswith(".index.json")


class ShardedCheckpoint(WeightFile):
    """A model folder (or its index) as one weight file; see the module doc."""

    def __init__(self, path):
        super().__init__(path)
        path = self.path
        self._real = os.path.realpath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        if os.path.isdir(path):
            self.folder = path
            found = [n for n in INDEXES if os.path.isfile(os.path.join(path, n))]
            if len(found) > 1:
                raise FormatError(f"{path}: holds both {found[0]} and {found[1]}; open one of them")
            if found:
                self.index_name = found[0]
            else:
                singles = [n for n in SINGLE if os.path.isfile(os.path.join(path, n))]
                if not singles:
                    raise FormatError(f"{path}: a folder without a checkpoint index ({' or '.join(INDEXES)}) or "
                                      f"a single {' / '.join(SINGLE)}")
                self.index_name = None
                weight_map, self.index_metadata = None, None
                self.shards = [singles[0]]
        else:
            self.folder, self.index_name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if self.index_name is not None:
            weight_map, self.index_metadata = self._read_index(self.checked(self.index_name))
            self.shards = list(dict.fromkeys(weight_map.values()))
        for shard in self.shards:
            self.checked(shard)
        self.kind = "torch" if self.shards[0].endswith(".bin") else "safetensors"
        self.format = f"sharded-{self.kind}" if self.index_name else f"folder-{self.kind}"
        self._open = {}
        self.shard_of = {}
        for shard in self.shards:
            reader = self.reader(shard)
            for name, e in reader.entries.items():
                if name in self.shard_of:
                    raise FormatError(f"{path}: tensor {name!r} is stored twice, in {self.shard_of[name]} and "
                                      f"{shard}")
                if weight_map is not None and weight_map.get(name) != shard:
                    raise FormatError(f"{path}: shard {shard} holds {name!r}, which the index "
                                      + (f"places in {weight_map[name]}" if name in weight_map else "does not list"))
                self.shard_of[name] = shard
                self.entries[name] = e
            if self.kind == "torch":  # a loaded pickle holds its tensors: one shard in memory at a time
                self._close_shard(shard)
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self.shard_of]
            if missing:
                raise FormatError(f"{path}: the index places {missing[0]!r} in {weight_map[missing[0]]}, which "
                                  f"does not hold it")
        self.config = self._read_config()
        self.tied = {}
        if self.config.get("tie_word_embeddings", True) and self.config:
            embed = next((n for n in self.entries if n.endswith("embed_tokens.weight") or n.endswith("wte.weight")
                          or n.endswith("word_embeddings.weight")), None)
            for head in _HEAD:
                if head in self.entries and embed is not None:
                    self.tied[head] = embed
                    self.entries[head].default = False
                    self.entries[head].left_out = f"tied to {embed}"

    def _read_index(self, index_path):
        try:
            with open(index_path, "rb") as f:
                if os.fstat(f.fileno()).st_size > 64 << 20:
                    raise FormatError(f"{index_path}: over 64 MiB, not a checkpoint index")
                index = json.loads(f.read().decode("utf-8"))
        except RecursionError:
            raise FormatError(f"{index_path}: JSON nested too deeply to be a checkpoint index") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{index_path}: not a readable checkpoint index ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: no weight_map (tensor name -> shard file) in the index")
        kind = None
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise FormatError(f"{index_path}: tensor {name!r} maps to {shard!r}; a shard must be a file name "
                                  f"in the index's folder")
            ext = ".bin" if shard.endswith(".bin") else ".safetensors" if shard.endswith(".safetensors") else None
            if ext is None:
                raise FormatError(f"{index_path}: shard {shard!r} of {name!r} is neither .safetensors nor .bin")
            if kind is not None and ext != kind:
                raise FormatError(f"{index_path}: mixes .safetensors and .bin shards")
            kind = ext
            if not os.path.isfile(os.path.join(os.path.dirname(index_path), shard)):
                raise FormatError(f"{index_path}: shard {shard} (of {name!r}) is missing from the folder")
        meta = index.get("metadata")
        return weight_map, meta if isinstance(meta, dict) else None

    def _read_config(self):
        p = os.path.join(self.folder, "config.json")
        if not os.path.isfile(p):
            return {}
        try:
            with open(p, "rb") as f:
                cfg = json.loads(f.read(16 << 20).decode("utf-8"))
        except RecursionError:
            raise FormatError(f"{p}: JSON nested too deeply to be a model config") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return cfg if isinstance(cfg, dict) else {}

    def checked(self, rel):
        """The path of the folder's file ``rel``, refused unless it and its links
        stay inside the folder or lead, as a Hugging Face cache's snapshot
        links do, into the cache's ``blobs/`` (see the module doc)."""
        p = os.path.join(self.folder, rel)
        real = os.path.realpath(p)
        if os.path.commonpath([self._real, real]) == self._real:
            return p
        parts = self._real.split(os.sep)
        if "snapshots" in parts[:-1]:  # <cache>/models--org--name/snapshots/<revision>[/sub-folder]
            at = len(parts) - 1 - parts[::-1].index("snapshots")
            repo = os.sep.join(parts[:at]) or os.sep
            if parts[at - 1].startswith(_HUB_REPOS) and os.path.dirname(real) == os.path.join(repo, "blobs") \
                    and os.path.isfile(real):
                return p
        raise FormatError(f"{self.folder}: {rel} is a link to {real}, outside the model folder; links out of a "
                          f"model folder are followed only into a Hugging Face cache's blobs/ (copy the file in)")

    def reader(self, shard):
        """The open reader of one shard (opened on first use; for ``.bin``
        shards only one stays open)."""
        if shard not in self._open:
            if self.kind == "torch":
                for other in list(self._open):
                    self._close_shard(other)
            p = os.path.join(self.folder, shard)
            self._open[shard] = TorchFile(p) if self.kind == "torch" else SafeTensorsFile(p)
        return self._open[shard]

    def _close_shard(self, shard):
        r = self._open.pop(shard, None)
        if r is not None:
            r.close()

    def names_in(self, shard):
        """The tensors of one shard, in its file order."""
        return [n for n in self.entries if self.shard_of[n] == shard]

    def raw(self, name):
        """The tensor as stored (its own dtype), as a new array."""
        return self.reader(self.shard_of[name]).raw(name)

    def raw_run(self, names):
        """The tensors ``names`` laid end to end (one read where one shard holds them end to end)."""
        shards = {self.shard_of[n] for n in names}
        if len(shards) == 1:
            return self.reader(shards.pop()).raw_run(names)
        return super().raw_run(names)

    def row_subset(self, name, step):
        """Every ``step``-th row of a tensor, as floats (read alone where the shard's format allows)."""
        return self.reader(self.shard_of[name]).row_subset(name, step)

    def other_files(self):
        """The folder's files that are not weights (config, tokenizer, ...), relative paths; sub-folders too."""
        skip = set(self.shards) | ({self.index_name} if self.index_name else set())
        out, seen, stack = [], {self._real}, [""]
        while stack:  # depth first, each folder's files before its sub-folders, by name (as os.walk)
            top = stack.pop()
            with os.scandir(os.path.join(self.folder, top)) as it:
                found = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
            subs = []
            for e in found:
                rel = os.path.join(top, e.name) if top else e.name
                if e.is_dir():  # a linked sub-folder is carried (a copy) when it stays inside and loops nowhere
                    if e.is_symlink():
                        real = os.path.realpath(e.path)
                        if os.path.commonpath([self._real, real]) != self._real:
                            raise FormatError(f"{self.folder}: the sub-folder {rel} is a link to {real}, outside "
                                              f"the model folder; copy it in or remove the link")
                        if real in seen or os.path.commonpath([real, os.path.realpath(os.path.dirname(e.path))]) \
                                == real:
                            raise FormatError(f"{self.folder}: the sub-folder {rel} is a link to a folder that holds "
                                              f"it or that another link brought in already (a loop or a twin); "
                                              f"remove the link")
                        seen.add(real)
                    subs.append(rel)
                elif e.is_file():
                    self.checked(rel)
                    if rel not in skip:
                        out.append(rel)
                else:
                    raise FormatError(f"{self.folder}: {rel} is not a regular file (a dangling link, a pipe, a "
                                      f"socket or a device); remove it or move it out of the model folder")
            stack.extend(reversed(subs))
        return out

    def write_like(self, path, tensor, pruned=None):
        """A model folder like this one at ``path`` (an existing folder):
        each shard rewritten under its own name, every tensor through
        ``tensor(name)`` or (outside ``pruned``) as read (one in memory at a
        time), the index and the other files (config, tokenizer, ...) copied
        as streams."""
        def each(n):
            return tensor(n) if pruned is None or n in pruned else self.raw(n)
        for shard in self.shards:
            self.reader(shard).write_like(os.path.join(path, shard), each)
        self.copy_files(path)

    def copy_files(self, path):
        """The index and the other files of the folder, copied into the folder ``path``."""
        for rel in ([self.index_name] if self.index_name else []) + self.other_files():
            target = os.path.join(path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(self.folder, rel), target)

    def weight_copies(self):
        """The folder's other files that hold another copy of the model's
        weights (a ``model.safetensors`` beside ``pytorch_model.bin``, shards
        of another format, ONNX, TensorFlow, Flax, GGUF exports), relative
        paths; trainer state (optimizer, scheduler, ``training_args.bin``) is
        not a copy."""
        return [rel for rel in self.other_files() if _COPY.search(rel.replace(os.sep, "/"))]

    def input_files(self):
        """Every path this checkpoint reads: the folder, its index, shards and other files."""
        return [self.folder] + self.weight_files() + [os.path.join(self.folder, r) for r in self.other_files()]

    def weight_files(self):
        """Paths of the index (if any) and the shards, in that order."""
        names = ([self.index_name] if self.index_name else []) + self.shards
        return [os.path.join(self.folder, n) for n in names]

    def close(self):
        """Release every open shard."""
        for shard in list(self._open):
            self._close_shard(shard)
