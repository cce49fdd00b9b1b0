"""The Hydra sweeper: asks Optuna for trials, launches them as normal Hydra jobs, tells results.

Each launch is a batch of up to ``n_jobs`` trials, run by the configured ``hydra/launcher``
(basic: one after the other; joblib, submitit_local, submitit_slurm: in parallel). Trial k
always runs in ``<sweep dir>/k`` (``hydra.sweep.subdir=k``), whatever the job's number. More
parallelism: start the same command in more processes or machines against one storage.

A process that Lightning starts for a DDP trial re-runs the sweep's command line: its sweeper runs
that trial's job instead (see digitnet.sweep.trial_ranks).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, run_job, setup_globals
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from digitnet.atomic import write_atomically
from digitnet.errors import DigitnetError
from digitnet.sweep import budget, compat, report, trial_ranks
from digitnet.sweep.study import (
    heartbeat,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    split_spec,
)

from .search_space import Param, SearchSpace, parse_search_space
from .trial_task import OUTCOME, WORKER, StudyAccess, TrialTask

log = logging.getLogger(__name__)

PRUNING_CALLBACK = "++callbacks.optuna_pruning"


class _QuietLauncher(logging.Filter):
    """Drops Hydra's launcher lines: `Launching 1 jobs locally` and each job's overrides, which
    repeat the trial line's parameters plus the internal pruning-callback settings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.match(r"Launching \d+ jobs locally$|\t#\d+ : ", record.getMessage())


_QUIET_LAUNCHER = _QuietLauncher()


class DigitnetOptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = DictConfig(conf)  # the keys of DigitnetOptunaSweeperConf
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None
        self.task: TrialTask | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.task = TrialTask(task_function)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=self.task, config=config
        )
        logging.getLogger(type(self.launcher).__module__).addFilter(_QUIET_LAUNCHER)

    def sweep(self, arguments: list[str]) -> optuna.Study | None:
        job = trial_ranks.job_of_this_rank()
        if job is not None:
            return self._join_trial(job)
        try:
            return self._sweep(arguments)
        except DigitnetError as err:
            # A sweep is an entry point: one clear line and status 2, like digitnet's CLIs.
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> optuna.Study:
        assert self.config is not None and self.hydra_context is not None
        conf = self.conf
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parse_search_space(_plain(conf.params), arguments, parser)
        if not space.params:
            raise DigitnetError(
                "nothing to search: set hydra.sweeper.params or sweep on the command line, "
                "e.g. 'optim.lr=tag(log, interval(1e-4, 1e-1))' or 'model=cnn,mlp'"
            )
        if conf.n_jobs < 1:
            raise DigitnetError(f"hydra.sweeper.n_jobs must be at least 1, got {conf.n_jobs}")
        self._check_composes(space)
        directions = [conf.direction] if isinstance(conf.direction, str) else list(conf.direction)
        monitor = self._monitor(directions)
        n_trials = conf.n_trials
        if split_spec(conf.sampler, "sampler")[0] == "grid":
            n_trials = self._cap_to_grid(space, n_trials)

        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage_url = conf.storage or f"sqlite:///{sweep_dir / 'study.db'}"
        storage = open_storage(storage_url, conf.heartbeat_interval, conf.grace_period)

        study = open_study(storage, conf.study_name, directions, make_pruner(_plain(conf.pruner)))
        # Seeding with the number of trials already there keeps a resumed sweep reproducible
        # without replaying the first run's draws.
        next_number = len(study.get_trials(deepcopy=False))
        seed = None if conf.seed is None else conf.seed + next_number
        study.sampler = make_sampler(_plain(conf.sampler), seed, space.grid())
        write_atomically(sweep_dir / "multirun.yaml", lambda tmp: OmegaConf.save(self.config, tmp))
        log.info("study %r in %s: %d trials", conf.study_name, storage_url, n_trials)

        assert self.task is not None
        self.task.study = StudyAccess(
            storage_url,
            study.study_name,
            len(directions),
            conf.heartbeat_interval,
            conf.grace_period,
            self._torch_threads(),
            os.getpid(),
        )
        trial_runner = _TrialRunner(self, space, study, storage, n_trials, monitor, storage_url)
        while self._check_failure_rate(study, n_trials):
            budget.fail_stale_trials(study)
            batch: list[optuna.Trial] = []
            while len(batch) < conf.n_jobs and (trial := budget.claim_trial(study, storage, n_trials)):
                if trial.number != next_number:
                    # Another worker shares the study: don't mirror its (equally seeded) draws.
                    study.sampler.reseed_rng()
                next_number = trial.number + 1
                batch.append(trial)
            if not batch:
                break
            trial_runner.run(batch)
        budget.wait_for_running(study, n_trials, poll_seconds=min(conf.heartbeat_interval, 2))
        self._finish(study, n_trials, sweep_dir, trial_runner.last_summary)
        return study

    def _join_trial(self, job: dict[str, Any]) -> None:
        """Run a trial's job as one of its DDP processes: same config, same run dir. The trial's own
        process reports its outcome; this one exits 0 unless it failed on its own (Lightning then
        stops the trial's other processes)."""
        assert self.hydra_context is not None and self.config is not None and self.task is not None
        run_dir = Path(job["run_dir"])
        where = [f"hydra.sweep.dir={override_value(str(run_dir.parent))}", f"hydra.sweep.subdir={run_dir.name}"]
        config = self.hydra_context.config_loader.load_sweep_config(self.config, [*job["overrides"], *where])
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = job["id"], job["num"]
        setup_globals()
        result = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        error = compat.job_error(result)
        if error is not None and not isinstance(error, optuna.TrialPruned | DigitnetError):
            raise error
        return None

    def _torch_threads(self) -> int | None:
        """Torch threads per job when a batch's jobs share cores: the launcher's cpus_per_task
        (submitit), else this machine's cores split over the batch. None: leave torch's default."""
        assert self.config is not None
        launcher = self.config.hydra.launcher
        if self.conf.n_jobs == 1 or launcher._target_.endswith(".BasicLauncher"):
            return None
        return launcher.get("cpus_per_task") or max(1, (os.cpu_count() or 1) // self.conf.n_jobs)

    def _check_composes(self, space: SearchSpace) -> None:
        """Compose a few trial configs now, so unknown keys or groups fail before any training."""
        assert self.hydra_context is not None and self.config is not None
        for overrides in space.samples():
            try:
                self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except HydraException as err:
                reason = str(err).strip().splitlines()[0]
                raise DigitnetError(f"bad sweep parameter: {reason}") from None

    def _monitor(self, directions: list[str]) -> str | None:
        """The metric the pruning callback reports each epoch (None: no callback)."""
        pruning = split_spec(_plain(self.conf.pruner), "pruner")[0] != "none"
        if len(directions) > 1:
            if pruning:
                raise DigitnetError("Optuna cannot prune multi-objective trials; set hydra.sweeper.pruner=none")
            return None
        assert self.config is not None
        monitor = self.conf.monitor or self.config.get("optimized_metric")
        if not isinstance(monitor, str) and pruning:
            raise DigitnetError("set hydra.sweeper.monitor to the metric to prune on (e.g. val/acc)")
        return monitor if isinstance(monitor, str) else None

    def _cap_to_grid(self, space: SearchSpace, n_trials: int) -> int:
        grid = space.grid()
        if grid is None:
            raise DigitnetError("the grid sampler needs choice(...) or range(...) parameters, not interval(...)")
        size = math.prod(len(values) for values in grid.values())
        if n_trials > size:
            log.info("the grid has %d points: running %d trials, not %d", size, size, n_trials)
        return min(n_trials, size)

    def _check_failure_rate(self, study: optuna.Study, n_trials: int) -> bool:
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number < n_trials]
        limit = self.conf.max_failure_rate * n_trials
        if len(failed) <= limit:
            return True
        last_error = failed[-1].user_attrs.get("error", "worker stopped")
        report.write_report(study, Path(self.config.hydra.sweep.dir))  # type: ignore[union-attr]
        raise DigitnetError(
            f"{len(failed)} of {n_trials} trials failed, more than max_failure_rate="
            f"{self.conf.max_failure_rate}; last error: {last_error}. Fix it, or raise "
            "hydra.sweeper.max_failure_rate"
        )

    def _finish(self, study: optuna.Study, n_trials: int, sweep_dir: Path, last_summary: str | None) -> None:
        summary = report.summary_line(study, n_trials)
        if summary != last_summary:  # else the last trial's line said it already
            log.info(summary)
        log.info("report written to %s", report.write_report(study, sweep_dir))


