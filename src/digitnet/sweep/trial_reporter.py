"""Per-epoch reports from a training job to its Optuna trial (no Lightning needed here).

The job may run in another process or machine than the sweeper, so it reaches its trial
through the study's storage, by study name and trial number.
"""

from __future__ import annotations

from typing import Any

import optuna

from digitnet.sweep import compat
from digitnet.sweep.study import load_study, open_storage


class TrialReporter:
    """Reports ``monitor`` each epoch and raises ``optuna.TrialPruned`` when the pruner says so."""

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str, pruner: Any = "none") -> None:
        self.monitor = monitor
        rdb = open_storage(storage)
        self.trial = compat.trial_of(load_study(rdb, study_name, pruner=pruner), rdb, trial_number)

    def report(self, value: float, epoch: int) -> None:
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor}={value:.4g}")
