"""`digitnet predict`: MNIST-style preparation, every model and input kind, CSV output, bad inputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx
from digitnet import cli
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.classifier import load_classifier
from digitnet.data.prepare import prepare_digit
from digitnet.predict import load_inputs
from tiny_run import tiny_run

N = 30


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def test_digits(real_data):
    images, labels = load_split("mnist", "test")
    return images[:N].numpy(), labels[:N].numpy()


def _photo(digit: np.ndarray, i: int) -> Image.Image:
    """An MNIST digit as a photo of paper: dark ink on light grey, enlarged, off-centre, in colour."""
    ink = Image.fromarray(255 - digit).resize((90 + 3 * i, 90 + 3 * i), Image.Resampling.BILINEAR)
    page = Image.new("L", (320, 240), 230)
    page.paste(ink, (20 + 5 * i, 10 + 2 * i))
    return page.convert("RGB")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def _predict(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepared_mnist_digit_looks_like_the_original(test_digits):
    """MNIST is already prepared, so preparing it again (from any polarity or size) changes little."""
    images, _ = test_digits
    for digit in images[:10]:
        assert _correlation(prepare_digit(Image.fromarray(digit)), digit) > 0.98
        photo = prepare_digit(_photo(digit, 3))  # dark on light, 4x larger, off-centre, RGB
        assert _correlation(photo, digit) > 0.8
        drawn = np.zeros((*digit.shape, 4), np.uint8)
        drawn[..., 3] = digit  # black strokes on a transparent canvas
        assert _correlation(prepare_digit(Image.fromarray(drawn, "RGBA")), digit) > 0.9


def test_preparation_fits_20x20_and_centres_the_mass():
    bar = np.zeros((300, 100), np.uint8)
    bar[20:280, 30:50] = 255  # a tall stroke near the left edge
    out = prepare_digit(Image.fromarray(bar)).astype(float)
    rows, cols = np.flatnonzero(out.sum(1)), np.flatnonzero(out.sum(0))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 <= 3
    centre = [(out.sum(axis) * np.arange(28)).sum() / out.sum() for axis in (1, 0)]
    assert np.allclose(centre, 14, atol=0.5)  # where MNIST puts it


def test_background_flag_overrides_detection(test_digits):
    digit = test_digits[0][0]
    paper = Image.fromarray(255 - digit)
    assert _correlation(prepare_digit(paper, "light"), digit) > 0.9
    with pytest.raises(DigitnetError, match="seven.png: no digit found"):  # told wrong: paper is no digit
        prepare_digit(paper, "dark", name="seven.png")
    with pytest.raises(DigitnetError, match="no digit found"):
        prepare_digit(Image.new("RGB", (64, 64), (200, 200, 200)), name="blank.png")


def test_png_and_jpeg_photos_are_classified(trained, test_digits, tmp_path, capsys):
    images, labels = test_digits
    for i, digit in enumerate(images):
        _photo(digit, i % 10).save(tmp_path / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    code, out, err = _predict(capsys, str(trained.checkpoint), str(tmp_path), "-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == N and lines[0].startswith(str(tmp_path / "00.jpg"))
    predicted = np.array([int(line.split()[1]) for line in lines])
    for suffix in (0, 1):  # JPEGs and PNGs alike: the tiny model gets ~86% of clean test digits
        assert (predicted[suffix::2] == labels[suffix::2]).mean() >= 0.7
    assert all(line.count(",") == 1 for line in lines)  # top-2


def test_idx_npy_onnx_and_registry_models_agree(trained, test_digits, tmp_path, capsys):
    images, labels = test_digits
    idx = write_idx(tmp_path / "digits-idx3-ubyte", images)
    npy = tmp_path / "digits.npy"
    np.save(npy, images.astype(np.float32) / 255)  # floats in [0, 1] work as well as uint8
    reference = load_classifier(str(trained.checkpoint)).probabilities(torch.from_numpy(images)[:, None].float() / 255)
    assert (reference.argmax(1).numpy() == labels).mean() >= 0.7
    for model in (str(trained.checkpoint), str(trained.onnx), "best:mnist", trained.record_id[:8]):
        csv_path = tmp_path / f"{model.replace('/', '_')}.csv"
        code, out, err = _predict(capsys, model, str(idx), str(npy), "--csv", str(csv_path), "--db", trained.registry_url)
        assert code == 0, err
        assert out.strip() == f"wrote {2 * N} predictions to {csv_path}"
        rows = list(csv.DictReader(csv_path.open()))
        assert [r["input"] for r in rows[:2]] == [f"{idx}[0]", f"{idx}[1]"] and rows[N]["input"] == f"{npy}[0]"
        probs = np.array([[float(r[str(c)]) for c in range(10)] for r in rows])
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
        assert np.allclose(probs[:N], reference.numpy(), atol=1e-4) and np.allclose(probs[N:], probs[:N], atol=1e-4)
        assert [int(r["predicted"]) for r in rows[:N]] == reference.argmax(1).tolist()


def test_save_prepared_writes_what_the_model_sees(trained, test_digits, tmp_path, capsys):
    _photo(test_digits[0][0], 0).save(tmp_path / "seven.png")
    code, out, err = _predict(capsys, str(trained.onnx), str(tmp_path / "seven.png"), "--save-prepared", str(tmp_path / "seen.png"))
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "seen.png").convert("L"))
    assert grid.shape == (28, 28)  # a grid of one image has no padding
    assert _correlation(grid, load_inputs([str(tmp_path / "seven.png")]).images[0].numpy()) > 0.99


@pytest.mark.parametrize("case", ["not an image", "empty folder", "unknown model id", "unreadable checkpoint", "missing input"])
def test_bad_inputs_are_one_line_errors_and_write_nothing(trained, test_digits, tmp_path, capsys, case):
    good = tmp_path / "good.png"
    _photo(test_digits[0][0], 0).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained.checkpoint.read_bytes()[:5000])  # a truncated download
    model, inputs, message = {
        "not an image": (trained.checkpoint, [good, text], f"{text} is not an image, IDX or .npy file"),
        "empty folder": (trained.checkpoint, [good, empty], f"folder {empty} holds no images"),
        "unknown model id": ("0123abcd", [good], "no model with id '0123abcd' in registry"),
        "unreadable checkpoint": (broken, [good], f"{broken} is not a readable PyTorch checkpoint"),
        "missing input": (trained.checkpoint, [tmp_path / "nope.png"], "input"),
    }[case]
    out_csv = tmp_path / "out.csv"
    out_csv.write_text("previous results\n")
    code, out, err = _predict(capsys, str(model), *map(str, inputs), "--csv", str(out_csv), "--db", trained.registry_url)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert out_csv.read_text() == "previous results\n"  # untouched, and no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.png", "notes.png", "empty", "broken.ckpt", "out.csv"])
