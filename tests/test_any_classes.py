"""Any number of classes end to end: a 3-class data=custom run exports [1,3]; MNIST keeps the exercise's [1,10]."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import compose_config
from digitnet import cli
from digitnet.classifier import classifier_from_onnx
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from test_custom_data import QUIET, _folder

SHORT = ("model=mlp", "sched=none", "trainer.max_epochs=3", *QUIET)  # onecycle needs more steps than 3 classes give


def test_a_three_class_custom_dataset_trains_and_exports_three_probabilities(real_data, tmp_path, monkeypatch, capsys):
    from digitnet.train import train

    images, labels = load_split("mnist", "test")
    mnist_test = images.numpy(), labels.numpy()
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    _folder(tmp_path, {"0": 60, "1": 60, "7": 60}, mnist_test)
    train(compose_config("data=custom", "data.class_names=['0','1','7']", *SHORT, output_dir=tmp_path / "run"))

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    proto = onnx.load(tmp_path / "run" / "model.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 3] and json.loads(meta["class_names"]) == ["0", "1", "7"] and meta["dataset"] == "custom"
    assert meta["output"].startswith("float32 [N,3] class probabilities")
    assert metrics["onnx/test_acc"] == metrics["onnx/torch_test_acc"] > 0.8

    classifier = classifier_from_onnx(tmp_path / "run" / "model.onnx", "model.onnx")
    seven = tmp_path / "custom" / "7" / "drawing002.png"  # a plain grayscale MNIST seven
    capsys.readouterr()  # training's own output
    assert cli.main(["predict", str(tmp_path / "run" / "model.onnx"), str(seven), "-k", "3"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{seven}  7  (7 ") and line.count(",") == 2 and classifier.class_names == ["0", "1", "7"]


def test_mnist_with_other_than_ten_classes_stops_before_training(real_data, tmp_path):
    from digitnet.train import train

    # eleven names: every MNIST label has one, so only the exercise's contract is broken
    cfg = compose_config("data.class_names=[0,1,2,3,4,5,6,7,8,9,ten]", *SHORT, output_dir=tmp_path)
    with pytest.raises(
        DigitnetError,
        match=r"^data.name=mnist models are for the exercise, whose contract is "
        r"\[1,1,28,28\] -> \[1, 10\] .* lists 11 classes; use data=custom",
    ):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # not one training step was taken
