"""The task function as one Optuna trial, wherever the launcher runs it (this process, a joblib
worker, a SLURM node).

The job itself stores its outcome in the study (user attr ``outcome``) through the study's
storage, and keeps the trial's heartbeat while it runs, so the sweeper learns each trial's result
even when the launcher loses the job's return value (submitit raises for a whole batch when one
of its jobs was cancelled).

A trial run by the sweep's own process (the basic launcher) may train in several processes: it
offers its job to the processes Lightning starts (digitnet.sweep.trial_ranks).
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.types import TaskFunction
from omegaconf import DictConfig, OmegaConf

from digitnet.sweep import compat, trial_ranks
from digitnet.sweep.study import heartbeat, open_storage

OUTCOME = "outcome"  # user attr: {"state": "COMPLETE", "values": [...]} / PRUNED / FAIL + error
WORKER = "worker"  # user attr "<host>:<pid>", set once the job starts
TORCH_THREADS = "torch_threads"  # user attr: torch's threads in the job, when the sweeper set them
JOB = "job"  # user attr: the launcher's job id (hydra.job.id, e.g. the SLURM job of submitit)


@dataclass
class StudyAccess:
    """Where the job finds its trial; set by the sweeper before it launches any."""

    storage_url: str
    name: str
    n_objectives: int
    heartbeat_interval: int
    grace_period: int
    torch_threads: int | None = None  # limit per job when jobs share a machine's cores
    sweeper_pid: int = 0  # the sweep's process: Lightning re-runs its command line for DDP ranks


class TrialTask:
    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function
        self.study: StudyAccess | None = None

    def __call__(self, cfg: DictConfig) -> Any:
        assert self.study is not None, "the sweeper sets the study before launching"
        study = self.study
        storage = open_storage(study.storage_url, study.heartbeat_interval, study.grace_period)
        trial_id = self._start(storage)

        def store(outcome: dict[str, Any]) -> None:
            storage.set_trial_user_attr(trial_id, OUTCOME, outcome)

        in_sweep_process = os.getpid() == study.sweeper_pid
        with heartbeat(storage, trial_id), trial_ranks.offered(_job()) if in_sweep_process else nullcontext():
            try:
                returned = self.task_function(cfg)
            except optuna.TrialPruned:
                store({"state": "PRUNED"})
                raise
            except Exception as err:
                store({"state": "FAIL", "error": f"{type(err).__name__}: {err}"})
                raise
            store(self._returned(returned))
        return returned

    def _start(self, storage: optuna.storages.BaseStorage) -> int:
        """This job's trial id, after checking the trial still waits for it and noting who runs it."""
        assert self.study is not None
        hydra = HydraConfig.get()
        number = int(hydra.sweep.subdir)  # the sweeper puts trial k in <sweep dir>/k
        trial_id = compat.trial_id(storage, self.study.name, number)
        state = storage.get_trial(trial_id).state
        if state.is_finished():  # e.g. a queued job the sweeper already gave up on
            raise RuntimeError(f"trial {number} already ended as {state.name}")
        threads = self._limit_torch_threads()
        if threads is not None:
            storage.set_trial_user_attr(trial_id, TORCH_THREADS, threads)
        storage.set_trial_user_attr(trial_id, JOB, hydra.job.id)
        storage.set_trial_user_attr(trial_id, WORKER, f"{socket.gethostname()}:{os.getpid()}")
        return trial_id

    def _returned(self, returned: Any) -> dict[str, Any]:
        assert self.study is not None
        try:
            return {"state": "COMPLETE", "values": objective_values(returned, self.study.n_objectives)}
        except ValueError as err:
            return {"state": "FAIL", "error": str(err)}

    def _limit_torch_threads(self) -> int | None:
        """The job's torch threads once limited, or None when the task does not use torch (train.py
        imports it; importing it here would cost seconds) or needs no limit."""
        threads = self.study.torch_threads if self.study else None
        torch = sys.modules.get("torch")
        if not threads or torch is None:
            return None
        torch.set_num_threads(threads)
        return torch.get_num_threads()


def _job() -> dict[str, Any]:
    """This Hydra job, as the trial's other DDP processes need it to compose the same config."""
    hydra = HydraConfig.get()
    return {
        "overrides": OmegaConf.to_container(hydra.overrides.task),
        "run_dir": hydra.runtime.output_dir,
        "id": hydra.job.id,
        "num": hydra.job.num,
    }


def objective_values(returned: Any, n_objectives: int) -> list[float]:
    """The task function's return value as ``n_objectives`` finite floats."""
    if returned is None:
        raise ValueError("the task returned None instead of the optimized metric's value")
    is_list = isinstance(returned, Sequence) and not isinstance(returned, str)
    items = list(returned) if is_list else [returned]
    if len(items) != n_objectives:
        raise ValueError(f"the task returned {len(items)} value(s) for {n_objectives} sweep direction(s)")
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"the task returned {returned!r}, not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the task returned {values}: the objective must be finite")
    return values
