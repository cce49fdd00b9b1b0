"""Optimizer and LR schedule from the `optim` and `sched` config groups."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from hydra.utils import get_class
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on norms, biases or layer scales (all 1-d)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """`cfg` names any torch optimizer class (`_target_: torch.optim.AdamW`) and its arguments."""
    kwargs = dict(cfg)
    optimizer_class = get_class(kwargs.pop("_target_"))
    return optimizer_class(param_groups(model, kwargs.pop("weight_decay", 0.0)), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int) -> dict | None:
    """A per-step LR schedule for Lightning, or None for a constant LR."""
    name = cfg["name"]
    if name == "none":
        return None
    if name == "cosine":
        warmup = int(cfg.get("warmup_frac", 0.0) * total_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.get("min_lr", 0.0))
        scheduler = cosine
        if warmup > 0:
            ramp = LinearLR(optimizer, start_factor=cfg.get("warmup_start_factor", 0.01), total_iters=warmup)
            scheduler = SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    elif name == "onecycle":
        pct_start = cfg.get("pct_start", 0.25)
        if math.isclose(pct_start * total_steps, 1):  # torch divides by the warm-up's steps minus one
            pct_start = 0.5 / total_steps  # no warm-up: the cycle starts at its peak
        scheduler = OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct_start,
            div_factor=cfg.get("div_factor", 25.0),
            final_div_factor=cfg.get("final_div_factor", 1e4),
        )
    else:  # config validation names the choices before training starts
        raise ValueError(f"unknown schedule {name!r}")
    return {"scheduler": scheduler, "interval": "step"}