class _TrialRunner:
    """Runs a batch of claimed trials as one launch and records each trial's outcome."""

    def __init__(
        self,
        sweeper: DigitnetOptunaSweeper,
        space: SearchSpace,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        n_trials: int,
        monitor: str | None,
        storage_url: str,
    ) -> None:
        self.sweeper, self.space, self.study, self.storage = sweeper, space, study, storage
        self.n_trials, self.monitor, self.storage_url = n_trials, monitor, storage_url
        self.sweep_dir = Path(sweeper.config.hydra.sweep.dir).absolute()  # type: ignore[union-attr]
        self._ids: dict[int, int] = {}  # trial number -> storage id
        self.last_summary: str | None = None  # the study's state as last printed

    def _id(self, trial: optuna.Trial) -> int:
        if trial.number not in self._ids:
            self._ids[trial.number] = compat.trial_id(self.storage, self.study.study_name, trial.number)
        return self._ids[trial.number]

    def run(self, batch: list[optuna.Trial]) -> None:
        results: list[JobReturn | None] = [None] * len(batch)
        launch_error = None
        with ExitStack() as beats:
            for trial in batch:
                beats.enter_context(heartbeat(self.storage, self._id(trial)))
            jobs = [self._job_overrides(trial) for trial in batch]
            try:
                results = list(self.sweeper.launcher.launch(jobs, batch[0].number))
            except Exception as err:  # composing or launching a job failed, or a job was lost
                launch_error = err
                log.warning("the launcher failed: %s", _describe(err))
            except BaseException as err:  # Ctrl-C / SystemExit: record it, then stop
                for trial in batch:
                    self._finish(trial, None, err)
                raise
        if launch_error is not None:
            self._wait_for_started_jobs(batch)
        for trial, result in zip(batch, results, strict=True):
            self._finish(trial, result, launch_error)

    def _job_overrides(self, trial: optuna.Trial) -> list[str]:
        params = [p.override(_suggest(trial, p)) for p in self.space.params]
        task_overrides = [*self.space.fixed, *params]
        trial.set_user_attr("command", shlex.join(["python", sys.argv[0], *task_overrides]))
        log.info("trial #%d (%d of %d): %s", trial.number, trial.number + 1, self.n_trials, " ".join(params))
        trial.set_user_attr("run_dir", str(self.sweep_dir / str(trial.number)))
        subdir = f"hydra.sweep.subdir={trial.number}"
        return [*task_overrides, *self._callback_overrides(trial), subdir]

    def _callback_overrides(self, trial: optuna.Trial) -> list[str]:
        if self.monitor is None:
            return []
        settings = {
            "_target_": "digitnet.sweep.pruning.OptunaPruning",
            "storage": self.storage_url,
            "study_name": self.study.study_name,
            "trial_number": trial.number,
            "monitor": self.monitor,
            "pruner": _plain(self.sweeper.conf.pruner),
        }
        return [f"{PRUNING_CALLBACK}.{key}={override_value(v)}" for key, v in settings.items()]

    def _wait_for_started_jobs(self, batch: list[optuna.Trial]) -> None:
        """After the launcher raised, jobs of the batch may still run (submitit stops at the
        first lost job): wait until each started one stored its outcome or stopped beating."""
        poll = min(self.storage.get_heartbeat_interval() or 2, 2)
        while True:
            stale = compat.stale_trial_ids(self.storage, self.study.study_name)
            attrs = [self.storage.get_trial(self._id(t)).user_attrs for t in batch]
            if not any(
                WORKER in a and OUTCOME not in a and self._id(t) not in stale for t, a in zip(batch, attrs, strict=True)
            ):
                return
            time.sleep(poll)

    def _finish(self, trial: optuna.Trial, result: JobReturn | None, launch_error: BaseException | None) -> None:
        """Tell the outcome the job stored; without one the trial failed with the job's or the
        launcher's error."""
        frozen = self.storage.get_trial(self._id(trial))
        if frozen.state.is_finished():  # failed as stale by another worker meanwhile
            return
        raised = launch_error if result is None else compat.job_error(result)
        if not isinstance(raised, Exception) or isinstance(raised, optuna.TrialPruned):
            raised = None  # the task's return value, or Ctrl-C: no traceback to show
        outcome = frozen.user_attrs.get(OUTCOME)
        if outcome is not None:
            state = TrialState[outcome["state"]]
            self._tell(trial, state, outcome.get("values"), outcome.get("error"), raised)
        elif launch_error is not None and not isinstance(launch_error, Exception):
            self._tell(trial, TrialState.FAIL, None, f"interrupted ({type(launch_error).__name__})")
        else:
            error = _describe(raised) if raised else "the job stored no outcome"
            self._tell(trial, TrialState.FAIL, None, error, raised)

    def _tell(
        self,
        trial: optuna.Trial,
        state: TrialState,
        values: list[float] | None,
        error: str | None,
        raised: BaseException | None = None,
    ) -> None:
        if error is not None:
            trial.set_user_attr("error", error)
            bug = raised if not isinstance(raised, DigitnetError) else None  # a DigitnetError's message says it all
            log.warning("trial #%d failed: %s", trial.number, error, exc_info=bug)
        self.study.tell(trial, values, state=state)
        self.last_summary = report.summary_line(self.study, self.n_trials)
        log.info(self.last_summary)


def _suggest(trial: optuna.Trial, param: Param) -> Any:
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(param.name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(param.name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(param.name, dist.low, dist.high, step=dist.step, log=dist.log)


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted, so URLs and paths survive)."""
    if isinstance(value, str):
        # Hydra reads backslashes literally except in runs right before a quote or the end.
        escaped = re.sub(r"\\+(?='|$)", lambda run: run.group(0) * 2, value)
        return "'" + escaped.replace("'", "\\'") + "'"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _plain(value: Any) -> Any:
    """Config nodes as plain Python values."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
