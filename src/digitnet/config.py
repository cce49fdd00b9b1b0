"""Checks of a composed config that turn impossible values into one clear message before any work."""

from __future__ import annotations

import functools
import math

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from digitnet.atomic import unwritable
from digitnet.checkpoint import load_checkpoint_of
from digitnet.data.idx import DATASETS
from digitnet.errors import DigitnetError
from digitnet.models import BACKBONES, build_backbone
from digitnet.optim import build_optimizer, build_scheduler
from digitnet.registry import check_recordable


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
    _require(
        not isinstance(value, bool) and not math.isnan(number) and (not integer or number.is_integer()),
        f"{key}={value} must be {kind}",
    )
    return int(number) if integer else number


def instantiate_checked(node: DictConfig, key: str, **kwargs):
    """Hydra's instantiate, where a class refusing its arguments (Lightning's Trainer, a callback, a logger...)
    becomes a one-line DigitnetError naming the config key, with the library's own message."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        reason = " ".join(str(err.__cause__ or err).split())
        raise DigitnetError(f"{key}: {reason}") from None


# What DigitClassifier logs while fitting: the metrics a callback can monitor.
FIT_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")
# group -> key -> (integer?, test, what is valid); keys that are absent or null are left to the defaults
RULES = {
    "trainer": {
        "limit_train_batches": (False, lambda v: v > 0, "> 0: a number of batches or a fraction in (0, 1]"),
        "limit_val_batches": (False, lambda v: v > 0, "> 0: validation picks the best checkpoint"),
        "val_check_interval": (False, lambda v: v > 0, "> 0: a fraction of an epoch or a number of batches"),
        "max_steps": (True, lambda v: v >= 1 or v == -1, ">= 1 (or -1: no limit)"),
        "accumulate_grad_batches": (True, lambda v: v >= 1, ">= 1"),
        "gradient_clip_val": (False, lambda v: v >= 0, ">= 0 (or null: no clipping)"),
        "log_every_n_steps": (True, lambda v: v >= 1, ">= 1"),
        "min_epochs": (True, lambda v: v >= 0, ">= 0 (or null)"),
        "check_val_every_n_epoch": (True, lambda v: v >= 1, ">= 1"),
        "num_sanity_val_steps": (True, lambda v: v >= -1, ">= 0 (or -1: all of them)"),
    },
    "callbacks.early_stopping": {"patience": (True, lambda v: v >= 0, ">= 0")},
    "callbacks.onnx_export": {"test_images": (True, lambda v: v >= 1, ">= 1 (or null: all of them)")},
}


def _check_rules(cfg: DictConfig, group: str) -> None:
    node = OmegaConf.select(cfg, group)
    for key, (integer, ok, valid) in RULES[group].items():
        if node is not None and node.get(key) is not None:
            _require(ok(_number(cfg, f"{group}.{key}", integer)), f"{group}.{key}={node[key]} must be {valid}")


def _switch(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key, default=False)  # a trainer config may leave its switches out
    _require(isinstance(value, bool), f"{key}={value} must be true or false")


def _check_added_keys(cfg: DictConfig) -> None:
    """`+key=value` on the command line adds a top-level key that no code reads, e.g. a training
    option under its old name: refuse it rather than train without it."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    for override in hydra.overrides.task:
        key = override.lstrip("+").split("=", 1)[0]
        if override.startswith("+") and "." not in key and "/" not in key and key not in hydra.runtime.choices:
            hint = f"the option is module.{key}" if key in cfg.module else "`--cfg job` lists the config's keys"
            raise DigitnetError(f"{override} adds a key that nothing reads; {hint}")


def validate(cfg: DictConfig) -> None:
    """Raise DigitnetError naming the key, its value and what would be valid."""
    _check_added_keys(cfg)
    seed = _number(cfg, "seed", integer=True)
    _require(0 <= seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32)")
    for key in (
        "test",
        "registry.enabled",
        "data.download",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
    ):
        _switch(cfg, key)
    _validate_data(cfg)
    _require(
        cfg.model.get("name") in BACKBONES, f"model.name={cfg.model.get('name')!r} is not one of {sorted(BACKBONES)}"
    )
    _validate_optim(cfg)
    # a trial build on a one-parameter optimizer: the schedule refuses its own impossible values
    build_scheduler(
        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
        OmegaConf.to_container(cfg.sched, resolve=True),
        total_steps=100,
    )
    for group in RULES:
        _check_rules(cfg, group)
    _validate_epochs(cfg)
    _validate_metrics(cfg)
    _require(
        cfg.ckpt_path is None or cfg.init_from is None,
        "set either ckpt_path (resume a run) or init_from (fine-tune from weights), not both",
    )
    if cfg.ckpt_path is not None:  # Lightning would only read it once training starts
        _require_resumable(load_checkpoint_of(cfg.ckpt_path, cfg.model.name, "ckpt_path"), cfg)
    _validate_output_folders(cfg)
    if cfg.registry.enabled and not cfg.trainer.get("fast_dev_run"):  # train() records only real runs
        check_registry(cfg.registry.url)


def _validate_epochs(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    max_epochs = trainer.get("max_epochs")
    _require(
        max_epochs is None or _number(cfg, "trainer.max_epochs", integer=True) >= 1 or max_epochs == -1,
        f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 for no limit)",
    )
    _require(
        max_epochs != -1 or trainer.get("max_steps", -1) not in (None, -1),
        "trainer.max_epochs=-1 (no epoch limit) needs +trainer.max_steps=<steps>: "
        "the LR schedule and the checkpoints plan with the number of steps",
    )


