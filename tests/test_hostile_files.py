"""Hostile files and faults (issue 22): links that alias the input to the output, HDF5 storage that lives in
other files, archive and shape bombs, zero-element tensors, deep JSON, corrupt sparse files, terminal
escapes, caps that empty small tensors, temporaries that outlive a run. Each case failed on a70b2f3."""

import json
import os
import subprocess
import sys
import tempfile
import zipfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

import sparsecore as sc
from sparsecore import _atomic, cli
from sparsecore.io import FormatError, UserError, densify_file, open_weights, prune_file
from sparsecore.io import _safetensors as st

CLEAN = (FormatError, UserError, ValueError, TypeError, OSError)


def _st(path, tensors, meta=None):
    with open(path, "wb") as f:
        st.write(f, [(k, "BF16" if v.dtype == np.uint16 else st.dtype_name(v.dtype), v.shape, lambda v=v: v)
                     for k, v in tensors.items()], meta)
    return path


def _folder(path, rng, extra=True):
    """A model folder: one unsharded model.safetensors and a config."""
    os.makedirs(path)
    _st(os.path.join(path, "model.safetensors"),
        {"layers.0.w": rng.standard_normal((16, 8)).astype(np.float32),
         "layers.1.w": rng.standard_normal((8, 16)).astype(np.float32)})
    if extra:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"tie_word_embeddings": False}, f)
    return path


def _tree(path):
    """Every file under ``path`` with its bytes (links followed)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def _run(*args):
    """The command line in a process of its own: (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "sparsecore", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


def _peak_mib(code, *args):
    """Run ``code`` in a fresh interpreter; its peak resident memory (VmHWM) in MiB."""
    code += "\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024


# --- 1. links never alias the input to the output ------------------------------------------------------

def test_a_linked_input_folder_is_not_replaced_by_its_target(tmp_path, rng):
    victim = _folder(tmp_path / "victim", rng)
    before = _tree(victim)
    os.symlink(victim, tmp_path / "alias_in")
    with pytest.raises(UserError, match="overlap the input folder .*after resolving links"):
        prune_file(tmp_path / "alias_in", victim, sparsity=0.5, force=True)
    assert _tree(victim) == before


def test_an_output_through_a_linked_parent_is_the_input(tmp_path, rng):
    victim = _folder(tmp_path / "victim2", rng)
    before = _tree(victim)
    os.symlink(".", tmp_path / "pl")
    code, _, err = _run("prune", victim, "-o", tmp_path / "pl" / "victim2", "--sparsity", "0.5", "--force")
    assert code == 1 and err.count("\n") == 1 and "overlap" in err, err
    assert _tree(victim) == before


def test_densify_never_replaces_the_folder_holding_its_input(tmp_path, rng):
    src = _folder(tmp_path / "m", rng)
    out = tmp_path / "out"
    os.makedirs(out)
    prune_file(src, out / "m.sparse.h5", sparsity=0.5)
    before = _tree(out)
    os.symlink(out, tmp_path / "link")
    for dst in (tmp_path / "link", out):
        with pytest.raises(UserError, match="lies inside the output folder"):
            densify_file(out / "m.sparse.h5", dst, force=True)
    with pytest.raises(UserError, match="lies inside the output folder"):
        densify_file(tmp_path / "link" / "m.sparse.h5", out, force=True)
    assert _tree(out) == before


def test_a_single_file_through_links_and_the_scores_file(tmp_path, rng):
    w = {"w": rng.standard_normal((8, 8)).astype(np.float32)}
    m = _st(tmp_path / "m.safetensors", w)
    os.symlink(m, tmp_path / "alias.safetensors")
    os.symlink(".", tmp_path / "pl")
    for dst in (m, tmp_path / "pl" / "m.safetensors"):
        with pytest.raises(UserError, match="overwrite the input"):
            prune_file(tmp_path / "alias.safetensors", dst, sparsity=0.5, force=True)
    scores = tmp_path / "s.safetensors"
    _st(scores, {"w": np.abs(w["w"])})
    before = scores.read_bytes()
    with pytest.raises(UserError, match="overwrite the input"):  # the scores file is an input too
        prune_file(m, tmp_path / "pl" / "s.safetensors", sparsity=0.5, scores=scores, force=True)
    assert scores.read_bytes() == before
    with pytest.raises(UserError, match="overlap the input folder"):  # output inside an input folder
        prune_file(_folder(tmp_path / "f", rng), tmp_path / "f" / "x.sparse.h5", sparsity=0.5)


def test_a_report_plot_never_replaces_its_input(tmp_path, rng):
    pytest.importorskip("matplotlib")
    m = _st(tmp_path / "m.safetensors", {"w": rng.standard_normal((4, 4)).astype(np.float32)})
    before = m.read_bytes()
    os.symlink(".", tmp_path / "pl")
    code, _, err = _run("report", m, "--plot", tmp_path / "pl" / "m.safetensors")
    assert code == 1 and "overwrite the input" in err and m.read_bytes() == before
    folder = _folder(tmp_path / "f", rng)  # nor any file of a model folder
    before = _tree(folder)
    code, _, err = _run("report", folder, "--plot", folder / "config.json")
    assert code == 1 and "overlap the input folder" in err and _tree(folder) == before


def test_a_scores_checkpoint_is_an_input_too(tmp_path, rng):
    m = _st(tmp_path / "m.safetensors", {"layers.0.w": rng.standard_normal((16, 8)).astype(np.float32)})
    scores = _folder(tmp_path / "scores", rng)
    with open(scores / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"layers.0.w": "model.safetensors", "layers.1.w": "model.safetensors"}}, f)
    before = _tree(scores)
    with pytest.raises(UserError, match="overlap the input folder"):  # the index names the scores; a shard is hit
        prune_file(m, scores / "model.safetensors", sparsity=0.5, scores=scores / "model.safetensors.index.json",
                   force=True)
    assert _tree(scores) == before


