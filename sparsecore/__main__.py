"""``python -m sparsecore`` / ``sparsecore``: the command line (see ``sparsecore.cli``)."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main  # imports NumPy, SciPy and Numba: Ctrl-C may land here
    except KeyboardInterrupt:
        print("sparsecore: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