def _validate_metrics(cfg: DictConfig) -> None:
    """What callbacks monitor must be logged while fitting; optimized_metric must be one name or a list."""
    for name, callback in (cfg.get("callbacks") or {}).items():
        monitor = callback.get("monitor") if callback is not None else None
        _require(
            monitor is None or monitor in FIT_METRICS,
            f"callbacks.{name}.monitor={monitor} is not a metric of training; choose one of {list(FIT_METRICS)}",
        )
    metric = cfg.optimized_metric
    _require(
        isinstance(metric, str)
        or (isinstance(metric, ListConfig) and len(metric) > 0 and all(isinstance(m, str) for m in metric)),
        f"optimized_metric={metric} must be a metric name or a list of them (e.g. val/acc_best)",
    )


def _validate_output_folders(cfg: DictConfig) -> None:
    """Checkpoint and logger folders must be writable: they would fail only once training writes them."""
    for group, key in (("callbacks", "dirpath"), ("logger", "save_dir")):
        for name, node in (cfg.get(group) or {}).items():
            folder = node.get(key) if node is not None else None
            blocker = unwritable(folder) if folder is not None else None
            _require(
                blocker is None,
                f"{group}.{name}.{key}={folder} cannot be written: {blocker} is not "
                f"a folder you can write; set {group}.{name}.{key} to one of yours",
            )


def _require_resumable(trained: nn.Module, cfg: DictConfig) -> None:
    """Resuming restores every weight, so this run's network needs the checkpoint's layer sizes and classes."""
    model, classes = OmegaConf.to_container(cfg.model, resolve=True), len(cfg.data.class_names)
    net = build_backbone(num_classes=classes, **model)
    if _shapes(net) == _shapes(trained.net):
        return
    saved, saved_classes = trained.hparams.model, len(trained.hparams.class_names)
    changes = [f"model.{k}={saved[k]} (this run: {v})" for k, v in model.items() if k in saved and saved[k] != v]
    if saved_classes != classes:
        changes.append(f"{saved_classes} classes (this run: {classes}, data.class_names)")
    raise DigitnetError(
        f"ckpt_path={cfg.ckpt_path} does not fit this run's network: the checkpoint has "
        f"{', '.join(changes) or 'other layer sizes'}; resume with the checkpoint's settings"
    )


def _shapes(net: nn.Module) -> list[tuple[int, ...]]:
    """The shapes of all weights and buffers, in order (the standardising first layer has none)."""
    return [tuple(tensor.shape) for tensor in net.state_dict().values()]


def _validate_data(cfg: DictConfig) -> None:
    data = cfg.data
    _require(data.name in DATASETS, f"data.name={data.name!r} is not one of {sorted(DATASETS)}")
    for key in ("batch_size", "eval_batch_size"):
        _require(_number(cfg, f"data.{key}", integer=True) >= 1, f"data.{key}={data[key]} must be a positive integer")
    _require(
        _number(cfg, "data.val_size") > 0, f"data.val_size={data.val_size} must be a count >= 1 or a fraction in (0, 1)"
    )
    _require(_number(cfg, "data.num_workers", integer=True) >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    _number(cfg, "data.seed", integer=True)
    names = data.class_names
    _require(
        isinstance(names, ListConfig) and len(names) >= 2 and len(set(names)) == len(names),
        f"data.class_names={names} must be a list of at least two different names",
    )


def _validate_optim(cfg: DictConfig) -> None:
    """The optimizer class must import, and accept its arguments (tried on a one-parameter model)."""
    _require(_number(cfg, "optim.lr") > 0, f"optim.lr={cfg.optim.lr} must be positive")
    _require(
        "weight_decay" not in cfg.optim or _number(cfg, "optim.weight_decay") >= 0,
        f"optim.weight_decay={cfg.optim.get('weight_decay')} must be >= 0",
    )
    target = cfg.optim.get("_target_")
    try:
        factory = instantiate(cfg.optim)
    except InstantiationException:  # no such class
        factory = None
    _require(
        isinstance(factory, functools.partial)
        and isinstance(factory.func, type)
        and issubclass(factory.func, torch.optim.Optimizer),
        f"optim._target_={target} is not an optimizer class (e.g. torch.optim.AdamW, torch.optim.SGD) "
        "with _partial_: true",
    )
    try:
        build_optimizer(nn.Linear(1, 1), OmegaConf.to_container(cfg.optim, resolve=True))
    except (TypeError, ValueError) as err:  # e.g. betas out of range, nesterov without momentum, unknown keys
        raise DigitnetError(f"optim: {' '.join(str(err).split())}") from None


def check_registry(url: str) -> None:
    """A bad registry.url would otherwise show only after training; the check creates no database file."""
    try:
        check_recordable(url)
    except DigitnetError as err:
        raise DigitnetError(f"registry.url: {err}") from None


def validate_eval(cfg: DictConfig) -> None:
    """The same for `python eval.py`: its counts and switches, before the model and data are loaded."""
    _require(
        cfg.data.limit is None or _number(cfg, "data.limit", integer=True) >= 1,
        f"data.limit={cfg.data.limit} must be a positive integer or null (all test images)",
    )
    for key, low in (("calibration_bins", 1), ("gallery_size", 0), ("confused_pairs", 0), ("seed", 0)):
        _require(_number(cfg, key, integer=True) >= low, f"{key}={cfg[key]} must be an integer >= {low}")
    _require(isinstance(cfg.tta_hflip, bool), f"tta_hflip={cfg.tta_hflip} must be true or false")
