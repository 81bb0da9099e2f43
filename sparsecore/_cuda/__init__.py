"""Host code of the CUDA backend, one module per topic beside its kernels
(``sparsecore/_kernels/cuda_<topic>.py``).

Each module launches its kernels on numba device arrays and brings back only
small things (counts, histograms, ranges, error counters). The public modules
import these lazily, inside their ``device="cuda"`` branch, so that
``import sparsecore`` never imports ``numba.cuda``. Nothing here imports a
public module: the rules (selection, caps, patterns, MI arithmetic) live
above and call down.

- ``arrays``: device arrays in and out, launch sizes, error counters.
- ``select``: :class:`DeviceSource`, radix histograms, norms, rule counts and masks.
- ``csr``: :class:`DeviceCSR` construction and products.
- ``pattern``: N:M groups, block and unit pooling, group masks.
- ``importance``: gradient criteria and the gradient sums.
- ``mi``: activation reductions, bins, codes, MI counts and pair tables.
"""
