"""The docs site stays true: the generated config reference covers conf/, and the extending page's
files work (the backbone example trains and exports; the config examples compose and build)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from conftest import REPO

DOCS = REPO / "docs"
TITLED_BLOCK = re.compile(r'```(\w+) title="([^"]+)"\n(.*?)\n\s*```', re.S)
QUIET = [
    "logger=none",
    "callbacks.lr_monitor=null",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
    "print_config=false",
]


def conf_reference():
    spec = importlib.util.spec_from_file_location("conf_reference", DOCS / "hooks" / "conf_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extending_files() -> dict[str, str]:
    """path -> text of every block of extending.md titled with a file path (indent removed)."""
    text = (DOCS / "extending.md").read_text()
    files = {}
    for _, path, body in TITLED_BLOCK.findall(text):
        lines = body.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        files[path] = "\n".join(line[indent:] for line in lines) + "\n"
    return files


@pytest.fixture
def conf_with_examples(tmp_path) -> Path:
    """A copy of conf/ with the extending page's config files added."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    for path, text in extending_files().items():
        if path.startswith("conf/"):
            (tmp_path / path).write_text(text)
    return conf


def compose_in(conf: Path, *overrides: str, hydra: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_reference_lists_every_group_option_and_key():
    ref = conf_reference()
    conf = REPO / "conf"
    text = ref.reference(conf)
    for group in ref.groups(conf):
        assert f"## `{group.name}`" in text
        for option in group.glob("*.yaml"):
            assert f"### `{group.name}={option.stem}`" in text
            values = yaml.safe_load(option.read_text()) or {}
            values.pop("defaults", None)
            for key in ref.flatten(values):
                assert f"{key}` |" in text, f"{option}: {key} missing from the reference"
    for key in ref.flatten(yaml.safe_load((conf / "train.yaml").read_text())):
        assert key == "defaults" or f"| `{key}` |" in text


def test_reference_is_on_the_configuration_page():
    ref = conf_reference()
    assert ref.MARKER in (DOCS / "configuration.md").read_text()
    assert "docs/hooks/conf_reference.py" in (REPO / "mkdocs.yml").read_text()


def test_backbone_example_trains_and_exports(real_data, conf_with_examples, tmp_path):
    from digitnet.models import BACKBONES
    from digitnet.train import train

    files = extending_files()
    source = files["src/digitnet/models/tiny.py"]
    # step 2 of the page: the families' import line with the new module added
    page = (DOCS / "extending.md").read_text()
    import_line = next(line.strip() for line in page.splitlines() if "from digitnet.models import cnn" in line)
    init = (REPO / "src" / "digitnet" / "models" / "__init__.py").read_text()
    assert import_line.replace(", tiny", "") in init

    module = types.ModuleType("digitnet.models.tiny")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, "src/digitnet/models/tiny.py", "exec"), module.__dict__)
        assert BACKBONES["tiny"].__name__ == "TinyNet"
        cfg = compose_in(
            conf_with_examples,
            "model=tiny",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=20",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
            "callbacks.onnx_export.test_images=500",
            *QUIET,
            f"paths.output_dir={tmp_path / 'run'}",
        )
        train(cfg)
    finally:
        BACKBONES.pop("tiny", None)
        sys.modules.pop(module.__name__, None)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.5  # 20 batches of real MNIST teach this net far beyond chance
    graph = onnx.load(metrics["onnx/path"]).graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (dims(graph.input[0]), dims(graph.output[0])) == ([1, 1, 28, 28], [1, 10])


def test_dataset_example_composes(conf_with_examples):
    import torchvision

    from digitnet.data.idx import DATASET_FOLDERS

    page = (DOCS / "extending.md").read_text()
    line = next(line.strip() for line in page.splitlines() if line.strip().startswith("DATASET_FOLDERS = "))
    documented = ast.literal_eval(line.split("=", 1)[1].strip())
    assert {k: v for k, v in documented.items() if k != "kmnist"} == DATASET_FOLDERS
    assert hasattr(torchvision.datasets, documented["kmnist"])
    data = compose_in(conf_with_examples, "data=kmnist").data
    assert (data.name, len(data.class_names)) == ("kmnist", 10)
    assert data._target_ == "digitnet.data.datamodule.DigitDataModule"  # MNIST's, extended


def test_augmentation_example_builds(conf_with_examples):
    import torch

    from digitnet.config import validate
    from digitnet.train import build_module

    cfg = compose_in(conf_with_examples, "aug=shaky", "paths.output_dir=unused")
    validate(cfg)
    batch = torch.rand(8, 1, 28, 28)
    out = build_module(cfg).augment(batch)
    assert out.shape == batch.shape and not torch.equal(out, batch)


def test_logger_example_names_a_lightning_logger(conf_with_examples):
    logger = compose_in(conf_with_examples, "logger=comet").logger
    assert list(logger) == ["comet"]
    assert issubclass(get_class(logger.comet._target_), Logger)


def test_sweep_example_composes(conf_with_examples):
    cfg = compose_in(conf_with_examples, "sweep=resnet_width", hydra=True)
    assert cfg.model.name == "resnet" and cfg.trainer.max_epochs == 2
    params = cfg.hydra.sweeper.params
    assert set(params) == {"optim.lr", "model.widths"}
    for key in params:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a key of the composed config"
