"""One config convention: a setting is a config key read by the code that uses it. The worked examples
of docs/extending.md (a new schedule, a training option) hold, and an explicit data.root wins."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import digitnet.optim
from conftest import REPO, compose_config
from digitnet.config import validate
from digitnet.errors import DigitnetError
from digitnet.module import DigitClassifier
from digitnet.optim import SCHEDULES, build_scheduler
from digitnet.train import build_module

EXTENDING = (REPO / "docs" / "extending.md").read_text()


def example(path: str) -> str:
    """The code block of docs/extending.md whose first line is the comment `# <path>`."""
    blocks = re.findall(r"```\w+\n# (\S+)\n(.*?)```", EXTENDING, re.S)
    (code,) = [code for name, code in blocks if name == path]
    return code


@pytest.fixture
def step_schedule(tmp_path):
    """The docs' step schedule, registered as its code would be in optim.py, and its YAML file in a config
    folder Hydra also searches."""
    exec(example("src/digitnet/optim.py"), dict(vars(digitnet.optim)))
    (tmp_path / "sched").mkdir()
    (tmp_path / "sched" / "step.yaml").write_text(example("conf/sched/step.yaml"))
    yield f"hydra.searchpath=[file://{tmp_path}]"
    SCHEDULES.pop("step")


def test_the_step_schedule_of_the_docs_is_two_files_and_does_what_they_say(step_schedule, tmp_path):
    cfg = compose_config("sched=step", "registry.enabled=false", step_schedule, output_dir=tmp_path / "run")
    validate(cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, OmegaConf.to_container(cfg.sched), total_steps=100)["scheduler"]
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = cfg.optim.lr
    assert rates == pytest.approx([lr] * 25 + [lr / 10] * 25 + [lr / 100] * 25 + [lr / 1000] * 25)
    bad = compose_config("sched=step", "sched.gamma=2", "registry.enabled=false", step_schedule, output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=r"^sched.gamma=2 must be in \(0, 1\)$"):
        validate(bad)


def test_the_option_example_of_the_docs_is_in_the_code():
    for path in ("conf/module/default.yaml", "src/digitnet/module.py"):
        source = (REPO / path).read_text()
        for line in example(path).splitlines():
            assert line in source.splitlines(), f"{path} no longer has: {line.strip()}"


def test_every_module_key_is_a_keyword_of_the_module_with_the_same_default(tmp_path):
    options = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "module" / "default.yaml"))
    keywords = inspect.signature(DigitClassifier).parameters
    # `auto` is the config's own value, settled into true/false before the module is built (digitnet.fastpath)
    settled = {key: value for key, value in options.items() if value != "auto"}
    assert settled.keys() == options.keys() - {"channels_last"}
    assert {key: keywords[key].default for key in settled} == settled
    module = build_module(compose_config("model=mlp", "module.label_smoothing=0.2", output_dir=tmp_path))
    assert module.criterion.label_smoothing == 0.2 and module.hparams.label_smoothing == 0.2


def test_an_explicit_data_root_wins_over_the_environment(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path / "elsewhere"))
    assert compose_config(output_dir=tmp_path).data.root == str(tmp_path / "elsewhere")
    cfg = compose_config(f"data.root={tiny_mnist}", "data.download=false", "data.val_size=50", output_dir=tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert len(datamodule.train_set) + len(datamodule.val_set) == 200  # the tiny dataset, not the environment's
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        assert compose("eval", overrides=[f"data.root={tiny_mnist}"]).data.root == str(tiny_mnist)
    monkeypatch.delenv("DIGITNET_DATA")
    assert compose_config(output_dir=tmp_path).data.root == "data"
