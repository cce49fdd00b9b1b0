"""ONNX export: the exercise's contract (docs/design.md), verification, checkpoints, CLI, old onnxruntime."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import digitnet
from conftest import compose_config
from digitnet.checkpoint import load_checkpoint
from digitnet.data.datamodule import DigitDataModule
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.export import OnnxExport, export_checkpoint, export_onnx, main
from digitnet.module import DigitClassifier
from digitnet.train import train

TINY_CNN = ["model=cnn", "model.channels=[8,16]", "model.hidden=32"]
QUIET = ["debug=test"]
EXPORT_CALLBACK = ["++callbacks.onnx_export._target_=digitnet.export.OnnxExport", "++callbacks.onnx_export.int8=true"]
OLD_ORT = "onnxruntime==1.16.*"


@pytest.fixture(scope="session")
def run_dir(real_data, tmp_path_factory) -> Path:
    """A short real training run (~85% test accuracy) that ends with the export callback."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*TINY_CNN, "trainer.max_epochs=1", "++trainer.limit_train_batches=40", "++trainer.limit_val_batches=2"]
    train(compose_config(*overrides, "test=false", *EXPORT_CALLBACK, *QUIET, output_dir=run_dir))
    return run_dir


@pytest.fixture(scope="session")
def best_ckpt(run_dir) -> Path:
    return Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])


@pytest.fixture(scope="session")
def session(run_dir) -> ort.InferenceSession:
    return ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def mnist_sample(real_data) -> tuple[np.ndarray, np.ndarray]:
    """200 real MNIST test images as uint8 [N,1,28,28] and their labels."""
    images, labels = load_split("mnist", "test")
    return images[:200, None].numpy(), labels[:200].numpy()


def predict(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Probabilities [N,10] the way the exercise runs the model: one [1,1,28,28] float32 frame at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None].astype(np.float32)})[0] for image in images])


def test_training_run_ends_with_a_verified_onnx_and_int8_copy(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["onnx/path"] == str(run_dir / "model.onnx") and (run_dir / "model.onnx").is_file()
    assert metrics["onnx/test_images"] == 10_000
    assert metrics["onnx/test_acc"] == metrics["onnx/torch_test_acc"] > 0.7
    assert 0 <= metrics["onnx/max_abs_diff"] <= 1e-5
    assert (run_dir / "model.int8.onnx").stat().st_size == metrics["onnx_int8/bytes"]
    assert metrics["onnx_int8/bytes"] < metrics["onnx/bytes"] / 2
    assert abs(metrics["onnx_int8/test_acc"] - metrics["onnx/test_acc"]) < 0.02


@pytest.mark.parametrize("filename", ["model.onnx", "model.int8.onnx"])
def test_graph_meets_the_exercise_contract(run_dir, filename):
    model = onnx.load(run_dir / filename)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 8
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {("ai.onnx", 17)}
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output

    def described(value):
        tensor = value.type.tensor_type
        return value.name, tensor.elem_type, [d.dim_value for d in tensor.shape.dim]

    assert described(graph_input) == ("input", onnx.TensorProto.FLOAT, [1, 1, 28, 28])
    assert described(graph_output) == ("output", onnx.TensorProto.FLOAT, [1, 10])


def test_metadata_describes_the_model(run_dir):
    meta = ort.InferenceSession(str(run_dir / "model.onnx")).get_modelmeta().custom_metadata_map
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert meta["dataset"] == "mnist" and meta["model_name"] == "cnn"
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert float(meta["test_accuracy"]) == pytest.approx(metrics["onnx/test_acc"], abs=1e-4)
    assert meta["digitnet_version"] == digitnet.__version__
    assert "0-255" in meta["input_convention"] and "[N,1,28,28]" in meta["input_convention"]


def test_matches_pytorch_and_any_pixel_scale_gives_the_same_prediction(session, best_ckpt, mnist_sample):
    images, labels = mnist_sample
    raw = images.astype(np.float32)
    standardised = (raw - raw.mean(axis=(1, 2, 3), keepdims=True)) / raw.std(axis=(1, 2, 3), keepdims=True)
    probs = {name: predict(session, x) for name, x in [("0-255", raw), ("0-1", raw / 255), ("std", standardised)]}
    with torch.inference_mode():
        torch_probs = load_checkpoint(best_ckpt).net.eval()(torch.from_numpy(raw / 255)).softmax(1).numpy()
    np.testing.assert_allclose(probs["0-1"], torch_probs, atol=1e-5)
    for name in ("0-255", "std"):
        np.testing.assert_allclose(probs[name], probs["0-1"], atol=1e-5, err_msg=name)
        assert (probs[name].argmax(1) == probs["0-1"].argmax(1)).all()
    assert (probs["0-1"].argmax(1) == labels).mean() > 0.7  # a trained model, so the comparison means something


@pytest.mark.parametrize("value", [0.0, 0.5, 255.0])
def test_blank_image_gives_probabilities_not_nan(session, value):
    probs = predict(session, np.full((1, 1, 28, 28), value, np.float32))
    assert np.isfinite(probs).all() and probs.min() >= 0
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_cli_dynamic_batch_export_runs_whole_batches(best_ckpt, tmp_path, session, mnist_sample):
    images, _ = mnist_sample
    assert main([str(best_ckpt), "-o", str(tmp_path / "dynamic.onnx"), "--dynamic-batch", "--test-images", "500"]) == 0
    dynamic = ort.InferenceSession(str(tmp_path / "dynamic.onnx"))
    assert dynamic.get_inputs()[0].shape[0] == "batch"
    probs = dynamic.run(None, {"input": images[:7].astype(np.float32)})[0]
    assert probs.shape == (7, 10)
    np.testing.assert_allclose(probs, predict(session, images[:7]), atol=1e-6)


@pytest.mark.slow
def test_cli_writes_next_to_the_checkpoint_and_says_where(best_ckpt, tmp_path, capsys):
    ckpt = shutil.copy(best_ckpt, tmp_path / "best.ckpt")
    assert main([str(ckpt), "--int8"]) == 0
    out = capsys.readouterr().out
    for written in (tmp_path / "best.onnx", tmp_path / "best.int8.onnx"):
        assert written.is_file() and str(written) in out
    assert "test acc" in out and "10000 images" in out


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, dst)
    return dst


