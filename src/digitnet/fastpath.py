"""Hardware-aware defaults: bf16 autocast and NHWC layout where the training device runs them natively.

`trainer.precision=auto` and `module.channels_last=auto` (the defaults) are decided once at the start of a run,
from the device Lightning trains on; a value set in a recipe or on the command line is kept as given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from digitnet.errors import DigitnetError
from digitnet.models import build_backbone

AUTO = "auto"
# CPU features with bf16 arithmetic in hardware (elsewhere oneDNN emulates bf16, and it is slower than float32)
NATIVE_BF16_CPU = ("avx512_bf16", "amx_bf16")
# devices whose convolution kernels prefer NHWC: oneDNN on CPUs, tensor cores on CUDA GPUs
NHWC_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Device:
    type: str  # the torch device type Lightning trains on: cpu, cuda, mps, ...
    bf16_native: bool  # computes bf16 in hardware, not emulated
    detail: str = ""  # what bf16_native rests on, for the log line


def choose(device: Device, convolutional: bool) -> tuple[str, bool]:
    """(trainer.precision, channels_last) for `device` and a network that is or is not convolutional."""
    precision = "bf16-mixed" if device.bf16_native else "32-true"
    return precision, convolutional and device.type in NHWC_DEVICES


def cpu_device(features: Iterable[str]) -> Device:
    """A CPU with these features (names as in /proc/cpuinfo flags)."""
    native = sorted(set(features) & set(NATIVE_BF16_CPU))
    return Device("cpu", bool(native), "+".join(native))


def _cpu_features() -> set[str]:
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()}


def training_device(accelerator: object) -> Device:
    """The device `trainer.accelerator` trains on, by Lightning's own choice for `auto` and `gpu`."""
    kind = str(accelerator)
    try:
        if kind == AUTO:
            kind = _AcceleratorConnector._choose_auto_accelerator()
        if kind == "gpu":
            kind = _AcceleratorConnector._choose_gpu_accelerator_backend()
    except MisconfigurationException:  # no GPU: Lightning says so when the trainer is built
        return Device(kind, False)
    if kind == "cpu":
        return cpu_device(_cpu_features())
    if kind == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Device("cuda", native, torch.cuda.get_device_name())
    return Device(kind, False)


def is_convolutional(model: DictConfig, num_classes: int) -> bool:
    net = build_backbone(num_classes=num_classes, **OmegaConf.to_container(model, resolve=True))
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def keep_gradients_channels_last(net: nn.Module) -> None:
    """Make the gradient that flows back through each nn.Flatten NHWC again.

    Flatten's backward hands an NCHW gradient to the NHWC layers before it, and their backward kernels then
    convert every tensor they touch (max-pooling's backward, e.g., runs about twice as slow); one conversion of
    the gradient here saves them. The gradients are the same, bit for bit.
    """

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        (x,) = args
        if x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))

    for module in net.modules():
        if isinstance(module, nn.Flatten):
            module.register_forward_pre_hook(hook)


def settle(cfg: DictConfig) -> str:
    """Replace `auto` in trainer.precision and module.channels_last by this machine's choice; returns the log line."""
    precision, channels_last = cfg.trainer.get("precision"), cfg.module.channels_last
    if channels_last not in (True, False, AUTO):
        raise DigitnetError(f"module.channels_last={channels_last} must be true, false or auto")
    notes = []
    if AUTO in (precision, channels_last):
        device = training_device(cfg.trainer.get("accelerator", AUTO))
        convolutional = is_convolutional(cfg.model, len(cfg.data.class_names))
        chosen = choose(device, convolutional)
        if precision == AUTO:
            cfg.trainer.precision = precision = chosen[0]
            native = "native" if device.bf16_native else "no native"
            notes.append(
                f"precision: {device.type} has {native} bf16" + (f" ({device.detail})" if device.detail else "")
            )
        if channels_last == AUTO:
            cfg.module.channels_last = channels_last = chosen[1]
            kind = "a convolutional" if convolutional else "no convolutional"
            notes.append(f"channels_last: {kind} network on {device.type}")
    why = f"auto, {'; '.join(notes)}" if notes else "as set"
    return f"training precision={precision} channels_last={str(channels_last).lower()} ({why})"
