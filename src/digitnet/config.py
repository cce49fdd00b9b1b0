"""Checks of a composed config that turn impossible values into one clear message before training."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

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
    if cfg.ckpt_path is not None:
        check_checkpoint(cfg.ckpt_path, cfg.model.name)


def check_checkpoint(path: str, model_name: str | None = None) -> dict:
    """Load a checkpoint's hyperparameters, checking it is a digitnet checkpoint (of `model_name`)."""
    file = Path(path)
    _require(file.is_file(), f"checkpoint {file} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, a text file...
        raise DigitnetError(f"{file} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    _require(
        isinstance(hparams, dict) and "model" in hparams and "state_dict" in ckpt,
        f"{file} is not a digitnet checkpoint (no digitnet hyperparameters in it)",
    )
    trained = hparams["model"].get("name")
    _require(
        model_name is None or trained == model_name,
        f"{file} holds a model={trained} checkpoint but this run builds model={model_name}; "
        f"add model={trained} to the command",
    )
    return hparams
