"""Offline weight files: formats, round trips, selection equal to in-memory prune, safety."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

import sparsecore as sc
from sparsecore.io import FormatError, UserError, densify_file, open_weights, prune_file
from sparsecore.io.sparse import SparseFile

os.environ.setdefault("KERAS_BACKEND", "torch")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def all_datasets(path):
    """Every dataset of an HDF5 file with its value and attributes."""
    out = {}
    with h5py.File(path, "r") as h:
        def visit(name, obj):
            attrs = {k: np.asarray(obj.attrs[k]).tolist() for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()], attrs)
            else:
                out[name] = (None, attrs)
        h.visititems(visit)
        out["/"] = (None, {k: np.asarray(h.attrs[k]).tolist() for k in h.attrs})
    return out


def assert_same_h5(a, b):
    da, db = all_datasets(a), all_datasets(b)
    assert da.keys() == db.keys()
    for k in da:
        va, vb = da[k][0], db[k][0]
        assert da[k][1] == db[k][1], k
        if va is not None:
            assert va.dtype == vb.dtype and va.shape == vb.shape
            assert va.tobytes() == vb.tobytes(), k  # bit for bit


# --- a Keras model in three formats -----------------------------------------------

@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    keras = pytest.importorskip("keras")
    d = tmp_path_factory.mktemp("keras")
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    sub = keras.Sequential([keras.layers.Dense(32, activation="relu"), keras.layers.Dense(24)], name="sub")
    x = keras.layers.BatchNormalization()(sub(inp))
    x = keras.layers.Reshape((4, 6, 1))(x)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    m = keras.Model(inp, out)
    m.compile("adam", "mse")
    rng = np.random.default_rng(0)
    m.fit(rng.standard_normal((64, 16)), rng.standard_normal((64, 3)), verbose=0, epochs=2)
    paths = {"keras": d / "m.keras", "keras-weights": d / "m.weights.h5", "keras-legacy": d / "m.h5"}
    m.save(paths["keras"])
    m.save_weights(paths["keras-weights"])
    m.save(paths["keras-legacy"])
    x_test = rng.standard_normal((8, 16)).astype(np.float32)
    return paths, x_test


def _keras_weights(model):
    import keras

    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.parametrize("fmt", ["keras", "keras-weights", "keras-legacy"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_keras_files_prune_load_and_round_trip(keras_files, tmp_path, fmt, scope):
    keras = pytest.importorskip("keras")
    paths, x = keras_files
    src = paths[fmt]
    before = sha(src)
    with open_weights(src) as r:
        assert r.format == fmt
        names = r.select()
        weights = {n: r.floats(n) for n in names}
    kernels = [n for n in names if n.endswith(("vars/0", "kernel"))]
    assert len(names) == 4 and names == kernels  # 3 dense kernels and one conv kernel; no biases, no BN
    dst = tmp_path / ("out" + src.name[1:])
    res = prune_file(src, dst, sparsity=0.7, scope=scope, max_sparsity=0.9)
    assert sha(src) == before  # the input is untouched
    want = sc.prune(weights, sparsity=0.7, scope=scope, max_sparsity=0.9)  # the same masks in memory
    assert sum(s.pruned for s in res.summary) == sum(s.pruned for s in want.summary)
    with open_weights(dst) as r:
        assert r.format == fmt
        for n in names:
            np.testing.assert_array_equal(r.floats(n), np.where(want.masks[n], weights[n], 0))
    # the framework loads it unchanged, and computes with the pruned weights
    if fmt == "keras-weights":
        model = keras.saving.load_model(paths["keras"], compile=False)
        model.load_weights(dst)
    else:
        model = keras.saving.load_model(dst, compile=False)
    flat = [w for w in _keras_weights(model) if w.ndim >= 2]
    assert sum(int((w == 0).sum()) for w in flat) == sum(s.pruned for s in want.summary)
    assert np.isfinite(model.predict(x, verbose=0)).all()
    # framework -> sparse HDF5 -> framework: the masked weights bit for bit, everything else too
    sp_path = tmp_path / "m.sparse.h5"
    prune_file(src, sp_path, sparsity=0.7, scope=scope, max_sparsity=0.9)
    back = tmp_path / ("back" + src.name[1:])
    densify_file(sp_path, back)
    if fmt == "keras":
        with zipfile.ZipFile(dst) as a, zipfile.ZipFile(back) as b:
            assert a.namelist() == b.namelist()
            for n in a.namelist():
                if n != "model.weights.h5":
                    assert a.read(n) == b.read(n)
            a.extract("model.weights.h5", tmp_path / "a")
            b.extract("model.weights.h5", tmp_path / "b")
        assert_same_h5(tmp_path / "a" / "model.weights.h5", tmp_path / "b" / "model.weights.h5")
    else:
        assert_same_h5(dst, back)
    with h5py.File(sp_path) as h:
        assert h.attrs["format"] == "sparsecore-sparse-hdf5" and h.attrs["source_sha256"] == before
        assert h.attrs["criterion"] == "magnitude" and h.attrs["scope"] == scope
        assert h.attrs["tool_version"] == sc.__version__
        assert h.attrs["format_version"] == 2
        g = h["tensors/0"]
        assert g.attrs["encoding"] in ("delta8", "bitmask")  # packed: the fewest bytes (2:4 tensors: nm)
        name = g.attrs["name"]
    with SparseFile(sp_path) as f:
        sc.check_csr(f.csr(name), full=True)  # what it stores reads back as a canonical CSR
        sc.check_packed(f.packed(name))


def test_legacy_split_attributes_bytes_and_empty_layers(tmp_path, rng):
    """Keras 2 HDF5 written by hand: split layer_names, bytes attributes, a layer without weights."""
    path = tmp_path / "legacy.h5"
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    w2 = rng.standard_normal((4, 2)).astype(np.float32)
    with h5py.File(path, "w") as h:
        mw = h.create_group("model_weights")
        mw.attrs["layer_names0"] = np.array([b"input", b"dense_a"])
        mw.attrs["layer_names1"] = np.array([b"dense_b"])
        mw.attrs["backend"] = b"tensorflow"
        mw.create_group("input").attrs["weight_names"] = np.array([], dtype="S1")
        ga = mw.create_group("dense_a")
        ga.attrs["weight_names"] = np.array([b"dense_a/kernel:0", b"dense_a/bias:0"])
        ga.create_dataset("dense_a/kernel:0", data=w1)
        ga.create_dataset("dense_a/bias:0", data=np.zeros(4, np.float32))
        gb = mw.create_group("dense_b")
        gb.attrs["weight_names"] = ["dense_b/kernel:0"]  # str attributes
        gb.create_dataset("dense_b/kernel:0", data=w2)
        h.create_dataset("optimizer_weights/adam/m", data=rng.standard_normal((6, 4)).astype(np.float32))
    with open_weights(path) as r:
        assert r.format == "keras-legacy"
        assert list(r.entries) == ["dense_a/dense_a/kernel:0", "dense_a/dense_a/bias:0", "dense_b/dense_b/kernel:0"]
        assert r.select() == ["dense_a/dense_a/kernel:0", "dense_b/dense_b/kernel:0"]
    out = tmp_path / "out.h5"
    prune_file(path, out, sparsity=0.5)
    with h5py.File(out) as h:
        k = h["model_weights/dense_a/dense_a/kernel:0"][()]
        assert (k == 0).sum() == 12
        np.testing.assert_array_equal(k, np.where(sc.sparsity_mask(w1, 0.5, absolute=True), w1, 0))
        assert list(h["model_weights"].attrs["layer_names0"]) == [b"input", b"dense_a"]
        np.testing.assert_array_equal(h["optimizer_weights/adam/m"][()],
                                      h5py.File(path)["optimizer_weights/adam/m"][()])


# --- safetensors and PyTorch ----------------------------------------------------------

def test_safetensors_round_trips_and_passes_non_floats(tmp_path, rng):
    stn = pytest.importorskip("safetensors.numpy")
    tensors = {"emb.weight": rng.standard_normal((50, 16)).astype(np.float32),
               "fc.weight": rng.standard_normal((16, 16)).astype(np.float16),
               "fc.bias": rng.standard_normal(16).astype(np.float32),
               "pos_ids": np.arange(50, dtype=np.int64)[None],
               "head.weight": rng.standard_normal((4, 16))}
    src = tmp_path / "m.safetensors"
    stn.save_file(tensors, str(src), metadata={"format": "np", "note": "kept"})
    dst = tmp_path / "out.safetensors"
    res = prune_file(src, dst, sparsity=0.6, scope="global")
    got = stn.load_file(str(dst))  # the reference implementation reads our output
    want = sc.prune({k: tensors[k] for k in ("emb.weight", "fc.weight", "head.weight")}, sparsity=0.6, scope="global")
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        if k in want.masks:
            np.testing.assert_array_equal(got[k], np.where(want.masks[k], v, 0))
        else:
            assert got[k].tobytes() == v.tobytes()
    assert res.copied == ["fc.bias", "pos_ids"] or set(res.copied) == {"fc.bias", "pos_ids"}
    with open_weights(dst) as r:
        assert r.metadata == {"format": "np", "note": "kept"}
    sp_path = tmp_path / "m.sparse.h5"
    prune_file(src, sp_path, sparsity=0.6, scope="global")
    back = tmp_path / "back.safetensors"
    densify_file(sp_path, back)
    again = stn.load_file(str(back))
    for k in tensors:
        assert again[k].tobytes() == got[k].tobytes()


def _header_of(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8:8 + n], raw[8 + n:]


@pytest.mark.parametrize("in_order", [True, False])
def test_a_pruned_safetensors_keeps_its_header_or_lays_it_out_anew(tmp_path, rng, in_order):
    # a header written by another tool (spaces, its own key order, metadata): kept byte for byte when the
    # tensors lie in its order; rebuilt in order, the data moved with it, when they do not
    a, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float64)
    spans = {"a": (0, a.nbytes), "b": (a.nbytes, a.nbytes + b.nbytes)}
    data = a.tobytes() + b.tobytes()
    if not in_order:
        spans = {"a": (b.nbytes, b.nbytes + a.nbytes), "b": (0, b.nbytes)}
        data = b.tobytes() + a.tobytes()
    head = json.dumps({"__metadata__": {"by": "other tool"},
                       "a": {"shape": [6, 5], "dtype": "F32", "data_offsets": list(spans["a"])},
                       "b": {"data_offsets": list(spans["b"]), "dtype": "F64", "shape": [3, 4]}},
                      indent=1).encode() + b"   "
    src = tmp_path / "m.safetensors"
    src.write_bytes(len(head).to_bytes(8, "little") + head + data)
    dst = tmp_path / "o.safetensors"
    prune_file(src, dst, sparsity=0.5)
    out_head, out_data = _header_of(dst)
    want = sc.prune({"a": a, "b": b}, sparsity=0.5)
    with open_weights(dst) as r:
        assert list(r.entries) == ["a", "b"] and r.metadata == {"by": "other tool"}
        for k in ("a", "b"):
            np.testing.assert_array_equal(r.raw(k), np.where(want.masks[k], {"a": a, "b": b}[k], 0))
    if in_order:
        assert out_head == head
    else:
        assert out_head != head and json.loads(out_head)["a"]["data_offsets"] == [0, a.nbytes]
        assert len(out_head) % 8 == 0 and len(out_data) == len(data)


def test_bfloat16_safetensors(tmp_path, rng):
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    w = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)).to(torch.bfloat16)
    src = tmp_path / "bf.safetensors"
    stt.save_file({"w": w}, str(src))
    dst = tmp_path / "out.safetensors"
    prune_file(src, dst, sparsity=0.5)
    got = stt.load_file(str(dst))["w"]
    mask = sc.sparsity_mask(w.float().numpy(), 0.5, absolute=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.where(torch.from_numpy(mask), w, torch.zeros_like(w)))
    sp_path = tmp_path / "bf.sparse.h5"
    prune_file(src, sp_path, sparsity=0.5)
    densify_file(sp_path, tmp_path / "back.safetensors")
    assert torch.equal(stt.load_file(str(tmp_path / "back.safetensors"))["w"], got)


def test_torch_state_dict(tmp_path, rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4),
                                torch.nn.BatchNorm1d(4))
    src = tmp_path / "m.pt"
    torch.save(model.state_dict(), src)
    dst = tmp_path / "out.pt"
    prune_file(src, dst, sparsity=0.75)
    sd = torch.load(dst, weights_only=True)
    fresh = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4),
                                torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(sd, strict=True)  # loads into the original architecture
    for k in ("0.weight", "2.weight"):
        w = model.state_dict()[k].numpy()
        np.testing.assert_array_equal(sd[k].numpy(), np.where(sc.sparsity_mask(w, 0.75, absolute=True), w, 0))
    assert sd["3.num_batches_tracked"].dtype == torch.int64
    sp_path = tmp_path / "m.sparse.h5"
    prune_file(src, sp_path, sparsity=0.75)
    densify_file(sp_path, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --- scores files, selection options -------------------------------------------------

def test_scores_file_and_options_match_in_memory_prune(tmp_path, rng):
    weights = {f"l{i}.weight": rng.standard_normal((32, 24)).astype(np.float32) for i in range(4)}
    weights["l0.weight"] *= 10
    src = tmp_path / "w.safetensors"
    with open(src, "wb") as f:
        from sparsecore.io import _safetensors as st

        st.write(f, [(k, "F32", v.shape, lambda v=v: v) for k, v in weights.items()])
    scores = {k: rng.random(v.shape) for k, v in weights.items()}
    np.savez(tmp_path / "scores.npz", **scores)
    for kw in [dict(sparsity=0.8, scope="global", normalize="l2", min_sparsity=0.1, max_sparsity=0.95),
               dict(threshold=0.5), dict(sparsity=0.3, scope="global")]:
        dst = tmp_path / "o.sparse.h5"
        prune_file(src, dst, scores=tmp_path / "scores.npz", criterion="fisher", force=True, **kw)
        want = sc.prune(weights, scores, **kw)
        with open_weights(dst) as r:
            for k in weights:
                np.testing.assert_array_equal(r.mask(k), want.masks[k])
        with h5py.File(dst) as h:
            assert h.attrs["criterion"] == "fisher"
    with pytest.raises(UserError, match="scores file .* has no tensor 'l3.weight'"):
        np.savez(tmp_path / "bad.npz", **{k: v for k, v in scores.items() if k != "l3.weight"})
        prune_file(src, tmp_path / "x.safetensors", sparsity=0.5, scores=tmp_path / "bad.npz")
    r = prune_file(src, tmp_path / "inc.safetensors", sparsity=0.5, include=["l1*", "l2"], exclude=["l2.weight"])
    assert [s.name for s in r.summary] == ["l1.weight"]


# --- safety ----------------------------------------------------------------------------

def _small_safetensors(path, rng):
    from sparsecore.io import _safetensors as st

    w = rng.standard_normal((16, 16)).astype(np.float32)
    with open(path, "wb") as f:
        st.write(f, [("w", "F32", w.shape, lambda: w)])


def test_output_rules(tmp_path, rng):
    src = tmp_path / "w.safetensors"
    _small_safetensors(src, rng)
    with pytest.raises(UserError, match="would overwrite the input"):
        prune_file(src, src, sparsity=0.5, force=True)
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(UserError, match="exists; pass force=True to replace it"):
        prune_file(src, dst, sparsity=0.5)
    assert dst.read_bytes() == b"old"
    prune_file(src, dst, sparsity=0.5, force=True)
    assert dst.read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "w.safetensors"]  # no temporaries


def _corrupt_inputs(tmp_path, rng, keras_ok):
    cases = {}
    src = tmp_path / "w.safetensors"
    _small_safetensors(src, rng)
    data = src.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    cases["trunc.safetensors"] = "truncated"
    (tmp_path / "text.h5").write_bytes(b"this is not HDF5 at all, only text\n" * 10)
    cases["text.h5"] = "unknown weight-file format .*no HDF5 signature"
    with h5py.File(tmp_path / "good.h5", "w") as h:
        h["w"] = rng.standard_normal((64, 64)).astype(np.float32)
    good = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "trunc.h5").write_bytes(good[: len(good) // 2])
    cases["trunc.h5"] = "truncated or corrupt|unreadable"
    with zipfile.ZipFile(tmp_path / "nokeras.keras", "w") as z:
        z.writestr("config.json", "{}")
    cases["nokeras.keras"] = "without model.weights.h5"
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    cases["blob.bin"] = "unknown weight-file format"
    bad_header = struct.pack("<Q", 10) + b"{not json}"
    (tmp_path / "badjson.safetensors").write_bytes(bad_header)
    cases["badjson.safetensors"] = "not valid JSON"
    return cases


def test_corrupt_and_unknown_inputs_give_clear_errors_and_no_output(tmp_path, rng):
    cases = _corrupt_inputs(tmp_path, rng, False)
    for name, pattern in cases.items():
        before = sha(tmp_path / name)
        out = tmp_path / f"out-{name}.sparse.h5"
        with pytest.raises((FormatError, UserError), match=pattern):
            prune_file(tmp_path / name, out, sparsity=0.5)
        assert not out.exists()
        assert sha(tmp_path / name) == before
    leftovers = [p.name for p in tmp_path.iterdir() if "sparsecore-tmp" in p.name]
    assert leftovers == []


def test_outputs_get_the_mode_of_a_plain_write_and_stale_temporaries_go(tmp_path, rng):
    src = tmp_path / "w.safetensors"
    _small_safetensors(src, rng)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone: its writer was killed
    stale = tmp_path / f".o.sparse.h5.{dead.pid}.abc123.sparsecore-tmp"
    live = tmp_path / f".o.sparse.h5.{os.getpid()}.def456.sparsecore-tmp"  # a writer still running
    other = tmp_path / f".other.h5.{dead.pid}.x.sparsecore-tmp"  # another target's: not ours to judge
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    old = os.umask(0o027)
    try:
        prune_file(src, tmp_path / "o.sparse.h5", sparsity=0.5)
    finally:
        os.umask(old)
    assert (tmp_path / "o.sparse.h5").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
    assert not stale.exists() and live.exists() and other.exists()


class _Runs:
    """A pickle that would run code when loaded unsafely."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_unsafe_pickles_are_refused_in_one_plain_line(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "x": _Runs()}, src)
    r = subprocess.run([sys.executable, "-m", "sparsecore", "info", str(src)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"sparsecore: error: {src}: refused: the pickle holds print, which is not a tensor; "
                        f"sparsecore loads PyTorch files with weights_only=True and never runs a pickle's code "
                        f"(save a plain state dict)\n")
    assert "\x1b" not in r.stderr and "weights_only` set to `False" not in r.stderr


def test_densify_refuses_dense_files(tmp_path, rng):
    src = tmp_path / "w.safetensors"
    _small_safetensors(src, rng)
    with pytest.raises(UserError, match="not a sparsecore sparse file"):
        densify_file(src, tmp_path / "o.safetensors")


def test_sparse_file_reports_bytes_and_masks_with_kept_zeros(tmp_path, rng):
    from sparsecore.io import _safetensors as st

    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[0, :10] = 0  # kept zeros: the mask cannot be derived from the CSR
    src = tmp_path / "w.safetensors"
    with open(src, "wb") as f:
        st.write(f, [("w", "F32", w.shape, lambda: w)])
    scores = {"w": np.ones_like(w)}
    scores["w"][5:] = 0
    np.savez(tmp_path / "s.npz", **scores)
    dst = tmp_path / "w.sparse.h5"
    res = prune_file(src, dst, threshold=0.5, scores=tmp_path / "s.npz")
    with open_weights(dst) as r:
        np.testing.assert_array_equal(r.mask("w"), scores["w"] > 0.5)
        assert r.nnz("w") == 5 * 64 - 10
    assert res.output_bytes < res.input_bytes
    assert json.loads(h5py.File(dst).attrs["threshold"]) == 0.5


@pytest.mark.kernel
@pytest.mark.parametrize("dtype, bits", [(np.float32, np.uint32), (np.float64, np.uint64), (np.float16, np.uint16)])
@pytest.mark.parametrize("n", [0, 1, 7, 70_000])
def test_keep_raw_kernel(rng, dtype, bits, n):
    from sparsecore._kernels.cpu_pattern import keep_raw

    from . import reference as ref

    vals = rng.standard_normal(n).astype(dtype)
    vals[::5] = 0
    mask = rng.random(n) < 0.5
    raw = vals.copy().view(bits)
    want, want_nz = ref.keep_raw(vals.view(bits), mask)
    got_nz = keep_raw(raw, mask, vals.astype(np.float32) if dtype == np.float16 else vals.copy())
    assert raw.tobytes() == want.tobytes() and got_nz == want_nz


def test_compressed_sparse_output_round_trips(tmp_path, rng):
    stn = pytest.importorskip("safetensors.numpy")
    w = {"a": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal((16, 16))}
    src = tmp_path / "m.safetensors"
    stn.save_file(w, str(src))
    plain, packed = tmp_path / "p.sparse.h5", tmp_path / "c.sparse.h5"
    prune_file(src, plain, sparsity=0.8)
    prune_file(src, packed, sparsity=0.8, compression="gzip")
    with h5py.File(packed) as h:
        assert h["tensors/0/vals"].compression == "gzip"
    densify_file(plain, tmp_path / "p.safetensors")
    densify_file(packed, tmp_path / "c.safetensors")
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    with pytest.raises(UserError, match="compression applies to sparse HDF5"):
        prune_file(src, tmp_path / "x.safetensors", sparsity=0.5, compression="gzip")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16", np.float64])
def test_every_encoding_densifies_bit_exactly_and_packed_files_are_small(tmp_path, rng, dtype):
    """Version 2 stores packed encodings: densify gives the masked weights bit for bit whatever the
    encoding, and a 50% / 70% float32 file takes about a half / a third of the dense bytes."""
    stn = pytest.importorskip("safetensors.numpy")
    w = rng.standard_normal((256, 512)).astype(np.float32)
    src = tmp_path / "m.safetensors"
    if dtype == "bfloat16":
        from sparsecore.io import _safetensors

        with open(src, "wb") as f:
            _safetensors.write(f, [("w", "BF16", w.shape, lambda: (w.view(np.uint32) >> 16).astype(np.uint16))])
    else:
        stn.save_file({"w": w.astype(dtype)}, str(src))
    dense_bytes = os.path.getsize(src)
    for sparsity, most in ((0.5, 0.58), (0.7, 0.40)):
        outs = {}
        for enc in ("auto", "csr", "delta8", "bitmask"):
            out = tmp_path / f"{enc}.sparse.h5"
            prune_file(src, out, sparsity=sparsity, encoding=enc, force=True)
            back = tmp_path / f"{enc}.safetensors"
            densify_file(out, back, force=True)
            outs[enc] = (os.path.getsize(out), back.read_bytes())
            with SparseFile(out) as f:
                assert f.encoding("w") == (enc if enc != "auto" else f.encoding("w"))
                assert f.encoding("w") in ("delta8", "bitmask") or enc == "csr"
        assert len({b for _, b in outs.values()}) == 1  # the same dense file from every encoding
        if dtype == np.float32:
            assert outs["auto"][0] <= most * dense_bytes, (sparsity, outs["auto"][0], dense_bytes)
            assert outs["auto"][0] < outs["csr"][0]
    with pytest.raises(UserError, match="an encoding applies to sparse HDF5"):
        prune_file(src, tmp_path / "x.safetensors", sparsity=0.5, encoding="delta8")


def test_version_1_files_still_read(tmp_path, rng):
    """A version 1 file (CSR only, no encoding attribute) reads as before."""
    stn = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "m.safetensors"
    stn.save_file({"w": rng.standard_normal((8, 16)).astype(np.float32)}, str(src))
    out = tmp_path / "m.sparse.h5"
    prune_file(src, out, sparsity=0.5, encoding="csr")
    with h5py.File(out, "r+") as h:
        h.attrs["format_version"] = 1
        del h["tensors/0"].attrs["encoding"]
    densify_file(out, tmp_path / "back.safetensors")
    w = stn.load_file(str(src))["w"]
    got = stn.load_file(str(tmp_path / "back.safetensors"))["w"]
    np.testing.assert_array_equal(got, np.where(sc.sparsity_mask(np.abs(w), 0.5), w, 0))
    with h5py.File(out, "r+") as h:
        h.attrs["format_version"] = 3
    with pytest.raises(FormatError, match="reads versions 1, 2"):
        densify_file(out, tmp_path / "again.safetensors")


@settings(max_examples=300, deadline=None)
@given(name=st_.lists(st_.sampled_from(["embed", "EMBED", "wte", "Wpe", "shared", "depthwise", "dw_conv", "DWConv",
                                        "recurrent", "weight_hh", "stft", "basis", "window", "mel_filter",
                                        "MelFilter", "filterbank", "fbank", ".", "/", "_", "layer", "w", "e",
                                        "\u017f", "\u0130", "\u212a", "\u0131", "x\n", "0"]),
                      max_size=6).map("".join))
def test_left_out_reason_prefilter_agrees_with_the_full_patterns(name):
    """The cheap lower-case word search in front of the patterns never hides a match (non-ASCII names,
    whose case rules differ, go to the full patterns)."""
    from sparsecore.io import formats

    m = formats._ANY_LEFT_OUT.search(name)
    want = "" if m is None else next(r for i, (r, _) in enumerate(formats._LEFT_OUT) if m.group(f"g{i}") is not None)
    assert formats.left_out_reason(name) == want


def test_save_safetensors_round_trips_streams_and_refuses(tmp_path, rng):
    from sparsecore.io import save_safetensors

    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.integers(0, 9, 7).astype(np.int64)
    calls = []
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": a, "b": b, "c": (np.float16, (2, 2), lambda: calls.append(1) or np.ones((2, 2),
                                                                                                       np.float16))},
                     {"format": "pt"})
    with open_weights(path) as f:
        assert list(f.entries) == ["a", "b", "c"] and calls == [1]
        assert np.array_equal(f.raw("a"), a) and np.array_equal(f.raw("b"), b) and f.raw("c").dtype == np.float16
    before = path.read_bytes()
    with pytest.raises(UserError, match="exists; pass force=True"):
        save_safetensors(path, {"a": a})
    with pytest.raises(ValueError, match="header says F32"):  # a producer that lies: nothing replaced
        save_safetensors(path, {"a": (np.float32, (2, 2), lambda: a)}, force=True)
    with pytest.raises(TypeError, match="safetensors has no dtype"):
        save_safetensors(tmp_path / "x.safetensors", {"s": np.array(["x"])})
    with pytest.raises(TypeError, match="give an array or"):
        save_safetensors(tmp_path / "x.safetensors", {"s": (1, 2)})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    save_safetensors(path, {"z": np.zeros(2, np.float64)}, force=True)
    with open_weights(path) as f:
        assert list(f.entries) == ["z"]


