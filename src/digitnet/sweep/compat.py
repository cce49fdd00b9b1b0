"""The Optuna and Hydra internals the sweeper relies on, in one place.

Written against optuna 5.1.0 and hydra-core 1.3.8. The rest of the sweeper uses public APIs only;
after upgrading either library, check these functions first (the sweep tests exercise each).
"""

from __future__ import annotations

from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number``: the public route to ``Trial._trial_id``."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def trial_of(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> optuna.Trial:
    """A handle on an existing trial, to report to and ask ``should_prune`` from another process.
    Optuna builds ``Trial`` objects itself in ``study.ask``; its constructor is not meant for users."""
    return optuna.Trial(study, trial_id(storage, study.study_name, number))


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_name: str) -> set[int]:
    """Ids of the RUNNING trials whose heartbeat is older than the grace period. Private in Optuna:
    the public ``fail_stale_trials`` would also end them, without the sweeper's error message."""
    return set(storage._get_stale_trial_ids(storage.get_study_id_from_name(study_name)))


def job_error(result: JobReturn) -> Any:
    """What a failed Hydra job raised, or None if it completed. The public ``JobReturn.return_value``
    re-raises it (and writes the job's overrides to stderr) instead of returning it."""
    return None if result.status == JobStatus.COMPLETED else result._return_value
