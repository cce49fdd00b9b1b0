"""Hydra override syntax -> Optuna distributions, parsed by Hydra's own override parser.

    interval(a,b)                 float in [a, b]
    int(interval(a,b))            int in [a, b]
    tag(log, interval(a,b))       log-uniform (also with int(...))
    range(a,b,step)               ints (or floats) a, a+step, ... below b
    choice(x,y,...) / x,y,...     categorical (also config groups: model=cnn,convnext)

Anything that is not a sweep (``trainer.max_epochs=3``) is passed unchanged to every trial.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from digitnet.errors import DigitnetError

# Optuna stores categorical choices of these types; others (lists, dicts) go by their text.
_PLAIN_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched parameter: where it goes in the config and how Optuna samples it."""

    key: str  # the override's key as typed, e.g. "model" or "+optim.lr"
    distribution: BaseDistribution
    choice_texts: tuple[str, ...] = ()  # override text of each categorical choice

    @property
    def name(self) -> str:
        return self.key.lstrip("+~")

    def override(self, value: Any) -> str:
        """The command-line override that sets this parameter to ``value``."""
        if isinstance(self.distribution, CategoricalDistribution):
            text = self.choice_texts[self.distribution.choices.index(value)]
        else:
            text = repr(value)
        return f"{self.key}={text}"

    def grid_values(self) -> list[Any] | None:
        """All values for a grid search, or None for continuous parameters."""
        dist = self.distribution
        if isinstance(dist, CategoricalDistribution):
            return list(dist.choices)
        if isinstance(dist, IntDistribution) and not dist.log:
            return list(range(dist.low, dist.high + 1, dist.step))
        if isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step) + 1
            return [round(dist.low + i * dist.step, 12) for i in range(count)]
        return None


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    fixed: tuple[str, ...]  # non-sweep overrides given to every trial

    def grid(self) -> dict[str, list[Any]] | None:
        values = {p.name: p.grid_values() for p in self.params}
        if any(v is None for v in values.values()):
            return None
        return values  # type: ignore[return-value]

    def samples(self) -> list[list[str]]:
        """Override lists that together use every categorical choice once (others at their low
        end): composing them checks that every key and config group option exists."""
        first = {p.name: _low_end(p.distribution) for p in self.params}
        lists = [[*self.fixed, *(p.override(first[p.name]) for p in self.params)]]
        for param in self.params:
            if isinstance(param.distribution, CategoricalDistribution):
                for choice in param.distribution.choices[1:]:
                    params = {**first, param.name: choice}
                    lists.append([*self.fixed, *(p.override(params[p.name]) for p in self.params)])
        return lists


def parse_search_space(params: Mapping[str, str], arguments: Sequence[str], parser: OverridesParser) -> SearchSpace:
    """The sweeper's ``params`` plus the command line (which wins for the same key)."""
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    try:
        overrides = parser.parse_overrides(lines)
    except HydraException as err:
        raise DigitnetError(f"bad sweep parameter: {err}") from None
    by_key: dict[str, Override] = {}
    for override in overrides:
        by_key.pop(override.key_or_group, None)  # keep command-line order, last one wins
        by_key[override.key_or_group] = override
    searched = tuple(_param(o) for o in by_key.values() if o.is_sweep_override())
    fixed = tuple(o.input_line for o in by_key.values() if not o.is_sweep_override())
    return SearchSpace(searched, fixed)


def _param(override: Override) -> Param:
    key = override.get_key_element()
    sweep = override.value()
    if "log" in sweep.tags and not isinstance(sweep, IntervalSweep):
        raise DigitnetError(f"{key}: tag(log, ...) only works with interval(a,b)")
    if isinstance(sweep, IntervalSweep):
        return Param(key, _interval(key, sweep))
    if isinstance(sweep, RangeSweep):
        return Param(key, _range(key, list(override.sweep_iterator()), sweep))
    assert isinstance(sweep, ChoiceSweep)
    values = list(override.sweep_iterator())
    texts = tuple(override.sweep_string_iterator())
    if not values:
        raise DigitnetError(f"{key}: choice() needs at least one value")
    plain = all(isinstance(v, _PLAIN_TYPES) for v in values)
    return Param(key, CategoricalDistribution(values if plain else texts), texts)


def _interval(key: str, sweep: IntervalSweep) -> BaseDistribution:
    low, high, log = sweep.start, sweep.end, "log" in sweep.tags
    if not low < high:
        raise DigitnetError(f"{key}: interval({low}, {high}) is empty; the lower bound must be below the upper")
    if log and low <= 0:
        raise DigitnetError(f"{key}: a log interval needs a positive lower bound, got {low}")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _range(key: str, values: list[Any], sweep: RangeSweep) -> BaseDistribution:
    if not values:
        raise DigitnetError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) contains no value")
    step = abs(sweep.step)
    if all(isinstance(v, int) for v in values):
        return IntDistribution(min(values), max(values), step=step)
    # Rebuild the bounds from the step so float noise (0.30000000000000004) can't shrink them.
    low = round(min(values), 12)
    return FloatDistribution(low, round(low + step * (len(values) - 1), 12), step=step)


def _low_end(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # type: ignore[attr-defined]