class _JsonWeights(sc.io.formats.WeightFile):
    """A format of the test's own (tensors as JSON lists): one class is all a new format needs."""

    format = native = "jsonw"
    extensions = (".jsonw",)

    @classmethod
    def sniff(cls, probe):
        return probe.head.startswith(b'{"jsonw"')

    def __init__(self, path):
        super().__init__(path)
        with open(self.path) as f:
            d = json.load(f)["jsonw"]
        self.data = {k: np.array(v["data"], np.float32).reshape(v["shape"]) for k, v in d.items()}
        self.entries = {k: sc.io.formats.entry_of(k, a.shape, a.dtype) for k, a in self.data.items()}

    def raw(self, name):
        return self.data[name].copy()

    def write_like(self, path, tensor, pruned=None):
        out = {k: {"shape": list(a.shape), "data": np.asarray(tensor(k) if pruned is None or k in pruned else a)
                   .ravel().tolist()} for k, a in self.data.items()}
        with open(path, "w") as f:
            json.dump({"jsonw": out}, f)


def test_a_new_format_is_one_class(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(sc.io.files, "FORMATS", (_JsonWeights, *sc.io.files.FORMATS))
    w = {"fc.weight": rng.standard_normal((8, 6)).astype(np.float32), "fc.bias": np.ones(8, np.float32)}
    src = tmp_path / "m.jsonw"
    doc = {k: {"shape": list(a.shape), "data": a.ravel().tolist()} for k, a in w.items()}
    src.write_text(json.dumps({"jsonw": doc}))
    with open_weights(src) as r:
        assert isinstance(r, _JsonWeights) and list(r.entries) == ["fc.weight", "fc.bias"]
    r = prune_file(src, tmp_path / "out.jsonw", sparsity=0.5)  # written like its input, by the class
    assert r.format == "jsonw" and r.copied == ["fc.bias"]
    with open_weights(tmp_path / "out.jsonw") as out:
        got = out.raw("fc.weight")
        np.testing.assert_array_equal(got, w["fc.weight"] * sc.prune(w, sparsity=0.5).masks["fc.weight"])
        np.testing.assert_array_equal(out.raw("fc.bias"), w["fc.bias"])
    prune_file(src, tmp_path / "out.safetensors", sparsity=0.5, format="safetensors")  # converted
    with open_weights(tmp_path / "out.safetensors") as out:
        np.testing.assert_array_equal(out.raw("fc.weight"), got)
    assert prune_file(src, tmp_path / "y.safetensors", sparsity=0.5).format == "safetensors"  # converted by name
    with pytest.raises(UserError, match="the name says hdf5, but a jsonw input is written as jsonw"):
        prune_file(src, tmp_path / "x.h5", sparsity=0.5)


_NAME_PARTS = st_.sampled_from(["embed", "EMBED", "wte", "dw_conv", "dwconv", "mel_filter", "window", "weight_hh",
                                "layer", "q_proj", ".", "_", "/", "\0", "\n", "İ", "ß", "0"])


@settings(max_examples=200, deadline=None)
@given(st_.lists(st_.lists(_NAME_PARTS, max_size=5).map("".join), max_size=12))
def test_the_joined_search_finds_every_name_left_out(names):
    from sparsecore.io.formats import left_out_hints, left_out_reason

    hinted = left_out_hints(names)
    assert {n for n in names if left_out_reason(n)} <= hinted <= set(names)
