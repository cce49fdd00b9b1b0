"""Resuming into a new run dir ends like the uninterrupted run: same best checkpoint, test/acc and metrics keys."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, compose_config, run_train
from digitnet.train import train

pytestmark = pytest.mark.slow  # several multi-epoch runs, one killed and resumed

SPIKE_EPOCH = 2
RUN = [
    "model=mlp",
    "sched=none",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.onnx_export.test_images=200",
    "++callbacks.lr_spike._target_=test_resume.LrSpike",
    f"++callbacks.lr_spike.epoch={SPIKE_EPOCH}",
    "debug=test",
]


class LrSpike(L.Callback):
    """Multiplies the learning rate by 100 at the start of `epoch`: that epoch validates far worse."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 100


def run(run_dir: Path, *overrides: str) -> dict:
    train(compose_config(*RUN, *overrides, output_dir=run_dir))
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint_epoch(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


@pytest.fixture(scope="module")
def uninterrupted(real_data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    metrics = run(run_dir, "trainer.max_epochs=3")
    assert checkpoint_epoch(metrics["best_checkpoint"]) < SPIKE_EPOCH, "the spike should make the last epoch worse"
    return run_dir, metrics


def test_resumed_run_keeps_the_best_checkpoint_from_before_the_stop(uninterrupted, tmp_path):
    _, expected = uninterrupted
    run(
        tmp_path / "first", f"trainer.max_epochs={SPIKE_EPOCH}"
    )  # stopped after epoch 1, as a kill after its checkpoint
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = run(tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={last}")

    best = Path(resumed["best_checkpoint"])
    assert best.parent == tmp_path / "resumed" / "checkpoints"  # the new run dir holds its own best checkpoint
    assert best.name == Path(expected["best_checkpoint"]).name
    assert checkpoint_epoch(best) == checkpoint_epoch(expected["best_checkpoint"])
    for key in ("val/acc_best", "test/acc", "test/loss", "onnx/test_acc", "epochs"):
        assert resumed[key] == expected[key], key
    assert (tmp_path / "first" / "checkpoints" / best.name).is_file()  # the old run dir is left as it was


def test_run_resumed_after_its_last_epoch_tests_and_reports_the_same_metrics(uninterrupted, tmp_path):
    """As a run killed during its test phase: its last.ckpt holds the final epoch, fit has nothing left to do."""
    run_dir, expected = uninterrupted
    assert checkpoint_epoch(run_dir / "checkpoints" / "last.ckpt") == 2  # the last epoch, though not the best
    resumed = run(tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert sorted(resumed) == sorted(expected)
    for key in expected:
        if key.split("/")[0] in ("train", "val", "test") or key in ("epochs", "onnx/test_acc"):
            assert resumed[key] == expected[key], key


def test_resume_without_a_monitor_tests_the_last_epoch_checkpoint_of_the_new_run_dir(real_data, tmp_path):
    """model_checkpoint.monitor=null (as fashion_best): the "best" checkpoint is the last epoch's."""
    no_monitor = ["callbacks.model_checkpoint.monitor=null", "callbacks.lr_spike=null", "trainer.max_epochs=2"]
    expected = run(tmp_path / "uninterrupted", *no_monitor)
    last = tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt"
    resumed = run(tmp_path / "resumed", *no_monitor, f"ckpt_path={last}")
    assert (
        Path(resumed["best_checkpoint"])
        == tmp_path / "resumed" / "checkpoints" / Path(expected["best_checkpoint"]).name
    )
    assert resumed["test/acc"] == expected["test/acc"] and resumed["val/acc"] == expected["val/acc"]


def test_run_killed_while_testing_resumes_to_a_normal_end(real_data, tmp_path):
    """The real thing: SIGKILL once model.onnx is written (end of fit, the test set is next)."""
    args = ["model=mlp", "trainer.max_epochs=2", "trainer.limit_train_batches=20", "logger=none"]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (tmp_path / "first" / "model.onnx").exists() and first.poll() is None:
            time.sleep(0.01)
        first.kill()
    finally:
        first.wait()
    assert not (tmp_path / "first" / "metrics.json").exists(), "the run finished before it could be killed"
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"

    resumed = run_train(*args, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    fit_metrics = torch.load(last, map_location="cpu", weights_only=False)["fit_metrics"]
    assert {k: metrics[k] for k in fit_metrics} == fit_metrics  # train/*, val/* including val/acc_best
    assert metrics["epochs"] == 2 and metrics["test/acc"] > 0.8 and (tmp_path / "resumed" / "model.onnx").is_file()
