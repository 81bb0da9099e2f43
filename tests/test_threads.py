"""Threads on a busy machine: what runs on one thread, how idle threads wait,
and the passes a global selection makes over many tiny tensors. No test
times anything: each asserts on a decision or on what was called."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import sparsecore as sc
from sparsecore import _kernels, selection
from sparsecore._kernels import cpu_csr, cpu_pattern, cpu_select
from sparsecore._source import Source

from . import reference as ref
from .conftest import make

TWO = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")


@pytest.fixture
def launches(monkeypatch):
    """The thread counts that the kernel wrappers ask ``run`` for, in order."""
    seen = []
    real = _kernels.run

    def spy(nthreads, kernel, *args):
        seen.append(nthreads)
        return real(nthreads, kernel, *args)

    for mod in (cpu_select, cpu_csr, cpu_pattern):
        monkeypatch.setattr(mod, "run", spy)
    return seen


def test_small_work_takes_one_thread():
    assert _kernels.threads_for(0) == 1
    assert _kernels.threads_for(32) == 1
    assert _kernels.threads_for(2 * _kernels.PAR_MIN - 1) == 1


@TWO
def test_large_work_takes_the_threads_it_can_fill():
    assert _kernels.threads_for(2 * _kernels.PAR_MIN) == 2
    assert _kernels.threads_for(10**9) == numba.get_num_threads()


@TWO
def test_a_lowered_thread_count_is_respected():
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert _kernels.threads_for(10**9) == 1
    finally:
        numba.set_num_threads(before)


@TWO
def test_run_launches_on_that_many_threads_and_restores_the_count():
    from numba import njit, prange

    @njit(parallel=True)
    def who(out):
        for i in prange(out.size):
            out[i] = numba.get_thread_id()

    _kernels.ready()
    out = np.full(256, -1, np.int64)
    _kernels.run(1, who, out)
    assert set(out) == {0}
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    _kernels.run(numba.get_num_threads(), who, out)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@TWO
@pytest.mark.parametrize("scope", ["local", "global"])
def test_tiny_tensors_launch_every_kernel_on_one_thread(rng, launches, scope):
    w = {f"t{i}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(20)}
    sc.prune(w, sparsity=0.5, scope=scope)
    sc.prune(w, sparsity=0.5, scope=scope, normalize="l2")
    assert launches and set(launches) == {1}


@TWO
def test_large_tensors_share_their_passes(rng, launches, monkeypatch):
    monkeypatch.setattr(_kernels, "PAR_MIN", 1 << 10)
    w = {"a": rng.standard_normal((64, 128)).astype(np.float32), "b": rng.standard_normal((16, 8)).astype(np.float32)}
    r = sc.prune(w, sparsity=0.5, scope="global")
    assert 2 in launches and 1 in launches  # "a" (8192 entries) on two threads, "b" (128) on one
    monkeypatch.setattr(_kernels, "PAR_MIN", 1 << 18)
    for n in w:  # the same masks
        np.testing.assert_array_equal(sc.prune(w, sparsity=0.5, scope="global").masks[n], r.masks[n])


def _omp_env(env):
    """libgomp's settings (``omp_display_env``) in a fresh process that prunes a tiny tensor."""
    code = ("import ctypes, os, numpy as np, numba, sparsecore as sc\n"
            "sc.prune({'a': np.ones((4, 8), np.float32)}, sparsity=0.5)\n"
            "assert numba.threading_layer() == 'omp', numba.threading_layer()\n"
            "print('left:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
            "ctypes.CDLL('libgomp.so.1').omp_display_env(1)\n")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True)
    if out.returncode or "GOMP_SPINCOUNT" not in out.stderr:
        pytest.skip(f"not Numba's omp layer on GNU libgomp here: {out.stderr[-300:]}")
    return out.stdout, out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU libgomp")
def test_openmp_threads_wait_passively():
    stdout, stderr = _omp_env({})
    assert "GOMP_SPINCOUNT = '0'" in stderr  # libgomp's default spins 300,000 times
    assert "left: None" in stdout  # the process's environment is as it was


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU libgomp")
def test_a_users_waiting_policy_is_kept():
    _, stderr = _omp_env({"OMP_WAIT_POLICY": "active"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in stderr


@pytest.mark.kernel
@pytest.mark.parametrize("caps", [False, True])
@pytest.mark.parametrize("big", [0, 1])
def test_many_tiny_tensors_are_selected_from_their_keys_alone(rng, monkeypatch, caps, big):
    """Each tiny tensor's keys are formed once, and no histogram or bracket
    pass runs over it (at HEAD: one to four passes per tensor, each with a
    histogram of up to 2**16 counts)."""
    monkeypatch.setattr(selection, "_SAMPLE_MIN", 1 << 12)  # the sampled bracket runs beside the pool
    calls = {"passes": 0}
    for name in ("hist_level", "range_pass"):
        def spy(*a, _real=getattr(cpu_select, name)):
            calls["passes"] += 1
            return _real(*a)
        monkeypatch.setattr(cpu_select, name, spy)
    scores = [make(rng, (4, 8), np.float32, "ties" if t % 3 == 0 else "normal") for t in range(300)]
    if big:
        scores.insert(5, make(rng, (64, 96), np.float32))
    srcs = [Source(f"t{t}", s.reshape(-1), s.shape) for t, s in enumerate(scores)]
    sizes = np.array([s.size for s in scores])
    lo = (sizes * 0.2).round().astype(np.int64) if caps else np.zeros(len(scores), np.int64)
    hi = (sizes * 0.7).round().astype(np.int64) if caps else sizes.copy()
    target = round(0.5 * sizes.sum())
    rules = selection.select_rules(srcs, target=target, lo=lo, hi=hi)
    assert calls["passes"] <= 2 * big  # the large tensor's own: radix levels, or sample and bracket
    want = ref.global_keep_masks(scores, target, lo, hi)
    for src, rule, m in zip(srcs, rules, want):
        np.testing.assert_array_equal(selection.mask_from(src, rule).reshape(-1), m.reshape(-1))


@pytest.mark.kernel
def test_pooled_tensors_refuse_nonfinite_scores_by_name(rng):
    scores = {f"t{i}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(5)}
    scores["t3"][1, 2] = np.nan
    with pytest.raises(ValueError, match=r"'t3' hold 1 NaN or Inf value \(first: NaN at index \(1, 2\)\)"):
        sc.prune({k: np.ones_like(v) for k, v in scores.items()}, scores, sparsity=0.5, scope="global")
