"""Every `@package _global_` preset (experiment, sweep, debug) gets the values it sets,
including the top-level keys that conf/train.yaml only gives defaults for."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose_config

GLOBAL_PRESETS = sorted(
    path.relative_to(REPO / "conf")
    for path in (REPO / "conf").glob("*/*.yaml")
    if path.read_text().startswith("# @package _global_")
)


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_the_global_presets_are_found():
    groups = {path.parts[0] for path in GLOBAL_PRESETS}
    assert {"experiment", "sweep", "debug"} <= groups
    assert len(GLOBAL_PRESETS) >= 10


@pytest.mark.parametrize("preset", GLOBAL_PRESETS, ids=str)
def test_preset_values_reach_the_composed_config(preset, tmp_path):
    group, name = preset.parts[0], preset.stem
    settings = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / preset))
    settings.pop("defaults", None)
    settings.pop("hydra", None)  # the sweeper's settings are not part of the job's config
    cfg = compose_config(f"{group}={name}", output_dir=tmp_path)
    composed = OmegaConf.to_container(cfg)
    for key, value in _leaves(settings):
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, f"{preset} sets {key}={value!r} but the run gets {node!r}"
