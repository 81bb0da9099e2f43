"""One prune path: offline pruning and the command line refuse exactly what
``sparsecore.prune`` refuses, with the same messages, and select the same masks."""

import math
import subprocess
import sys

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.io import UserError, open_weights, prune_file

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def model(tmp_path, rng):
    weights = {"fc1.weight": rng.standard_normal((16, 8)).astype(np.float32),
               "fc2.weight": rng.standard_normal((4, 16)).astype(np.float32)}
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(weights, str(path))
    return path, weights


# Every rule prune() enforces on its options, as keyword arguments of prune() and prune_file().
RULES = {
    "scope": dict(sparsity=0.5, scope="sideways"),
    "normalize": dict(sparsity=0.5, normalize="l3"),
    "both targets": dict(sparsity=0.5, threshold=0.1),
    "no target": dict(),
    "sparsity above 1": dict(sparsity=1.5),
    "sparsity below 0": dict(sparsity=-0.1),
    "global sparsity above 1": dict(sparsity=1.5, scope="global"),
    "sparsity not a number": dict(sparsity="half"),
    "NaN threshold": dict(threshold=math.nan),
    "min above max": dict(sparsity=0.5, min_sparsity=0.8, max_sparsity=0.2),
    "min above max, global": dict(sparsity=0.5, scope="global", min_sparsity=0.8, max_sparsity=0.2),
    "min above max, threshold": dict(threshold=0.1, min_sparsity=0.8, max_sparsity=0.2),
    "max above 1": dict(sparsity=0.5, scope="global", max_sparsity=1.5),
    "min below 0": dict(threshold=0.1, min_sparsity=-0.5),
    "caps make the target impossible": dict(sparsity=0.9, scope="global", max_sparsity=0.5),
    "per-tensor sparsity in global scope": dict(sparsity={"fc1.weight": 0.5, "fc2.weight": 0.5}, scope="global"),
    "per-tensor sparsity for an unknown tensor": dict(sparsity={"fc1.weight": 0.5, "nope": 0.5}),
    "per-tensor sparsity missing a tensor": dict(sparsity={"fc1.weight": 0.5}),
}


def _message(fn):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("rule", RULES)
def test_offline_refuses_what_prune_refuses(model, tmp_path, rule):
    path, weights = model
    kw = RULES[rule]
    want = _message(lambda: sc.prune(weights, **kw))
    got = _message(lambda: prune_file(path, tmp_path / "out.safetensors", **kw))
    assert got == want
    assert not (tmp_path / "out.safetensors").exists()


# The rules the command line can express: flag values it checks itself before any file is read (exit 2, the
# flag named), and rules only the selection can judge (exit 1, prune's own message).
CLI_RULES = {
    "sparsity above 1": (["--sparsity", "1.5"], dict(sparsity=1.5), "--sparsity"),
    "NaN threshold": (["--threshold", "nan"], dict(threshold=math.nan), "--threshold"),
    "min above max": (["--sparsity", "0.5", "--min-sparsity", "0.8", "--max-sparsity", "0.2"],
                      dict(sparsity=0.5, min_sparsity=0.8, max_sparsity=0.2), "--min-sparsity"),
    "min above max, global": (["--sparsity", "0.5", "--scope", "global", "--min-sparsity", "0.8",
                               "--max-sparsity", "0.2"],
                              dict(sparsity=0.5, scope="global", min_sparsity=0.8, max_sparsity=0.2),
                              "--min-sparsity"),
    "max above 1": (["--sparsity", "0.5", "--max-sparsity", "1.5"], dict(sparsity=0.5, max_sparsity=1.5),
                    "--max-sparsity"),
    "a local sparsity outside its caps": (["--sparsity", "0.5", "--max-sparsity", "0.3"],
                                          dict(sparsity=0.5, max_sparsity=0.3), "--max-sparsity"),
    "caps make the target impossible": (["--sparsity", "0.9", "--scope", "global", "--max-sparsity", "0.5"],
                                        dict(sparsity=0.9, scope="global", max_sparsity=0.5), None),
}


@pytest.mark.parametrize("rule", CLI_RULES)
def test_command_line_refuses_what_prune_refuses(model, tmp_path, rule):
    path, weights = model
    flags, kw, flag = CLI_RULES[rule]
    want = _message(lambda: sc.prune(weights, **kw))  # the library refuses it too
    out = tmp_path / "out.safetensors"
    missing = tmp_path / "absent.safetensors"
    for src in ([path, missing] if flag else [path]):  # a flag error comes before any file is read
        run = subprocess.run([sys.executable, "-m", "sparsecore", "prune", str(src), "-o", str(out), *flags],
                             capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        if flag:
            assert run.returncode == 2 and lines[-1].startswith("sparsecore: error:") and flag in lines[-1], \
                run.stderr  # argparse's usage line, then the error
        else:
            assert run.returncode == 1, run.stderr
            assert run.stderr.strip() == f"sparsecore: error: {want}"
        assert not out.exists()


def test_offline_errors_are_user_errors(model, tmp_path):
    path, _ = model
    with pytest.raises(UserError, match="min_sparsity 0.8 exceeds max_sparsity 0.2"):
        prune_file(path, tmp_path / "o.safetensors", sparsity=0.5, min_sparsity=0.8, max_sparsity=0.2)


@pytest.mark.parametrize("kw", [dict(sparsity=0.6), dict(sparsity=0.7, scope="global", max_sparsity=0.8),
                                dict(threshold=0.5, min_sparsity=0.3, max_sparsity=0.6),
                                dict(sparsity=0.5, scope="global", normalize="l2")])
def test_offline_masks_equal_prune(model, tmp_path, kw):
    path, weights = model
    want = sc.prune(weights, **kw)
    out = tmp_path / "o.safetensors"
    prune_file(path, out, **kw)
    with open_weights(out) as f:
        for n, w in weights.items():
            np.testing.assert_array_equal(f.floats(n), np.where(want.masks[n], w, 0), err_msg=n)
