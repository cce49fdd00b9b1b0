"""Training options of the recipes: EMA of the weights, MixUp/CutMix, channels_last, torch.compile, bf16."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.mix import build_mix
from digitnet.module import DigitClassifier
from digitnet.train import build_module, train

QUIET = ["debug=test", "callbacks.onnx_export=null", "registry.enabled=false"]


def _test_loss(module: DigitClassifier, state_dict: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    module.load_state_dict(state_dict)
    with torch.no_grad():
        return F.cross_entropy(module.eval()(images.unsqueeze(1).float() / 255), labels).item()


def test_ema_weights_are_checkpointed_and_tested(tiny_mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    cfg = compose_config(
        "model=mlp",
        "module.ema_decay=0.5",
        "data.val_size=50",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "optim.lr=0.01",
        *QUIET,
        output_dir=tmp_path,
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    checkpoint = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    images, labels = load_split("mnist", "test", str(tiny_mnist), False, [str(i) for i in range(10)])
    module = build_module(cfg)
    ema_loss = _test_loss(module, checkpoint["state_dict"], images, labels)
    raw_loss = _test_loss(module, checkpoint["current_model_state"], images, labels)
    assert metrics["test/loss"] == pytest.approx(ema_loss, rel=1e-4)  # the test ran on the average...
    assert abs(ema_loss - raw_loss) > 1e-3  # ...which is not the raw weights


def test_mixup_targets_match_the_mixed_images():
    x, y = torch.rand(32, 1, 28, 28), torch.arange(32) % 10
    mixed, target = build_mix(0.4, 0.0, 10)(x, y)
    assert target.shape == (32, 10) and torch.allclose(target.sum(1), torch.ones(32))
    lam = target[1, y[1]]  # torchvision mixes each image with its predecessor in the batch
    assert torch.allclose(mixed[1], lam * x[1] + (1 - lam) * x[0], atol=1e-6)


def test_cutmix_target_share_is_the_pasted_area():
    x, y = torch.zeros(16, 1, 28, 28), torch.arange(16) % 10
    x[::2] = 1.0  # even images white, odd ones black
    mixed, target = build_mix(0.0, 1.0, 10)(x, y)
    own_share = mixed[1].mean()  # black image 1 with a box of white image 0 pasted in
    assert target[1, y[0]] == pytest.approx(own_share.item(), abs=1e-6)


def test_mixing_is_off_by_default_and_only_for_training_batches():
    assert build_mix(0.0, 0.0, 10) is None
    module = DigitClassifier(model={"name": "mlp"}, mixup_alpha=0.2, cutmix_alpha=1.0)
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    batch = (torch.randint(0, 255, (8, 28, 28), dtype=torch.uint8), torch.arange(8))
    module.trainer.validating = True
    assert module.on_after_batch_transfer(batch, 0)[1].ndim == 1  # validation: hard labels, no mixing
    module.trainer.training = True
    x, y = module.on_after_batch_transfer(batch, 0)
    assert x.shape == (8, 1, 28, 28) and y.shape == (8, 10)


def test_channels_last_and_compile_keep_the_checkpoint_format(tmp_path):
    cfg = compose_config("model=cnn", "module.channels_last=true", "module.compile=true", output_dir=tmp_path)
    module = build_module(cfg)
    module.setup("fit")  # as Lightning does when fitting starts
    conv = module.net[1][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_module(compose_config("model=cnn", output_dir=tmp_path))
    assert list(module.state_dict()) == list(plain.state_dict())  # loads into an uncompiled model as is
    plain.load_state_dict(module.state_dict())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(module.eval()(x), plain.eval()(x), atol=1e-5)


@pytest.mark.parametrize("override", ["module.ema_decay=1.0", "module.mixup_alpha=-0.1", "module.cutmix_alpha=-1"])
def test_bad_option_values_are_refused(tmp_path, override):
    cfg = compose_config(override, output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=override.split("=")[0]):
        train(cfg)


def test_bf16_autocast_run_checkpoints_and_exports_float32(tiny_mnist, monkeypatch, tmp_path):
    """The recipes train with trainer.precision=bf16-mixed; the weights and the ONNX model stay float32."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    quiet = [o for o in QUIET if not o.startswith("callbacks.onnx_export")]
    cfg = compose_config(
        "model=convpool",
        "trainer.precision=bf16-mixed",
        "module.channels_last=true",
        "data.val_size=50",
        "trainer.max_epochs=1",
        *quiet,
        output_dir=tmp_path,
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    weights = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert metrics["onnx/test_images"] == 50 and metrics["onnx/max_abs_diff"] < 1e-5
    assert metrics["onnx/test_acc"] == metrics["onnx/torch_test_acc"]


@pytest.mark.parametrize("total_steps, pct_start", [(4, 0.25), (10, 0.1), (1, 1.0), (40, 0.025)])
def test_onecycle_runs_when_its_warm_up_would_be_exactly_one_step(total_steps, pct_start):
    """torch's OneCycleLR divides by zero when pct_start * total_steps == 1 (tiny runs hit it)."""
    from digitnet.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, {"name": "onecycle", "pct_start": pct_start}, total_steps)["scheduler"]
    rates = []  # the rate each training step uses
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(0 < r <= 0.1 for r in rates) and rates == sorted(rates, reverse=True)  # no warm-up left
