"""Private Numba kernels.

Each topic has a ``cpu_<topic>.py`` module (``@njit``) and, once the CUDA
backend exists, a ``cuda_<topic>.py`` twin with the same argument order. The
public modules validate input, prepare contiguous arrays and call these.
"""
