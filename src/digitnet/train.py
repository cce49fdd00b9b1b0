"""One training run: fit, test the best checkpoint, write metrics.json, return the optimised metric."""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from digitnet import trackers
from digitnet.atomic import write_atomically
from digitnet.checkpoint import AtomicCheckpointIO, checkpoint_file, checkpoint_spec, load_checkpoint_of
from digitnet.config import instantiate_checked, validate
from digitnet.console import config_log, config_tree, result_line
from digitnet.errors import DigitnetError
from digitnet.fastpath import settle
from digitnet.module import DigitClassifier
from digitnet.registry import record_run
from digitnet.sweep.trial_processes import trial_processes

log = logging.getLogger(__name__)


def _instantiate_all(cfg: DictConfig, key: str) -> list:
    """Every entry of config dict `key` that has a `_target_` (entries set to null are switched off)."""
    group = cfg.get(key) or {}
    return [instantiate_checked(c, f"{key}.{name}") for name, c in group.items() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig) -> DigitClassifier:
    """The LightningModule from the model, optim, sched and aug groups, the data's classes and every
    key of the `module` group (its training options, keywords of DigitClassifier); `auto` settings are
    settled first, as `settle` does."""
    settle(cfg)
    inputs = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "optim", "sched", "aug")}
    inputs |= {"class_names": list(cfg.data.class_names), "data_name": cfg.data.name}
    options = OmegaConf.to_container(cfg.module, resolve=True)
    known = sorted(set(inspect.signature(DigitClassifier).parameters) - set(inputs))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DigitnetError(f"module.{unknown[0]} is not a training option; the options are {known}")
    return DigitClassifier(**inputs, **options)


def init_weights(module: DigitClassifier, path: str) -> None:
    """Fine-tuning: start from the weights of a trained checkpoint of the same model."""
    trained = load_checkpoint_of(path, module.hparams.model["name"], "init_from")
    try:
        module.net.load_state_dict(trained.net.state_dict())
    except RuntimeError as err:  # other layer sizes or number of classes
        reason = str(err).strip().splitlines()[-1].strip()
        raise DigitnetError(
            f"init_from={path} does not fit this run's model {dict(module.hparams.model)} "
            f"with {len(module.hparams.class_names)} classes: {reason}"
        ) from None
    log.info("initialised the weights from %s", path)


def use_registry_checkpoints(cfg: DictConfig) -> None:
    """ckpt_path / init_from may name a registry model: its stored checkpoint, copied into the run dir."""
    for key in ("ckpt_path", "init_from"):
        if cfg[key] is not None:
            cfg[key] = checkpoint_file(checkpoint_spec(key, cfg[key]), cfg.registry.url, Path(cfg.paths.output_dir))


def _scalars(trainer: L.Trainer) -> dict:
    return {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _final_metrics(
    trainer: L.Trainer, module: DigitClassifier, fit_metrics: dict, fit_seconds: float, channels_last: bool
) -> dict:
    metrics = {**fit_metrics, **_scalars(trainer)}
    metrics.update(
        epochs=trainer.current_epoch,
        train_seconds=round(fit_seconds, 3),
        precision=trainer.precision,  # what trainer.precision=auto and module.channels_last=auto chose
        channels_last=channels_last,
        params=sum(p.numel() for p in module.parameters()),
        best_checkpoint=trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
    )
    for callback in trainer.callbacks:  # e.g. the ONNX export adds its verification results
        metrics.update(getattr(callback, "run_metrics", {}))
    return metrics


def _publish(cfg: DictConfig, trainer: L.Trainer, loggers: list, metrics: dict, logged: set, run_dir: Path) -> None:
    """A finished run's outputs (once per run, by global rank 0): metrics.json, the registry record, the
    loggers' summary (the config with the final metrics not `logged` as curves already, model.onnx and the
    best checkpoint) and the result line."""
    write_atomically(run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    if cfg.registry.enabled and not trainer.fast_dev_run:  # a smoke test leaves no model to keep
        record_id = record_run(cfg.registry.url, OmegaConf.to_container(cfg, resolve=True), metrics, run_dir)
        log.info("recorded as model %s in the registry (`digitnet models show %s`)", record_id, record_id[:8])
    if not trainer.fast_dev_run:
        final = {k: v for k, v in metrics.items() if k not in logged}
        trackers.log_summary(loggers, OmegaConf.to_container(cfg, resolve=True), final, trainer.global_step)
        for path in (metrics.get("onnx/path"), metrics["best_checkpoint"]):
            if path:
                trackers.log_artifact(loggers, path)
        trackers.finish(loggers)
    log.info(result_line(metrics, trainer.fast_dev_run, cfg.test))
    log.info("run dir: %s", run_dir.resolve())


def train(cfg: DictConfig) -> float | list[float]:
    """Train as `cfg` says; returns `cfg.optimized_metric` (a list of values for a list of metrics)."""
    use_registry_checkpoints(cfg)
    validate(cfg)
    log.info(settle(cfg))
    if cfg.print_config:
        config_log.info("%s", config_tree(cfg))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate_checked(cfg.data, "data")
    module = build_module(cfg)
    if cfg.init_from is not None:
        init_weights(module, cfg.init_from)
    loggers = _instantiate_all(cfg, "logger")
    callbacks = _instantiate_all(cfg, "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress-bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # nothing for the LR monitor to write to (Lightning refuses it then)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate_checked(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=run_dir,
        plugins=[AtomicCheckpointIO()],
    )
    with trial_processes(trainer), trackers.finished_on_failure(loggers):
        start = time.perf_counter()
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        fit_seconds = time.perf_counter() - start
        # testing replaces the trainer's metrics; a run resumed after its last epoch logged none
        fit_metrics = _scalars(trainer) or module.checkpoint_metrics
        if cfg.test:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(module, datamodule, ckpt_path=best or None, verbose=False)

        # under DDP every process has the synced test metrics, but only rank 0 exported the ONNX model and its
        # clock ran from its own start: its metrics are the run's, and what every process returns
        metrics = trainer.strategy.broadcast(
            _final_metrics(trainer, module, fit_metrics, fit_seconds, cfg.module.channels_last)
        )
        if trainer.is_global_zero:
            logged = set(fit_metrics) | set(_scalars(trainer))  # already in the loggers, as curves
            _publish(cfg, trainer, loggers, metrics, logged, run_dir)

    wanted = [cfg.optimized_metric] if isinstance(cfg.optimized_metric, str) else list(cfg.optimized_metric)
    unknown = [name for name in wanted if name not in metrics]
    if unknown:
        raise DigitnetError(f"optimized_metric {unknown} not among this run's metrics: {sorted(metrics)}")
    values = [metrics[name] for name in wanted]
    return values[0] if isinstance(cfg.optimized_metric, str) else values
