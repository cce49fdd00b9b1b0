"""A checkpoint written by an earlier digitnet (an MLP with the flat `aug` preset, `optim` without
`_partial_` and the loose training flags of its time) still loads for eval, export and predict, and
gives the probabilities that digitnet gave then (checkpoint_v1.json).

The checkpoint is kept as text, tests/data/checkpoint_v1.ckpt.json: the dict Lightning saved, with
each tensor as {"tensor": values, "dtype": name}, a dict with non-string keys as {"items": [[key,
value], ...]} and a tuple as {"tuple": [...]}; the fixture writes it back with torch.save."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from digitnet import cli
from digitnet.checkpoint import load_checkpoint
from digitnet.data.idx import load_split
from digitnet.evaluate import evaluate
from digitnet.export import export_checkpoint
from digitnet.optim import build_optimizer
from test_evaluate import eval_config

DATA = Path(__file__).parent / "data"
EXPECTED = np.array(json.loads((DATA / "checkpoint_v1.json").read_text())["probabilities"])


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if "items" in value:
        return {key: _decode(v) for key, v in value["items"]}
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    return {key: _decode(v) for key, v in value.items()}


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """The earlier digitnet's checkpoint, written back to a .ckpt file from its text form."""
    path = tmp_path_factory.mktemp("old") / "checkpoint_v1.ckpt"
    torch.save(_decode(json.loads((DATA / "checkpoint_v1.ckpt.json").read_text())), path)
    return path


@pytest.fixture(scope="module")
def images(real_data) -> torch.Tensor:
    """The 32 test images the expected probabilities were computed on, as float [B,1,28,28] in [0, 1]."""
    return load_split("mnist", "test")[0][: len(EXPECTED), None].float() / 255


def test_the_old_checkpoint_loads_with_its_settings(old, images):
    module = load_checkpoint(old)
    assert module.hparams.model == {"name": "mlp", "hidden": [6], "dropout": 0.0}
    assert module.hparams.label_smoothing == 0.1 and module.hparams.mixup_alpha == 0.2
    assert isinstance(build_optimizer(module.net, module.hparams.optim), torch.optim.SGD)  # resumable as well
    # its flat aug=camera settings, read as today's preset of per-op settings
    assert module.hparams.aug == OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "aug" / "camera.yaml"))
    with torch.no_grad():
        np.testing.assert_allclose(module.eval()(images).softmax(1).numpy(), EXPECTED, atol=1e-5)


def test_the_old_checkpoint_exports(old, images, tmp_path):
    report = export_checkpoint(old, tmp_path / "old.onnx", test_images=200, progress_bar=False)
    assert report.test_images == 200 and report.onnx_test_acc == report.torch_test_acc
    session = ort.InferenceSession(str(tmp_path / "old.onnx"))
    probs = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: images[i : i + 1].numpy()})[0] for i in range(len(images))]
    )
    np.testing.assert_allclose(probs, EXPECTED, atol=1e-5)


def test_the_old_checkpoint_predicts(old, images, tmp_path, capsys):
    np.save(tmp_path / "digits.npy", images[:, 0].numpy())
    assert cli.main(["predict", str(old), str(tmp_path / "digits.npy"), "--csv", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    np.testing.assert_allclose([[float(r[str(c)]) for c in range(10)] for r in rows], EXPECTED, atol=1e-5)


def test_the_old_checkpoint_evaluates(old, real_data, tmp_path):
    acc = evaluate(
        eval_config(f"ckpt_path='{old}'", "data.limit=500", "logger=none", "progress_bar=false", output_dir=tmp_path)
    )
    summary = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert (tmp_path / "report.md").is_file() and summary["test/images"] == 500 and summary["test/acc"] == acc
