"""Opening Optuna studies for sweeps: storage, samplers and pruners from plain config values.

Samplers and pruners are given as a name (``"tpe"``) or a mapping with a ``name`` and the
Optuna constructor's keyword arguments (``{name: median, n_warmup_steps: 2}``); the patient
pruner takes the pruner it wraps the same way (``{name: patient, patience: 1, wrapped_pruner:
{name: median}}``).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import optuna
import sqlalchemy.exc

from digitnet.errors import DigitnetError

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "patient": optuna.pruners.PatientPruner,
    "none": optuna.pruners.NopPruner,
}


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler minus its ``study.stop()`` call, which only works inside
    ``study.optimize``; the sweeper stops by itself after ``n_trials`` (capped to the grid)."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        pass


def split_spec(spec: Any, what: str) -> tuple[str, dict[str, Any]]:
    """``"tpe"`` or ``{name: tpe, **kwargs}`` -> ``("tpe", kwargs)``."""
    if spec is None:
        return "none", {}
    if isinstance(spec, str):
        return spec.lower(), {}
    if isinstance(spec, Mapping) and "name" in spec:
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return str(spec["name"]).lower(), kwargs
    raise DigitnetError(f"{what} must be a name or a mapping with a 'name' key, got {spec!r}")


def make_pruner(spec: Any) -> optuna.pruners.BasePruner:
    name, kwargs = split_spec(spec, "pruner")
    if name not in PRUNERS:
        raise DigitnetError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    if name == "patient" and kwargs.get("wrapped_pruner") is not None:
        kwargs = {**kwargs, "wrapped_pruner": make_pruner(kwargs["wrapped_pruner"])}
    return _construct(PRUNERS[name], kwargs, f"pruner {name!r}")


def make_sampler(
    spec: Any, seed: int | None, grid: Mapping[str, Sequence[Any]] | None = None
) -> optuna.samplers.BaseSampler:
    """``grid`` is the search space as value lists, needed only by the grid sampler."""
    name, kwargs = split_spec(spec, "sampler")
    if name == "grid":
        if grid is None:
            raise DigitnetError("the grid sampler needs choice(...) or range(...) parameters")
        return _construct(GridSampler, {"search_space": grid, "seed": seed, **kwargs}, "grid sampler")
    if name not in SAMPLERS:
        choices = ", ".join([*SAMPLERS, "grid"])
        raise DigitnetError(f"unknown sampler {name!r}; choose one of {choices}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _construct(SAMPLERS[name], {"seed": seed, **kwargs}, f"sampler {name!r}")


def _construct(cls: type, kwargs: dict[str, Any], what: str) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as err:  # a misspelt or foreign option, e.g. n_warmup_steps on NopPruner
        raise DigitnetError(f"bad options for {what}: {err}") from None


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` (any SQLAlchemy URL), with a clear error if it can't be reached."""
    # SQLite serialises writers; concurrent workers wait for the lock instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            if "already exists" in str(err) or isinstance(err, sqlalchemy.exc.IntegrityError):
                # Another worker is creating the same new database's tables right now.
                time.sleep(0.2 * (attempt + 1))
                continue
            raise _unreachable(url, err) from None
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
            raise _unreachable(url, err) from None
    raise DigitnetError(f"cannot create the tables of sweep storage {url!r}; try again")


def _unreachable(url: str, err: Exception) -> DigitnetError:
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
    return DigitnetError(
        f"cannot open sweep storage {url!r}: {reason}. Check the URL (hydra.sweeper.storage), "
        "that the database server is running and reachable, and that its driver is installed"
    )


def open_study(
    storage: optuna.storages.RDBStorage,
    study_name: str,
    directions: list[str],
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study or resume it; refuses to resume a study that optimises other directions.

    The caller sets ``study.sampler``: its seed may depend on the trials already there.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=directions,
        pruner=pruner,
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != [d.lower() for d in directions]:
        raise DigitnetError(
            f"study {study_name!r} in {storage.url} optimises {stored}, not {directions}; "
            "use another hydra.sweeper.study_name or the same direction"
        )
    return study


def load_study(storage: str | optuna.storages.RDBStorage, study_name: str, pruner: Any = None) -> optuna.Study:
    """An existing study (``storage``: a URL or an opened storage), with a clear error if there is
    none of that name."""
    if isinstance(storage, str):
        storage = open_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(pruner) if pruner else None)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise DigitnetError(f"no study named {study_name!r} in {storage.url}; studies there: {names}") from None


@contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``heartbeat_interval`` seconds while the block runs,
    so other workers can tell (``fail_stale_trials``) that a worker died holding this trial."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
