"""The framework-free sequential-calibration driver, driven by a toy hooks
object over a NumPy model (what a third framework would write): each layer's
weights redone by hand from the inputs it sees, for every option."""

import numpy as np
import pytest

import sparsecore as sc

D, F = 8, 16
PARTS = ("q", "k", "v", "o", "g", "u", "d")  # attention q/k/v -> o, MLP gate/up -> down


def _block(W, i, h, catch=None):
    """One residual block of the toy transformer; ``catch(name, x)`` before each layer."""
    def lin(part, x):
        name = f"b{i}.{part}"
        if catch is not None:
            catch(name, x)
        return x @ W[name].T
    q, k, v = lin("q", h), lin("k", h), lin("v", h)  # the very same tensor h: one shared H
    h = h + lin("o", q * np.tanh(k) + v)
    return h + lin("d", np.maximum(lin("g", h), 0.0) * lin("u", h))


def _model(rng, blocks=2):
    W = {}
    for i in range(blocks):
        for part in PARTS:
            out, inp = {"g": (F, D), "u": (F, D), "d": (D, F)}.get(part, (D, D))
            W[f"b{i}.{part}"] = rng.standard_normal((out, inp)) / np.sqrt(inp)
    W["head"] = rng.standard_normal((3, D))  # outside the blocks: left alone
    return W


def _data(rng, n=3, tokens=24):
    mix = rng.standard_normal((D, D))
    return [rng.standard_normal((tokens, D)) @ mix for _ in range(n)]


class Toy(sc.SequentialHooks):
    """The toy model's hooks: a stack carried from block to block; every
    other method is the driver's NumPy default."""

    carry = True

    def __init__(self, W, data, blocks=2):
        self.W, self.data, self.n, self.grams = W, data, blocks, 0

    def layers(self):
        return {n: sc.Feed(w.shape[1], ("linear", w.shape[1]) if n != "head" else None) for n, w in self.W.items()}

    def blocks(self):
        return [[f"b{i}.{p}" for p in PARTS] for i in range(self.n)]

    def inputs(self):
        return list(self.data)

    def run(self, block, item, catch):
        return _block(self.W, block, item, catch)

    def advance(self, item, output):
        return output

    def rows(self, name, x, item):
        return x.reshape(-1, x.shape[-1])

    def gram(self, acc):
        self.grams += 1
        return super().gram(acc)

    def read(self, name):
        return self.W[name]

    def write(self, name, array):
        self.W[name] = np.array(array, dtype=self.W[name].dtype)


def _seen(W, data, upto):
    """Each layer's inputs over ``data`` when blocks ``0..upto`` run with ``W``: name -> list of arrays."""
    seen = {}
    for x in data:
        h = x
        for i in range(upto + 1):
            h = _block(W, i, h, lambda n, a: seen.setdefault(n, []).append(a))
    return seen


def _redo(dense, name, inputs, dense_inputs=None, a=0.0, **how):
    acc = sc.HessianAccumulator(dense[name].shape[1], cross=dense_inputs is not None)
    for j, x in enumerate(inputs):
        acc.update(x, **({"dense": dense_inputs[j]} if dense_inputs is not None else {}))
    return sc.sparsegpt({name: dense[name]}, {name: acc}, dense_target=a, **(how or {"sparsity": 0.5})).dense(name)


def _hybrid(dense, pruned, i):
    """The dense model with blocks before ``i`` taken from ``pruned``."""
    return {n: (pruned[n] if n.startswith("b") and int(n[1:n.index(".")]) < i else w) for n, w in dense.items()}


