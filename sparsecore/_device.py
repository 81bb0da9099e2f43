"""Device selection for the CUDA backend: ``device="cpu" | "cuda" | "auto"``.

numba's CUDA target is imported only when a CUDA path is asked for, so
``import sparsecore`` works without it or without a GPU. Threads per block
come from here (tests shrink them so that tiny inputs span several blocks).
"""

from __future__ import annotations

import numpy as np

THREADS = 256  # threads per block of the 1-D kernels
THREADS_2D = (16, 16)
ROW_THREADS = 128  # threads of the block that builds one CSR row (at most cuda_csr.MAX_THREADS)
HIST_BLOCKS = 1024  # most blocks of a radix histogram pass (grid-stride beyond)
MAX_GRID = (2**31 - 1, 65535, 65535)  # most blocks along grid x, y, z (CUDA's limits; tests lower them)
GRID_STRIDE_BLOCKS = 65535  # most blocks of a 1-D grid-stride launch (enough to fill any GPU)


def cuda():
    """numba's CUDA module, or a clear error naming what is missing."""
    try:
        from numba import cuda as nb_cuda
    except ImportError as exc:  # numba without its CUDA target
        raise RuntimeError(f"device='cuda' needs numba's CUDA target (pip install numba-cuda): {exc}") from None
    if not nb_cuda.is_available():
        raise RuntimeError("device='cuda': no usable CUDA GPU and driver (numba.cuda.is_available() is False); "
                           "use device='cpu', or NUMBA_ENABLE_CUDASIM=1 for the simulator")
    return nb_cuda


def is_device_array(a) -> bool:
    """Anything with ``__cuda_array_interface__``, or a numba device array
    (the CUDA simulator's arrays have ``copy_to_host`` but not the interface)."""
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")


def resolve(device: str, *arrays) -> str:
    """``"cpu"`` or ``"cuda"``; ``"auto"`` is ``"cuda"`` when any array lives on a GPU."""
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "auto":
        return "cuda" if any(is_device_array(a) for a in arrays) else "cpu"
    return device


def to_device(a, dtype=None):
    """A numba device array viewing a ``__cuda_array_interface__`` array
    (CuPy, PyTorch CUDA, numba) without a copy, or a host array copied over."""
    c = cuda()
    if is_device_array(a):
        d = a if hasattr(a, "copy_to_host") else c.as_cuda_array(a)
        if dtype is not None and d.dtype != np.dtype(dtype):
            raise TypeError(f"device array has dtype {d.dtype}, {np.dtype(dtype)} needed")
        return d
    return c.to_device(np.ascontiguousarray(a, dtype=dtype))


def blocks(n, threads=None):
    """``(blocks, threads)`` of a 1-D grid-stride launch over ``n`` items
    (at least one block: callers launch nothing for empty inputs)."""
    t = threads or THREADS
    return max(1, min((n + t - 1) // t, GRID_STRIDE_BLOCKS, MAX_GRID[0])), t


def rows_grid(rows):
    """Blocks of a launch with a block per row (grid-stride over rows beyond the limit)."""
    return max(1, min(int(rows), MAX_GRID[0]))


def blocks_2d(nx, ny):
    """``((bx, by), (tx, ty))`` of a 2-D grid-stride launch over ``nx x ny``
    items, each grid axis within its limit (grid y stops at 65,535 blocks)."""
    tx, ty = THREADS_2D
    return ((max(1, min(-(-int(nx) // tx), MAX_GRID[0])), max(1, min(-(-int(ny) // ty), MAX_GRID[1]))),
            (tx, ty))