def test_a_carried_file_linked_into_the_output_folder_is_refused(tmp_path, rng):
    out = _folder(tmp_path / "out", rng)
    src = _folder(tmp_path / "src", rng, extra=False)
    os.symlink(out / "config.json", src / "config.json")  # the input carries a file of the output
    before = _tree(out)
    with pytest.raises((UserError, FormatError), match="config.json"):
        prune_file(src, out, sparsity=0.5, force=True)
    assert _tree(out) == before


# --- 2. nothing outside the input is read into the output ------------------------------------------------

def test_links_out_of_a_model_folder_only_into_a_hugging_face_cache(tmp_path, rng):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    src = _folder(tmp_path / "m", rng)
    os.symlink(secret, src / "tokenizer.json")
    with pytest.raises(FormatError, match="tokenizer.json is a link to .*outside the model folder"):
        prune_file(src, tmp_path / "o", sparsity=0.5)
    assert not (tmp_path / "o").exists()
    os.unlink(src / "tokenizer.json")
    os.makedirs(tmp_path / "outside")
    os.symlink(tmp_path / "outside", src / "sub")
    with pytest.raises(FormatError, match="sub-folder sub is a link"):
        prune_file(src, tmp_path / "o", sparsity=0.5)
    os.unlink(src / "sub")
    os.makedirs(src / "real")
    (src / "real" / "a.txt").write_text("a")
    os.symlink("real", src / "inner")  # a linked sub-folder inside is carried as a copy
    os.mkfifo(src / "pipe")
    with pytest.raises(FormatError, match="pipe is not a regular file"):
        prune_file(src, tmp_path / "o", sparsity=0.5)
    os.unlink(src / "pipe")
    prune_file(src, tmp_path / "o", sparsity=0.5)
    assert (tmp_path / "o" / "inner" / "a.txt").read_text() == "a" and not os.path.islink(tmp_path / "o" / "inner")
    os.symlink("..", src / "real" / "up")  # a loop
    with pytest.raises(FormatError, match="a loop"):
        prune_file(src, tmp_path / "o2", sparsity=0.5)
    os.unlink(src / "real" / "up")
    os.unlink(src / "inner")

    # a Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--m"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    os.makedirs(blobs)
    os.makedirs(snap)
    for name in ("model.safetensors", "config.json"):
        os.replace(src / name, blobs / f"h-{name}")
        os.symlink(f"../../blobs/h-{name}", snap / name)
    before = _tree(blobs)
    with pytest.raises(UserError, match="lies inside the output folder"):  # the blobs are inputs too
        prune_file(snap, blobs, sparsity=0.5, force=True)
    assert _tree(blobs) == before
    prune_file(snap, tmp_path / "pruned", sparsity=0.5)
    assert not os.path.islink(tmp_path / "pruned" / "config.json")
    assert (tmp_path / "pruned" / "config.json").read_bytes() == (blobs / "h-config.json").read_bytes()
    os.rename(tmp_path / "hub" / "models--org--m", tmp_path / "hub" / "plain")  # not a hub cache's name
    with pytest.raises(FormatError, match="outside the model folder"):
        prune_file(tmp_path / "hub" / "plain" / "snapshots" / "abc123", tmp_path / "p2", sparsity=0.5)


