"""Lightning callback that reports a metric to an Optuna trial each epoch and prunes it.

The sweeper adds it to every trial's ``callbacks`` config (keys: TrialReporter's arguments).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from digitnet.errors import DigitnetError
from digitnet.sweep.trial_reporter import TrialReporter


class OptunaPruning(Callback):
    """After every validation epoch, report ``monitor`` to the trial; a pruned trial raises
    ``optuna.TrialPruned`` out of ``fit``. With ``pruner: none`` it only records the curve."""

    def __init__(self, **reporter_args: Any) -> None:
        self.reporter = TrialReporter(**reporter_args)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor = self.reporter.monitor
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise DigitnetError(
                f"pruning monitors {monitor!r} but training logged {logged}; "
                "set hydra.sweeper.monitor to one of those"
            )
        self.reporter.report(float(value), trainer.current_epoch)
