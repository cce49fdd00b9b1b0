"""The exercise's webcam client, replayed: MNIST test digits drawn into camera frames, light-on-dark
and dark-on-light, preprocessed exactly as the client does (docs/export.md, "The exercise"), classified by the exported
model of a short `model=cnn aug=camera` training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from digitnet.data.idx import load_split
from digitnet.train import train
from test_export import QUIET

pytestmark = pytest.mark.slow  # a 200-batch training run

FRAME_HEIGHT, FRAME_WIDTH = 480, 640
DIGITS_PER_POLARITY = 100
CAMERA_RUN = [
    "model=cnn",
    "model.channels=[16,32]",
    "model.hidden=64",
    "aug=camera",
    "sched=none",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=200",
    "++trainer.limit_val_batches=2",
    "test=false",
    "++callbacks.onnx_export._target_=digitnet.export.OnnxExport",
    "++callbacks.onnx_export.test_images=2000",
    *QUIET,
]


def bilinear_resize(image: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR) for float images: half-pixel
    centres, edge clamping, no antialiasing (matches OpenCV 4.10 to 1e-4 on unit-variance data)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0, 0].numpy()


def client_preprocess(frame_bgr: np.ndarray) -> np.ndarray:
    """The client's steps, in its order: gray = mean of B,G,R as uint8; centre square crop of 75%
    of the shorter side; (roi - mean) / std; bilinear resize to 28x28 -> float32 [1,1,28,28]."""
    gray = frame_bgr.mean(axis=2).astype(np.uint8)
    height, width = gray.shape
    side = int(0.75 * min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    roi = gray[top : top + side, left : left + side].astype(np.float32)
    roi = (roi - roi.mean()) / roi.std()
    return bilinear_resize(roi, 28)[None, None]


def camera_frame(digit: np.ndarray, dark_on_light: bool, rng: np.random.Generator) -> np.ndarray:
    """A uint8 BGR frame with the 28x28 MNIST `digit` enlarged to fill most of the client's crop,
    on paper (dark ink on light) or a dark board (light chalk), with uneven light, a colour tint
    and sensor noise."""
    crop = int(0.75 * min(FRAME_HEIGHT, FRAME_WIDTH))
    size = int(crop * rng.uniform(0.8, 1.0))
    stroke = bilinear_resize(digit.astype(np.float32) / 255, size)  # upscaling: smooth strokes
    background, ink = (
        (rng.uniform(170, 220), rng.uniform(20, 60)) if dark_on_light else (rng.uniform(20, 60), rng.uniform(170, 230))
    )
    ramp = np.linspace(-1, 1, FRAME_WIDTH, dtype=np.float32) * rng.uniform(-15, 15)  # light falls off to one side
    frame = np.full((FRAME_HEIGHT, FRAME_WIDTH), background, np.float32) + ramp
    top = (FRAME_HEIGHT - size) // 2 + rng.integers(-crop // 20, crop // 20 + 1)
    left = (FRAME_WIDTH - size) // 2 + rng.integers(-crop // 20, crop // 20 + 1)
    region = frame[top : top + size, left : left + size]
    region += (ink - region) * stroke
    tint = rng.uniform(-10, 10, size=3).astype(np.float32)
    bgr = frame[..., None] + tint + 3 * rng.standard_normal((FRAME_HEIGHT, FRAME_WIDTH, 3), np.float32)
    return np.clip(bgr, 0, 255).round().astype(np.uint8)


def camera_accuracy(model_path: Path, dark_on_light: bool) -> float:
    images, labels = load_split("mnist", "test")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    hits = 0
    for image, label in zip(images[:DIGITS_PER_POLARITY].numpy(), labels[:DIGITS_PER_POLARITY].tolist()):
        probs = session.run(None, {name: client_preprocess(camera_frame(image, dark_on_light, rng))})[0]
        hits += int(probs.argmax() == label)
    return hits / DIGITS_PER_POLARITY


@pytest.fixture(scope="module")
def camera_model(real_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("camera_run")
    train(compose_config(*CAMERA_RUN, output_dir=run_dir))
    return run_dir / "model.onnx"


def test_client_preprocessing_matches_the_design():
    frame = np.zeros((FRAME_HEIGHT, FRAME_WIDTH, 3), np.uint8)
    frame[60:420, 140:500] = [10, 20, 60]  # exactly the client's 360x360 centre crop; gray = 30
    frame[60:240, 140:500] = [100, 110, 121]  # its top half, gray = floor(110.33) = 110
    x = client_preprocess(frame)
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, :14], 1.0, atol=1e-5)  # standardised two-level image: +-1
    np.testing.assert_allclose(x[0, 0, 14:], -1.0, atol=1e-5)


@pytest.mark.parametrize("dark_on_light", [False, True], ids=["light-on-dark", "dark-on-light"])
def test_camera_trained_model_reads_digits_through_the_client(camera_model, dark_on_light):
    assert camera_accuracy(camera_model, dark_on_light) >= 0.9
