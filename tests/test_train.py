"""End-to-end training: every model x data x aug combination, a real short run, resume, seeding."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose_config, run_train
from digitnet.data.idx import DATASET_FOLDERS
from digitnet.errors import DigitnetError
from digitnet.models import BACKBONES
from digitnet.module import DigitClassifier
from digitnet.train import train

# every registered backbone, official dataset and augmentation preset
MODELS, DATA = sorted(BACKBONES), sorted(DATASET_FOLDERS)
AUGS = sorted(path.stem for path in (REPO / "conf" / "aug").glob("*.yaml"))

# the fast tier trains a covering set: every model, dataset and augmentation at least once
COVERING = {
    tuple(choices[i % len(choices)] for choices in (MODELS, DATA, AUGS))
    for i in range(max(len(MODELS), len(DATA), len(AUGS)))
}
COMBINATIONS = [
    pytest.param(*combination, marks=() if combination in COVERING else pytest.mark.slow)
    for combination in itertools.product(MODELS, DATA, AUGS)
]


@pytest.mark.parametrize("model, data, aug", COMBINATIONS)
def test_every_combination_runs(real_data, tmp_path, model, data, aug):
    overrides = [
        f"model={model}",
        f"data={data}",
        f"aug={aug}",
        "debug=[fast_dev_run,test]",
        "data.batch_size=16",
        "data.eval_batch_size=16",
    ]
    cfg = compose_config(*overrides, output_dir=tmp_path)
    val_acc_best = train(cfg)
    assert 0.0 <= val_acc_best <= 1.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/loss"] > 0 and metrics["params"] > 10_000


@pytest.mark.slow
def test_short_real_run_writes_the_run_dir(real_data, tmp_path):
    run = run_train(
        "model=mlp", "trainer.max_epochs=2", "trainer.limit_train_batches=60", "aug=light", run_dir=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "val/acc_best", "val/acc", "epochs", "train_seconds", "params"):
        assert key in metrics
    assert metrics["test/acc"] > 0.85 and metrics["epochs"] == 2 and metrics["params"] == 109_386
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # the best checkpoint holds what is needed to rebuild the model
    model = DigitClassifier.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    assert model.hparams.model["name"] == "mlp" and model.hparams.data_name == "mnist"
    assert str(tmp_path) in run.stdout + run.stderr  # the run says where its outputs are


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(real_data, tmp_path):
    args = ["model=mlp", "trainer.max_epochs=3", "trainer.limit_train_batches=40", "logger=none"]
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not last.exists() and first.poll() is None:
            time.sleep(0.05)
        first.kill()  # as hard as a power cut: no chance to clean up
    finally:
        first.wait()
    assert not (tmp_path / "first" / "metrics.json").exists(), "the run finished before it could be killed"
    stopped_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]

    resumed = run_train(*args, f"ckpt_path={last}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and stopped_at < 2


@pytest.mark.slow
def test_same_seed_same_metrics(real_data, tmp_path):
    def run(name):
        overrides = [
            "model=cnn",
            "aug=strong",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
            "seed=7",
            "data.eval_batch_size=200",
        ]
        cfg = compose_config(*overrides, "debug=test", output_dir=tmp_path / name)
        train(cfg)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    first, second = run("a"), run("b")
    assert first["test/loss"] == second["test/loss"] and first["val/acc"] == second["val/acc"]


def test_nan_loss_stops_with_a_message_and_keeps_last_good_checkpoint(real_data, tmp_path, monkeypatch):
    original = DigitClassifier._step

    def poisoned(self, batch):
        loss, preds, y = original(self, batch)
        return (loss * float("nan") if self.current_epoch == 1 else loss), preds, y

    monkeypatch.setattr(DigitClassifier, "_step", poisoned)
    cfg = compose_config(
        "model=mlp",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "debug=test",
        output_dir=tmp_path,
    )
    with pytest.raises(DigitnetError, match="training loss became nan by epoch 1"):
        train(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0  # written after the good epoch 0, untouched by the NaN epoch
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_csv_logger_writes_metrics(real_data, tmp_path):
    cfg = compose_config(
        "model=mlp",
        "debug=test",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "test=false",
        "callbacks.onnx_export=null",
        output_dir=tmp_path,
    )
    train(cfg)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "val/acc_best", "train/loss"} <= set(header)
