"""Bad config values, data and checkpoints give one clear line before any training."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config, run_train
from digitnet.errors import DigitnetError
from digitnet.train import train


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be positive"),
    ("label_smoothing=1.5", "label_smoothing=1.5 must be in [0, 1)"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be >= 1"),
    ("data.batch_size=abc", "data.batch_size=abc must be an integer"),  # a typo, not a deep ValueError
    ("optim.lr=3e-3x", "optim.lr=3e-3x must be a number"),
    ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5 must be an integer"),
    ("ema_decay=true", "ema_decay=True must be a number"),
    ("aug=light", None),  # control: a valid config passes validation and trains
])
def test_impossible_values_are_refused_before_training(real_data, tmp_path, override, message):
    cfg = compose_config(override, "debug=fast_dev_run", "logger=none", output_dir=tmp_path)
    if message is None:
        assert 0 <= train(cfg) <= 1
        return
    with pytest.raises(DigitnetError) as err:
        train(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_val_size_as_large_as_the_training_set(real_data, tmp_path):
    cfg = compose_config("data.val_size=60000", "debug=fast_dev_run", "logger=none", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="data.val_size=60000 must be between 1 and 59999"):
        train(cfg)


def test_missing_data_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path / "empty"))
    cfg = compose_config("data.download=false", "debug=fast_dev_run", "logger=none", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=r"mnist data not found in .*empty/MNIST/raw.*DIGITNET_DATA"):
        train(cfg)


def test_checkpoint_of_another_model(real_data, tmp_path):
    cfg = compose_config("model=mlp", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                         "trainer.limit_val_batches=1", "test=false", "logger=none", output_dir=tmp_path / "mlp")
    train(cfg)
    ckpt = tmp_path / "mlp" / "checkpoints" / "last.ckpt"
    cfg = compose_config("model=cnn", f"ckpt_path={ckpt}", "logger=none", output_dir=tmp_path / "cnn")
    with pytest.raises(DigitnetError, match="holds a model=mlp checkpoint but this run builds model=cnn; add model=mlp"):
        train(cfg)


def test_resume_with_a_longer_schedule_says_to_fine_tune_instead(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    short = ("model=mlp", "data.val_size=50", "trainer.max_epochs=1", "test=false", "logger=none",
             "callbacks.onnx_export=null")
    assert run_train(*short, run_dir=tmp_path / "short").returncode == 0
    ckpt = tmp_path / "short" / "checkpoints" / "last.ckpt"
    run = run_train(*short, "trainer.max_epochs=3", f"ckpt_path={ckpt}", run_dir=tmp_path / "longer")
    assert run.returncode == 2, run.stderr
    assert "LR schedule was planned for 2 steps but this run plans 6" in run.stderr
    assert "init_from=<checkpoint>" in run.stderr and "Traceback" not in run.stderr
    fine_tune = run_train(*short, "trainer.max_epochs=3", f"init_from={ckpt}", run_dir=tmp_path / "tuned")
    assert fine_tune.returncode == 0, fine_tune.stderr


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is not a readable PyTorch checkpoint"),
    (None, "is not a digitnet checkpoint"),  # a real torch file without digitnet hyperparameters
])
def test_unreadable_or_foreign_checkpoint(tmp_path, content, message):
    ckpt = tmp_path / "x.ckpt"
    if content is None:
        torch.save({"state_dict": {}, "epoch": 3}, ckpt)
    else:
        ckpt.write_bytes(content)
    cfg = compose_config(f"ckpt_path={ckpt}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=message):
        train(cfg)


def test_missing_checkpoint(tmp_path):
    cfg = compose_config(f"ckpt_path={tmp_path / 'nope.ckpt'}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="nope.ckpt not found"):
        train(cfg)


def test_command_line_shows_one_line_not_a_traceback(tmp_path):
    run = run_train("data.batch_size=0", run_dir=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "error: data.batch_size=0 must be a positive integer"
    assert "Traceback" not in run.stderr


def test_unknown_option_lists_the_choices(tmp_path):
    run = run_train("model=vit", run_dir=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "Could not find 'model/vit'" in run.stderr and "convnext" in run.stderr


def test_resume_and_fine_tune_at_once_is_refused(tmp_path):
    cfg = compose_config(f"ckpt_path={tmp_path / 'a.ckpt'}", f"init_from={tmp_path / 'b.ckpt'}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="set either ckpt_path .* or init_from .*, not both"):
        train(cfg)
