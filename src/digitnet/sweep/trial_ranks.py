"""DDP inside sweep trials: how a trial's processes 1.. find their trial.

Lightning starts them by re-running the command line of the trial's process, which in a sweep is
the whole ``-m`` command. While a trial runs, its process offers its Hydra job (task overrides and
run dir) in an environment variable that the started processes inherit; the sweeper of such a
process then runs that one job instead of a sweep.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TRIAL_JOB = "DIGITNET_SWEEP_TRIAL_JOB"


@contextmanager
def offered(job: dict[str, Any]) -> Iterator[None]:
    """Offer ``job`` to the processes Lightning starts while the block runs."""
    os.environ[TRIAL_JOB] = json.dumps(job)
    try:
        yield
    finally:
        os.environ.pop(TRIAL_JOB, None)


def is_offered() -> bool:
    """Whether this process runs a trial whose other processes will find it."""
    return TRIAL_JOB in os.environ


def job_of_this_rank() -> dict[str, Any] | None:
    """The trial job this process joins as a process that Lightning started, else None."""
    if TRIAL_JOB in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":  # the trial's own process is 0
        return json.loads(os.environ[TRIAL_JOB])
    return None
