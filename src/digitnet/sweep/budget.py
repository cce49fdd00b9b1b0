"""A study-wide trial budget that any number of workers share exactly.

The budget is the trial numbers ``0 .. n_trials-1``. Optuna numbers trials densely and
atomically across processes, so a worker asks for a trial and keeps it only if its number
is inside the budget. A trial that lands outside (two workers raced for the last slot) is
handed back as WAITING: it never runs now, and a later sweep with a larger ``n_trials``
picks it up first. Every trial inside the budget ends COMPLETE, PRUNED or FAIL: a worker
that dies holding one stops sending heartbeats and the others mark it FAIL.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter

import optuna
from optuna.trial import TrialState

from digitnet.sweep import compat

log = logging.getLogger(__name__)


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker stopped sending heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def state_counts(study: optuna.Study, n_trials: int) -> Counter[TrialState]:
    """How many trials of the budget are in each state."""
    trials = study.get_trials(deepcopy=False)
    return Counter(t.state for t in trials if t.number < n_trials)


def claim_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, n_trials: int) -> optuna.Trial | None:
    """A new RUNNING trial inside the budget, or None once every budget slot is taken."""
    trials = study.get_trials(deepcopy=False)
    waiting_in_budget = any(t.state == TrialState.WAITING and t.number < n_trials for t in trials)
    if len(trials) >= n_trials and not waiting_in_budget:
        return None
    with warnings.catch_warnings():
        # Optuna expects heartbeats only under study.optimize; the sweeper sends its own.
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        trial = study.ask()
    if trial.number < n_trials:
        return trial
    # Lost the race for the last slot: give the trial back untouched (no params sampled yet).
    storage.set_trial_state_values(compat.trial_id(storage, study.study_name, trial.number), TrialState.WAITING)
    return None


def wait_for_running(study: optuna.Study, n_trials: int, poll_seconds: float) -> None:
    """Block until no budget trial is RUNNING (other workers finish theirs, dead ones go stale)."""
    announced = False
    while running := state_counts(study, n_trials)[TrialState.RUNNING]:
        if not announced:
            log.info("waiting for %d trial(s) still running in other workers", running)
            announced = True
        time.sleep(poll_seconds)
        fail_stale_trials(study)
