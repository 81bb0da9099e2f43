"""Private Numba kernels.

Each topic has a ``cpu_<topic>.py`` module (``@njit``) and, once the CUDA
backend exists, a ``cuda_<topic>.py`` twin with the same argument order. The
public modules validate input, prepare contiguous arrays and call these.

Threads. The wrapper of a parallel kernel decides how many threads it gets
(``threads_for``) and launches it with ``run``, which sets that many for
this launch only: work too small to share runs on one thread, so that the
other threads are neither woken nor waited for. On a machine whose
cores are busy with other work, waking a thread and waiting for it at the
end of a parallel loop costs up to a scheduler time slice (milliseconds),
far more than a small pass saves. ``ready`` starts Numba's threading layer
with OpenMP's passive waiting (see its docstring).
"""

import os
import threading

import numba

# Elements a thread must have to itself before a pass is shared between
# threads. Measured on 2 cores with two other busy processes (bench/threads.py):
# below about 2**18 elements per thread, two threads are slower than one
# once the cost of waking the second and waiting for it is paid.
PAR_MIN = 1 << 18

_started = False
_lock = threading.Lock()
# OpenMP settings of the user's that say how idle threads wait: when one is
# set, it is kept as it is.
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def threads_for(n, par_min=None):
    """Threads that a pass over ``n`` elements uses: one per ``par_min``
    (default ``PAR_MIN``) elements, at most the caller's Numba threads
    (``numba.get_num_threads``, which a Dask task or the user may have
    lowered), at least one."""
    if not _started:
        ready()
    if par_min is None:
        par_min = PAR_MIN
    if n < 2 * par_min:
        return 1  # decided without asking Numba (a call costs microseconds: many tiny tensors pay it)
    return max(1, min(_get_threads(), n // par_min))


def run(nthreads, kernel, *args):
    """``kernel(*args)`` with at most ``nthreads`` Numba threads, then the
    caller's thread count again (Numba's count is per calling thread: other
    threads, e.g. a Dask worker's tasks, are not affected). Jitted code
    cannot set it itself and stay cached (``numba.set_num_threads`` in a
    kernel is a ctypes global), so it is set here, through the layer's own
    setters: about 1.5 us a launch where ``numba.set_num_threads`` costs 7."""
    before = _get_threads()
    if nthreads >= before:
        return kernel(*args)
    _set_threads(nthreads)
    try:
        return kernel(*args)
    finally:
        _set_threads(before)


def _get_threads():
    return numba.get_num_threads()


def _set_threads(n):
    numba.set_num_threads(n)


def variants(factory, key=lambda *k: k):
    """Memoise a kernel factory on its arguments (normalised by ``key``): the
    factory defines its ``@njit`` kernel inside, so the arguments are closure
    constants that Numba folds into the code and its on-disk cache keys each
    variant by; only the variants a run uses are compiled. The threading
    layer is started (waiting passively) before a first kernel runs."""
    cache = {}

    def get(*args):
        ready()
        k = key(*args)
        if k not in cache:
            cache[k] = factory(*k)
        return cache[k]

    get.__doc__ = factory.__doc__
    get.__name__ = factory.__name__
    return get


def ready():
    """Start Numba's threading layer once, where it is OpenMP (GNU libgomp)
    with its threads waiting passively.

    libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded. By default its
    idle threads spin for up to ~300,000 iterations (milliseconds) before
    they sleep; on cores shared with other processes the spinning thread
    takes the time that the thread doing the work needs, and a pass that
    waits for a descheduled thread waits for its time slice: two threads ran
    the same global prune 1.2-2.5x slower than one, and 200 tiny tensors
    10x slower. Passive waiting costs a futex wake (microseconds) per
    parallel pass, and only passes of at least ``2 * PAR_MIN`` elements (a
    millisecond of work) are run on several threads.

    The variable is set only while Numba loads the layer, then the
    environment is restored: child processes, and OpenMP runtimes loaded
    later (PyTorch's own libgomp, Intel's or LLVM's), do not see it. Nothing
    is changed when the user set a waiting policy (``OMP_WAIT_POLICY``,
    ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``), or when the layer was already
    started (by other Numba code of the process). Called before the first
    parallel kernel runs, never at import.
    """
    global _started
    if _started:
        return
    with _lock:
        if _started:
            return
        try:
            numba.threading_layer()  # raises ValueError while no layer is loaded
            loaded = True
        except ValueError:
            loaded = False
        if not loaded and not any(v in os.environ for v in _WAIT_VARIABLES):
            os.environ["OMP_WAIT_POLICY"] = "passive"
            try:
                numba.get_num_threads()  # loads the layer (and libgomp, which reads the variable now)
            finally:
                os.environ.pop("OMP_WAIT_POLICY", None)
        _use_layer_setters()
        _started = True


def _use_layer_setters():
    """Numba's threading layer exports its getter and setter of the calling
    thread's count (``numba.np.ufunc.parallel._get_num_threads`` and
    ``_set_num_threads``, ctypes functions, since Numba 0.49); the public
    functions add a lock and checks on top. ``run`` uses them where they
    exist, the public functions otherwise."""
    global _get_threads, _set_threads
    numba.get_num_threads()  # the layer is loaded
    from numba.np.ufunc import parallel

    get, put = getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None)
    if callable(get) and callable(put) and get() == numba.get_num_threads():
        _get_threads, _set_threads = get, put
