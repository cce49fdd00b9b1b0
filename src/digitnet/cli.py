"""The `digitnet` console script, and the error handling shared by the Hydra entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from digitnet import __version__
from digitnet.errors import DigitnetError


def run_task(task: Callable, cfg):
    """Run a Hydra task; a single run prints a DigitnetError as one line and exits 2.

    In a multirun the error propagates, so the sweeper can record the trial as failed and go on.
    """
    try:
        return task(cfg)
    except DigitnetError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digitnet", description="Train, sweep and ship 28x28 image classifiers.")
    parser.add_argument("--version", action="version", version=f"digitnet {__version__}")
    parser.add_subparsers(dest="command", metavar="command")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
