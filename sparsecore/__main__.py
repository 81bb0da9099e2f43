"""``python -m sparsecore`` / ``sparsecore``: run the embedded default job."""

import argparse
import sys

from . import __version__


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="sparsecore",
        description="Run the embedded default: train a small MLP, prune it by the Fisher "
                    "criterion, fine-tune with masks held, export and run CSR weights.")
    parser.add_argument("--sparsity", type=float, default=0.9, help="global sparsity (default 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", action="version", version=f"sparsecore {__version__}")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity <= 1.0:
        parser.error(f"--sparsity must lie in [0, 1], got {args.sparsity}")
    from ._demo import main as demo

    demo(sparsity=args.sparsity, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
