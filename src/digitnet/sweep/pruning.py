"""Lightning callback that reports a metric to an Optuna trial each epoch and prunes it.

The sweeper adds it to every trial's ``callbacks`` config, so it runs in the training job
(possibly another process or machine) and reaches the trial through the study's storage.
"""

from __future__ import annotations

from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

from digitnet.errors import DigitnetError
from digitnet.sweep.study import load_study


class OptunaPruning(Callback):
    """Report ``monitor`` after every validation epoch; raise ``optuna.TrialPruned`` when the
    study's pruner says so. With ``pruner: none`` it only records the learning curve."""

    def __init__(
        self, storage: str, study_name: str, trial_number: int, monitor: str, pruner: Any = "none"
    ) -> None:
        self.monitor = monitor
        study = load_study(storage, study_name, pruner=pruner)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, trial_number
        )
        self.trial = optuna.Trial(study, trial_id)

    def report(self, value: float, epoch: int) -> None:
        """Record ``value`` for ``epoch``; raise TrialPruned if the pruner stops the trial."""
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor}={value:.4g}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise DigitnetError(
                f"pruning monitors {self.monitor!r} but training logged {logged}; "
                "set hydra.sweeper.monitor to one of those"
            )
        self.report(float(value), trainer.current_epoch)
