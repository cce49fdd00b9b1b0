"""One tiny trained MLP per test session, shared by the evaluate, registry and predict tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import compose_config


@dataclass
class TinyRun:
    run_dir: Path
    checkpoint: Path
    onnx: Path
    registry_url: str
    record_id: str
    metrics: dict


_cache: dict[str, TinyRun] = {}


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Train (once) an MLP for 30 batches of real MNIST, recorded in its own registry, plus its ONNX export."""
    if "run" not in _cache:
        from digitnet.export import export_checkpoint
        from digitnet.registry import Registry
        from digitnet.train import train

        root = tmp_path_factory.mktemp("tiny_run")
        url = f"sqlite:///{root / 'registry.db'}"
        cfg = compose_config(
            "model=mlp", "trainer.max_epochs=1", "trainer.limit_train_batches=30", "logger=none",
            "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "callbacks.model_summary=null",
            f"registry.url={url}", output_dir=root / "run",
        )
        train(cfg)
        metrics = json.loads((root / "run" / "metrics.json").read_text())
        onnx = root / "run" / "model.onnx"
        if not onnx.exists():  # unless the training config exports it already
            export_checkpoint(metrics["best_checkpoint"], onnx, test_images=200, data_root=os.environ["DIGITNET_DATA"])
        with Registry(url) as registry:
            (record,) = registry.list()
        _cache["run"] = TinyRun(root / "run", Path(metrics["best_checkpoint"]), onnx, url, record.id, metrics)
    return _cache["run"]
