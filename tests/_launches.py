"""Checks on every kernel launch the CUDA simulator runs (installed by
``conftest.py`` when ``NUMBA_ENABLE_CUDASIM=1``).

The simulator runs any grid and any argument types; a GPU does not. Each
launch is checked as a GPU would see it:

- its argument types, typed as the real dispatcher types them (an empty
  device array is C-contiguous there, whatever the simulator says), are one
  of the ``SIGNATURES`` its module declares, so ``test_cuda_compile.py`` has
  compiled that very combination for real GPUs;
- the grid has at least one block along each axis and at most
  ``sparsecore._device.MAX_GRID`` (the tests lower it so that grid-stride
  loops run), and the block at most 1024 threads.
"""

import sys

import numba
from numba.core import types
from numba.np import numpy_support

MAX_BLOCK = (1024, 1024, 64)


def launch_type(arg):
    """The numba type a real GPU launch gives ``arg``."""
    ary = getattr(arg, "_ary", None)  # a simulator device array
    if ary is None:
        return numba.typeof(arg)
    broadcast = 0 in ary.strides and ary.size != 0
    if ary.flags.c_contiguous and not broadcast:
        layout = "C"
    elif ary.flags.f_contiguous and not broadcast:
        layout = "F"
    else:
        layout = "A"
    return types.Array(numpy_support.from_dtype(ary.dtype), ary.ndim, layout)


class LaunchError(Exception):
    """A launch a GPU would refuse, or one whose types no compile test covers."""


def check(kernel, args):
    from sparsecore import _device

    where = f"{kernel.fn.__module__}.{kernel.fn.__name__}"
    grid, block = kernel.grid_dim, kernel.block_dim
    for axis, (g, limit) in enumerate(zip(grid, _device.MAX_GRID)):
        if not 1 <= g <= limit:
            raise LaunchError(f"{where}: grid {grid} has {g} blocks along axis {'xyz'[axis]} "
                              f"(a GPU takes 1 to {limit})")
    if block[0] * block[1] * block[2] > 1024 or any(b > m for b, m in zip(block, MAX_BLOCK)):
        raise LaunchError(f"{where}: block {block} is over a GPU's limits")
    sig = tuple(launch_type(a) for a in args)
    declared = getattr(sys.modules[kernel.fn.__module__], "SIGNATURES", {}).get(kernel.fn.__name__, ())
    if sig not in declared:
        raise LaunchError(f"{where} launched with ({', '.join(map(str, sig))}), which its module's "
                          f"SIGNATURES do not declare: declare it so that test_cuda_compile.py compiles it")


def install():
    """Wrap the simulator's kernel launch with :func:`check`."""
    from numba.cuda.simulator import kernel as sim

    launch = sim.FakeCUDAKernel.__call__
    if getattr(launch, "checked", False):
        return

    def checked_launch(self, *args):
        if not (self._device or sim._kernel_context):
            check(self, args)
        return launch(self, *args)

    checked_launch.checked = True
    sim.FakeCUDAKernel.__call__ = checked_launch
