"""One tiny trained MLP per test session, shared by the evaluate, registry and predict tests."""

from __future__ import annotations

import json
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
    """Train (once) an MLP for 30 batches of real MNIST, with its model.onnx, recorded in its own registry."""
    if "run" not in _cache:
        from digitnet.registry import Registry
        from digitnet.train import train

        root = tmp_path_factory.mktemp("tiny_run")
        url = f"sqlite:///{root / 'registry.db'}"
        cfg = compose_config(
            "model=mlp",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=30",
            "debug=test",
            f"registry.url={url}",
            output_dir=root / "run",
        )
        train(cfg)
        metrics = json.loads((root / "run" / "metrics.json").read_text())
        with Registry(url) as registry:
            (record,) = registry.list()
        checkpoint, onnx = Path(metrics["best_checkpoint"]), Path(metrics["onnx/path"])
        _cache["run"] = TinyRun(root / "run", checkpoint, onnx, url, record.id, metrics)
    return _cache["run"]
