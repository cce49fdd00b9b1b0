"""Epochs, best value and wall time of a real sweep under several Optuna pruners and without one.

The sweep without pruning is the real command, `python train.py -m sweep=<sweep>
hydra.sweeper.pruner=none hydra.sweeper.seed=<seed> <overrides>`, run once: its study.db keeps
every trial's parameters and its val/acc after each epoch. Training is seeded, so a trial with
the same parameters learns the same curve (the pruning callback only reads it). Each pruner then
replays the sweep in an Optuna study with the same sampler, seed, pruner and study name as the
sweeper's: the sampler draws the same parameters as long as the history is the same, a trial
whose parameters the baseline already trained reuses that curve, and a trial with new
parameters (the sampler reacting to pruned trials) is trained for real, once, and cached.
The pruner sees each curve epoch by epoch, as in a sweep; epochs, pruned trials and best values
are exact. Wall time is an estimate: the sum of the trials' measured seconds, a pruned trial's
scaled to the epochs it ran.

--real runs every pruner's sweep for real instead (same numbers, measured wall time; slow).
Finished sweeps and trained curves in --out are reused when asked for again (--fresh: rerun).

    python benchmarks/pruning.py --sweep quick --seeds 0 --out sweeps/pruning-benchmark
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from digitnet.sweep.study import make_pruner, make_sampler  # noqa: E402
from hydra_plugins.digitnet_optuna_sweeper.search_space import Param  # noqa: E402
from hydra_plugins.digitnet_optuna_sweeper.sweeper import _suggest  # noqa: E402  (the sweeper's own draws)

# name -> hydra.sweeper.pruner; "none" is the baseline.
PRUNERS = {
    "none": "none",
    "median_warmup1": "{name:median,n_startup_trials:3,n_warmup_steps:1}",
    "median_warmup0": "{name:median,n_startup_trials:3,n_warmup_steps:0}",
    "percentile60": "{name:percentile,percentile:60,n_startup_trials:3,n_warmup_steps:0}",
    "asha_rf2": "{name:successive_halving,min_resource:1,reduction_factor:2}",
    "hyperband_rf3": "{name:hyperband,min_resource:1,reduction_factor:3}",
    "patient_median": "{name:patient,patience:1,wrapped_pruner:{name:median,n_startup_trials:3,n_warmup_steps:0}}",
}
COMMON = ["trainer.enable_progress_bar=false"]


def run_sweep(sweep_name: str, pruner: str, seed: int, overrides: list[str], out: Path, fresh: bool) -> float:
    """Run one real sweep into ``out`` (or reuse the finished one there); returns its wall seconds."""
    out.mkdir(parents=True, exist_ok=True)
    # A mapping would merge into the sweep's own pruner mapping: reset that first.
    reset = ["hydra.sweeper.pruner=none"] if pruner.startswith("{") else []
    command = [
        sys.executable,
        "train.py",
        "-m",
        f"sweep={sweep_name}",
        *reset,
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.seed={seed}",
        *overrides,
        f"hydra.sweep.dir={out}",
        f"registry.url=sqlite:///{out / 'registry.db'}",
        *COMMON,
    ]
    record = out / "benchmark.json"
    if record.is_file() and not fresh:
        done = json.loads(record.read_text())
        if done["command"] != command[1:]:
            print(
                f"error: {out} holds a sweep of another command; give another --out, or --fresh to replace it",
                file=sys.stderr,
            )
            sys.exit(2)
        return done["seconds"]
    for old in out.glob("study.db*"):  # an unfinished or replaced sweep: start afresh
        old.unlink()
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / "sweep.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        sys.exit(f"sweep failed ({out / 'sweep.log'}): {shlex.join(command)}\n{run.stderr.strip()[-2000:]}")
    record.write_text(json.dumps({"command": command[1:], "seconds": seconds}, indent=1))
    return seconds


def load(out: Path) -> optuna.Study:
    storage = f"sqlite:///{out / 'study.db'}"
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def param_overrides(trial: FrozenTrial) -> list[str]:
    """The trial's parameters as overrides, in the order the sweeper suggested them."""
    return [arg for arg in shlex.split(trial.user_attrs["command"]) if arg.split("=", 1)[0] in trial.params]


class Curves:
    """val/acc per epoch and seconds per trial, by parameters: the baseline's, then trained ones."""

    def __init__(self, baseline: optuna.Study, sweep_name: str, overrides: list[str], out: Path) -> None:
        self.sweep_name, self.overrides, self.out = sweep_name, overrides, out
        self.known: dict[tuple, tuple[list[float], float]] = {}
        for t in baseline.get_trials(states=(TrialState.COMPLETE,)):
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            self.known[self.key(t.params)] = ([v for _, v in sorted(t.intermediate_values.items())], seconds)
        self.trained = 0

    @staticmethod
    def key(params: dict) -> tuple:
        return tuple(sorted(params.items()))

    def get(self, params: dict, overrides: list[str]) -> tuple[list[float], float]:
        key = self.key(params)
        if key not in self.known:
            self.known[key] = self.train(overrides)
        return self.known[key]

    def train(self, params: list[str]) -> tuple[list[float], float]:
        """Train one trial's parameters for real: a one-trial sweep of exactly these values."""
        pinned = [f"{key}=choice({value})" for key, value in (p.split("=", 1) for p in params)]
        out = self.out / "trained" / hashlib.sha1(json.dumps(params).encode()).hexdigest()[:12]
        run_sweep(self.sweep_name, "none", 0, [*self.overrides, *pinned, "hydra.sweeper.n_trials=1"], out, fresh=False)
        (trial,) = load(out).trials
        self.trained += 1
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()  # as the baseline's
        return [v for _, v in sorted(trial.intermediate_values.items())], seconds


