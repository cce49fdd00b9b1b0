"""Checks of a composed config that turn impossible values into one clear message before training."""

from __future__ import annotations

from omegaconf import DictConfig

from digitnet.checkpoint import load_checkpoint_of
from digitnet.data.idx import DATASETS
from digitnet.errors import DigitnetError
from digitnet.models import BACKBONES

SCHEDULES = ("none", "cosine", "onecycle")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DigitnetError(message)


def validate(cfg: DictConfig) -> None:
    """Raise DigitnetError naming the key, its value and what would be valid."""
    data, optim = cfg.data, cfg.optim
    _require(data.name in DATASETS, f"data.name={data.name!r} is not one of {sorted(DATASETS)}")
    for key in ("batch_size", "eval_batch_size"):
        _require(int(data[key]) >= 1, f"data.{key}={data[key]} must be a positive integer")
    _require(float(data.val_size) > 0, f"data.val_size={data.val_size} must be a count >= 1 or a fraction in (0, 1)")
    _require(int(data.num_workers) >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    _require(len(data.class_names) >= 2, "data.class_names must list at least two classes")
    _require(cfg.model.get("name") in BACKBONES, f"model.name={cfg.model.get('name')!r} is not one of {sorted(BACKBONES)}")
    _require(float(optim.lr) > 0, f"optim.lr={optim.lr} must be positive")
    _require(float(optim.get("weight_decay", 0)) >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0")
    _require(cfg.sched.name in SCHEDULES, f"sched.name={cfg.sched.name!r} is not one of {list(SCHEDULES)}")
    _require(0 <= float(cfg.label_smoothing) < 1, f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    _require(cfg.ema_decay is None or 0 < float(cfg.ema_decay) < 1, f"ema_decay={cfg.ema_decay} must be in (0, 1) or null")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(float(cfg[key]) >= 0, f"{key}={cfg[key]} must be >= 0 (0 switches it off)")
    max_epochs = cfg.trainer.get("max_epochs")
    _require(max_epochs is None or int(max_epochs) >= 1 or int(max_epochs) == -1,
             f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 for no limit)")
    _require(cfg.ckpt_path is None or cfg.init_from is None,
             "set either ckpt_path (resume a run) or init_from (fine-tune from weights), not both")
    if cfg.ckpt_path is not None:  # Lightning would only read it once training starts
        load_checkpoint_of(cfg.ckpt_path, cfg.model.name, "ckpt_path")