@pytest.mark.parametrize("kind", ["external", "virtual", "link"])
def test_hdf5_storage_in_other_files_is_refused(tmp_path, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"root:x:0:0:" * 40)
    src = tmp_path / "m.h5"
    with h5py.File(src, "w") as h:
        h["layers/dense/vars/0"] = np.ones((4, 8), np.float32)
        if kind == "external":
            h.create_dataset("layers/dense/vars/1", (4, 8), np.float32, external=[(str(secret), 0, 128)])
        elif kind == "virtual":
            with h5py.File(tmp_path / "secret.h5", "w") as s:
                s["x"] = np.arange(32, dtype=np.float32).reshape(4, 8)
            layout = h5py.VirtualLayout((4, 8), np.float32)
            layout[:] = h5py.VirtualSource(str(tmp_path / "secret.h5"), "x", (4, 8))
            h.create_virtual_dataset("layers/dense/vars/1", layout)
        else:
            h["layers/dense/vars/1"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/x")
    want = {"external": "external file", "virtual": "is virtual", "link": "a link to"}[kind]
    for out in ("o.h5", "o.sparse.h5"):
        with pytest.raises(FormatError, match=want):
            prune_file(src, tmp_path / out, sparsity=0.5)
        assert not (tmp_path / out).exists()
    code, out, err = _run("info", src)
    assert code == 1 and want in err and "root:x" not in out + err


# --- 4. temporary files --------------------------------------------------------------------------------

def test_a_keras_archive_leaves_no_named_temporary(tmp_path, monkeypatch):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="a")])
    model.save(tmp_path / "m.keras")
    private = tmp_path / "tmp"
    os.makedirs(private)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with open_weights(tmp_path / "m.keras") as r:
        assert r.entries and os.listdir(private) == []  # open, and nothing has a name a kill could leave
        prune_file(tmp_path / "m.keras", tmp_path / "o.keras", sparsity=0.5)
        prune_file(tmp_path / "m.keras", tmp_path / "o.sparse.h5", sparsity=0.5)
        densify_file(tmp_path / "o.sparse.h5", tmp_path / "b.keras")
        assert os.listdir(private) == []


def test_an_inflating_archive_member_is_refused_before_it_is_written(tmp_path, monkeypatch):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="a")])
    model.save(tmp_path / "m.keras")
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(tmp_path / "m.keras") as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            if info.filename != "model.weights.h5":
                zout.writestr(info, zin.read(info.filename))
        member = zipfile.ZipInfo("model.weights.h5")
        member.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(member, "w", force_zip64=True) as f:
            zeros = bytes(1 << 20)
            for _ in range(300):  # 300 MiB of zeros in ~300 KiB: past the floor and the ratio
                f.write(zeros)
    assert os.path.getsize(bomb) < 1 << 20
    private = tmp_path / "tmp"
    os.makedirs(private)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with pytest.raises(FormatError, match="model.weights.h5.* decompression bomb"):
        prune_file(bomb, tmp_path / "o.keras", sparsity=0.5)
    assert os.listdir(private) == [] and not (tmp_path / "o.keras").exists()


def test_an_inflating_torch_storage_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "m.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "m.pt") as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data/0"):  # the storage, declared 300 MiB and deflated
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(member, "w", force_zip64=True) as f:
                    for _ in range(300):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(info, data)
    code, _, err = _run("prune", bomb, "-o", tmp_path / "o.pt", "--sparsity", "0.5")
    assert code == 1 and "decompression bomb" in err and err.count("\n") == 1, err


def test_moved_aside_outputs_of_killed_writers_are_cleaned_or_put_back(tmp_path, rng):
    src = _folder(tmp_path / "m", rng)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid  # a process id that no longer runs
    out = tmp_path / "out"
    prune_file(src, out, sparsity=0.5)
    stale = tmp_path / f".out.{dead}.old.x1y2z3.sparsecore-tmp"
    os.makedirs(stale)
    (stale / "old.txt").write_text("old")
    prune_file(src, out, sparsity=0.6, force=True)  # the next run removes it
    assert not stale.exists() and not [n for n in os.listdir(tmp_path) if n.endswith(".sparsecore-tmp")]
    # killed after moving the old output aside and before renaming the new one: the old one comes back
    os.rename(out, stale)
    assert _atomic._remove_stale(str(tmp_path), "out") == []
    assert out.is_dir() and not stale.exists()


