"""Per-epoch reports from a training job to its Optuna trial (no Lightning needed here).

The job may run in another process or machine than the sweeper, so it reaches its trial
through the study's storage, by study name and trial number.
"""

from __future__ import annotations

from typing import Any

import optuna

from digitnet.sweep.study import load_study


class TrialReporter:
    """Reports ``monitor`` each epoch and raises ``optuna.TrialPruned`` when the pruner says so."""

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
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor}={value:.4g}")
