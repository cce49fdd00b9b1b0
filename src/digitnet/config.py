"""Checks of a composed config that turn impossible values into one clear message before any work."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from digitnet.checkpoint import load_checkpoint_of
from digitnet.data.idx import DATASETS
from digitnet.errors import DigitnetError
from digitnet.models import BACKBONES

SCHEDULES = ("none", "cosine", "onecycle")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DigitnetError(message)


def _number(cfg: DictConfig, key: str, integer: bool = False) -> float:
    """The value at dotted `key` as a number (an int if `integer`); a typo such as `lr=1e-3x` is refused by name."""
    value = OmegaConf.select(cfg, key)
    try:
        number = float(value)  # numeric strings too, e.g. from an ${oc.env:...} interpolation
    except (TypeError, ValueError):
        number = math.nan
    kind = "an integer" if integer else "a number"
    _require(not isinstance(value, bool) and not math.isnan(number) and (not integer or number.is_integer()),
             f"{key}={value} must be {kind}")
    return int(number) if integer else number


def validate(cfg: DictConfig) -> None:
    """Raise DigitnetError naming the key, its value and what would be valid."""
    data, optim = cfg.data, cfg.optim
    _require(data.name in DATASETS, f"data.name={data.name!r} is not one of {sorted(DATASETS)}")
    for key in ("batch_size", "eval_batch_size"):
        _require(_number(cfg, f"data.{key}", integer=True) >= 1, f"data.{key}={data[key]} must be a positive integer")
    _require(_number(cfg, "data.val_size") > 0, f"data.val_size={data.val_size} must be a count >= 1 or a fraction in (0, 1)")
    _require(_number(cfg, "data.num_workers", integer=True) >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    _require(len(data.class_names) >= 2, "data.class_names must list at least two classes")
    _require(cfg.model.get("name") in BACKBONES, f"model.name={cfg.model.get('name')!r} is not one of {sorted(BACKBONES)}")
    _require(_number(cfg, "optim.lr") > 0, f"optim.lr={optim.lr} must be positive")
    _require("weight_decay" not in optim or _number(cfg, "optim.weight_decay") >= 0,
             f"optim.weight_decay={optim.get('weight_decay')} must be >= 0")
    _require(cfg.sched.name in SCHEDULES, f"sched.name={cfg.sched.name!r} is not one of {list(SCHEDULES)}")
    _require(0 <= _number(cfg, "label_smoothing") < 1, f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    _require(cfg.ema_decay is None or 0 < _number(cfg, "ema_decay") < 1, f"ema_decay={cfg.ema_decay} must be in (0, 1) or null")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(_number(cfg, key) >= 0, f"{key}={cfg[key]} must be >= 0 (0 switches it off)")
    max_epochs = cfg.trainer.get("max_epochs")
    _require(max_epochs is None or _number(cfg, "trainer.max_epochs", integer=True) >= 1 or max_epochs == -1,
             f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 for no limit)")
    _require(cfg.ckpt_path is None or cfg.init_from is None,
             "set either ckpt_path (resume a run) or init_from (fine-tune from weights), not both")
    if cfg.ckpt_path is not None:  # Lightning would only read it once training starts
        load_checkpoint_of(cfg.ckpt_path, cfg.model.name, "ckpt_path")


def validate_eval(cfg: DictConfig) -> None:
    """The same for `python eval.py`: its counts and switches, before the model and data are loaded."""
    _require(cfg.data.limit is None or _number(cfg, "data.limit", integer=True) >= 1,
             f"data.limit={cfg.data.limit} must be a positive integer or null (all test images)")
    for key, low in (("calibration_bins", 1), ("gallery_size", 0), ("confused_pairs", 0), ("seed", 0)):
        _require(_number(cfg, key, integer=True) >= low, f"{key}={cfg[key]} must be an integer >= {low}")
    _require(isinstance(cfg.tta_hflip, bool), f"tta_hflip={cfg.tta_hflip} must be true or false")
