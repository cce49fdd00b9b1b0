"""Backbones, one file per family, and a tiny name -> class registry (timm-style)."""

from __future__ import annotations

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


# importing the families fills the registry
from digitnet.models import cnn, convnext, convpool, mlp, resnet  # noqa: E402,F401
from digitnet.models.standardize import PerImageStandardize  # noqa: E402,F401
