"""Every configured logger gets the run's report: config, curves, final metrics, figures, model files.

Real runs on real MNIST, read back through each tracker's own reader: MLflow's client on a
throwaway local store, W&B's offline run file (tests/wandb_records.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from conftest import REPO, compose_config
from digitnet.train import train
from wandb_records import items, records

TINY = [
    "model=mlp",
    "sched=none",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.onnx_export.test_images=100",
    "debug=test",
]


def test_logger_group_takes_several_loggers(tmp_path):
    cfg = compose_config("logger=[tensorboard,mlflow,wandb]", output_dir=tmp_path)
    assert [c._target_.rsplit(".", 1)[1] for c in cfg.logger.values()] == [
        "TensorBoardLogger",
        "MLFlowLogger",
        "WandbLogger",
    ]
    assert not compose_config("logger=none", output_dir=tmp_path).get("logger")


def test_a_defaults_list_takes_several_loggers(tmp_path):
    """`- logger: [tensorboard, mlflow]` in a config's defaults list, e.g. an experiment's."""
    (tmp_path / "mine.yaml").write_text(
        f"defaults:\n  - logger: [tensorboard, mlflow]\n  - _self_\nhydra:\n  searchpath: [file://{REPO / 'conf'}]\n"
    )
    with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
        assert list(compose("mine").logger) == ["tensorboard", "mlflow"]


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for entry in client.list_artifacts(run_id, path):
        files += artifact_files(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return files


@pytest.mark.slow
def test_mlflow_run_holds_params_curves_figures_and_model(real_data, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    train(
        compose_config(
            *TINY,
            "logger=[tensorboard,mlflow]",
            f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}",
            output_dir=tmp_path / "run",
        )
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mlp" and run.data.params["trainer.max_epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one point per epoch
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.metrics["onnx/test_acc"] == pytest.approx(metrics["onnx/test_acc"])
    files = artifact_files(client, run.info.run_id)
    assert "model.onnx" in files and Path(metrics["best_checkpoint"]).name in files
    assert any(f.startswith("test/confusion_matrix/") and f.endswith(".png") for f in files), files
    assert any(f.startswith("images/train~augmented_samples") for f in files), files
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # and TensorBoard beside it


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same(real_data, tmp_path):
    train(compose_config(*TINY, "logger=wandb", output_dir=tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")

    config, summary, val_acc, files, artifacts = {}, {}, [], [], []
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= items(record.config.update)
        elif kind == "summary":
            summary |= items(record.summary.update)
        elif kind == "history":
            val_acc += [v for k, v in items(record.history.item).items() if k == "val/acc"]
        elif kind == "files":
            files += [f.path for f in record.files.files]
        elif kind == "artifact":
            artifacts += [entry.path for entry in record.artifact.manifest.contents]
    assert json.loads(config["model.name"]) == "mlp" and json.loads(config["trainer.max_epochs"]) == 2
    assert len(val_acc) == 2
    assert json.loads(summary["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert any(f.startswith("media/images/test/confusion_matrix") for f in files), files
    assert sorted(artifacts) == sorted(["model.onnx", Path(metrics["best_checkpoint"]).name])


@pytest.mark.slow
def test_eval_sends_its_report_to_the_loggers(real_data, tmp_path, tmp_path_factory):
    from digitnet.evaluate import evaluate
    from test_evaluate import eval_config
    from tiny_run import tiny_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    acc = evaluate(
        eval_config(
            f"ckpt_path='{tiny_run(tmp_path_factory).checkpoint}'",
            "data.limit=300",
            "logger=mlflow",
            f"logger.mlflow.tracking_uri={store}",
            "logger.mlflow.experiment_name=eval",
            f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}",
            output_dir=tmp_path / "eval",
        )
    )
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert run.data.metrics["eval/acc"] == pytest.approx(acc) and "eval/ece" in run.data.metrics
    files = artifact_files(client, run.info.run_id)
    for name in ("confusion_matrix", "misclassified", "reliability", "robustness"):
        assert f"eval/{name}/step_000000.png" in files, files
    assert {"report.md", "eval_metrics.json"} <= set(files)


@pytest.mark.slow
def test_a_failed_run_ends_its_wandb_run(real_data, tmp_path):
    """A sweep trial that raises must not leave its W&B run open: the next trial would log into it."""
    import wandb

    cfg = compose_config(
        *TINY, "logger=wandb", "+callbacks.boom._target_=failing_callback.Boom", output_dir=tmp_path / "failed"
    )
    with pytest.raises(RuntimeError, match="boom after epoch 0"):
        train(cfg)
    assert wandb.run is None
    train(compose_config(*TINY, "logger=wandb", output_dir=tmp_path / "next"))
    assert len(list((tmp_path / "next" / "wandb").glob("offline-run-*"))) == 1  # a run of its own
