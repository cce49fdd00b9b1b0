"""The sweeper with the real train.py: example sweeps compose, a tiny real sweep prunes/reports."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from digitnet.sweep.study import make_pruner
from hydra_plugins.digitnet_optuna_sweeper.search_space import parse_search_space

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
TINY = [
    "model=mlp",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.onnx_export.test_images=500",
]


def train_sweep(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("name", SWEEPS)
def test_example_sweeps_compose_every_choice(name):
    """Every parameter of conf/sweep/<name>.yaml exists, with every categorical choice."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        base = [f"sweep={name}"]
        cfg = compose("train", overrides=base, return_hydra_config=True)
        assert cfg.hydra.sweeper.study_name == name
        make_pruner(OmegaConf.to_container(cfg.hydra.sweeper)["pruner"])  # the shipped pruner builds
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        space = parse_search_space(params, [], OverridesParser.create())
        assert space.params
        for overrides in space.samples():
            compose("train", overrides=[*base, *overrides])


@pytest.mark.slow
def test_tiny_real_sweep_reports_every_epoch_and_writes_runs(real_data, tmp_path):
    train_sweep(
        tmp_path,
        *TINY,
        "optim.lr=tag(log,interval(1e-3,1e-2))",
        "model.dropout=0.0,0.2",
        "hydra.sweeper.study_name=tiny",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.monitor=val/acc",
    )
    sweep_dir = tmp_path / "sweeps" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir}/study.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:  # the Lightning callback reported val/acc after each epoch
        assert sorted(trial.intermediate_values) == [0, 1]
        run_dir = sweep_dir / str(trial.number)
        assert (run_dir / "metrics.json").is_file() and list(run_dir.glob("checkpoints/*.ckpt"))
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["best"]["value"] == study.best_value
    assert "optim.lr=" in best["best"]["command"] and "model=mlp" in best["best"]["command"]


@pytest.mark.slow
def test_quick_sweeps_pruner_saves_epochs_yet_lets_sampled_trials_finish(real_data, tmp_path):
    """Pruning must not end every trial after the first ones: the search keeps finding trials
    worth finishing (the tiny budget's curves differ from the full sweep's, the rule is the same)."""
    n_trials = 6
    tiny = [o for o in TINY if not o.startswith(("model=", "trainer.max_epochs="))]
    train_sweep(tmp_path, "sweep=quick", f"hydra.sweeper.n_trials={n_trials}", *tiny, "registry.enabled=false")
    sweep_dir = tmp_path / "sweeps" / "quick"
    study = optuna.load_study(study_name="quick", storage=f"sqlite:///{sweep_dir}/study.db")
    states = [t.state.name for t in study.trials]
    assert len(states) == n_trials and "FAIL" not in states
    assert "PRUNED" in states
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        pruner = compose("train", overrides=["sweep=quick"], return_hydra_config=True).hydra.sweeper.pruner
    assert "COMPLETE" in states[pruner.n_startup_trials :], states
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    assert epochs < n_trials * 4


@pytest.mark.slow
def test_tiny_real_sweep_runs_trials_in_parallel_with_joblib(real_data, tmp_path):
    train_sweep(
        tmp_path,
        *TINY,
        "optim.lr=tag(log,interval(1e-3,1e-2))",
        "hydra.sweeper.study_name=par",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "hydra.sweeper.monitor=val/acc",
    )
    sweep_dir = tmp_path / "sweeps" / "par"
    study = optuna.load_study(study_name="par", storage=f"sqlite:///{sweep_dir}/study.db")
    a, b = study.trials
    assert [a.state, b.state] == [optuna.trial.TrialState.COMPLETE] * 2
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    assert a.user_attrs["worker"] != b.user_attrs["worker"]  # two processes
    # that share the cores rather than each using them all
    assert a.user_attrs["torch_threads"] == b.user_attrs["torch_threads"] == max(1, os.cpu_count() // 2)
    for trial in (a, b):
        assert sorted(trial.intermediate_values) == [0, 1]  # pruning reports from the worker
        assert (sweep_dir / str(trial.number) / "metrics.json").is_file()