def test_two_writers_without_force_never_replace_each_other(tmp_path):
    dst = tmp_path / "o.bin"
    with pytest.raises(FileExistsError, match="exists"):
        with _atomic.AtomicPath(dst, replace=False) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"mine")
            dst.write_bytes(b"theirs")  # the other writer finished first
    assert dst.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["o.bin"]
    folder = tmp_path / "d"
    with pytest.raises(FileExistsError, match="exists"):
        with _atomic.AtomicDir(folder, replace=False) as tmp:
            (folder / "x").parent.mkdir()
            (folder / "x").write_text("theirs")
    assert (folder / "x").read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["d", "o.bin"]


# --- 5. one line for every failure, memory bounded by the real tensors ------------------------------------

def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("which", ["index", "config"])
def test_deeply_nested_json_is_one_line(tmp_path, rng, which):
    src = _folder(tmp_path / "m", rng)
    if which == "index":
        (src / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep(200_000) + "}")
    else:
        (src / "config.json").write_text(_deep(200_000))
    code, _, err = _run("prune", src, "-o", tmp_path / "o", "--sparsity", "0.5")
    assert code == 1 and err.count("\n") == 1 and "nested too deeply" in err, err
    assert not (tmp_path / "o").exists()


def test_zero_element_tensors_are_copied_in_bounded_memory(tmp_path, rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    src = tmp_path / "z.safetensors"
    with open(src, "wb") as f:
        st.write(f, [("empty", "F32", (1 << 32, 0), lambda: np.zeros((1 << 32, 0), np.float32)),
                     ("wide", "F32", (0, 1 << 26), lambda: np.zeros((0, 1 << 26), np.float32)),
                     ("w", "F32", (8, 8), lambda: w)])
    assert os.path.getsize(src) < 4096
    code = ("import sys\nfrom sparsecore.io import prune_file\n"
            "r = prune_file(sys.argv[1], sys.argv[2], sparsity=0.5)\n"
            "assert [t.name for t in r.summary] == ['w'] and r.copied == ['empty', 'wide'], r\n"
            "prune_file(sys.argv[1], sys.argv[3], sparsity=0.5, scope='global')\n")
    assert _peak_mib(code, src, tmp_path / "o.safetensors", tmp_path / "o.sparse.h5") < 400
    with open_weights(tmp_path / "o.sparse.h5") as r:
        assert r.entries["empty"].shape == (1 << 32, 0) and r.raw("empty").size == 0
    r = sc.prune({"e": np.zeros((1 << 20, 0), np.float32), "w": w}, "magnitude", sparsity=0.5, scope="global")
    assert r.masks["e"].shape == (1 << 20, 0) and r.masks["w"].sum() == 32


def test_an_hdf5_dataset_declared_far_past_its_storage_is_refused(tmp_path):
    src = tmp_path / "huge.h5"
    with h5py.File(src, "w") as h:
        h["layers/dense/vars/0"] = np.ones((4, 8), np.float32)
        h.create_dataset("layers/dense/vars/1", (1 << 20, 1 << 20), np.float32, chunks=(64, 64))  # 4 TiB, unwritten
    code = ("import sys\nfrom sparsecore.io import FormatError, prune_file\n"
            "try:\n    prune_file(sys.argv[1], sys.argv[2], sparsity=0.5)\n"
            "except FormatError as e:\n    assert 'shape bomb' in str(e), e\nelse:\n    raise SystemExit('accepted')\n")
    assert _peak_mib(code, src, tmp_path / "o.h5") < 400
    assert not (tmp_path / "o.h5").exists()


def _sparse(tmp_path, rng, kind="safetensors"):
    if kind == "sharded":
        src = _folder(tmp_path / "m", rng)
        out = tmp_path / "m.sparse.h5"
    else:
        src = _st(tmp_path / "m.safetensors", {"w": rng.standard_normal((6, 8)).astype(np.float32)})
        out = tmp_path / "m.sparse.h5"
    prune_file(src, out, sparsity=0.5, encoding="csr")  # the CSR datasets that these tests damage
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda h: h["tensors/0/indices"].__setitem__(0, 99), "column indices"),
    (lambda h: h["tensors/0/indices"].__setitem__(0, -1), "column indices"),
    (lambda h: h["tensors/0/indptr"].__setitem__(1, 40), "row pointers"),
    (lambda h: h["container"].attrs.__setitem__("kind", "zip"), "container kind 'zip'"),
    (lambda h: h["container"].attrs.__setitem__("order", json.dumps(["w", "nothing"])), "stored nowhere"),
    (lambda h: h["tensors/0"].attrs.__setitem__("csr_shape", np.array([6, 9])), "does not fit"),
])
def test_corrupt_sparse_files_are_refused_by_name(tmp_path, rng, damage, message):
    out = _sparse(tmp_path, rng)
    with h5py.File(out, "r+") as h:
        if "order" in h["container"] and "order" in message:
            del h["container/order"]
        damage(h)
    with pytest.raises(FormatError, match=message):
        with open_weights(out) as r:
            r.raw("w")
    code, _, err = _run("densify", out, "-o", tmp_path / "back.safetensors")
    assert code == 1 and err.count("\n") == 1 and message.split()[0] in err, err
    assert not (tmp_path / "back.safetensors").exists()


