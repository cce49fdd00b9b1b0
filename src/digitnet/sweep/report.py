"""Sweep reports: best.yaml, trials.csv and plots/*.png for any stored study.

Written at the end of every sweep into the sweep dir, and on demand:
``digitnet sweep-report <storage> <study> [--out DIR]`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from digitnet.atomic import write_atomically
from digitnet.errors import DigitnetError
from digitnet.sweep.study import load_study

log = logging.getLogger(__name__)


def summary_line(study: optuna.Study, n_trials: int) -> str:
    """``5 of 12 trials ended | best 0.9312 (trial #3) | 2 pruned, 0 failed`` for the console.

    Trials are named ``#<Optuna trial number>`` as their folders are, counting from 0."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.number < n_trials]
    counts = Counter(t.state for t in trials)
    ended = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] + counts[TrialState.FAIL]
    if len(study.directions) > 1:
        best = f"pareto front of {len(study.best_trials)}"
    elif counts[TrialState.COMPLETE]:
        best = f"best {study.best_value:.4g} (trial #{study.best_trial.number})"
    else:
        best = "no complete trial yet"
    return (
        f"{ended} of {n_trials} trials ended | {best} | {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed | {epochs_trained(trials)} epochs trained"
    )


def epochs_trained(trials: list[FrozenTrial]) -> int:
    """Epochs over all trials, counted from the per-epoch reports of the pruning callback."""
    return sum(len(t.intermediate_values) for t in trials)


def write_report(study: optuna.Study, out_dir: Path) -> Path:
    """Write best.yaml, trials.csv and plots/ into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)  # created by the first write, which says so if it cannot
    trials = study.get_trials(deepcopy=False)
    best = yaml.safe_dump(best_summary(study), sort_keys=False)
    write_atomically(out_dir / "best.yaml", lambda tmp: tmp.write_text(best))
    write_atomically(out_dir / "trials.csv", lambda tmp: tmp.write_text(trials_csv(trials, len(study.directions))))
    _write_plots(study, out_dir / "plots")
    return out_dir


def best_summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "trials": {s.name.lower(): n for s, n in Counter(t.state for t in trials).items()},
        "epochs_trained": epochs_trained(trials),
    }
    if not any(t.state == TrialState.COMPLETE for t in trials):
        summary["best"] = None
    elif len(study.directions) == 1:
        summary["best"] = _trial_summary(study.best_trial)
    else:
        summary["pareto_front"] = [_trial_summary(t) for t in study.best_trials]
    return summary


def _trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    values = trial.values if len(trial.values) > 1 else trial.value
    return {
        "trial": trial.number,
        "value" if len(trial.values) == 1 else "values": values,
        "params": dict(trial.params),
        "command": trial.user_attrs.get("command"),
        "run_dir": trial.user_attrs.get("run_dir"),
    }


def trials_csv(trials: list[FrozenTrial], n_objectives: int) -> str:
    value_columns = ["value"] if n_objectives == 1 else [f"value_{i}" for i in range(n_objectives)]
    param_names = sorted({name for t in trials for name in t.params})
    columns = ["trial", "state", *value_columns, "epochs", "seconds", *param_names, "error", "command"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for t in trials:
        duration = t.duration.total_seconds() if t.duration else None
        row = {"trial": t.number, "state": t.state.name, "epochs": len(t.intermediate_values)}
        row |= {"seconds": round(duration, 1) if duration is not None else None}
        row |= dict(zip(value_columns, t.values or [], strict=False))
        row |= t.params | {k: t.user_attrs.get(k) for k in ("error", "command")}
        if t.state == TrialState.FAIL and not row["error"]:
            row["error"] = "worker stopped (no heartbeat)"
        writer.writerow(row)
    return out.getvalue()


def _plot_functions(study: optuna.Study) -> dict[str, Callable[[optuna.Study], Any]]:
    """The plots that have data to show (Optuna draws empty axes and warns otherwise)."""
    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    if complete == 0:
        return {}
    if len(study.directions) > 1:
        return {"pareto_front": plots.plot_pareto_front}
    functions = {
        "optimization_history": plots.plot_optimization_history,
        "parallel_coordinate": plots.plot_parallel_coordinate,
    }
    if complete >= 2:
        functions["param_importances"] = plots.plot_param_importances
    if any(t.intermediate_values for t in trials):
        functions["intermediate_values"] = plots.plot_intermediate_values
    return functions


def _write_plots(study: optuna.Study, plot_dir: Path) -> None:
    import matplotlib.pyplot as plt

    plot_dir.mkdir(exist_ok=True)
    for name, plot in _plot_functions(study).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
            log.info("skipped plot %s: %s", name, err)
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        try:
            write_atomically(plot_dir / f"{name}.png", partial(figure.savefig, format="png", bbox_inches="tight"))
        finally:
            plt.close(figure)


def _storage_url(storage: str) -> str:
    """A SQLAlchemy URL, or a path to an existing SQLite study file."""
    if "://" in storage:
        return storage
    if not Path(storage).is_file():
        raise DigitnetError(f"no study database at {storage}; give its path or a SQLAlchemy URL")
    return f"sqlite:///{Path(storage).absolute()}"


def main(argv: list[str] | None = None) -> int:
    """``digitnet sweep-report``: write the report of a stored study."""
    parser = argparse.ArgumentParser(
        prog="digitnet sweep-report", description="Write best.yaml, trials.csv and plots/."
    )
    parser.add_argument("storage", help="SQLAlchemy URL, or path to a study.db")
    parser.add_argument("study", help="study name (hydra.sweeper.study_name)")
    parser.add_argument("--out", type=Path, help="output folder (default: sweeps/<study>)")
    args = parser.parse_args(argv)
    study = load_study(_storage_url(args.storage), args.study)
    out = write_report(study, args.out or Path("sweeps") / args.study)
    print(summary_line(study, len(study.trials)))
    print(f"report written to {out}")
    return 0
