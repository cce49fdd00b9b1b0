"""Lightning callback that reports a metric to an Optuna trial each epoch and prunes it.

The sweeper adds it to every trial's ``callbacks`` config (keys: TrialReporter's arguments).
"""

from __future__ import annotations

from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

from digitnet.errors import DigitnetError
from digitnet.sweep.trial_reporter import TrialReporter


class OptunaPruning(Callback):
    """After every validation epoch, report ``monitor`` to the trial; a pruned trial raises
    ``optuna.TrialPruned`` out of ``fit``. With ``pruner: none`` it only records the curve.

    Under DDP, global rank 0 reports and decides, and every process stops with the trial."""

    def __init__(self, **reporter_args: Any) -> None:
        self.reporter_args = reporter_args
        self.reporter: TrialReporter | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.reporter is None:
            self.reporter = TrialReporter(**self.reporter_args)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor = self.reporter_args["monitor"]
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise DigitnetError(
                f"pruning monitors {monitor!r} but training logged {logged}; set hydra.sweeper.monitor to one of those"
            )
        pruned = None
        if self.reporter is not None:
            try:
                self.reporter.report(float(value), trainer.current_epoch)
            except optuna.TrialPruned as err:
                pruned = str(err)
        pruned = trainer.strategy.broadcast(pruned)
        if pruned is not None:
            raise optuna.TrialPruned(pruned)
