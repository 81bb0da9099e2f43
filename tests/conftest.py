import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


@pytest.fixture
def force_int64(monkeypatch):
    """Make every CSR take the int64 index path, even on tiny inputs."""
    import sparsecore.csr

    monkeypatch.setattr(sparsecore.csr, "INT32_LIMIT", -1)


# Edge shapes every kernel test runs over.
SHAPES = [(0,), (0, 5), (1, 1), (1, 17), (17, 1), (7, 13), (3, 4, 5), (64, 300)]
DTYPES = [np.float32, np.float64]


def make(rng, shape, dtype, kind="normal"):
    """Seeded data with the features that trip kernels: ties, zero rows, negatives."""
    if kind == "normal":
        a = rng.standard_normal(shape)
    elif kind == "ties":
        a = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:  # zero rows
        a = rng.standard_normal(shape)
        if a.ndim >= 2 and a.shape[0]:
            a[:: 2] = 0
    return a.astype(dtype)


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    from . import _launches

    _launches.install()
