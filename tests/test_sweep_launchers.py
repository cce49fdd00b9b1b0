"""Parallel trials through Hydra launchers (hydra.sweeper.n_jobs): joblib, submitit_local, and
submitit_slurm on a private one-machine SLURM cluster. Each sweep is a real `app.py -m ...`
process on tests/sweep_app, as in test_sweep.py; its "epochs" sleep, so trials that run in
parallel overlap in time whatever the machine's load.
"""

import csv
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from digitnet.errors import DigitnetError
from digitnet.sweep.study import load_study
from slurm_cluster import slurm_cluster  # noqa: F401 (fixture)
from test_sweep import SPACE, assert_exactly_ended, load, start, started_trials, sweep

pytestmark = pytest.mark.slow  # sweeps in parallel processes and SLURM jobs

PARALLEL = [*SPACE, "epochs=4", "seconds_per_epoch=0.5", "hydra.sweeper.n_jobs=2"]
PRUNING = "hydra.sweeper.pruner={name:median,n_startup_trials:2,n_warmup_steps:1}"


def overlap(a: FrozenTrial, b: FrozenTrial) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


def assert_ran_in_pairs(study: optuna.Study) -> None:
    """Trials 2k and 2k+1 ran at the same time, in two processes, each in its own folder."""
    trials = study.trials
    for a, b in zip(trials[::2], trials[1::2], strict=True):
        assert overlap(a, b), [(t.number, t.datetime_start, t.datetime_complete) for t in trials]
        assert a.user_attrs["worker"] != b.user_attrs["worker"]
    for t in trials:
        assert Path(t.user_attrs["run_dir"]).name == str(t.number)
        config = yaml.safe_load((Path(t.user_attrs["run_dir"]) / ".hydra" / "config.yaml").read_text())
        assert config["x"] == t.params["x"]


def assert_report(cwd: Path, study: optuna.Study, n_trials: int) -> None:
    sweep_dir = cwd / "sweeps" / study.study_name
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["best"]["value"] == study.best_value
    assert sum(best["trials"].values()) == n_trials
    with open(sweep_dir / "trials.csv", newline="") as rows:
        assert [int(row["trial"]) for row in csv.DictReader(rows)] == list(range(n_trials))


def test_joblib_runs_two_trials_at_a_time_and_still_prunes(tmp_path):
    sweep(tmp_path, *PARALLEL, "hydra/launcher=joblib", "hydra.sweeper.n_trials=8", PRUNING)
    study = load(tmp_path)
    assert_exactly_ended(study, 8)
    assert_ran_in_pairs(study)
    assert sum(t.state == TrialState.PRUNED for t in study.trials) > 0
    assert_report(tmp_path, study, 8)


def test_trials_keep_their_folders_when_a_batch_is_not_consecutive(tmp_path):
    """Trial 1 is another worker's: the batch is trials 0 and 2, run as jobs 0 and 1."""
    storage = f"sqlite:///{tmp_path}/sweeps/demo/study.db"
    (tmp_path / "sweeps" / "demo").mkdir(parents=True)
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    study.enqueue_trial({})  # trial 0, waiting
    study.add_trial(optuna.trial.create_trial(value=0.5))  # trial 1
    out = sweep(tmp_path, *SPACE, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    assert started_trials(out) == [0, 2]
    study = load(tmp_path)
    assert_exactly_ended(study, 3)
    for t in (study.trials[0], study.trials[2]):
        config = yaml.safe_load((tmp_path / "sweeps" / "demo" / str(t.number) / ".hydra" / "config.yaml").read_text())
        assert config["x"] == t.params["x"]
    assert not (tmp_path / "sweeps" / "demo" / "1").exists()


def test_submitit_local_runs_each_trial_as_a_job(tmp_path):
    sweep(
        tmp_path,
        *SPACE,
        "epochs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "hydra/launcher=submitit_local",
    )
    study = load(tmp_path)
    assert_exactly_ended(study, 2)
    assert_ran_in_pairs(study)
    jobs = {t.user_attrs["job"] for t in study.trials}  # submitit's job ids, one per trial
    assert len(jobs) == 2 and all((tmp_path / "sweeps" / "demo" / ".submitit" / j).is_dir() for j in jobs)


SLURM = [
    *PARALLEL,
    "hydra/launcher=submitit_slurm",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.heartbeat_interval=1",
    "hydra.sweeper.grace_period=3",
]


@pytest.mark.slurm
def test_slurm_runs_each_trial_as_a_slurm_job(slurm_cluster, tmp_path):  # noqa: F811
    sweep(tmp_path, *SLURM, PRUNING, study="slurm")
    study = load(tmp_path, "slurm")
    assert_exactly_ended(study, 4)
    assert_ran_in_pairs(study)
    finished = slurm_cluster.jobs()
    assert [finished[t.user_attrs["job"]] for t in study.trials] == ["COMPLETED"] * 4
    assert_report(tmp_path, study, 4)


def wait_for_job(cwd: Path, study: str, number: int, worker: subprocess.Popen) -> str:
    """The SLURM job id of trial `number`, once that job runs the trial."""
    for _ in range(600):
        assert worker.poll() is None, worker.communicate()[0]
        try:  # digitnet's loader: waits while the sweep creates the database's tables
            trials = load_study(f"sqlite:///{cwd}/sweeps/{study}/study.db", study).trials
        except DigitnetError:  # no such study yet
            trials = []
        if len(trials) > number and "worker" in trials[number].user_attrs:
            return trials[number].user_attrs["job"]
        time.sleep(0.2)
    raise AssertionError(f"trial {number} never started")


@pytest.mark.slurm
def test_a_cancelled_slurm_job_fails_only_its_trial(slurm_cluster, tmp_path):  # noqa: F811
    slow = [*SLURM, "epochs=16"]
    worker = start(tmp_path, *slow, study="cancel")
    job = wait_for_job(tmp_path, "cancel", 0, worker)
    subprocess.run(["scancel", job], check=True)
    out = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, out

    study = load(tmp_path, "cancel")
    assert_exactly_ended(study, 4)
    cancelled, *others = study.trials
    assert cancelled.state == TrialState.FAIL
    assert "UncompletedJobError" in cancelled.user_attrs["error"] and job in cancelled.user_attrs["error"]
    # trial 1 ran in the same batch: the launcher raised for it too, yet its result is kept
    assert [t.state for t in others] == [TrialState.COMPLETE] * 3
    assert slurm_cluster.jobs()[job] == "CANCELLED"

    out = sweep(tmp_path, *slow, study="cancel")  # the same command again: the study is complete
    assert started_trials(out) == []
    assert_exactly_ended(load(tmp_path, "cancel"), 4)
    assert_report(tmp_path, load(tmp_path, "cancel"), 4)
