"""The Hydra sweeper: asks Optuna for trials, launches each as a normal Hydra job, tells results.

One trial per launch, numbered like its Optuna trial (``hydra.job.num`` = trial number), so
``hydra.sweep.subdir: ${hydra.job.num}`` puts trial k in ``<sweep dir>/k``. Parallelism is
Optuna's: start the same command in more processes or machines against one storage.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from digitnet.atomic import write_atomically
from digitnet.errors import DigitnetError
from digitnet.sweep import budget, report
from digitnet.sweep.study import (
    heartbeat,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    split_spec,
)

from .search_space import Param, SearchSpace, parse_search_space

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

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        logging.getLogger(type(self.launcher).__module__).addFilter(_QUIET_LAUNCHER)

    def sweep(self, arguments: list[str]) -> optuna.Study:
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

        trial_runner = _TrialRunner(self, space, study, storage, n_trials, monitor, storage_url)
        while self._check_failure_rate(study, n_trials):
            budget.fail_stale_trials(study)
            trial = budget.claim_trial(study, n_trials)
            if trial is None:
                break
            if trial.number != next_number:
                # Another worker shares the study: don't mirror its (equally seeded) draws.
                study.sampler.reseed_rng()
            next_number = trial.number + 1
            trial_runner.run(trial)
        budget.wait_for_running(study, n_trials, poll_seconds=min(conf.heartbeat_interval, 2))
        self._finish(study, n_trials, sweep_dir)
        return study

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
                raise DigitnetError(
                    "Optuna cannot prune multi-objective trials; set hydra.sweeper.pruner=none"
                )
            return None
        assert self.config is not None
        monitor = self.conf.monitor or self.config.get("optimized_metric")
        if not isinstance(monitor, str) and pruning:
            raise DigitnetError("set hydra.sweeper.monitor to the metric to prune on (e.g. val/acc)")
        return monitor if isinstance(monitor, str) else None

    def _cap_to_grid(self, space: SearchSpace, n_trials: int) -> int:
        grid = space.grid()
        if grid is None:
            raise DigitnetError(
                "the grid sampler needs choice(...) or range(...) parameters, not interval(...)"
            )
        size = math.prod(len(values) for values in grid.values())
        if n_trials > size:
            log.info("the grid has %d points: running %d trials, not %d", size, size, n_trials)
        return min(n_trials, size)

    def _check_failure_rate(self, study: optuna.Study, n_trials: int) -> bool:
        failed = [
            t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number < n_trials
        ]
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

    def _finish(self, study: optuna.Study, n_trials: int, sweep_dir: Path) -> None:
        log.info(report.summary_line(study, n_trials))
        log.info("report written to %s", report.write_report(study, sweep_dir))


class _TrialRunner:
    """Runs one claimed trial as a Hydra job and records its outcome in the study."""

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

    def run(self, trial: optuna.Trial) -> None:
        with heartbeat(self.storage, trial._trial_id):
            params = [p.override(_suggest(trial, p)) for p in self.space.params]
            task_overrides = [*self.space.fixed, *params]
            trial.set_user_attr("command", shlex.join(["python", sys.argv[0], *task_overrides]))
            log.info("trial #%d (%d of %d): %s", trial.number, trial.number + 1, self.n_trials, " ".join(params))
            try:
                job_overrides = [*task_overrides, *self._callback_overrides(trial)]
                [result] = self.sweeper.launcher.launch([job_overrides], trial.number)
            except Exception as err:  # composing or launching the job failed
                self._record_failure(trial, _describe(err), err)
                return
            except BaseException as err:  # Ctrl-C / SystemExit: record it, then stop
                trial.set_user_attr("error", f"interrupted ({type(err).__name__})")
                self.study.tell(trial, state=TrialState.FAIL)
                raise
        if result.hydra_cfg is not None:
            trial.set_user_attr("run_dir", result.hydra_cfg.hydra.runtime.output_dir)
        state, values, error = _outcome(result, len(self.study.directions))
        if state == TrialState.FAIL:
            # the job's exception, or None when the task's return value was unusable
            raised = result._return_value if result.status == JobStatus.FAILED else None
            self._record_failure(trial, error, raised)
            return
        self.study.tell(trial, values, state=state)
        log.info(report.summary_line(self.study, self.n_trials))

    def _record_failure(self, trial: optuna.Trial, error: str, raised: BaseException | None) -> None:
        trial.set_user_attr("error", error)
        bug = raised if not isinstance(raised, DigitnetError) else None  # a DigitnetError's message says it all
        log.warning("trial #%d failed: %s", trial.number, error, exc_info=bug)
        self.study.tell(trial, state=TrialState.FAIL)
        log.info(report.summary_line(self.study, self.n_trials))

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


def _suggest(trial: optuna.Trial, param: Param) -> Any:
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(param.name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(param.name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(param.name, dist.low, dist.high, step=dist.step, log=dist.log)


def _outcome(result: JobReturn, n_objectives: int) -> tuple[TrialState, list[float] | None, str | None]:
    """(state, values, error message) of a finished job."""
    if result.status != JobStatus.COMPLETED:
        error = result._return_value  # the exception (reading .return_value re-raises it)
        if isinstance(error, optuna.TrialPruned):
            return TrialState.PRUNED, None, None
        return TrialState.FAIL, None, _describe(error)
    try:
        return TrialState.COMPLETE, objective_values(result.return_value, n_objectives), None
    except ValueError as err:
        return TrialState.FAIL, None, str(err)


def objective_values(returned: Any, n_objectives: int) -> list[float]:
    """The task function's return value as ``n_objectives`` finite floats."""
    if returned is None:
        raise ValueError("the task returned None instead of the optimized metric's value")
    is_list = isinstance(returned, Sequence) and not isinstance(returned, str)
    items = list(returned) if is_list else [returned]
    if len(items) != n_objectives:
        raise ValueError(
            f"the task returned {len(items)} value(s) for {n_objectives} sweep direction(s)"
        )
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"the task returned {returned!r}, not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the task returned {values}: the objective must be finite")
    return values


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
