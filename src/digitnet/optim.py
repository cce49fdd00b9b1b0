"""Optimizer and LR schedule from the `optim` and `sched` config groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

from digitnet.errors import DigitnetError, check_number


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on norms, biases or layer scales (all 1-d)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """`cfg` is a Hydra partial of any torch optimizer class (`_target_: torch.optim.AdamW`, `_partial_: true`
    and its arguments); `weight_decay` applies to the weights only (`param_groups`)."""
    return instantiate(cfg)(param_groups(model, cfg.get("weight_decay", 0.0)))


# name -> function(optimizer, total_steps, **keys of conf/sched/<name>.yaml) -> LR scheduler or None
SCHEDULES: dict[str, Callable[..., LRScheduler | None]] = {}


def register_schedule(name: str):
    """Function decorator that makes an LR schedule buildable by name from config (`sched=<name>`).

    The function gets the optimizer, the run's planned optimizer steps and the other keys of
    `conf/sched/<name>.yaml` as keywords; it returns a scheduler stepped once per optimizer step
    (None: constant LR). It refuses impossible values with a DigitnetError, which config
    validation shows before any work.
    """

    def add(fn: Callable[..., LRScheduler | None]) -> Callable[..., LRScheduler | None]:
        SCHEDULES[name] = fn
        return fn

    return add


@register_schedule("none")
def constant(optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """The optimizer's LR throughout."""
    return None


@register_schedule("cosine")
def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_frac: float = 0.0,
    warmup_start_factor: float = 0.01,
    min_lr: float = 0.0,
) -> LRScheduler:
    """Linear warm-up over the first `warmup_frac` of the steps, then cosine decay to `min_lr`."""
    warmup = int(check_number("sched.warmup_frac", warmup_frac, lambda v: 0 <= v < 1, "in [0, 1)") * total_steps)
    start = check_number("sched.warmup_start_factor", warmup_start_factor, lambda v: 0 < v <= 1, "in (0, 1]")
    decay = CosineAnnealingLR(
        optimizer,
        T_max=max(1, total_steps - warmup),
        eta_min=check_number("sched.min_lr", min_lr, lambda v: v >= 0, ">= 0"),
    )
    if warmup == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=start, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


@register_schedule("onecycle")
def onecycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """OneCycle: the peak LR is the optimizer's, reached after `pct_start` of the steps."""
    pct_start = check_number("sched.pct_start", pct_start, lambda v: 0 < v <= 1, "in (0, 1]")
    if math.isclose(pct_start * total_steps, 1):  # torch divides by the warm-up's steps minus one
        pct_start = 0.5 / total_steps  # no warm-up: the cycle starts at its peak
    return OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=check_number("sched.div_factor", div_factor, lambda v: v > 0, "> 0"),
        final_div_factor=check_number("sched.final_div_factor", final_div_factor, lambda v: v > 0, "> 0"),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int) -> dict | None:
    """The schedule `cfg` names (`name` + its keys) for Lightning, stepped per optimizer step; None for a
    constant LR."""
    kwargs = {str(k): v for k, v in cfg.items()}
    name = kwargs.pop("name", "none")
    if name not in SCHEDULES:
        raise DigitnetError(f"sched.name={name!r} is not one of {sorted(SCHEDULES)}")
    try:
        scheduler = SCHEDULES[name](optimizer, total_steps, **kwargs)
    except TypeError as err:  # an unknown or missing key in conf/sched/<name>.yaml
        raise DigitnetError(f"bad settings for sched={name}: {err}") from None
    return None if scheduler is None else {"scheduler": scheduler, "interval": "step"}
