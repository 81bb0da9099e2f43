"""``python -m sparsecore`` / ``sparsecore``: the command line (see ``sparsecore.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