@pytest.mark.parametrize("how", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_block_order_redone_by_hand(rng, how):
    """order="block": every layer of block i from one pass of block i as it was before any of its layers was
    pruned, the blocks before it pruned; q/k/v share one H, gate/up another (4 Gram sums a block)."""
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    seen_progress = []
    r = sc.prune_sequential(hooks, progress=lambda *a: seen_progress.append(a), **how)
    assert hooks.grams == 8
    assert r.ignored == ["head"] and sorted(r.masks) == sorted(n for n in dense if n != "head")
    assert [p[:2] for p in seen_progress] == [(k, 14) for k in range(1, 15)]  # only the layers in blocks
    np.testing.assert_array_equal(hooks.W["head"], dense["head"])
    for i in range(2):
        seen = _seen(_hybrid(dense, hooks.W, i), data, i)
        for p in PARTS:
            n = f"b{i}.{p}"
            np.testing.assert_allclose(hooks.W[n], _redo(dense, n, seen[n], **how), rtol=1e-10, atol=1e-12,
                                       err_msg=n)


def test_layer_order_redone_from_the_final_model(rng):
    """order="layer": each group on what the groups pruned before it give, so the final model's inputs redo
    every layer (o on the pruned q/k/v, down on the pruned gate/up)."""
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    sc.prune_sequential(hooks, sparsity=0.5, order="layer")
    seen = _seen(hooks.W, data, 1)
    for n in (n for n in dense if n != "head"):
        np.testing.assert_allclose(hooks.W[n], _redo(dense, n, seen[n]), rtol=1e-10, atol=1e-12, err_msg=n)
    block = Toy({n: w.copy() for n, w in dense.items()}, data)
    sc.prune_sequential(block, sparsity=0.5)
    assert not np.allclose(block.W["b0.o"], hooks.W["b0.o"])  # the orders differ where a group follows another


@pytest.mark.parametrize("dense_batches", [None, 2])
def test_dense_target_redone_by_hand(rng, dense_batches):
    """dense_target=0.5: each layer from the pruned stream's inputs and, for the cross term, the dense
    model's (on the first dense_batches batches, scaled to all); dense_layers picks the layers that aim."""
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    sc.prune_sequential(hooks, sparsity=0.5, dense_target=0.5, dense_batches=dense_batches,
                        dense_layers=["*.q", "*.o", "b1.d"])
    for i in range(2):
        seen, want = _seen(_hybrid(dense, hooks.W, i), data, i), _seen(dense, data, i)
        for p in PARTS:
            n = f"b{i}.{p}"
            lead = {"k": "q", "v": "q", "u": "g"}.get(p, p)  # a group follows its first layer
            if f"b{i}.{lead}" not in ("b0.q", "b1.q", "b0.o", "b1.o", "b1.d"):
                got = _redo(dense, n, seen[n])
            elif dense_batches is None:
                got = _redo(dense, n, seen[n], want[n], a=0.5)
            else:
                part = sc.HessianAccumulator(D if p != "d" else F, cross=True)
                for x, y in zip(seen[n][:dense_batches], want[n][:dense_batches]):
                    part.update(x, dense=y)
                plain = sc.HessianAccumulator(part.features).update(np.concatenate(seen[n]))
                acc = sc.HessianAccumulator(part.features, cross=True).update_gram(
                    plain.hessian(), plain.count, part.cross_term() * (plain.count / part.count))
                got = sc.sparsegpt({n: dense[n]}, {n: acc}, sparsity=0.5, dense_target=0.5).dense(n)
            np.testing.assert_allclose(hooks.W[n], got, rtol=1e-9, atol=1e-11, err_msg=n)


def test_selection_methods_refit_and_a_global_allocation(rng):
    """wanda + obs update with refit, and a per-layer sparsity mapping (an allocation made beforehand)."""
    dense, data = _model(rng), _data(rng)
    layers = [n for n in dense if n != "head"]
    alloc = {n: (0.25 if n.endswith(".d") else 0.625) for n in layers}
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    r = sc.prune_sequential(hooks, sparsity=alloc, method="wanda", update="obs", refit="exact")
    for i in range(2):
        seen = _seen(_hybrid(dense, hooks.W, i), data, i)
        for p in PARTS:
            n = f"b{i}.{p}"
            acc = sc.HessianAccumulator(dense[n].shape[1]).update(np.concatenate(seen[n]))
            want = sc.prune_layer(n, dense[n], acc, method="wanda", sparsity=alloc, update="obs", refit="exact")
            np.testing.assert_allclose(hooks.W[n], want.dense(n), rtol=1e-9, atol=1e-11, err_msg=n)
            assert r.masks[n].sum() == round((1 - alloc[n]) * r.masks[n].size)


class Mlp(sc.SequentialHooks):
    """Without a stack: every layer its own block, reached by running the model from the batch."""

    def __init__(self, W, data):
        self.W, self.data = W, data

    def layers(self):
        return {n: sc.Feed(w.shape[1]) for n, w in self.W.items()}

    def blocks(self):
        return [[n] for n in self.W]

    def inputs(self):
        return iter(self.data)

    def run(self, block, item, catch):
        h = item
        for j, (n, w) in enumerate(self.W.items()):
            if j == block:
                catch and catch(n, h)
                raise sc.StopForward  # the rest of the model is not needed
            h = np.maximum(h @ w.T, 0.0)

    def rows(self, name, x, item):
        return x

    def read(self, name):
        return self.W[name]

    def write(self, name, array):
        self.W[name] = np.array(array)


def test_layers_without_a_stack_each_from_the_model_run_up_to_it(rng):
    dims = [D, 12, 10, 4]
    dense = {f"l{j}": rng.standard_normal((dims[j + 1], dims[j])) for j in range(3)}
    data = _data(rng)
    hooks = Mlp({n: w.copy() for n, w in dense.items()}, data)
    sc.prune_sequential(hooks, sparsity=0.5, dense_target=1.0)
    for j, n in enumerate(dense):
        def inputs(W):
            out = []
            for x in data:
                h = x
                for w in list(W.values())[:j]:
                    h = np.maximum(h @ w.T, 0.0)
                out.append(h)
            return out
        np.testing.assert_allclose(hooks.W[n], _redo(dense, n, inputs(hooks.W), inputs(dense), a=1.0),
                                   rtol=1e-10, atol=1e-12, err_msg=n)


def test_a_failure_restores_every_weight(rng):
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)

    def boom(done, total, name):
        if done == 9:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        sc.prune_sequential(hooks, sparsity=0.5, dense_target=0.5, progress=boom)
    for n, w in dense.items():
        np.testing.assert_array_equal(hooks.W[n], w)