def test_compiled_model_checkpoint_exports_like_the_plain_one(best_ckpt, tmp_path, session, mnist_sample):
    def compile_net(checkpoint):
        module = load_checkpoint(best_ckpt)
        module.net = torch.compile(module.net)  # wrapping is lazy: nothing is compiled here
        checkpoint["state_dict"] = module.state_dict()
        assert any("_orig_mod." in key for key in checkpoint["state_dict"])

    ckpt = _rewrite_checkpoint(best_ckpt, tmp_path / "compiled.ckpt", compile_net)
    export_checkpoint(ckpt, tmp_path / "compiled.onnx", test_images=500)
    compiled = ort.InferenceSession(str(tmp_path / "compiled.onnx"))
    images, _ = mnist_sample
    np.testing.assert_allclose(predict(compiled, images[:20]), predict(session, images[:20]), atol=1e-7)


def test_older_checkpoint_without_newer_hparams_still_exports(best_ckpt, tmp_path):
    def drop_optional_hparams(checkpoint):  # everything the first digitnet release did not save
        hparams = checkpoint["hyper_parameters"]
        for key in ("class_names", "data_name", "label_smoothing", "aug", "sched"):
            del hparams[key]

    ckpt = _rewrite_checkpoint(best_ckpt, tmp_path / "old.ckpt", drop_optional_hparams)
    report = export_checkpoint(ckpt, tmp_path / "old.onnx", test_images=500)
    assert report.onnx_test_acc > 0.7
    meta = {p.key: p.value for p in onnx.load(tmp_path / "old.onnx").metadata_props}
    assert meta["dataset"] == "mnist" and json.loads(meta["class_names"])[9] == "9"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DigitnetError, match="not found"):
        main([str(tmp_path / "nope.ckpt")])


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(DigitnetError, match="not a readable PyTorch checkpoint"):
        export_checkpoint(tmp_path / "notes.ckpt", tmp_path / "out.onnx")


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    torch.save(nn.Linear(784, 10).state_dict(), tmp_path / "foreign.ckpt")
    with pytest.raises(DigitnetError, match="not a digitnet checkpoint"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_checkpoint_whose_weights_do_not_fit_its_config_is_a_clear_error(best_ckpt, tmp_path):
    def widen(checkpoint):
        checkpoint["hyper_parameters"]["model"]["hidden"] = 48

    ckpt = _rewrite_checkpoint(best_ckpt, tmp_path / "mismatch.ckpt", widen)
    with pytest.raises(DigitnetError, match="does not fit its own model config"):
        export_checkpoint(ckpt, tmp_path / "out.onnx")


def _module_with_backbone(backbone: nn.Module) -> DigitClassifier:
    module = DigitClassifier(model={"name": "mlp"})
    module.net[1] = backbone
    return module


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_speedrun_convpool_exports_within_the_contract(real_data, tmp_path, dynamic_batch):
    """The speedrun's net (pixel fold, pooling before the norms, global max-pool) within the contract;
    the fold (PixelUnshuffle) becomes Reshape/Transpose. Verified against PyTorch."""
    model = {
        "name": "convpool",
        "widths": [8, 16, 32],
        "space_to_depth": 2,
        "pool_before_norm": True,
        "global_pool": True,
    }
    module = DigitClassifier(model=model).eval()
    report = export_onnx(module, tmp_path / "s2d.onnx", dynamic_batch=dynamic_batch, test_images=300)
    ops = {node.op_type for node in onnx.load(tmp_path / "s2d.onnx").graph.node}
    assert {"Reshape", "Transpose"} <= ops and report.max_abs_diff <= 1e-5 and report.test_images == 300


def test_model_whose_output_is_not_1x10_is_a_clear_error(tmp_path):
    module = _module_with_backbone(nn.Sequential(nn.Flatten(), nn.Linear(784, 7)))
    with pytest.raises(DigitnetError, match=r"outputs \[1, 7\].*needs \[1, 10\]"):
        export_onnx(module, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


class StandardizeWithoutEpsilon(nn.Module):
    def forward(self, x):
        return (x - x.mean()) / x.std()


def test_model_that_gives_nan_for_a_blank_image_is_a_clear_error(tmp_path):
    module = DigitClassifier(model={"name": "mlp"})
    module.net[0] = StandardizeWithoutEpsilon()
    with pytest.raises(DigitnetError, match="NaN for a blank image"):
        export_onnx(module, tmp_path / "out.onnx")


class BatchDependent(nn.Module):
    """Python control flow on the batch size: tracing freezes the batch-1 branch into the graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits if x.shape[0] == 1 else -logits


def test_graph_that_disagrees_with_pytorch_fails_verification_and_writes_nothing(real_data, tmp_path):
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(DigitnetError, match="ONNX verification failed"):
        export_onnx(_module_with_backbone(BatchDependent()), tmp_path / "out.onnx", test_images=500)
    assert not (tmp_path / "out.onnx").exists()


def test_callback_without_a_checkpoint_exports_the_current_weights(real_data, tmp_path, caplog):
    callback = OnnxExport(test_images=300)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="no best checkpoint"), caplog.at_level(logging.INFO, logger="digitnet.export"):
        module = DigitClassifier(
            model={"name": "mlp", "hidden": [16]},
            optim={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            sched={"name": "none"},
        )
        trainer.fit(module, DigitDataModule(batch_size=16))
    assert (tmp_path / "model.onnx").is_file() and str(tmp_path / "model.onnx") in caplog.text
    assert callback.run_metrics["onnx/test_images"] == 300
    assert callback.run_metrics["onnx/test_acc"] == callback.run_metrics["onnx/torch_test_acc"]


@pytest.fixture(scope="session")
def old_ort_python(request) -> Path:
    """Python of a venv with the exercise's onnxruntime 1.16 (and numpy<2), built once per pytest cache.

    Built in a scratch folder and renamed into place when complete, so concurrent or interrupted
    runs never see a half-installed venv.
    """
    cache = Path(request.config.cache.mkdir("onnxruntime-1.16-venv"))
    python = cache / "venv" / "bin" / "python"
    if not python.exists():
        scratch = cache / f"building-{os.getpid()}"
        subprocess.run([sys.executable, "-m", "venv", str(scratch)], check=True)
        pip = subprocess.run(
            [scratch / "bin" / "python", "-m", "pip", "install", "-q", OLD_ORT, "numpy<2"],
            capture_output=True,
            text=True,
        )
        assert pip.returncode == 0, f"installing {OLD_ORT} failed:\n{pip.stderr[-2000:]}"
        try:
            scratch.rename(cache / "venv")
        except OSError:  # another run finished first
            shutil.rmtree(scratch)
    return python


OLD_ORT_PREDICT = """
import sys, numpy as np, onnxruntime as ort
model, images, out = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
probs = [session.run(None, {name: image[None]})[0] for image in np.load(images)]
np.save(out, np.concatenate(probs))
print(ort.__version__)
"""


@pytest.mark.network  # pip installs onnxruntime 1.16 once per pytest cache
@pytest.mark.parametrize("filename", ["model.onnx", "model.int8.onnx"])
def test_exercise_onnxruntime_1_16_gives_the_same_predictions(
    old_ort_python, run_dir, session, mnist_sample, tmp_path, filename
):
    images = mnist_sample[0].astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run(
        [old_ort_python, "-c", OLD_ORT_PREDICT, run_dir / filename, tmp_path / "images.npy", tmp_path / "probs.npy"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith("1.16.")
    current = ort.InferenceSession(str(run_dir / filename))
    old_probs = np.load(tmp_path / "probs.npy")
    np.testing.assert_allclose(old_probs, predict(current, images), atol=1e-5)
    assert (old_probs.argmax(1) == predict(current, images).argmax(1)).all()
