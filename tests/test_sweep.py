"""The sweeper end to end on tests/sweep_app (a Lightning-free stand-in for train.py).

Each sweep is a real `app.py -m ...` process, so resuming, killing and concurrent workers are
tested the way users run them.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from digitnet.sweep import report
from postgres_server import postgres_url  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # every test runs sweeps, each a process of its own

APP = Path(__file__).parent / "sweep_app" / "app.py"
SPACE = ["x=interval(0,1)", "lr=tag(log,interval(1e-4,1e-1))", "model=small,big"]
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def command(*args: str, study: str = "demo") -> list[str]:
    return [sys.executable, str(APP), "-m", f"hydra.sweeper.study_name={study}", *args]


def sweep(cwd: Path, *args: str, study: str = "demo", status: int = 0) -> str:
    done = subprocess.run(command(*args, study=study), cwd=cwd, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == status, output
    return output


def start(cwd: Path, *args: str, study: str = "demo") -> subprocess.Popen:
    # SIGINT back to its default, so the worker gets Ctrl-C as KeyboardInterrupt even when the tests
    # themselves run in the background (nohup, `&`), where it is inherited as ignored
    return subprocess.Popen(
        command(*args, study=study),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def load(cwd: Path, study: str = "demo", storage: str | None = None) -> optuna.Study:
    storage = storage or f"sqlite:///{cwd}/sweeps/{study}/study.db"
    return optuna.load_study(study_name=study, storage=storage)


def started_trials(output: str) -> list[int]:
    """Trial numbers a worker launched, from its console lines 'trial #k (k+1 of n): ...'."""
    return [int(k) for k in re.findall(r"trial #(\d+) \(\d+ of \d+\): ", output)]


def assert_exactly_ended(study: optuna.Study, n_trials: int) -> None:
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials if t.state in ENDED) == list(range(n_trials))
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_sweep_writes_report_resumes_and_extends(tmp_path):
    out = sweep(tmp_path, *SPACE, "hydra.sweeper.n_trials=6")
    assert "6 of 6 trials ended | best" in out
    study = load(tmp_path)
    assert_exactly_ended(study, 6)
    sweep_dir = tmp_path / "sweeps" / "demo"
    for t in study.trials:  # each trial is a normal run in sweeps/<study>/<number>
        assert (sweep_dir / str(t.number) / ".hydra" / "config.yaml").is_file()
        assert (sweep_dir / str(t.number) / "metrics.json").is_file() == (t.state == TrialState.COMPLETE)
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["best"]["value"] == study.best_value
    assert best["best"]["params"] == study.best_params
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 7
    assert {"optimization_history.png", "parallel_coordinate.png"} <= {p.name for p in (sweep_dir / "plots").iterdir()}

    # The command in best.yaml reproduces the best trial as a single run.
    argv = shlex.split(best["best"]["command"])
    subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True, capture_output=True)
    [rerun] = (tmp_path / "outputs").glob("*/*/metrics.json")
    assert yaml.safe_load(rerun.read_text())["val/acc_best"] == pytest.approx(study.best_value)

    sweep(tmp_path, *SPACE, "hydra.sweeper.n_trials=6")  # same command: nothing left to run
    assert len(load(tmp_path).trials) == 6
    out = sweep(tmp_path, *SPACE, "hydra.sweeper.n_trials=8")  # more trials extend the study
    assert started_trials(out) == [6, 7]
    study = load(tmp_path)
    assert_exactly_ended(study, 8)
    assert len({t.params["x"] for t in study.trials}) == 8  # resuming drew new values

    assert report.main([str(sweep_dir / "study.db"), "demo", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "trials.csv").read_text().count("\n") == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope=interval(0,1)"], "bad sweep parameter: Could not override 'nope'"),
        (["model=small,huge"], "bad sweep parameter: In 'config': Could not find 'model/huge'"),
        (["x=interval(0.8,0.2)"], r"x: interval\(0.8, 0.2\) is empty"),
        (
            ["x=interval(0,1)", "hydra.sweeper.storage=postgresql+psycopg2://u@127.0.0.1:9/db"],
            "cannot open sweep storage",
        ),
        (["x=interval(0,1)", "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs must be at least 1, got 0"),
        (
            [
                "x=interval(0,1)",
                "optimized_metric=[val/acc_best,params]",
                "hydra.sweeper.direction=[maximize,minimize]",
            ],
            "Optuna cannot prune multi-objective",
        ),
    ],
)
def test_bad_sweep_configs_fail_before_training(tmp_path, args, message):
    out = sweep(tmp_path, *args, status=2)
    assert re.search(f"error: {message}", out), out
    assert "Traceback" not in out
    assert not (tmp_path / "sweeps" / "demo" / "0").exists()


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    sweep(tmp_path, *SPACE, "crash_above=0.5", "hydra.sweeper.n_trials=6", "hydra.sweeper.max_failure_rate=1.0")
    trials = load(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and len(failed) < 6
    for t in trials:
        crashed = t.params["x"] > 0.5
        assert (t.state == TrialState.FAIL) == crashed
        assert (t.user_attrs.get("error") == f"RuntimeError: diverged at x={t.params['x']}") == crashed


@pytest.mark.parametrize("crash_as, traceback", [("runtime", True), ("digitnet", False)])
def test_a_failed_trial_shows_a_traceback_only_for_a_bug(tmp_path, crash_as, traceback):
    out = sweep(
        tmp_path,
        *SPACE,
        "crash_above=-1",
        f"crash_as={crash_as}",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    assert re.search(r"trial #0 failed: \w+Error: diverged at x=", out)
    assert ("Traceback" in out) == traceback


def test_too_many_failures_stop_the_sweep(tmp_path):
    out = sweep(
        tmp_path, *SPACE, "crash_above=-1", "hydra.sweeper.n_trials=8", "hydra.sweeper.max_failure_rate=0.25", status=2
    )
    assert "error: 3 of 8 trials failed, more than max_failure_rate=0.25" in out
    assert len(load(tmp_path).trials) == 3  # stopped once 3 > 0.25 * 8


def test_pruning_trains_clearly_fewer_epochs(tmp_path):
    common = [*SPACE, "epochs=8", "hydra.sweeper.n_trials=16", "hydra.sweeper.seed=3"]
    pruners = {"none": "none", "median": "{name:median,n_startup_trials:3,n_warmup_steps:1}"}
    epochs, pruned = {}, {}
    for study, pruner in pruners.items():
        sweep(tmp_path, *common, f"hydra.sweeper.pruner={pruner}", study=study)
        trials = load(tmp_path, study).trials
        epochs[study] = report.epochs_trained(trials)
        pruned[study] = sum(t.state == TrialState.PRUNED for t in trials)
    print(
        f"16 trials x 8 epochs: {epochs['none']} epochs without pruning, "
        f"{epochs['median']} with median pruning ({pruned['median']} trials pruned)"
    )
    assert epochs["none"] == 16 * 8 and pruned["none"] == 0
    assert pruned["median"] > 0
    assert epochs["median"] <= 0.75 * epochs["none"]


def test_multi_objective_sweep_reports_the_pareto_front(tmp_path):
    sweep(
        tmp_path,
        *SPACE,
        "optimized_metric=[val/acc_best,params]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.sweeper.sampler=nsgaii",
        "hydra.sweeper.pruner=none",
        "hydra.sweeper.n_trials=6",
    )
    study = load(tmp_path)
    best = yaml.safe_load((tmp_path / "sweeps" / "demo" / "best.yaml").read_text())
    assert {t["trial"] for t in best["pareto_front"]} == {t.number for t in study.best_trials}
    assert (tmp_path / "sweeps" / "demo" / "plots" / "pareto_front.png").is_file()


def test_grid_sampler_runs_each_point_once(tmp_path):
    out = sweep(
        tmp_path, "model=small,big", "lr=choice(0.01,0.001)", "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=10"
    )
    assert "the grid has 4 points" in out
    params = [tuple(sorted(t.params.items())) for t in load(tmp_path).trials]
    assert len(params) == 4 and len(set(params)) == 4


def wait_for_trial_dir(cwd: Path, number: int, process: subprocess.Popen) -> None:
    trial_dir = cwd / "sweeps" / "demo" / str(number)
    for _ in range(600):
        if trial_dir.exists():
            return
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"trial {number} never started")


SLOW = [
    *SPACE,
    "epochs=4",
    "seconds_per_epoch=0.25",
    "hydra.sweeper.n_trials=5",
    "hydra.sweeper.heartbeat_interval=1",
    "hydra.sweeper.grace_period=2",
]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_stopped_sweep_restarts_to_exactly_n_trials(tmp_path, stop):
    worker = start(tmp_path, *SLOW)
    wait_for_trial_dir(tmp_path, 1, worker)
    worker.send_signal(stop)
    worker.communicate(timeout=60)
    interrupted = load(tmp_path).trials[1]
    if stop == signal.SIGINT:
        assert interrupted.state == TrialState.FAIL
        assert interrupted.user_attrs["error"] == "interrupted (KeyboardInterrupt)"
    else:
        assert interrupted.state == TrialState.RUNNING  # until its heartbeat goes stale

    out = sweep(tmp_path, *SLOW)
    assert started_trials(out) == [2, 3, 4]
    study = load(tmp_path)
    assert_exactly_ended(study, 5)
    assert study.trials[1].state == TrialState.FAIL


def run_two_workers(cwd: Path, *args: str, study: str) -> None:
    workers = [start(cwd, *args, study=study) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    ran = [started_trials(out) for out in outputs]
    assert all(ran), ran  # both workers took part
    assert sorted(ran[0] + ran[1]) == list(range(8))  # no trial ran twice, none is missing


CONCURRENT = [*SPACE, "epochs=4", "seconds_per_epoch=0.1", "hydra.sweeper.n_trials=8"]


def assert_shared_study(study: optuna.Study) -> None:
    assert_exactly_ended(study, 8)
    assert len({t.params["x"] for t in study.trials}) == 8  # workers didn't mirror each other


def test_two_workers_share_a_sqlite_study(tmp_path):
    run_two_workers(tmp_path, *CONCURRENT, study="demo")
    assert_shared_study(load(tmp_path))


@pytest.mark.postgres
def test_two_workers_share_a_postgresql_study(tmp_path, postgres_url):  # noqa: F811
    run_two_workers(tmp_path, *CONCURRENT, f"hydra.sweeper.storage={postgres_url}", study="pg")
    assert_shared_study(load(tmp_path, "pg", postgres_url))


def test_hydra_optuna_sweeper_installed_alongside_leaves_ours_the_default(tmp_path):
    """hydra-optuna-sweeper registers hydra/sweeper=optuna; ours is digitnet_optuna, whatever the
    plugins' import order, and `-m` runs ours."""
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), "hydra-optuna-sweeper"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    def sweeper_target(*overrides: str) -> str:
        shown = subprocess.run(
            [sys.executable, str(APP), *overrides, "--cfg", "hydra"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        return yaml.safe_load(shown.stdout)["hydra"]["sweeper"].get("_target_", "")

    assert sweeper_target("hydra/sweeper=optuna").endswith(".OptunaSweeper")  # theirs is installed
    assert sweeper_target() == "hydra_plugins.digitnet_optuna_sweeper.sweeper.DigitnetOptunaSweeper"
    done = subprocess.run(
        command(*SPACE, "hydra.sweeper.n_trials=2"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert_exactly_ended(load(tmp_path), 2)
    assert (tmp_path / "sweeps" / "demo" / "best.yaml").is_file()  # our report
