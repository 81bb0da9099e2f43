"""Sequential calibration, framework-free: prune a model block by block, each
layer repaired from the inputs that the already pruned layers before it give.

The driver, :func:`prune_sequential`, owns the algorithm: it walks the
blocks, catches each layer's inputs, groups the layers fed the very same
tensor (a transformer's q/k/v, gate/up) so that they share one Hessian,
keeps the dense model's stream beside the pruned one for ``dense_target``,
calls :func:`sparsecore.prune_layer`, writes the repaired weights and, if
anything fails, puts every weight it changed back before the error is
raised. A framework supplies only a :class:`SequentialHooks` object: which
layers and blocks there are, how to run one block on one stream item while
reporting each layer's input, how to turn an input into the rows a weight
multiplies, and how to read and write a weight. The PyTorch and Keras
adapters each have one (``sparsecore.adapters.torch.prune_sequential``);
a NumPy model needs a few lines (see the tests).

Two ways through a model:

- ``carry = True`` (a transformer's stack of repeated blocks): the inputs of
  the first block are caught once per calibration batch (:meth:`inputs`),
  then each block's outputs, after it is pruned, become the next block's
  inputs (:meth:`advance`); one block's activations are held at a time.
- ``carry = False`` (MLPs, CNNs: every layer its own block): each block is
  reached by running the model from its inputs on the calibration batches,
  the blocks before it already pruned; :meth:`inputs` is read once per block.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from .prune import PruneResult
from .reconstruct import HessianAccumulator, check_layer_options, prune_layer

__all__ = ["Feed", "SequentialHooks", "StopForward", "prune_sequential"]


class StopForward(Exception):
    """Raised from a ``catch`` call to end the forward pass under way: the
    layers being calibrated have their inputs, the rest is not needed. A
    :meth:`SequentialHooks.run` lets it pass through (cleaning up whatever it
    registered); the driver catches it."""


class Feed(NamedTuple):
    """What the driver needs to know of a layer's input.

    ``features``: the columns of its Hessian (a Linear's inputs, a
    convolution's ``C·kh·kw``). ``share``: layers with equal, non-None keys
    that are fed the very same tensor share one Hessian (Linear layers of
    the same width: ``("linear", features)``); ``None`` never shares."""

    features: int
    share: Hashable | None = None


class _NumpyGram:
    """The default :meth:`SequentialHooks.gram`: NumPy rows summed into the
    accumulator. With a cross term and ``dense_batches``, only some batches
    bring dense rows: their sums (and the cross term) and those of the other
    batches are kept apart, and the cross term is scaled to all the tokens
    when they are handed over, as the framework Gram sums do."""

    def __init__(self, acc):
        self.acc = acc
        if acc.has_cross:
            self.both = HessianAccumulator(acc.features, name=acc.name, cross=True)
            self.plain = HessianAccumulator(acc.features, name=acc.name)

    def add(self, rows, dense=None):
        if not self.acc.has_cross:
            self.acc.update(rows)
        elif dense is None:
            self.plain.update(rows)
        else:
            self.both.update(rows, dense=dense)

    def flush(self):
        if self.acc.has_cross and self.both.count + self.plain.count:
            count = self.both.count + self.plain.count
            cross = self.both.cross_term() * (count / self.both.count if self.both.count else 0.0)
            self.acc.update_gram(self.both.upper() + self.plain.upper(), count, cross, triangle="upper")
            self.both = HessianAccumulator(self.acc.features, name=self.acc.name, cross=True)
            self.plain = HessianAccumulator(self.acc.features, name=self.acc.name)
        return self.acc


class SequentialHooks(abc.ABC):
    """What :func:`prune_sequential` asks of a framework.

    Subclasses give :meth:`layers`, :meth:`blocks`, :meth:`inputs`,
    :meth:`run`, :meth:`rows`, :meth:`read` and :meth:`write`, and with
    ``carry = True`` :meth:`advance`. The others have defaults that work on
    NumPy weights and rows; a framework overrides them to keep work where
    its tensors live (a Gram product on the GPU, a weight swapped without a
    copy). ``layout``: how :meth:`read` gives a weight, ``"oi"`` (outputs
    first, as PyTorch) or ``"io"`` (as Keras), see
    :func:`sparsecore.reconstruct`.
    """

    carry: bool = False
    layout: str = "oi"

    @abc.abstractmethod
    def layers(self) -> Mapping[str, Feed]:
        """The layers to prune, by weight name, in the order a forward pass
        reaches them."""

    @abc.abstractmethod
    def blocks(self) -> list[list[str]]:
        """The blocks in forward order, each the names (from :meth:`layers`)
        of its layers; a layer in no block is left alone."""

    @abc.abstractmethod
    def inputs(self) -> Iterable:
        """The calibration stream: with ``carry``, the first block's inputs,
        one item per batch (read once); without, the batches themselves
        (read once per block)."""

    @abc.abstractmethod
    def run(self, block: int, item, catch: Callable[[str, Any], None] | None):
        """Run block ``block`` on one stream item and return its output
        (with ``carry``; without, the model runs from the batch ``item`` up
        to the inputs of the block's layers, its output unused). Before each
        of the block's layers computes, call ``catch(name, x)`` with the
        layer's input ``x`` exactly as the layer gets it (the same object for
        layers fed the same tensor); ``catch`` may raise :class:`StopForward`,
        which must propagate. ``catch=None``: just run."""

    @abc.abstractmethod
    def rows(self, name: str, x, item):
        """The input ``x`` of layer ``name`` (caught on stream item ``item``)
        as the 2-D rows its weights multiply (convolutions: unfolded patches;
        padding tokens left out), in whatever array type :meth:`gram` takes."""

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The weight ``name`` as a float32/float64 NumPy array in ``layout``."""

    @abc.abstractmethod
    def write(self, name: str, array: np.ndarray) -> None:
        """Put ``array`` (shaped and laid out as :meth:`read` gave it) into
        the model's weight ``name``, in the weight's own dtype."""

    def advance(self, item, output):
        """The next block's stream item: ``item`` with the block's output as
        its inputs (``carry`` only)."""
        raise NotImplementedError(f"{type(self).__name__} sets carry = True but has no advance()")

    def gram(self, acc: HessianAccumulator):
        """An object with ``add(rows, dense_rows)`` and ``flush()`` that sums
        ``Σ x xᵀ`` (and the cross term) of the rows into ``acc``; the default
        hands NumPy rows to ``acc.update``."""
        return _NumpyGram(acc)

    def backup(self, name: str):
        """A copy of weight ``name`` as it is now, for :meth:`restore` and
        :meth:`dense_weights`; the default is :meth:`read`'s array, copied."""
        return np.array(self.read(name))

    def restore(self, name: str, saved) -> None:
        """Put a :meth:`backup` back."""
        self.write(name, saved)

    @contextlib.contextmanager
    def dense_weights(self, saved: Mapping[str, Any]):
        """For the duration, the weights named in ``saved`` hold their
        backups (the dense weights); the pruned ones come back after."""
        pruned = {}
        try:
            for name, dense in saved.items():
                pruned[name] = np.array(self.read(name))
                self.restore(name, dense)
            yield
        finally:
            for name, w in pruned.items():
                self.write(name, w)

    def session(self):
        """A context the whole calibration runs in (a framework's inference
        mode, caches off); the default does nothing."""
        return contextlib.nullcontext()


class _Catch:
    """One calibration pass's state: which layers form groups, their
    accumulators, and what the forward passes deliver (the ``catch`` that
    :meth:`SequentialHooks.run` calls)."""

    def __init__(self, hooks, feeds, candidates, whole, cross_layers):
        self.hooks, self.feeds, self.whole, self.cross_layers = hooks, feeds, whole, cross_layers
        self.candidates = set(candidates)
        self.groups, self.accs, self.member, self.sums = [], {}, {}, {}
        self.item, self.held, self.formed, self.dense_phase, self.dense = None, None, False, False, {}

    def __call__(self, n, x):
        if n not in self.candidates:
            return
        if self.dense_phase:  # the same batch through the dense weights: hold its inputs
            self.dense[n] = x
            return
        groups, member, feeds = self.groups, self.member, self.feeds
        if not self.formed and n not in member:
            lead = groups[-1][0] if groups else None
            if lead is not None and x is self.held and feeds[n].share is not None and \
                    feeds[n].share == feeds[lead].share and feeds[n].features == feeds[lead].features:
                groups[-1].append(n)
                member[n] = len(groups) - 1
                self.accs[n] = self.accs[lead]
                return
            if groups and not self.whole:
                raise StopForward
            groups.append([n])
            member[n] = len(groups) - 1
            self.accs[n] = HessianAccumulator(feeds[n].features, name=n, cross=self.cross_layers(n))
            self.sums[n] = self.hooks.gram(self.accs[n])
            self.held = x  # the tensor held: an id alone can be reused once it is freed
        elif n not in member:
            if self.whole:
                return
            raise StopForward
        group = groups[member[n]]
        if n == group[0]:
            dense = self.dense.get(n) if self.accs[n].has_cross else None
            self.sums[n].add(self.hooks.rows(n, x, self.item),
                             None if dense is None else self.hooks.rows(n, dense, self.item))
        if self.formed and not self.whole and n == group[-1]:
            raise StopForward  # the group has its inputs: the rest of the forward is not needed

    def batch_done(self):
        self.formed = bool(self.groups)
        self.held = None
        self.dense = {}


def _run(hooks, block, item, catch):
    try:
        return hooks.run(block, item, catch)
    except StopForward:
        return None


def prune_sequential(hooks: SequentialHooks, *, sparsity=None, pattern=None, method: str = "sparsegpt",
                     update: str | None = None, scope: str | None = None, damp: float = 0.01,
                     blocksize: int = 128, refit: str | None = None, order: str = "block",
                     dense_target: float = 0.0, dense_batches: int | None = None, dense_layers=None,
                     progress=None, keep: str = "all", restore: bool = True) -> PruneResult:
    """Prune a model through its ``hooks`` block by block, each layer from
    the inputs the already pruned layers give, and repair each layer.

    Within a block the layers are calibrated on one pass of the block
    (``order="block"``, as SparseGPT's reference code and llmcompressor do)
    or each group on what the groups pruned before it give
    (``order="layer"``: one pass per group). Layers fed the very same tensor
    with equal :class:`Feed` share keys share one ``H = Σ x xᵀ``. The
    options are those of :func:`sparsecore.prune_layer` and of the adapters'
    ``prune_sequential`` (whose docstrings say more): ``dense_target`` above
    0 also runs each block with its dense weights beside the pruned ones
    (on the first ``dense_batches`` items only, if given), for the layers
    matching ``dense_layers`` (fnmatch patterns of weight names; None: all).
    ``progress(done, total, name)`` is called after each layer; ``total``
    counts the layers in blocks.

    ``keep`` says what the result holds of each layer: ``"all"`` (masks and
    CSR of the new weights), ``"masks"``, or ``"summary"`` (its line only).
    The weights themselves are in the model; a whole model's CSR is about
    another copy of its layers (two, for a 16-bit model at 50%), which a
    caller that saves the model does not need. ``restore=False`` drops each
    block's backups once the block is done instead of holding the dense
    weights of every layer until the end (a model without a stack of blocks
    keeps them for ``dense_target``: its dense runs go through every layer),
    and restores nothing on failure (for a caller that discards the model).

    Returns the combined :class:`sparsecore.PruneResult`; its ``ignored``
    lists the layers left alone (in no block). The model's weights are
    replaced through :meth:`SequentialHooks.write`; if anything fails, every
    weight already changed is restored before the error is raised (unless
    ``restore`` is False).
    """
    scope = check_layer_options(method, sparsity, pattern, scope, update, dense_target)
    if order not in ("layer", "block"):
        raise ValueError(f"order must be 'layer' or 'block', got {order!r}")
    if keep not in ("all", "masks", "summary"):
        raise ValueError(f"keep must be 'all', 'masks' or 'summary', got {keep!r}")
    if dense_batches is not None and (isinstance(dense_batches, bool) or not isinstance(dense_batches, int)
                                      or dense_batches < 1):
        raise ValueError(f"dense_batches must be a positive integer or None, got {dense_batches!r}")
    feeds = dict(hooks.layers())
    if not feeds:
        raise ValueError("no layer to prune")
    blocks = [list(b) for b in hooks.blocks()]
    stray = [n for b in blocks for n in b if n not in feeds]
    if stray:
        raise ValueError(f"blocks name layers that layers() does not give: {stray[:5]}")
    cross = dense_target > 0
    dense_layers = None if dense_layers is None else list(dense_layers)

    def cross_layers(n):
        return cross and (dense_layers is None or any(fnmatch.fnmatchcase(n, p) for p in dense_layers))

    backup, results = {}, []
    total, done = sum(len(b) for b in blocks), 0

    def prune_group(group, accs):
        nonlocal done
        for n in group:
            w = hooks.read(n)
            r = prune_layer(n, w, accs[n], method=method, sparsity=sparsity, pattern=pattern, scope=scope,
                            update=update, damp=damp, blocksize=blocksize, refit=refit, layout=hooks.layout,
                            dense_target=dense_target)
            if n not in backup and (restore or cross):  # (nothing to restore, no dense run: no copy)
                backup[n] = hooks.backup(n)
            hooks.write(n, r.arrays.pop(n) if n in r.arrays else r.dense(n))  # the result keeps the CSR only
            if keep != "all":
                r.csr.clear()
                if keep == "summary":
                    r.masks.clear()
            results.append(r)
            done += 1
            if progress is not None:
                progress(done, total, n)

    def calibrate(candidates, run_pass):
        """Accumulate H for the next group of ``candidates`` (``order="block"``:
        for all of them) with ``run_pass(catch)``; returns the filled catch."""
        catch = _Catch(hooks, feeds, candidates, order == "block", cross_layers)
        run_pass(catch)
        for s in catch.sums.values():
            s.flush()
        return catch

    def prune_block(names, run_pass):
        remaining = list(names)
        while remaining:
            catch = calibrate(remaining, run_pass)
            if not catch.groups:
                raise ValueError(f"the calibration batches never reach {remaining}; leave these layers out")
            for group in catch.groups:
                prune_group(group, catch.accs)
                remaining = [n for n in remaining if n not in group]

    def dense_run(catch, block, item, names):
        """Run ``block`` on ``item`` with the dense weights of ``names``, the
        catch holding the inputs the layers see; returns the output."""
        catch.dense_phase = True
        try:
            with hooks.dense_weights({n: backup[n] for n in names if n in backup}):
                return _run(hooks, block, item, catch)
        finally:
            catch.dense_phase = False

    with hooks.session():
        try:
            if hooks.carry:
                items = list(hooks.inputs())
                dense_items = list(items[:dense_batches]) if cross else None
                last = max((i for i, b in enumerate(blocks) if b), default=-1)
                for i, names in enumerate(blocks):
                    if i > last:
                        break  # nothing left to prune: no more inputs to carry
                    dense_out = {}

                    def run_block(catch, i=i, names=names, dense_out=dense_out):
                        for k, item in enumerate(items):
                            catch.item = item
                            if dense_items is not None and k < len(dense_items):
                                dense_out[k] = dense_run(catch, i, dense_items[k], names)
                            _run(hooks, i, item, catch)
                            catch.batch_done()
                    if names:
                        prune_block(names, run_block)
                    if not restore:  # this block's dense weights are needed no more
                        for n in names:
                            backup.pop(n, None)
                    # the next block's inputs: this block's outputs, pruned (and dense, from its calibration)
                    for k, item in enumerate(items):
                        items[k] = hooks.advance(item, hooks.run(i, item, None))
                        if dense_items is not None and k < len(dense_items):
                            dense_items[k] = hooks.advance(dense_items[k], dense_out[k] if k in dense_out else
                                                           hooks.run(i, dense_items[k], None))
            else:
                every = list(feeds)
                for i, names in enumerate(blocks):
                    def run_model(catch, i=i):
                        for k, batch in enumerate(hooks.inputs()):
                            catch.item = batch
                            if cross and (dense_batches is None or k < dense_batches):
                                dense_run(catch, i, batch, every)
                            _run(hooks, i, batch, catch)
                            catch.batch_done()
                    if names:
                        prune_block(names, run_model)
                    if not restore and not cross:  # (the dense runs need every layer's dense weights)
                        for n in names:
                            backup.pop(n, None)
        except BaseException:
            if restore:
                for n, saved in backup.items():
                    hooks.restore(n, saved)
            raise
    out = PruneResult.combine(results)
    done_names = {t.name for t in out.summary}
    out.ignored = [n for n in feeds if n not in done_names]
    return out
