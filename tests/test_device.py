"""Device selection on a machine without a usable GPU (the main suite): the
CPU stays the default, ``device="auto"`` picks it for host arrays, and
``device="cuda"`` fails with a clear error instead of copying or guessing."""

import numpy as np
import pytest

import sparsecore as sc
from sparsecore import _device


def _has_cuda():
    try:
        _device.cuda()
    except RuntimeError:
        return False
    return True


pytestmark = pytest.mark.skipif(_has_cuda(), reason="a GPU or the CUDA simulator is present (tests/test_cuda.py)")


@pytest.mark.parametrize("call", [
    lambda w: sc.prune({"w": w}, sparsity=0.5, device="cuda"),
    lambda w: sc.to_csr(w, sparsity=0.5, device="cuda"),
    lambda w: sc.csr_matmul(sc.to_csr(w), np.ones(4, np.float32), device="cuda"),
    lambda w: sc.sparsity_mask(w, 0.5, device="cuda"),
    lambda w: sc.nm_mask(w, 2, 4, device="cuda"),
    lambda w: sc.unit_mi(w, np.array([0, 1, 0]), device="cuda"),
    lambda w: sc.pairwise_mi(w, w, device="cuda"),
    lambda w: sc.GradientAccumulator(device="cuda").update(w),
])
def test_device_cuda_without_a_gpu_says_what_is_missing(call):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(RuntimeError, match=r"device='cuda'.*(numba-cuda|no usable CUDA GPU)"):
        call(w)


def test_auto_and_cpu_stay_on_the_host():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    r = sc.prune({"w": w}, sparsity=0.5)  # device="auto" with host arrays
    assert isinstance(r.masks["w"], np.ndarray)
    acc = sc.GradientAccumulator(device="auto").update(w)
    assert acc.device == "cpu" and isinstance(acc.state()["g2"], np.ndarray)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'auto', got 'gpu'"):
        sc.prune({"w": w}, sparsity=0.5, device="gpu")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'auto'"):
        sc.GradientAccumulator(device="gpu")


def test_set_block_threads_sets_and_gives_back_the_launch_sizes():
    from sparsecore import cuda as scu

    before = scu.set_block_threads(64, 16)
    try:
        assert scu.set_block_threads() == (64, 16)
        for bad in (0, 2000, 1.5, True):
            with pytest.raises(ValueError, match="threads must be an int from 1 to 1024"):
                scu.set_block_threads(bad)
        with pytest.raises(ValueError, match="row_threads must be an int from 1 to 256"):
            scu.set_block_threads(row_threads=512)
        assert scu.set_block_threads() == (64, 16)  # a refused call changes nothing
    finally:
        scu.set_block_threads(*before)
    assert scu.is_device_array(np.zeros(3)) is False
