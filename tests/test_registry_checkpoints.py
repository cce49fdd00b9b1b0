"""Whole checkpoints in the registry: stored by training, opt-out, older registries, `--ckpt-out`, loading by id."""

from __future__ import annotations

import shutil

import pytest
import sqlalchemy as sa
import torch

from conftest import compose_config
from digitnet import cli
from digitnet.checkpoint import load_checkpoint
from digitnet.errors import DigitnetError
from digitnet.registry import MODELS, Registry, record_run
from tiny_run import tiny_run

CONFIG = {"data": {"name": "mnist"}, "model": {"name": "mlp"}}


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_training_stores_the_checkpoint_bytes(trained, tmp_path, capsys):
    with Registry(trained.registry_url) as registry:
        record = registry.get(trained.record_id, with_ckpt=True)
        assert registry.get(trained.record_id).ckpt is None  # only asked for
    assert record.ckpt == trained.checkpoint.read_bytes() and record.ckpt_bytes == len(record.ckpt)
    assert (
        cli.main(
            [
                "models",
                "--db",
                trained.registry_url,
                "show",
                trained.record_id[:8],
                "--ckpt-out",
                str(tmp_path / "copy.ckpt"),
            ]
        )
        == 0
    )
    assert (tmp_path / "copy.ckpt").read_bytes() == record.ckpt
    assert capsys.readouterr().out == f"wrote {tmp_path / 'copy.ckpt'} ({len(record.ckpt)} bytes)\n"
    cli.main(["models", "--db", trained.registry_url, "show", trained.record_id[:8]])
    assert f"ckpt_bytes  {len(record.ckpt)}\n" in capsys.readouterr().out


def test_a_checkpoint_loads_by_registry_id_once_its_file_is_gone(trained, tmp_path, monkeypatch):
    moved = tmp_path / "moved.ckpt"
    shutil.copy(trained.checkpoint, moved)
    expected = load_checkpoint(moved).net.state_dict()
    trained.checkpoint.rename(tmp_path / "away.ckpt")
    try:
        module = load_checkpoint(trained.record_id[:8], trained.registry_url)
        monkeypatch.setenv("DIGITNET_REGISTRY", trained.registry_url)  # the default registry of `digitnet export`
        assert load_checkpoint(trained.record_id).hparams.model["name"] == "mlp"
    finally:
        (tmp_path / "away.ckpt").rename(trained.checkpoint)
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in expected.items())


def test_store_checkpoint_false_keeps_only_the_path(trained, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    metrics = {"best_checkpoint": str(trained.checkpoint)}
    kept = record_run(url, CONFIG, metrics, tmp_path)
    skipped = record_run(url, {**CONFIG, "registry": {"store_checkpoint": False}}, metrics, tmp_path)
    with Registry(url) as registry:
        assert registry.get(kept).ckpt_bytes == trained.checkpoint.stat().st_size
        assert registry.get(skipped, with_ckpt=True).ckpt is None and registry.get(skipped).ckpt_bytes is None
    assert load_checkpoint(skipped, url).hparams.model["name"] == "mlp"  # its file is still there
    with sa.create_engine(url).begin() as conn:  # the file goes away: nothing left to load
        conn.execute(
            sa.text("UPDATE digitnet_models SET checkpoint = '/gone/last.ckpt' WHERE id = :id"), {"id": skipped}
        )
    with pytest.raises(
        DigitnetError,
        match=rf"^registry model {skipped[:8]} has no checkpoint stored \(recorded with "
        r"registry.store_checkpoint=false or by an older digitnet\) and its file "
        r"/gone/last.ckpt is gone$",
    ):
        load_checkpoint(skipped, url)
    assert cli.main(["models", "--db", url, "show", skipped, "--ckpt-out", str(tmp_path / "x.ckpt")]) == 2
    assert "has no checkpoint stored" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()


def test_a_registry_from_before_stored_checkpoints_is_read_and_then_upgraded(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table(
        "digitnet_models",
        old,
        *(sa.Column(c.name, c.type, primary_key=c.primary_key) for c in MODELS.c if c.name != "ckpt"),
    )
    engine = sa.create_engine(url)
    old.create_all(engine)
    engine.dispose()
    with Registry(url) as registry:  # reading changes nothing
        assert registry.list() == [] and "ckpt" not in registry.columns
    record_id = record_run(url, CONFIG, {"test/acc": 0.5}, tmp_path)  # training adds the column
    with Registry(url) as registry:
        assert "ckpt" in registry.columns and registry.get(record_id).ckpt_bytes is None


def test_a_numeric_id_prefix_must_be_quoted(tmp_path):
    from digitnet.train import train

    cfg = compose_config("init_from=7e123456", output_dir=tmp_path)
    with pytest.raises(
        DigitnetError,
        match=r"init_from=inf was read as a number; quote a registry id: "
        r"init_from=\"'<id>'\"",
    ):
        train(cfg)
