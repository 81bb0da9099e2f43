"""Small tensors pruned many at a time (io.tensorwise.SmallBatches and its kernel cpu_select.batch_keep): the
same bytes and summaries as one tensor at a time, and the kernel against its naive reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from sparsecore._kernels import cpu_select
from sparsecore._kernels.keys import MODE_ABS, MODE_IDENTITY, MODE_SQUARE, key_of, value_of
from sparsecore.io import UserError, open_weights, prune_file, tensorwise
from sparsecore.io import _safetensors as st

from . import reference as ref


def _run_kernel(scores, weights, rules, mode, capped):
    offs = np.zeros(len(scores) + 1, np.int64)
    np.cumsum([s.size for s in scores], out=offs[1:])
    s = np.concatenate([x.reshape(-1) for x in scores])
    w = np.concatenate([x.reshape(-1) for x in weights])
    raw = w.copy().view(np.uint32 if w.dtype == np.float32 else np.uint64)
    wide = s.dtype == np.float64
    n = len(scores)
    rule_key = np.zeros(n, np.uint64)
    quota, count, lo, hi = (np.zeros(n, np.int64) for _ in range(4))
    for t, r in enumerate(rules):
        if r[0] == "count":
            count[t] = r[1]
        else:
            count[t] = -1
            v = abs(r[1]) if mode == MODE_ABS else r[1]
            rule_key[t], quota[t], lo[t], hi[t] = key_of(v, wide), r[2], r[3], r[4]
    kept, nnz, bad = (np.zeros(n, np.int64) for _ in range(3))
    cpu_select.batch_keep(w, s, offs, mode, np.ones(n), False, wide, rule_key, quota, count, lo, hi, capped, raw,
                          kept, nnz, bad)
    out = raw.view(w.dtype)
    return [out[offs[t]:offs[t + 1]] for t in range(n)], kept, nnz, bad


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", [MODE_IDENTITY, MODE_ABS])
@settings(max_examples=40, deadline=None)
@given(data=st_.data())
def test_batch_keep_against_the_reference(dtype, mode, data):
    rng = np.random.default_rng(data.draw(st_.integers(0, 2**32 - 1)))
    n = data.draw(st_.integers(1, 6))
    sizes = [data.draw(st_.integers(1, 40)) for _ in range(n)]
    # few distinct values: many ties; zeros: kept zeros do not count as non-zeros
    scores = [rng.integers(-3, 4, s).astype(dtype) for s in sizes]
    weights = [x.copy() if mode == MODE_ABS else rng.integers(-2, 3, x.size).astype(dtype) for x in scores]
    rules = []
    for x in scores:
        if data.draw(st_.booleans()):
            rules.append(("count", data.draw(st_.integers(0, x.size))))
        else:
            t = float(data.draw(st_.integers(-3, 4)))
            lo = data.draw(st_.integers(0, x.size))
            rules.append(("cut", t, data.draw(st_.integers(0, x.size)), lo, data.draw(st_.integers(lo, x.size))))
    got, kept, nnz, bad = _run_kernel(scores, weights, rules, mode, True)
    sc = [ref.transform(x, mode) for x in scores]
    ref_rules = [r if r[0] == "count" else ("cut", abs(r[1]) if mode == MODE_ABS else r[1], *r[2:]) for r in rules]
    for t, keep in enumerate(ref.batch_keep(sc, ref_rules)):
        want, want_nnz = ref.keep_raw(weights[t], keep)
        np.testing.assert_array_equal(got[t], want)
        assert kept[t] == keep.sum() and nnz[t] == want_nnz and not bad[t]


@pytest.mark.kernel
def test_batch_keep_flags_non_finite_tensors_and_leaves_them():
    scores = [np.array([1, np.nan, 2], np.float32), np.array([3, 1, 2], np.float32)]
    weights = [np.array([1, 2, 3], np.float32), np.array([3, np.inf, 2], np.float32)]
    got, kept, nnz, bad = _run_kernel(scores, weights, [("count", 1), ("count", 1)], MODE_IDENTITY, False)
    assert list(bad) == [1, 1]
    np.testing.assert_array_equal(got[0], weights[0])


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mode", [MODE_IDENTITY, MODE_ABS, MODE_SQUARE])
@settings(max_examples=30, deadline=None)
@given(data=st_.data())
def test_sorted_keys_runs_and_counts_against_the_reference(dtype, mode, data):
    rng = np.random.default_rng(data.draw(st_.integers(0, 2**32 - 1)))
    sizes = [data.draw(st_.integers(0, 30)) for _ in range(data.draw(st_.integers(1, 6)))]  # empty runs too
    scores = [rng.integers(-3, 4, n).astype(dtype) * dtype(0.5) for n in sizes]  # ties, -0.0 and 0.0
    scaled = data.draw(st_.booleans())
    wide = scaled or dtype == np.float64 or data.draw(st_.booleans())
    invs = rng.uniform(0.5, 2.0, len(sizes))
    offs = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offs[1:])
    x = np.concatenate(scores) if scores else np.zeros(0, dtype)
    x = x.astype(np.float32) if dtype == np.float16 else x  # the kernels read float32/float64
    keys = np.zeros(x.size, np.uint64)
    assert cpu_select.sorted_keys_runs(x, offs, mode, invs, scaled, wide, keys) == -1
    want = ref.sorted_scores(scores, mode, invs, scaled, wide)
    for t in range(len(sizes)):
        got = [value_of(int(k), wide) for k in keys[offs[t]:offs[t + 1]]]
        np.testing.assert_array_equal(got, want[t])
    if x.size:
        probe = keys[int(rng.integers(x.size))]
        below, ties = np.zeros(len(sizes), np.int64), np.zeros(len(sizes), np.int64)
        cpu_select.counts_in_runs(keys, offs, probe, below, ties)
        assert (list(below), list(ties)) == ref.below_and_ties(want, value_of(int(probe), wide))


@pytest.mark.kernel
def test_sorted_keys_runs_stops_at_the_first_tensor_with_a_non_finite_score():
    x = np.array([1, 2, 3, np.inf, 1, np.nan], np.float32)
    offs = np.array([0, 2, 4, 6], np.int64)
    assert cpu_select.sorted_keys_runs(x, offs, MODE_ABS, np.ones(3), False, False, np.zeros(6, np.uint64)) == 1


def _file(path, rng, n=300):
    tensors = {f"t{i}.w": (rng.standard_normal((4, 8)) * rng.choice([1e-3, 1, 1e3])).astype(np.float32)
               for i in range(n)}
    tensors["t3.w"][:] = 1.0  # all ties
    tensors["t4.w"][0] = 0.0
    tensors["h"] = rng.standard_normal((6, 6)).astype(np.float16)  # another dtype: a batch of its own
    tensors["big"] = rng.standard_normal((80, 64)).astype(np.float32)  # not small
    tensors["t5.w"] = rng.standard_normal(12).astype(np.float32)  # 1-D
    with open(path, "wb") as f:
        st.write(f, [(k, st.dtype_name(v.dtype), v.shape, lambda v=v: v) for k, v in tensors.items()])
    return path


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.5, scope="global"),
                                dict(sparsity=0.3, scope="global", max_sparsity=0.6),
                                dict(sparsity=0.5, scope="global", normalize="l2"), dict(threshold=0.5),
                                dict(threshold=0.5, max_sparsity=0.7, min_sparsity=0.1),
                                dict(sparsity=0.5, any_rank=True), dict(sparsity=0.5, scores=True)])
def test_batches_give_the_bytes_of_one_tensor_at_a_time(tmp_path, rng, monkeypatch, kw):
    src = _file(tmp_path / "m.safetensors", rng)
    if kw.pop("scores", False):
        with open(tmp_path / "s.safetensors", "wb") as f, open_weights(src) as r:
            st.write(f, [(n, "F64", e.shape, lambda n=n: rng.random(r.entries[n].shape)) for n, e in r.entries.items()])
        kw["scores"] = tmp_path / "s.safetensors"
    calls = []
    real = tensorwise.SmallBatches._run
    monkeypatch.setattr(tensorwise.SmallBatches, "_run", lambda self, *a: calls.append(1) or real(self, *a))
    fast = prune_file(src, tmp_path / "a.safetensors", **kw)
    assert calls  # the batches ran
    monkeypatch.setattr(tensorwise, "SMALL", 0)
    slow = prune_file(src, tmp_path / "b.safetensors", **kw)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert fast.summary == slow.summary


def test_a_non_finite_small_tensor_is_named_as_one_at_a_time(tmp_path, rng):
    src = tmp_path / "m.safetensors"
    bad = np.ones((4, 8), np.float32)
    bad[1, 2] = np.nan
    with open(src, "wb") as f:
        st.write(f, [("a", "F32", (4, 8), lambda: np.ones((4, 8), np.float32)), ("b", "F32", (4, 8), lambda: bad)])
    with pytest.raises(ValueError, match="'b'"):
        prune_file(src, tmp_path / "o.safetensors", sparsity=0.5)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.4, normalize="l2"),
                                dict(sparsity=0.5, min_sparsity=0.2, max_sparsity=0.7)])
def test_global_keys_of_a_files_tiny_tensors_come_from_one_read_per_run(tmp_path, rng, monkeypatch, kw):
    """The pooled keys of a global selection over a file's tiny tensors are made a run at a time (one read of
    the file per run of one stored dtype), and select what the in-memory engine selects from the same floats."""
    from sparsecore import prune
    from sparsecore.io.formats import SafeTensorsFile

    tensors = {}
    for i in range(240):
        dt = ("F32", "F16", "BF16")[(i // 80) % 3]  # three runs, one per stored dtype
        v = (rng.standard_normal((4, 8)) * rng.choice([0.01, 1.0, 100.0])).astype(np.float32)
        if i % 7 == 0:
            v = np.round(v)  # ties
        tensors[f"t{i}.w"] = (dt, {"F32": v, "F16": v.astype(np.float16),
                                   "BF16": (v.view(np.uint32) >> 16).astype(np.uint16)}[dt])
    src = tmp_path / "m.safetensors"
    with open(src, "wb") as f:
        st.write(f, [(k, dt, v.shape, lambda v=v: v) for k, (dt, v) in tensors.items()])
    floats = {k: v.astype(np.float32) if dt == "F16" else st.bf16_to_f32(v) if dt == "BF16" else v
              for k, (dt, v) in tensors.items()}
    reads = {"run": 0, "one": 0}
    for name, key in (("raw_run", "run"), ("raw", "one")):
        def spy(self, *a, _real=getattr(SafeTensorsFile, name), _key=key):
            reads[_key] += 1
            return _real(self, *a)
        monkeypatch.setattr(SafeTensorsFile, name, spy)
    got = prune_file(src, tmp_path / "o.safetensors", scope="global", **kw)
    assert reads["run"] == 3 + 3  # the keys, then the batched writes
    assert reads["one"] == (len(tensors) if "normalize" in kw else 0)  # each tensor's norm is its own pass
    kw.setdefault("max_sparsity", 0.99)  # prune_file's default where caps bind
    want = prune(floats, scope="global", **kw)
    with open_weights(tmp_path / "o.safetensors") as r:
        for name in tensors:
            kept = want.masks[name] & (floats[name] != 0)  # a kept zero reads as pruned
            np.testing.assert_array_equal(r.floats(name) != 0, kept, err_msg=name)
    assert [s.pruned for s in got.summary] == [s.pruned for s in want.summary]


def test_prune_file_gives_the_cycle_collector_back_as_it_found_it(tmp_path, rng):
    import gc

    src = _file(tmp_path / "m.safetensors", rng, n=20)
    assert gc.isenabled()
    prune_file(src, tmp_path / "a.safetensors", sparsity=0.5)
    assert gc.isenabled()
    with pytest.raises(UserError):
        prune_file(src, tmp_path / "b.safetensors", sparsity=0.5, include=["no such tensor"])
    assert gc.isenabled()
    gc.disable()
    try:
        prune_file(src, tmp_path / "c.safetensors", sparsity=0.5)
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
