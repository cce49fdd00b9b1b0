"""Hardware-aware defaults: bf16 autocast and NHWC where the device runs them natively, explicit values win."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from digitnet.fastpath import Device, choose, cpu_device, keep_gradients_channels_last, settle, training_device
from digitnet.models import build_backbone
from digitnet.optim import build_optimizer
from digitnet.train import train

QUIET = [
    "logger=none",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
    "callbacks.onnx_export=null",
    "registry.enabled=false",
    "print_config=false",
]


def test_a_cpu_without_native_bf16_trains_in_float32():
    older_cpu = cpu_device(["sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"])
    assert not older_cpu.bf16_native
    assert choose(older_cpu, convolutional=True) == ("32-true", True)


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_a_cpu_with_native_bf16_trains_in_bf16_autocast(flag):
    assert choose(cpu_device(["avx2", "avx512f", flag]), convolutional=True) == ("bf16-mixed", True)


def test_nhwc_only_for_convolutional_networks_on_devices_that_prefer_it():
    assert choose(cpu_device(["avx512_bf16"]), convolutional=False) == ("bf16-mixed", False)  # model=mlp
    assert choose(Device("cuda", True), convolutional=True) == ("bf16-mixed", True)
    assert choose(Device("cuda", False), convolutional=True) == ("32-true", True)  # e.g. a pre-Ampere GPU
    assert choose(Device("mps", False), convolutional=True) == ("32-true", False)


def test_this_machines_cpu_is_read_from_its_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.fail("this test reads /proc/cpuinfo (Linux)")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert training_device("cpu").bf16_native == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_auto_is_decided_and_explicit_values_are_kept(tmp_path):
    cfg = compose_config("trainer.accelerator=cpu", output_dir=tmp_path)
    assert (cfg.trainer.precision, cfg.module.channels_last) == ("auto", "auto")  # the defaults
    line = settle(cfg)
    expected = choose(training_device("cpu"), convolutional=True)  # model=cnn
    assert (cfg.trainer.precision, cfg.module.channels_last) == expected
    assert line.startswith(f"training precision={expected[0]} channels_last={str(expected[1]).lower()} (auto, ")

    cfg = compose_config("trainer.precision=32-true", "module.channels_last=false", output_dir=tmp_path)
    assert settle(cfg) == "training precision=32-true channels_last=false (as set)"
    assert (cfg.trainer.precision, cfg.module.channels_last) == ("32-true", False)

    cfg = compose_config("model=mlp", "trainer.precision=32-true", output_dir=tmp_path)
    settle(cfg)
    assert (cfg.trainer.precision, cfg.module.channels_last) == ("32-true", False)


@pytest.mark.parametrize("overrides", [[], ["trainer.precision=32-true", "module.channels_last=false"]])
def test_the_choice_is_logged_and_in_metrics_json(overrides, tiny_mnist, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    cfg = compose_config(
        "data.val_size=50",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        *overrides,
        "test=false",
        *QUIET,
        output_dir=tmp_path,
    )
    expected = ("32-true", False) if overrides else choose(training_device("auto"), convolutional=True)
    with caplog.at_level(logging.INFO, logger="digitnet.train"):
        train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["precision"], metrics["channels_last"]) == expected
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training precision=")]
    assert len(lines) == 1 and f"precision={expected[0]} channels_last={str(expected[1]).lower()}" in lines[0]


def test_one_epoch_with_the_fast_defaults_matches_float32_accuracy(real_data, tmp_path):
    """Same seed, one epoch of model=cnn: the defaults (bf16 autocast and NHWC on this CPU) against float32 NCHW."""

    def test_acc(name: str, *overrides: str) -> dict:
        cfg = compose_config(
            "model=cnn",
            "trainer.max_epochs=1",
            "trainer.num_sanity_val_steps=0",
            "seed=3",
            *overrides,
            *QUIET,
            output_dir=tmp_path / name,
        )
        train(cfg)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    fast = test_acc("defaults")
    plain = test_acc("float32", "trainer.precision=32-true", "module.channels_last=false")
    assert (plain["precision"], plain["channels_last"]) == ("32-true", False)
    assert (fast["precision"], fast["channels_last"]) == choose(training_device("auto"), convolutional=True)
    assert fast["test/images"] == plain["test/images"] == 10_000
    assert abs(fast["test/acc"] - plain["test/acc"]) <= 0.0015, (fast["test/acc"], plain["test/acc"])


def _gradients(net: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One bf16 backward pass of `net` in NHWC: (the gradient arriving at its max-pool, the weight gradients)."""
    pooled = []
    pool = next(m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d))

    def record(module, args, out):
        out.register_hook(pooled.append)

    pool.register_forward_hook(record)
    torch.manual_seed(0)  # the same dropout masks for every net
    x = torch.randn(8, 1, 28, 28).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), torch.arange(8))
    loss.backward()
    return pooled[0], [p.grad for p in net.parameters()]


def test_gradients_flow_back_through_flatten_in_nhwc_unchanged():
    """keep_gradients_channels_last: the layers before Flatten get their gradient NHWC, the same numbers."""
    plain, fast = (build_backbone("cnn").to(memory_format=torch.channels_last) for _ in range(2))
    fast.load_state_dict(plain.state_dict())
    keep_gradients_channels_last(fast)
    plain_pooled, plain_grads = _gradients(plain)
    fast_pooled, fast_grads = _gradients(fast)
    assert not plain_pooled.is_contiguous(memory_format=torch.channels_last)  # what the hook is for
    assert fast_pooled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast_pooled, plain_pooled)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, plain_grads))


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_the_shipped_optimizers_update_as_torchs_per_parameter_loop(optim, tmp_path):
    """conf/optim/ sets foreach=true for speed: the weights after a few steps must be the same bits."""
    cfg = compose_config(f"optim={optim}", output_dir=tmp_path).optim
    assert cfg.foreach is True
    weights = []
    for foreach in (True, False):
        torch.manual_seed(0)
        net = build_backbone("convpool")
        optimizer = build_optimizer(net, OmegaConf.merge(cfg, {"foreach": foreach}))
        for _ in range(5):
            for p in net.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(*weights)