class Counting(Toy):
    """Counts the backups alive at once (held by the driver: dropped when it drops them)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.alive, self.most = 0, 0

    def backup(self, name):
        import weakref

        saved = np.array(self.W[name])
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(saved, self._dropped)
        return saved

    def _dropped(self):
        self.alive -= 1


@pytest.mark.parametrize("dense_target", [0.0, 0.5])
def test_keep_summary_and_no_restore_hold_no_copy_of_the_model(rng, dense_target):
    """keep="summary", restore=False: the same weights; no CSR or masks kept; no backup without a dense target,
    a block's at most with one; a failure leaves the weights as they are."""
    dense, data = _model(rng), _data(rng)
    full = Toy({n: w.copy() for n, w in dense.items()}, data)
    want = sc.prune_sequential(full, sparsity=0.5, dense_target=dense_target)
    hooks = Counting({n: w.copy() for n, w in dense.items()}, data)
    got = sc.prune_sequential(hooks, sparsity=0.5, dense_target=dense_target, keep="summary", restore=False)
    for n in dense:
        np.testing.assert_array_equal(hooks.W[n], full.W[n], err_msg=n)
    assert got.csr == {} and got.masks == {} and got.summary == want.summary and got.ignored == want.ignored
    assert hooks.most == (0 if dense_target == 0 else len(PARTS))
    masks = sc.prune_sequential(Toy({n: w.copy() for n, w in dense.items()}, data), sparsity=0.5, keep="masks")
    assert masks.csr == {} and set(masks.masks) == set(want.masks)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)

    def boom(done, total, name):
        if done == 9:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        sc.prune_sequential(hooks, sparsity=0.5, progress=boom, restore=False)
    assert not np.array_equal(hooks.W["b0.q"], dense["b0.q"])  # pruned and left so: the caller discards it


def test_refusals_name_the_option(rng):
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    for kw, msg in [(dict(order="rows"), "order must be 'layer' or 'block', got 'rows'"),
                    (dict(dense_batches=0), "dense_batches must be a positive integer or None, got 0"),
                    (dict(method="lasso"), "method must be one of"),
                    (dict(keep="csr"), "keep must be 'all', 'masks' or 'summary', got 'csr'"),
                    (dict(sparsity=None), "give exactly one of sparsity= and pattern=")]:
        with pytest.raises(ValueError, match=msg):
            sc.prune_sequential(hooks, **{"sparsity": 0.5, **kw})

    class Stray(Toy):
        def blocks(self):
            return [["b0.q", "b9.z"]]
    with pytest.raises(ValueError, match=r"blocks name layers that layers\(\) does not give: \['b9.z'\]"):
        sc.prune_sequential(Stray(hooks.W, data), sparsity=0.5)

    class NoAdvance(Toy):
        advance = sc.SequentialHooks.advance
    with pytest.raises(NotImplementedError, match="carry = True but has no advance"):
        sc.prune_sequential(NoAdvance(hooks.W, data), sparsity=0.5)
    for n, w in dense.items():  # every refusal left the weights as they were
        np.testing.assert_array_equal(hooks.W[n], w)
    with pytest.raises(TypeError, match="abstract"):
        sc.SequentialHooks()


class _Shrink(sc.RepairMethod):
    """A registered update (one class): the kept weights scaled by 0.9, to see it reach every layer."""

    name, roles = "test-shrink", frozenset({"update"})

    def update(self, problem, prune):
        return 0.9 * problem.rows


def test_a_registered_method_runs_through_the_driver(rng):
    sc.register_repair(_Shrink(), overwrite=True)
    dense, data = _model(rng), _data(rng)
    hooks = Toy({n: w.copy() for n, w in dense.items()}, data)
    r = sc.prune_sequential(hooks, sparsity=0.5, method="magnitude", update="test-shrink")
    for n in r.masks:
        np.testing.assert_allclose(hooks.W[n], np.where(r.masks[n], 0.9 * dense[n], 0.0), rtol=1e-12, err_msg=n)
        assert r.arrays == {}  # the driver hands each dense array to the model and keeps the CSR only