def test_a_sharded_sparse_file_naming_a_missing_tensor_or_clobbering_a_shard(tmp_path, rng):
    out = _sparse(tmp_path, rng, "sharded")
    with h5py.File(out, "r+") as h:
        layout = json.loads(h["container/shards"][()].tobytes())
        layout["model.safetensors"]["names"].append("ghost")
        del h["container/shards"]
        h["container/shards"] = np.frombuffer(json.dumps(layout).encode(), np.uint8)
    code, _, err = _run("densify", out, "-o", tmp_path / "back")
    assert code == 1 and "'ghost'" in err and err.count("\n") == 1, err
    os.makedirs(tmp_path / "again")
    out = _sparse(tmp_path / "again", rng, "sharded")
    with h5py.File(out, "r+") as h:
        key = next(iter(h["container/files"]))
        h["container/files"][key].attrs["path"] = "model.safetensors"
    with pytest.raises(UserError, match="would overwrite a shard"):
        densify_file(out, tmp_path / "back2")
    assert not (tmp_path / "back2").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st_.data())
def test_mutated_sparse_arrays_are_refused_or_exact(tmp_path_factory, data):
    import scipy.sparse as sp

    tmp = tmp_path_factory.mktemp("sfuzz")
    out = _sparse(tmp, np.random.default_rng(0))
    with h5py.File(out, "r+") as h:
        key = data.draw(st_.sampled_from(["indices", "indptr"]))
        ds = h[f"tensors/0/{key}"]
        i = data.draw(st_.integers(0, ds.shape[0] - 1))
        ds[i] = data.draw(st_.integers(-(1 << 31), (1 << 31) - 1))
    try:
        with open_weights(out) as r:
            got = r.raw("w")
            g = r.pruned["w"]
            want = sp.csr_array((g["data"][()], g["indices"][()], g["indptr"][()]), shape=(6, 8)).toarray()
    except FormatError:
        return
    np.testing.assert_array_equal(got, want)  # accepted: a valid CSR, read exactly


