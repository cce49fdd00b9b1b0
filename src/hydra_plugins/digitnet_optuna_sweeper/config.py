"""The sweeper's config, registered as ``hydra/sweeper: digitnet_optuna`` (not ``optuna``, the
name of hydra-optuna-sweeper, which may be installed alongside); all keys live under hydra.sweeper."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class DigitnetOptunaSweeperConf:
    _target_: str = "hydra_plugins.digitnet_optuna_sweeper.sweeper.DigitnetOptunaSweeper"
    # Name of the Optuna study; the same name (and storage) resumes it.
    study_name: str = "${hydra.job.name}"
    # Any SQLAlchemy URL; default: sqlite:///<hydra.sweep.dir>/study.db
    storage: str | None = None
    # Trials the study should end with (complete + pruned + failed), over all workers and runs.
    n_trials: int = 20
    # Trials launched together as one batch by hydra/launcher: joblib, submitit_local and
    # submitit_slurm run them in parallel, the basic launcher one after the other.
    n_jobs: int = 1
    # "maximize" / "minimize", or a list of them when the task returns a list of values.
    direction: Any = "maximize"
    # tpe | random | grid | cmaes | nsgaii, or {name: tpe, <constructor kwargs>}
    sampler: Any = "tpe"
    seed: int | None = 0
    # median | percentile | successive_halving | hyperband | patient | none,
    # or {name: median, <constructor kwargs>} (patient: wrapped_pruner: {name: ...})
    pruner: Any = "median"
    # Metric reported each epoch for pruning; default: the task config's optimized_metric.
    monitor: str | None = None
    # Stop the sweep once more than max_failure_rate * n_trials trials have failed.
    max_failure_rate: float = 0.25
    # A trial whose worker sent no heartbeat for grace_period seconds is marked failed.
    heartbeat_interval: int = 10
    grace_period: int = 60
    # Search space in Hydra override syntax: {optim.lr: "tag(log, interval(1e-4, 1e-1))"}
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="digitnet_optuna", node=DigitnetOptunaSweeperConf, provider="digitnet"
)
