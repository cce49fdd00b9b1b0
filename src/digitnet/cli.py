"""The `digitnet` console script, and the error handling shared by the Hydra entry points."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from digitnet import __version__
from digitnet.errors import DigitnetError


def run_task(task: Callable, cfg):
    """Run a Hydra task; a single run prints a DigitnetError as one line and exits 2.

    A single run that failed before writing anything of its own leaves no run dir behind.
    In a multirun the error propagates, so the sweeper can record the trial as failed and go on.
    Either way, the error (or an unexpected exception's traceback) also goes into the run's log file.
    """
    from digitnet import console  # imports Lightning: not for `digitnet --version`

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    console.setup(multi_node=(cfg.get("trainer") or {}).get("num_nodes", 1) > 1, sweep_trial=multirun)
    try:
        return task(cfg)
    except DigitnetError as err:
        console.log_error_to_file(f"error: {err}")
        if multirun:
            raise
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.initialized():
            _remove_unused_run_dir()
        sys.exit(2)
    except Exception as err:
        from optuna import TrialPruned  # raised by a sweep trial's pruning callback

        if isinstance(err, TrialPruned):  # the sweep goes on: not a failure
            logging.getLogger(__name__).info("%s", err)
        else:  # Hydra prints the traceback on the console
            console.log_error_to_file("the run failed:", exc_info=True)
        raise


def _remove_unused_run_dir() -> None:
    """Delete the run dir if it holds nothing but Hydra's own files (.hydra/ and the job's log)."""
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    hydra_files = {hydra.output_subdir, f"{hydra.job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files:
        shutil.rmtree(run_dir, ignore_errors=True)  # best effort: the error message matters more


# subcommand -> (module with a `main(argv) -> int`, one-line help); imported only when used
COMMANDS = {
    "export": ("digitnet.export", "write a verified model.onnx from a checkpoint"),
    "sweep-report": ("digitnet.sweep.report", "write best.yaml, trials.csv and plots of a stored Optuna study"),
    "models": ("digitnet.registry_cli", "list, show, rank, tag and remove models recorded by training runs"),
    "data": ("digitnet.data.sql_cli", "push datasets into a SQL database (SQLite, PostgreSQL, ...) to train from"),
    "predict": ("digitnet.predict", "classify image files, folders, IDX or .npy files with a trained model"),
    "serve": ("digitnet.serve", "a drawing pad in the browser: live predictions, collect drawings for data=custom"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="digitnet",
        description="Train, sweep and ship 28x28 image classifiers. Training itself: python train.py (see README).",
        epilog="commands:\n" + "\n".join(f"  {name:14s}{text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"digitnet {__version__}")
    parser.add_argument("command", choices=COMMANDS, metavar="command", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments (see digitnet <command> -h)")
    args = parser.parse_args(argv)
    command = importlib.import_module(COMMANDS[args.command][0])
    try:
        code = command.main(args.args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except DigitnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `digitnet predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe (docs: signal)
        return 1


if __name__ == "__main__":
    sys.exit(main())
