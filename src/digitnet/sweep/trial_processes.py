"""A sweep trial that trains in several processes (DDP): the processes Lightning starts join the trial,
and afterwards the sweep's process is ready for its next trial."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from digitnet.errors import DigitnetError
from digitnet.sweep import trial_ranks


@contextmanager
def trial_processes(trainer: L.Trainer) -> Iterator[None]:
    """A sweep trial in several processes: Lightning starts the others by re-running the `-m` command, whose
    sweeper joins them to this trial (digitnet.sweep.trial_ranks). Afterwards the trial's first process is
    ready for the next trial: its other processes ended, no process group, its environment as before."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if trainer.world_size == 1 or not multirun:
        yield
        return
    launcher = trainer.strategy.launcher
    if trial_ranks.job_of_this_rank() is not None:  # one of the processes Lightning started
        yield
        return
    starts_the_others = (
        isinstance(launcher, _SubprocessScriptLauncher)
        and trainer.num_nodes == 1
        and not trainer.strategy.cluster_environment.creates_processes_externally
    )
    if not (starts_the_others and trial_ranks.is_offered()):
        raise DigitnetError(
            f"this sweep trial cannot train in {trainer.world_size} processes (trainer.devices="
            f"{trainer.num_devices}, trainer.num_nodes={trainer.num_nodes}): DDP in -m sweeps needs "
            "hydra/sweeper=digitnet_optuna with the basic launcher (leave out hydra/launcher=...), "
            "strategy=ddp and one node; or leave out trainer=ddp* and train the best trial's config "
            "with it"
        )
    env, threads = dict(os.environ), torch.get_num_threads()  # Lightning sets the DDP variables and threads here
    stuck = False
    try:
        yield
    except BaseException as err:
        from optuna import TrialPruned  # not imported by single runs

        stuck = not isinstance(err, TrialPruned)  # a pruned trial stops in every process; others may wait
        raise
    finally:
        # Lightning's watcher thread kills this process once one in launcher.procs exits non-zero: leave it none
        children = list(launcher.procs)
        launcher.procs.clear()
        for child in children:
            if stuck:
                child.kill()
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
