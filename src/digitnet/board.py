"""A run's row in TensorBoard's HPARAMS tab: its config and its final metrics.

The hparams plugin shows, per run holding a session-start summary, the last value of each
scalar tag of that run. So the final metrics that Lightning did not log already go in as
scalars at the run's last step (never at step 0: a step going back makes TensorBoard drop the
curves before it), followed by the session summaries. There is no experiment summary: without
one, TensorBoard builds the table's columns from all runs under the logdir (with one, the
columns would be those of whichever run it read first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries


def flatten(config: Mapping, prefix: str = "") -> dict[str, float | str]:
    """{"optim.lr": 0.003, "model.name": "cnn", "model.widths": "[32, 64]", ...}: the override keys."""
    flat: dict[str, float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, bool):
            flat[name] = str(value).lower()
        elif isinstance(value, (int, float)):
            flat[name] = value
        elif value is not None:  # lists and strings as text
            flat[name] = str(value)
    return flat


def log_hparams(logger: TensorBoardLogger, config: Mapping, final_metrics: Mapping, step: int) -> None:
    """Write `config` as the run's hyperparameters and the numeric `final_metrics` at `step`."""
    writer = logger.experiment  # reopens a new events file if the trainer closed it
    for tag, value in final_metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(tag, value, step)
    _, session_start, session_end = hparams_summaries(flatten(config), {})
    for summary in (session_start, session_end):
        writer._get_file_writer().add_summary(summary, step)  # as SummaryWriter.add_hparams does
    writer.close()
