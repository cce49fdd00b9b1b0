"""`data=custom`: image folders of any size and mode, MNIST-style preparation, stratified splits, init_from."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import REPO, compose_config
from digitnet.checkpoint import load_checkpoint
from digitnet.data.datamodule import DigitDataModule
from digitnet.data.folder import load_folder_split, split_files
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.train import build_module, init_weights
from tiny_run import tiny_run

QUIET = ("debug=test", "registry.enabled=false")


@pytest.fixture(scope="module")
def mnist_test(real_data):
    images, labels = load_split("mnist", "test")
    return images.numpy(), labels.numpy()


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _rgba_canvas(digit: np.ndarray, size: int) -> Image.Image:
    """A drawing on a transparent canvas, like the seed project's 256x256 RGBA files: alpha is the ink."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = 30  # dark ink colour; only the alpha channel says where it is
    rgba[..., 3] = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))
    return Image.fromarray(rgba, "RGBA")


def _paper(digit: np.ndarray) -> Image.Image:
    """A colour photo of dark ink on light paper, not square, digit off-centre."""
    page = Image.new("L", (300, 200), 225)
    page.paste(Image.fromarray(255 - digit).resize((120, 120), Image.Resampling.BILINEAR), (30, 50))
    return page.convert("RGB")


def _folder(root: Path, counts: dict[str, int], mnist_test) -> Path:
    """<root>/custom/<label>/ with `counts[label]` MNIST test digits of that label, in every mode in turn."""
    images, labels = mnist_test
    makers = [lambda d: _rgba_canvas(d, 256), _paper, lambda d: Image.fromarray(d, "L")]
    for label, n in counts.items():
        folder = root / "custom" / label
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == int(label))[:n]):
            makers[i % 3](images[index]).save(folder / f"drawing{i:03d}.png")
    return root / "custom"


def test_any_size_and_mode_is_prepared_like_mnist(tmp_path, mnist_test):
    images, labels = mnist_test
    digit = images[0]
    folder = tmp_path / "custom" / str(labels[0])
    folder.mkdir(parents=True)
    _rgba_canvas(digit, 256).save(folder / "canvas.png")
    _paper(digit).save(folder / "photo.jpg", quality=95)
    Image.fromarray(digit, "L").save(folder / "mnist.png")
    files = split_files(tmp_path / "custom", "train") + split_files(tmp_path / "custom", "test")
    prepared, got = zip(*(load_folder_split(tmp_path / "custom", s) for s in ("train", "test")))
    prepared, got = torch.cat(prepared), torch.cat(got)
    assert prepared.dtype == torch.uint8 and prepared.shape == (3, 28, 28) and got.tolist() == [labels[0]] * 3
    assert sorted(p.name for p, _ in files) == ["canvas.png", "mnist.png", "photo.jpg"]
    for image in prepared.numpy():  # light digit on black, close to the original MNIST image
        assert image[0].max() == 0 and image.max() == 255
        assert np.corrcoef(image.ravel().astype(float), digit.ravel().astype(float))[0, 1] > 0.85


def test_split_is_stratified_deterministic_and_disjoint(tmp_path, mnist_test):
    counts = {"0": 20, "1": 7, "2": 2, "3": 1}
    folder = _folder(tmp_path, counts, mnist_test)
    train, test = split_files(folder, "train"), split_files(folder, "test")
    test_per_class = np.bincount([label for _, label in test], minlength=4).tolist()
    assert test_per_class == [3, 1, 1, 0]  # 15% per class, one or more for every class of two images
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert len(train) + len(test) == sum(counts.values())
    # the same file names split the same way in another folder (the hash is of label/name only)
    copy = _folder(tmp_path / "copy", {"0": 20, "1": 7, "2": 2, "3": 1}, mnist_test)
    assert [p.relative_to(copy) for p, _ in split_files(copy, "test")] == [p.relative_to(folder) for p, _ in test]
    x, y = load_folder_split(folder, "test")
    assert y.tolist() == [label for _, label in test] and len(x) == 5


def test_datamodule_takes_val_as_a_fraction_of_train(tmp_path, mnist_test, monkeypatch):
    monkeypatch.delenv("DIGITNET_DATA", raising=False)
    _folder(tmp_path, {str(k): 12 for k in range(10)}, mnist_test)
    dm = DigitDataModule("custom", root=str(tmp_path), batch_size=16, val_size=0.2)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    # 12 per class: 2 test, 10 train -> 100 train images, 20 of them validation, two per class
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (80, 20, 20)
    assert torch.bincount(dm.val_set.labels).tolist() == [2] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 28, 28) and y.dtype == torch.int64


