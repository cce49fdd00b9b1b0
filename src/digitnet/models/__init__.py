"""Backbones, one file per family, and a tiny name -> class registry (timm-style)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from digitnet.errors import DigitnetError

BACKBONES: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator that makes a backbone buildable by name from config (`model=<name>`)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        BACKBONES[name] = cls
        return cls

    return add


def build_backbone(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build backbone `name`; unknown names or keys become a one-line DigitnetError."""
    if name not in BACKBONES:
        raise DigitnetError(f"unknown model {name!r}; choose one of {sorted(BACKBONES)}")
    try:
        return BACKBONES[name](num_classes=num_classes, **kwargs)
    except TypeError as err:  # an unknown or missing keyword in conf/model/<name>.yaml
        raise DigitnetError(f"bad settings for model={name}: {err}") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_count(key: str, value: object) -> None:
    """`model.<key>` must be a positive integer (a layer width, a number of layers)."""
    if not _is_count(value):
        raise DigitnetError(f"model.{key}={value} must be a positive integer")


def check_counts(key: str, values: object, length: int | None = None, allow_empty: bool = False) -> None:
    """`model.<key>` must be a list of positive integers (`length` of them, if given)."""
    ok = isinstance(values, Sequence) and not isinstance(values, str) and all(map(_is_count, values))
    if ok:
        ok = len(values) == length if length is not None else allow_empty or len(values) > 0
    if not ok:
        count = f"{length} " if length is not None else "" if allow_empty else "one or more "
        raise DigitnetError(f"model.{key}={values} must be a list of {count}positive integers")


def check_number(key: str, value: object, low: float, high: float = math.inf) -> None:
    """`model.<key>` must be a number in [low, high), e.g. a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        bounds = f"in [{low:g}, {high:g})" if high < math.inf else f">= {low:g}"
        raise DigitnetError(f"model.{key}={value} must be a number {bounds}")


# importing the families fills the registry
from digitnet.models import cnn, convnext, convpool, mlp, resnet  # noqa: E402,F401
from digitnet.models.standardize import PerImageStandardize  # noqa: E402,F401
