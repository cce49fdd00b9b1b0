"""Nothing but the database: push MNIST, train from it, predict into it, delete outputs/, then
resume, fine-tune, evaluate and export from the registry id alone (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from hydra import compose, initialize_config_dir

from conftest import REPO, compose_config, run_train
from digitnet import cli
from digitnet.data.idx import load_split
from digitnet.registry import Registry
from postgres_server import BACKENDS, postgres_url  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # push, train, evaluate and predict through the database

# float32, as eval.py evaluates: its test/acc must equal the run's to the image
SHORT = (
    "model=mlp",
    "sched=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=40",
    "debug=test",
    "seed=5",
    "trainer.precision=32-true",
)


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path_factory):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'digits.db'}"
    return request.getfixturevalue("postgres_url")


def _train(url: str, output_dir, *overrides: str) -> dict:
    """`python train.py` in-process, data and registry in the database."""
    from digitnet.train import train

    cfg = compose_config(
        *SHORT,
        "data=sql",
        f"data.url={url}",
        "data.table=mnist",
        f"registry.url={url}",
        *overrides,
        output_dir=output_dir,
    )
    train(cfg)
    return json.loads((output_dir / "metrics.json").read_text())


def _latest(url: str):
    with Registry(url) as registry:
        return registry.list()[0]


def test_everything_from_the_database_after_outputs_is_gone(real_data, url, tmp_path, capsys, monkeypatch):
    assert cli.main(["data", "push", "mnist", "--url", url, "--table", "mnist", "-q"]) == 0
    outputs = tmp_path / "outputs"
    run = run_train(
        *SHORT, "data=sql", f"data.url={url}", "data.table=mnist", f"registry.url={url}", run_dir=outputs / "first"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first = _latest(url)
    assert first.ckpt_bytes == Path(first.checkpoint).stat().st_size and first.dataset == "mnist"
    first_acc = first.metrics["test/acc"]
    assert first_acc > 0.8

    images = load_split("mnist", "test")[0][:25].numpy()
    np.save(tmp_path / "inbox.npy", images)
    assert (
        cli.main(["data", "push-unlabelled", str(tmp_path / "inbox.npy"), "--url", url, "--table", "inbox", "-q"]) == 0
    )
    assert cli.main(["predict", first.id[:8], "--db", url, "--from-sql", url, "--table", "inbox", "-q"]) == 0
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inbox_predictions")).scalar() == 25
    engine.dispose()

    shutil.rmtree(outputs)
    capsys.readouterr()

    # resume the recorded run for a second epoch (sched=none: a schedule must keep its planned length)
    resumed = _train(url, tmp_path / "resumed", f"ckpt_path='{first.id[:8]}'", "trainer.max_epochs=2")
    assert resumed["epochs"] == 2
    assert (tmp_path / "resumed" / f"registry-{first.id[:8]}.ckpt").is_file()

    # fine-tune from its weights (a low LR keeps what it knew): 5 batches keep its accuracy, a fresh net's do not
    tune = ("trainer.limit_train_batches=5", "optim.lr=1e-4")
    tuned = _train(url, tmp_path / "tuned", f"init_from={first.id}", *tune)
    fresh = _train(url, tmp_path / "fresh", *tune)
    assert tuned["test/acc"] > first_acc - 0.02 and fresh["test/acc"] < first_acc - 0.2

    from digitnet.evaluate import evaluate

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        eval_cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path='{first.id[:8]}'",
                f"registry.url={url}",
                "logger=none",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
    assert evaluate(eval_cfg) == pytest.approx(first_acc, abs=1e-6)
    assert (
        f"Model: `registry model {first.id[:8]} (stored checkpoint)`" in (tmp_path / "eval" / "report.md").read_text()
    )

    assert cli.main(["models", "--db", url, "show", first.id[:8], "--ckpt-out", str(tmp_path / "f.ckpt")]) == 0
    monkeypatch.setenv("DIGITNET_REGISTRY", url)
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "digitnet.cli",
            "export",
            first.id[:8],
            "-o",
            str(tmp_path / "m.onnx"),
            "--test-images",
            "500",
        ],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "f.ckpt").stat().st_size == first.ckpt_bytes
