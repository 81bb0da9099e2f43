"""Hostile input: every structural rule of safetensors enforced with the file and tensor named; archive
members copied as streams; mutated headers and archives end in a clean error or a valid output."""

import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from sparsecore.io import FormatError, UserError, open_weights, prune_file
from sparsecore.io import _safetensors as st

CLEAN = (FormatError, UserError, ValueError, TypeError, OSError)


def _header_file(path, header, buffer=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + buffer)
    return path


def _valid(path, rng):
    tensors = {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
               "h": rng.standard_normal((8, 2)).astype(np.float16)}
    with open(path, "wb") as f:
        st.write(f, [(k, st.dtype_name(v.dtype), v.shape, lambda v=v: v) for k, v in tensors.items()], {"k": "v"})
    return tensors


BUF = bytes(96)


@pytest.mark.parametrize("header, message", [
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24.0]}}, "two integers >= 0 needed"),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0.5, 24]}}, "two integers >= 0 needed"),
    ({"a": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}, r"shape \[2, -3\]; dimensions must be"),
    ({"a": {"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}}, "dimensions must be integers"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
      "b": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, "they overlap"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
      "b": {"dtype": "F32", "shape": [6], "data_offsets": [32, 56]}}, "a gap"),
    ({"b": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]},  # out of order: checked once sorted
      "a": {"dtype": "F32", "shape": [12], "data_offsets": [0, 48]}}, "they overlap"),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, True]}}, "two integers >= 0 needed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, "cover it exactly"),
    ({"__metadata__": {"k": 3}, "a": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96]}},
     "__metadata__ must map strings to strings"),
    ({"a": {"dtype": "F33", "shape": [24], "data_offsets": [0, 96]}}, "unknown dtype 'F33'"),
    ({"a": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96], "extra": 1}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [25], "data_offsets": [0, 100]}}, "the file is truncated or corrupt"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 96]}}, "need"),
    (b'{"a": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96]}, '
     b'"a": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96]}}', "names 'a' twice"),
])
def test_every_structural_rule_of_safetensors_is_enforced(tmp_path, header, message):
    path = _header_file(tmp_path / "bad.safetensors", header, BUF)
    with pytest.raises(FormatError, match=message) as err:
        open_weights(path)
    assert str(path) in str(err.value)
    if isinstance(header, dict) and "a" in header and "metadata" not in message and "twice" not in message:
        assert "'a'" in str(err.value) or "'b'" in str(err.value) or "cover" in message


def test_tensors_listed_out_of_their_byte_order_are_read_as_placed(tmp_path):
    buf = np.arange(24, dtype=np.float32)
    path = _header_file(tmp_path / "ok.safetensors", {"b": {"dtype": "F32", "shape": [2, 9], "data_offsets": [24, 96]},
                                                      "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}},
                        buf.tobytes())
    with open_weights(path) as r:
        assert list(r.entries) == ["b", "a"]
        np.testing.assert_array_equal(r.raw("a"), buf[:6])
        np.testing.assert_array_equal(r.raw("b"), buf[6:].reshape(2, 9))


def test_the_safetensors_library_agrees_on_valid_files(tmp_path, rng):
    safetensors = pytest.importorskip("safetensors.numpy")
    want = _valid(tmp_path / "ok.safetensors", rng)
    got = safetensors.load_file(tmp_path / "ok.safetensors")
    with open_weights(tmp_path / "ok.safetensors") as r:
        for k, v in want.items():
            np.testing.assert_array_equal(r.raw(k), got[k])
            np.testing.assert_array_equal(r.raw(k), v)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st_.data())
