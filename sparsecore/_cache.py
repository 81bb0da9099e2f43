"""Where Numba keeps the compiled kernels (``cache=True``).

Numba writes its cache beside each module (``__pycache__``) or, where that
is read-only, under ``$HOME/.cache``; where both are read-only (a container's
installed package with a read-only or absent home) it cannot cache at all and
``@njit(cache=True)`` raises at import. Before any kernel is defined this
picks, in that case, the first writable of ``$XDG_CACHE_HOME/sparsecore``,
``~/.cache/sparsecore`` and ``<tmp>/sparsecore-<uid>``, and tells Numba
(``numba.config.CACHE_DIR``, what ``NUMBA_CACHE_DIR`` sets). A cache directory
the user chose (``NUMBA_CACHE_DIR``) is always kept.
"""

import os
import tempfile

from numba.core import config

_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels")


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def cache_dir():
    """The folder chosen for Numba's cache, or None where Numba's own choice works."""
    if config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(os.path.join(_KERNELS, "__pycache__")):
        return None
    candidates = []
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(os.path.join(os.environ["XDG_CACHE_HOME"], "sparsecore"))
    home = os.path.expanduser("~")
    if home and home != "~":
        candidates.append(os.path.join(home, ".cache", "sparsecore"))
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(os.path.join(tempfile.gettempdir(), f"sparsecore-{uid}"))
    for c in candidates:
        if _writable(c):
            return c
    return None


def redirect():
    """Point Numba's cache at :func:`cache_dir` where its own choice would fail."""
    chosen = cache_dir()
    if chosen is not None:
        config.CACHE_DIR = chosen
    return chosen


redirect()
