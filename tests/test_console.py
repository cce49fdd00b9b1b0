"""What runs print: no known noise, rounded results, and train.log as a copy of the console."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose_config
from digitnet.cli import run_task
from digitnet.console import progress
from digitnet.train import train
from tiny_run import tiny_run

TINY = [
    "model=mlp",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.onnx_export.test_images=300",
    "trainer.enable_progress_bar=false",
]
NOISE = [
    "litlogger",
    "Tip:",
    "Trainer already configured with model summary callbacks",
    "Trainer(limit_",
    "Trainer(val_check_interval=1.0)",
    "LeafSpec",
    "srun",
]


def run(script: str, *args: str, tmp_path: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """`python <script> args` in its own process; returns the process and its console (stdout + stderr)."""
    done = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    return done, done.stdout + done.stderr


def fake_srun(tmp_path: Path) -> dict:
    """A PATH on which SLURM's `srun` exists, as on a cluster's login node (Lightning then prints a hint)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_run_prints_no_noise_and_train_log_holds_the_console(real_data, tmp_path):
    done, console = run(
        "train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}", tmp_path=tmp_path, env=fake_srun(tmp_path)
    )
    assert done.returncode == 0, console
    for noise in NOISE:
        assert noise not in console, noise
    assert f"run dir: {tmp_path / 'run'}" in console
    assert re.search(
        r"^result: test/acc=0\.\d{4} test/loss=\d\.\d{4} val/acc_best=0\.\d{4} over \d+ of 10000 test images "
        r"\(2 epochs in \d+ s of training\)$",
        console,
        re.M,
    )

    log = (tmp_path / "run" / "train.log").read_text()
    for line in filter(str.strip, console.splitlines()):  # every console line, with time and source
        assert line.removeprefix("warning: ") in log, line
    for expected in (
        "GPU available: False",
        "Trainable params",
        "epoch 0 (1 of 2): train/acc=",
        "epoch 1 (2 of 2)",
        "verifying model.onnx against PyTorch on 300 test images ...",
        "ONNX model written to",
        "result: test/acc=",
        "run dir: ",
    ):
        assert expected in log, expected


@pytest.mark.slow
def test_failed_run_logs_its_error_line(real_data, tmp_path):
    """A DigitnetError after training: one `error:` line on the console, the same line in train.log."""
    done, console = run("train.py", *TINY, "optimized_metric=val/nope", f"hydra.run.dir={tmp_path}", tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: optimized_metric ['val/nope']"), console
    assert console.count("error:") == 1
    log = (tmp_path / "train.log").read_text()
    assert "epoch 1 (2 of 2)" in log and f"{done.stderr.strip()}" in log


@pytest.mark.slow
def test_unexpected_exception_leaves_its_traceback_in_train_log(real_data, tmp_path):
    """A bug (here a callback raising) ends the run with Hydra's traceback; train.log keeps it."""
    done, console = run(
        "train.py",
        *TINY,
        "+callbacks.boom._target_=failing_callback.Boom",
        f"hydra.run.dir={tmp_path}",
        tmp_path=tmp_path,
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))},
    )
    assert done.returncode == 1 and "RuntimeError: boom after epoch 0" in console
    log = (tmp_path / "train.log").read_text()
    assert "epoch 0 (1 of 2)" in log
    assert re.search(r"\[ERROR\] - the run failed:\nTraceback .*\nRuntimeError: boom after epoch 0", log, re.S)


@pytest.mark.slow
def test_sweep_console_numbers_trials_like_their_folders(real_data, tmp_path):
    done, console = run(
        "train.py",
        "-m",
        *TINY,
        "trainer.max_epochs=1",
        "model.dropout=0.0,0.1",
        "hydra.sweeper.study_name=tiny",
        "hydra.sweeper.n_trials=2",
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, console
    assert "trial #0 (1 of 2): model.dropout=" in console and "trial #1 (2 of 2): model.dropout=" in console
    assert len(re.findall(r"2 of 2 trials ended \| best 0\.\d+ \(trial #[01]\)", console)) == 1  # said once
    for noise in ("++callbacks.optuna_pruning", "Launching 1 jobs locally", "Trainable params", *NOISE):
        assert noise not in console, noise
    for number in (0, 1):  # each trial's own log keeps its model summary
        assert "Trainable params" in (tmp_path / "sweeps" / "tiny" / str(number) / "train.log").read_text()


def test_pruned_trial_is_one_line_not_a_failure(caplog):
    def pruned(cfg):
        raise optuna.TrialPruned("pruned after epoch 1: val/acc=0.8144")

    with caplog.at_level(logging.INFO), pytest.raises(optuna.TrialPruned):
        run_task(pruned, OmegaConf.create({}))
    logging.captureWarnings(False)  # run_task routed warnings into logging for the whole process
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", "pruned after epoch 1: val/acc=0.8144")]


def test_smoke_test_says_what_it_checked_not_an_accuracy(real_data, tmp_path, caplog):
    cfg = compose_config(
        "model=mlp",
        "debug=fast_dev_run",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        output_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="digitnet.train"):
        train(cfg)
    assert "smoke test (fast_dev_run) passed: 1 batch each of train, val and test ran" in caplog.text
    assert "test/acc" not in caplog.text


@pytest.mark.slow
def test_eval_says_what_it_does_before_each_long_phase(real_data, tmp_path, tmp_path_factory):
    trained = tiny_run(tmp_path_factory)
    done, console = run(
        "eval.py",
        f"ckpt_path={trained.checkpoint}",
        "data.limit=300",
        f"hydra.run.dir={tmp_path / 'eval'}",
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, console
    lines = console.splitlines()
    first = [
        next(i for i, line in enumerate(lines) if line.startswith(start))
        for start in (
            "predicting the 300 test images with",
            "robustness: accuracy on 29 corrupted copies of the 300",
            "robustness rotation",
            "report: ",
        )
    ]
    assert first == sorted(first)
    assert "robustness: accuracy on 29" in (tmp_path / "eval" / "eval.log").read_text()


@pytest.mark.slow
def test_digitnet_export_says_what_it_verifies(real_data, tmp_path, tmp_path_factory):
    trained = tiny_run(tmp_path_factory)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "digitnet.cli",
            "export",
            str(trained.checkpoint),
            "-o",
            str(tmp_path / "m.onnx"),
            "--test-images",
            "300",
            "--int8",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[:2] == [
        "verifying m.onnx against PyTorch on 300 test images ...",
        "quantising to m.int8.onnx and measuring its test accuracy ...",
    ]


def test_progress_bars_only_on_a_terminal_and_when_enabled():
    assert progress(range(3), desc="off", enabled=False).disable
    assert progress(range(3), desc="not a terminal").disable  # pytest captures stderr


@pytest.mark.parametrize("print_config", [True, False])
def test_config_tree_at_the_start_unless_switched_off(real_data, tmp_path, caplog, print_config):
    cfg = compose_config(
        "model=mlp",
        "debug=fast_dev_run",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        f"print_config={print_config}",
        output_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO):
        train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    trees = [m for m in messages if m.startswith("config\n")]
    assert len(trees) == int(print_config)
    if print_config:
        assert "├── model\n│   ├── name: mlp\n│   ├── hidden: [128, 64]" in trees[0]
        assert messages.index(trees[0]) < min(
            i for i, m in enumerate(messages) if m.startswith("epoch ") or "smoke test" in m
        )
    assert messages[-2].startswith("smoke test (fast_dev_run) passed")  # the result line stays