def test_bad_folders_give_clear_errors(tmp_path, mnist_test):
    with pytest.raises(DigitnetError, match="no custom dataset at .*digitnet serve"):
        load_folder_split(tmp_path / "custom", "train")
    folder = _folder(tmp_path, {"3": 4}, mnist_test)
    (folder / "seven").mkdir()
    with pytest.raises(DigitnetError, match=r"folders \['seven'\] that are not class names"):
        load_folder_split(folder, "train")
    (folder / "seven").rmdir()
    (folder / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DigitnetError, match="broken.png is not a readable image"):
        load_folder_split(folder, "train")
    Image.new("RGBA", (64, 64)).save(folder / "3" / "broken.png")  # a blank, fully transparent canvas
    with pytest.raises(DigitnetError, match="broken.png: no digit found"):
        load_folder_split(folder, "train")
    with pytest.raises(DigitnetError, match="unknown split 'val'"):
        load_folder_split(folder, "val")
    empty = tmp_path / "empty" / "custom"
    (empty / "5").mkdir(parents=True)
    with pytest.raises(DigitnetError, match="has no train images"):
        load_folder_split(empty, "train")


def test_init_from_loads_the_checkpoint_weights(trained, tmp_path):
    cfg = compose_config("data=custom", "model=mlp", output_dir=tmp_path)
    module = build_module(cfg)
    init_weights(module, str(trained.checkpoint))
    expected = load_checkpoint(trained.checkpoint).net.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in module.net.state_dict().items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model=cnn",), "holds a model=mlp checkpoint but this run builds model=cnn; add model=mlp"),
        (("model=mlp", "model.hidden=[32]"), "does not fit this run's model"),
        (("model=mlp", "ckpt_path=last.ckpt"), "either ckpt_path .* or init_from"),
    ],
)
def test_init_from_refuses_another_model(trained, tmp_path, mnist_test, monkeypatch, overrides, message):
    from digitnet.train import train

    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    _folder(tmp_path, {str(k): 3 for k in range(10)}, mnist_test)
    (tmp_path / "last.ckpt").write_bytes(trained.checkpoint.read_bytes())
    overrides = [o.replace("last.ckpt", str(tmp_path / "last.ckpt")) for o in overrides]
    cfg = compose_config(
        "data=custom", *overrides, f"init_from='{trained.checkpoint}'", *QUIET, output_dir=tmp_path / "run"
    )
    with pytest.raises(DigitnetError, match=message):
        train(cfg)


@pytest.mark.parametrize("aug", ["none", "light", "strong", "camera"])
def test_custom_training_runs_with_every_aug_preset(trained, tmp_path, mnist_test, monkeypatch, aug):
    from digitnet.train import train

    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    _folder(tmp_path, {str(k): 8 for k in range(10)}, mnist_test)
    cfg = compose_config(
        "data=custom",
        "model=mlp",
        f"aug={aug}",
        "trainer.max_epochs=1",
        "callbacks.onnx_export=null",
        f"init_from='{trained.checkpoint}'",
        *QUIET,
        output_dir=tmp_path / "run",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["test/acc"] <= 1 and np.isfinite(metrics["train/loss"])


def test_three_named_classes_train_export_evaluate_predict_and_serve(tmp_path, mnist_test, monkeypatch, capsys):
    """data=custom with classes a, b and c (drawings of 0, 1 and 7) through every command a user runs on it."""
    from digitnet import cli
    from digitnet.train import train
    from test_serve import _canvas_png, _post, _start_server, _stop

    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    folder = _folder(tmp_path, {"0": 60, "1": 60, "7": 60}, mnist_test)
    for digit, name in (("0", "a"), ("1", "b"), ("7", "c")):
        (folder / digit).rename(folder / name)
    run = tmp_path / "run"
    train(
        compose_config(
            "data=custom",
            "data.class_names=[a,b,c]",
            "model=mlp",
            "sched=none",
            "trainer.max_epochs=3",
            *QUIET,
            output_dir=run,
        )
    )
    checkpoint = Path(json.loads((run / "metrics.json").read_text())["best_checkpoint"])

    exported = tmp_path / "exported.onnx"
    assert cli.main(["export", str(checkpoint), "-o", str(exported)]) == 0
    proto = onnx.load(exported)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["class_names"]) == ["a", "b", "c"]
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 3]

    evaluation = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            f"ckpt_path={checkpoint}",
            "logger=none",
            "progress_bar=false",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    test_images = len(split_files(folder, "test", ["a", "b", "c"]))
    assert report["dataset"] == "custom" and report["test/images"] == test_images == sum(report["per_class"]["support"])
    assert len(report["per_class"]["support"]) == 3 and report["test/acc"] > 0.8

    seven = folder / "c" / "drawing002.png"  # a plain grayscale MNIST seven
    capsys.readouterr()
    assert cli.main(["predict", str(exported), str(seven)]) == 0
    assert capsys.readouterr().out.startswith(f"{seven}  c  (")

    server, proc = _start_server(tmp_path, str(run), "--collect-dir", "drawings/custom")
    try:
        with urllib.request.urlopen(server.url + "api/info", timeout=30) as response:
            assert json.loads(response.read())["classes"] == ["a", "b", "c"]
        images, labels = mnist_test
        status, answer = _post(server.url + "api/predict", _canvas_png(images[np.flatnonzero(labels == 7)[0]]))
    finally:
        _stop(proc)
    assert status == 200 and answer["top"][0]["label"] == "c" and len(answer["probabilities"]) == 3