def replay(baseline: optuna.Study, pruner: str, seed: int, curves: Curves) -> optuna.Study:
    """The sweep under ``pruner``, each trial's curve reported epoch by epoch as its callback does."""
    study = optuna.create_study(
        study_name=baseline.study_name,
        direction=baseline.direction,
        pruner=make_pruner(_spec(pruner)),
        sampler=make_sampler("tpe", seed),
    )
    template = baseline.trials[0]  # the search space and the order the sweeper suggests it in
    order = [arg.split("=", 1)[0] for arg in param_overrides(template)]
    for _ in baseline.trials:
        trial = study.ask()
        params = {name: _suggest(trial, Param(name, template.distributions[name])) for name in order}
        overrides = [f"{name}={value}" for name, value in params.items()]
        curve, seconds = curves.get(params, overrides)
        trial.set_user_attr("seconds", seconds)
        for epoch, value in enumerate(curve):
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("seconds", seconds * (epoch + 1) / len(curve))
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, max(curve))  # the sweep's objective: val/acc_best
    return study


def _spec(text: str):  # noqa: ANN202
    """``{name:median,n_warmup_steps:0}`` (Hydra's override syntax) as a plain value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"pruner={text}").value()


def summary(study: optuna.Study, seconds: float | None = None) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    half = len(trials) // 2
    return {
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "best": study.best_value,
        "complete": states[TrialState.COMPLETE],
        "pruned": states[TrialState.PRUNED],
        # trials of the second half that ran to the end: the search still finds trials worth finishing
        "late_complete": sum(t.state == TrialState.COMPLETE for t in trials if t.number >= half),
        "seconds": seconds if seconds is not None else sum(_seconds(t) for t in trials),
    }


def _seconds(trial: FrozenTrial) -> float:
    """A replayed trial's estimate, or a real trial's measured seconds."""
    if "seconds" in trial.user_attrs:
        return trial.user_attrs["seconds"]
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="quick", help="a conf/sweep/ name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds (hydra.sweeper.seed)")
    parser.add_argument(
        "--pruner",
        action="append",
        default=[],
        metavar="NAME",
        help=f"compare only these (repeatable): {', '.join(PRUNERS)}",
    )
    parser.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="another pruner to compare, e.g. 'm2={name:median,n_warmup_steps:2}' (repeatable)",
    )
    parser.add_argument("--override", action="append", default=[], help="an override for every sweep (repeatable)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "sweeps" / "pruning-benchmark",
        help="sweeps and trained curves; finished ones here are reused",
    )
    parser.add_argument("--real", action="store_true", help="run every pruner's sweep for real, not replayed")
    parser.add_argument("--fresh", action="store_true", help="rerun sweeps even if a finished one is there")
    args = parser.parse_args()

    unknown = [name for name in args.pruner if name not in PRUNERS]
    if unknown:
        print(
            f"error: unknown pruner {unknown[0]!r}; choose from {', '.join(PRUNERS)} or give --spec NAME=SPEC",
            file=sys.stderr,
        )
        sys.exit(2)
    bad = [spec for spec in args.spec if "=" not in spec]
    if bad:
        print(f"error: --spec {bad[0]!r} needs the form NAME=SPEC", file=sys.stderr)
        sys.exit(2)
    chosen = {name: PRUNERS[name] for name in args.pruner} if args.pruner else dict(PRUNERS)
    chosen.update(spec.split("=", 1) for spec in args.spec)
    chosen.pop("none", None)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out.absolute()
    rows = {}
    for seed in args.seeds:
        seconds = run_sweep(args.sweep, "none", seed, args.override, out / f"seed{seed}" / "none", args.fresh)
        baseline = load(out / f"seed{seed}" / "none")
        # replayed pruners are timed by their trials: so is the baseline they are compared with
        rows[seed, "none"] = summary(baseline, seconds if args.real else None)
        curves = Curves(baseline, args.sweep, args.override, out / f"seed{seed}")
        for name, spec in chosen.items():
            if args.real:
                folder = out / f"seed{seed}" / name
                seconds = run_sweep(args.sweep, spec, seed, args.override, folder, args.fresh)
                rows[seed, name] = summary(load(folder), seconds)
            else:
                rows[seed, name] = summary(replay(baseline, spec, seed, curves))
            row = rows[seed, name]
            print(
                f"seed {seed} {name}: {row['epochs']} epochs, best {row['best']:.4f}, "
                f"{row['complete']} complete / {row['pruned']} pruned",
                flush=True,
            )
        if not args.real:
            print(f"seed {seed}: {curves.trained} trial(s) with parameters the baseline did not train", flush=True)

    how = "real sweeps" if args.real else "replayed on the sweep without pruning"
    print(f"\nsweep={args.sweep} {' '.join(args.override)} ({how})".replace("  ", " "))
    print("seed  pruner            epochs  ratio  best     vs none  complete  pruned  late complete  wall s  ratio")
    for (seed, name), row in rows.items():
        base = rows[seed, "none"]
        print(
            f"{seed:4d}  {name:16s}  {row['epochs']:6d}  {row['epochs'] / base['epochs']:5.2f}  "
            f"{row['best']:.4f}  {row['best'] - base['best']:+.4f}  {row['complete']:8d}  {row['pruned']:6d}  "
            f"{row['late_complete']:13d}  {row['seconds']:6.0f}  {row['seconds'] / base['seconds']:5.2f}"
        )
    print(
        "(ratio: against no pruning with the same seed; late complete: trials of the second half that ran "
        "every epoch; wall s: with --real the sweeps' own, else the sum of the trials' measured seconds)"
    )


if __name__ == "__main__":
    main()