def test_mutated_safetensors_end_cleanly(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "m.safetensors"
    _valid(src, np.random.default_rng(0))
    blob = bytearray(src.read_bytes())
    n = struct.unpack("<Q", bytes(blob[:8]))[0]
    for _ in range(data.draw(st_.integers(1, 4))):
        kind = data.draw(st_.sampled_from(["flip", "digit", "cut", "length"]))
        if kind == "flip" and blob:
            i = data.draw(st_.integers(0, len(blob) - 1))
            blob[i] = data.draw(st_.integers(0, 255))
        elif kind == "digit":  # a number in the header replaced: offsets, shapes
            digits = [i for i in range(8, min(8 + n, len(blob))) if chr(blob[i]).isdigit()]
            if digits:
                i = data.draw(st_.sampled_from(digits))
                blob[i:i + 1] = data.draw(st_.sampled_from([b"9", b"-1", b"0.5", b"99999999999", b"true"]))
        elif kind == "cut":
            blob = blob[:data.draw(st_.integers(0, len(blob)))]
        elif kind == "length":
            blob[:8] = struct.pack("<Q", data.draw(st_.integers(0, 1 << 62)))
    bad = tmp / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    try:
        prune_file(bad, tmp / "out.safetensors", sparsity=0.5, force=True)
    except CLEAN:
        assert not (tmp / "out.safetensors").exists()
        return
    with open_weights(tmp / "out.safetensors") as r:  # accepted: then it is a valid file
        assert all(r.raw(k) is not None for k in r.entries)


def _keras_model(path):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(3, name="b")])
    model.save(path)


@pytest.fixture(scope="module")
def keras_bytes(tmp_path_factory):
    """One saved .keras (its bytes fixed for every example: a zip records the time of writing)."""
    path = tmp_path_factory.mktemp("keras") / "m.keras"
    _keras_model(path)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st_.data())
def test_mutated_keras_archives_end_cleanly(tmp_path_factory, keras_bytes, data):
    tmp = tmp_path_factory.mktemp("kfuzz")
    blob = bytearray(keras_bytes)
    for _ in range(data.draw(st_.integers(1, 3))):
        if data.draw(st_.booleans()) and blob:
            i = data.draw(st_.integers(0, len(blob) - 1))
            blob[i] = data.draw(st_.integers(0, 255))
        else:
            blob = blob[:data.draw(st_.integers(0, len(blob)))]
    bad = tmp / "bad.keras"
    bad.write_bytes(bytes(blob))
    for target in ("out.keras", "out.sparse.h5"):
        try:
            prune_file(bad, tmp / target, sparsity=0.5, force=True)
        except CLEAN:
            assert not (tmp / target).exists()
            continue
        with open_weights(tmp / target) as r:
            assert r.entries


def test_archive_members_are_streamed(tmp_path):
    """A .keras whose archive carries a 768 MiB member (deflated 80 to 1, inside the bomb rule's 100): pruning
    it, to .keras and to sparse HDF5 and back, stays within a small fraction of that in memory."""
    src = tmp_path / "m.keras"
    _keras_model(src)
    big = tmp_path / "big.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(big, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=info.compress_type)
        member = zipfile.ZipInfo("assets/zeros.bin")
        member.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(member, "w", force_zip64=True) as f:
            chunk = np.random.default_rng(0).bytes(12 << 10) + bytes((1 << 20) - (12 << 10))
            for _ in range(768):
                f.write(chunk)
    assert os.path.getsize(big) < 16 << 20
    code = (
        "import sys\n"
        "from sparsecore.io import prune_file, densify_file\n"
        "d = sys.argv[1]\n"
        "prune_file(d + '/big.keras', d + '/o.keras', sparsity=0.5)\n"
        "prune_file(d + '/big.keras', d + '/o.sparse.h5', sparsity=0.5)\n"
        "densify_file(d + '/o.sparse.h5', d + '/back.keras')\n"
        "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "KERAS_BACKEND": "torch"})
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.split()[-1]) / 1024  # VmHWM (ru_maxrss would count the forking parent's pages)
    assert peak_mib < 400, peak_mib  # the member alone is 768 MiB
    with zipfile.ZipFile(tmp_path / "back.keras") as z:
        assert z.getinfo("assets/zeros.bin").file_size == 768 << 20
