"""One config convention: a setting is a config key read by the code that uses it; an explicit data.root wins."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO, compose_config


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
