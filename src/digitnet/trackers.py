"""One adapter from a run's reports to every configured logger, each through its own API.

Lightning already sends every `self.log` curve to all loggers; what it has no common call for
goes through here: the config with the final metrics, matplotlib figures, image grids and files
(model.onnx, the best checkpoint). TensorBoard, MLflow and W&B each get them their own way; other
loggers (CSV) get what `log_hyperparams` / `log_metrics` carry. Only global rank 0 reports.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from digitnet.board import flatten, log_hparams

# `${relpath:${paths.output_dir}}`: a run's name in the trackers (conf/logger/), e.g. sweeps/<study>/3
OmegaConf.register_new_resolver("relpath", os.path.relpath, replace=True)


def numeric(metrics: Mapping) -> dict[str, float]:
    """The finite numbers of `metrics` (no paths, no flags)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


@rank_zero_only
def log_summary(loggers: Sequence[Logger], config: Mapping, final_metrics: Mapping, step: int) -> None:
    """The run's config as hyperparameters and its final numeric metrics at `step` (its last global step)."""
    final = numeric(final_metrics)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab wants its own session summaries
            log_hparams(logger, config, final, step)
        else:
            logger.log_hyperparams(flatten(config))
            logger.log_metrics(final, step)


@rank_zero_only
def log_figure(loggers: Sequence[Logger], tag: str, figure, step: int) -> None:
    """A matplotlib figure (confusion matrix, report plot) under `tag`; the figure is closed afterwards."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, step, close=False)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step_{step:06d}.png")
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.log_image(tag, [wandb.Image(figure)], step=step)
    plt.close(figure)


@rank_zero_only
def log_image(loggers: Sequence[Logger], tag: str, image: torch.Tensor, step: int) -> None:
    """An image [C,H,W] with values in [0, 1], e.g. a grid of training samples."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step)
        elif isinstance(logger, MLFlowLogger):
            pixels = (image.detach().cpu().permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            logger.experiment.log_image(logger.run_id, pixels, key=tag, step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [image], step=step)


@rank_zero_only
def log_artifact(loggers: Sequence[Logger], path: str | Path) -> None:
    """Keep a file (model.onnx, a checkpoint) with the run; TensorBoard runs keep theirs in the run dir."""
    path = Path(path)
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{run.id}-{path.name}"), type="model")
            artifact.add_file(str(path))
            run.log_artifact(artifact)


@rank_zero_only
def finish(loggers: Sequence[Logger], status: str = "success") -> None:
    """End the runs (a W&B run stays open in the process otherwise, and the next run would reuse it)."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=0 if status == "success" else 1)


@contextmanager
def finished_on_failure(loggers: Sequence[Logger]) -> Iterator[None]:
    """A run that raises (a bug, a pruned sweep trial) still ends its tracker runs, marked failed,
    so the next run in this process (a sweep's next trial) starts runs of its own."""
    try:
        yield
    except BaseException:
        finish(loggers, "failed")
        raise