def test_a_failed_torch_write_and_an_unexpected_failure_are_one_line(tmp_path, rng, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(4, 4)}, tmp_path / "m.pt")

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nmore")

    monkeypatch.setattr(torch, "save", full)
    assert cli.main(["prune", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.pt"), "--sparsity", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PyTorch could not write" in err and not (tmp_path / "o.pt").exists()

    monkeypatch.setattr(cli, "prune_file", lambda *a, **k: {}["boom"])
    m = _st(tmp_path / "m.safetensors", {"w": np.ones((4, 4), np.float32)})
    assert cli.main(["prune", str(m), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["prune", str(m), "-o", str(tmp_path / "o.safetensors"), "--sparsity", "0.5", "--debug"])


def test_a_pickle_that_calls_a_function_is_refused_without_advice(tmp_path):
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return os.system, ("echo PWNED",)

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pt")
    code, out, err = _run("info", tmp_path / "evil.pt")
    assert code == 1 and "PWNED" not in out + err and "system" in err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err


def test_dask_with_a_single_file_is_refused_at_once(tmp_path, rng):
    m = _st(tmp_path / "m.safetensors", {"w": rng.standard_normal((4, 4)).astype(np.float32)})
    code, _, err = _run("prune", m, "-o", tmp_path / "o.safetensors", "--sparsity", "0.5", "--dask",
                        "tcp://127.0.0.1:9")
    assert code == 2 and "sharded checkpoint" in err


# --- 6. terminal escapes and long strings ---------------------------------------------------------------

def test_names_and_provenance_are_printed_escaped_and_cut(tmp_path, rng):
    evil = "a\x1b]0;owned\x07\x1b[2J\u202eb"
    src = _st(tmp_path / "e.safetensors", {evil: rng.standard_normal((4, 8)).astype(np.float32)})
    out = tmp_path / "e.sparse.h5"
    prune_file(src, out, sparsity=0.5)
    with h5py.File(out, "r+") as h:
        h.attrs["criterion"] = "\x1b[31m" + "x" * 50_000_000
    for args in (("info", src), ("info", out), ("report", out),
                 ("prune", src, "-o", tmp_path / "o.safetensors", "--sparsity", "0.5")):
        code, stdout, stderr = _run(*args)
        assert code == 0, stderr
        text = stdout + stderr
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        assert "\\x1b]0;owned" in text and len(text) < 20_000


# --- 7. a cap never empties a tensor that was not asked to be emptied ---------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 49, 50, 51])
def test_the_default_cap_keeps_a_weight_of_every_tensor(tmp_path, rng, n):
    w = {"tiny": rng.standard_normal((1, n)).astype(np.float32) * 1e-3,
         "big": rng.standard_normal((64, 64)).astype(np.float32)}
    r = sc.prune(w, "magnitude", sparsity=0.5, scope="global", max_sparsity=0.99)
    assert r.masks["tiny"].sum() >= 1
    r = sc.prune(w, "magnitude", threshold=1e9, max_sparsity=0.99)
    assert all(m.sum() >= 1 for m in r.masks.values())
    src = _st(tmp_path / "t.safetensors", w)
    res = prune_file(src, tmp_path / "o.safetensors", sparsity=0.5, scope="global")
    assert all(t.pruned < t.size for t in res.summary)
    r = sc.prune(w, "magnitude", threshold=1e9, max_sparsity=1.0)  # asked: emptied
    assert all(m.sum() == 0 for m in r.masks.values())


def test_many_members_or_datasets_each_under_the_floor_are_refused_together(tmp_path, monkeypatch):
    from sparsecore.io import formats

    monkeypatch.setattr(formats, "BOMB_FLOOR", 1 << 20)  # the rule's shape at a test's size
    src = tmp_path / "many.h5"
    with h5py.File(src, "w") as h:
        h["layers/dense/vars/0"] = np.ones((4, 8), np.float32)
        for i in range(4):  # 4 x 0.9 MiB declared, none written: each under the floor, together over it
            h.create_dataset(f"layers/d{i}/vars/0", (480, 480), np.float32, chunks=(16, 16))
    with pytest.raises(FormatError, match="declare .* bytes in all"):
        open_weights(src)
    arch = tmp_path / "many.zip"
    with zipfile.ZipFile(arch, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(4):
            z.writestr(f"m{i}", bytes(900 << 10))
    with zipfile.ZipFile(arch) as z, pytest.raises(FormatError, match="declare .* bytes in all"):
        formats.check_members(z, str(arch))


def test_a_linked_old_output_is_unlinked_not_followed(tmp_path, rng):
    src = _folder(tmp_path / "m", rng)
    real = tmp_path / "realout"
    os.makedirs(real)
    (real / "keep.txt").write_text("mine")
    os.symlink(real, tmp_path / "outlink")
    prune_file(src, tmp_path / "outlink", sparsity=0.5, force=True)
    assert (real / "keep.txt").read_text() == "mine"  # the link was replaced, not what it pointed at
    assert os.path.isdir(tmp_path / "outlink") and not os.path.islink(tmp_path / "outlink")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".sparsecore-tmp")]


def test_an_interrupted_force_run_is_undone_before_the_next_run_checks(tmp_path, rng):
    src = _folder(tmp_path / "m", rng)
    out = tmp_path / "outx"
    prune_file(src, out, sparsity=0.5)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    os.rename(out, tmp_path / f".outx.{p.pid}.old.abc123.sparsecore-tmp")  # killed mid-swap
    with pytest.raises(UserError, match="exists; pass force=True"):  # the old output is back, and protected
        prune_file(src, out, sparsity=0.6)
    assert out.is_dir()


@pytest.mark.parametrize("damage, what", [
    ("dtype", "damaged sparsecore sparse file"),
    ("deep", "damaged sparsecore sparse file"),
    ("meta", "damaged sparsecore sparse file"),
])
def test_a_damaged_container_is_one_line_naming_the_file(tmp_path, rng, damage, what):
    kind = "sharded" if damage == "meta" else "safetensors"
    if kind == "sharded":
        out = _sparse(tmp_path, rng, "sharded")
    else:
        out = _sparse(tmp_path, rng)
    with h5py.File(out, "r+") as h:
        if damage == "meta":
            layout = json.loads(h["container/shards"][()].tobytes())
            layout["model.safetensors"]["metadata"] = ["not", "a", "map"]
            del h["container/shards"]
            h["container/shards"] = np.frombuffer(json.dumps(layout).encode(), np.uint8)
        else:
            hdr = json.loads(h["container/header"][()].tobytes()) if damage == "dtype" else None
            text = "[" * 100_000 + "]" * 100_000 if damage == "deep" else None
            if damage == "dtype":
                hdr["w"]["dtype"] = "ZZ"
                text = json.dumps(hdr)
            del h["container/header"]
            h["container/header"] = np.frombuffer(text.encode(), np.uint8)
    code, _, err = _run("densify", out, "-o", tmp_path / "back.out")
    assert code == 1 and err.count("\n") == 1 and what in err and str(out) in err, err
    assert not (tmp_path / "back.out").exists()


def test_long_names_are_cut_in_every_table(tmp_path, rng):
    long = "n" * 100_000
    tensors = {long: rng.standard_normal((4, 8)).astype(np.float32)}
    tensors.update({f"t{i}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(20)})
    src = _st(tmp_path / "l.safetensors", tensors)
    for args in (("info", src), ("report", src), ("prune", src, "-o", tmp_path / "o.safetensors", "--sparsity",
                                                     "0.5")):
        code, out, err = _run(*args)
        assert code == 0, err
        assert len(out) < 30_000 and "(100000 characters)" in out


def test_a_shape_past_any_array_is_refused_by_name(tmp_path):
    src = tmp_path / "huge.safetensors"
    header = json.dumps({"z": {"dtype": "F32", "shape": [1 << 62, 1 << 62, 0], "data_offsets": [0, 0]}}).encode()
    src.write_bytes(len(header).to_bytes(8, "little") + header)
    code, _, err = _run("info", src)
    assert code == 1 and "'z'" in err and "2**62" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st_.data())
def test_mutated_packed_arrays_are_refused_or_exact(tmp_path_factory, data):
    """Version 2's packed encodings, one array entry changed: refused by name, or read as exactly
    what the arrays say (never an index outside the tensor, never a crash)."""
    from . import reference as ref

    tmp = tmp_path_factory.mktemp("pfuzz")
    enc = data.draw(st_.sampled_from(["delta8", "bitmask"]))
    src = _st(tmp / "m.safetensors", {"w": np.random.default_rng(1).standard_normal((6, 300)).astype(np.float32)})
    out = tmp / "m.sparse.h5"
    prune_file(src, out, sparsity=data.draw(st_.sampled_from([0.5, 0.99])), encoding=enc)
    with h5py.File(out, "r+") as h:
        key = data.draw(st_.sampled_from(["ptr", "deltas" if enc == "delta8" else "words", "vals"]))
        ds = h[f"tensors/0/{key}"]
        if ds.size:
            at = tuple(data.draw(st_.integers(0, s - 1)) for s in ds.shape)
            hi = {"ptr": 1 << 40, "deltas": 255, "words": (1 << 63) - 1, "vals": 1e30}[key]
            lo = -hi if key in ("ptr", "vals") else 0
            ds[at] = data.draw(st_.integers(lo, hi)) if key != "vals" else data.draw(st_.floats(lo, hi))
        g = h["tensors/0"]
        arrays = {k: g[k][()] for k in ("ptr", "deltas", "words") if k in g}
        want = ref.unpack(enc, (6, 300), g["vals"][()], **arrays)
    try:
        with open_weights(out) as r:
            got = r.raw("w")
    except FormatError as exc:
        assert "damaged" in str(exc)
        return
    assert want is not None, "a damaged encoding was accepted"
    np.testing.assert_array_equal(got, want.astype(np.float32))
