"""`digitnet predict`: MNIST-style preparation, every model and input kind, CSV output, bad inputs."""

from __future__ import annotations

import csv
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx
from digitnet import cli
from digitnet.classifier import load_classifier
from digitnet.data.idx import load_split
from digitnet.data.prepare import prepare_digit
from digitnet.errors import DigitnetError
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
        code, out, err = _predict(
            capsys, model, str(idx), str(npy), "--csv", str(csv_path), "--db", trained.registry_url
        )
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
    code, out, err = _predict(
        capsys, str(trained.onnx), str(tmp_path / "seven.png"), "--save-prepared", str(tmp_path / "seen.png")
    )
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "seen.png").convert("L"))
    assert grid.shape == (28, 28)  # a grid of one image has no padding
    assert _correlation(grid, load_inputs([str(tmp_path / "seven.png")]).images[0].numpy()) > 0.99


def _huge_png(path, width: int, height: int) -> None:
    """A small PNG whose header claims width x height pixels (its data would not even fill a row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit gray
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def _npy(path, index: int, value: float) -> None:
    images = np.zeros((5, 28, 28), np.float32)
    images[:, 10:18, 13:15] = 1
    images[index, 3, 4] = value
    np.save(path, images)


@pytest.fixture
def good(test_digits, tmp_path):
    path = tmp_path / "good.png"
    _photo(test_digits[0][0], 0).save(path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "empty folder",
        "unknown model id",
        "unreadable checkpoint",
        "missing input",
        "--csv is a folder",
        "--csv under a file",
        "--csv where nothing can be written",
        "--save-prepared is a folder",
    ],
)
def test_bad_runs_are_one_line_errors_and_write_nothing(trained, good, tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained.checkpoint.read_bytes()[:5000])  # a truncated download
    out_csv = tmp_path / "out.csv"
    out_csv.write_text("previous results\n")
    model, inputs, options, message = {
        "empty folder": (trained.checkpoint, [good, empty], [], f"folder {empty} holds no images"),
        "unknown model id": ("0123abcd", [good], [], "no model with id '0123abcd' in registry"),
        "unreadable checkpoint": (broken, [good], [], f"{broken} is not a readable PyTorch checkpoint"),
        "missing input": (
            trained.checkpoint,
            [tmp_path / "nope.png"],
            [],
            f"input {tmp_path / 'nope.png'} does not exist",
        ),
        "--csv is a folder": (
            trained.checkpoint,
            [good],
            ["--csv", empty],
            f"--csv {empty} is a folder; give a file name",
        ),
        "--csv under a file": (
            trained.checkpoint,
            [good],
            ["--csv", out_csv / "x.csv"],
            f"--csv {out_csv / 'x.csv'} cannot be written: {out_csv} takes no new files (Not a directory)",
        ),
        "--csv where nothing can be written": (
            trained.checkpoint,
            [good],
            ["--csv", "/proc/digits.csv"],
            "--csv /proc/digits.csv cannot be written: /proc takes no new files",
        ),
        "--save-prepared is a folder": (
            trained.checkpoint,
            [good],
            ["--save-prepared", empty],
            f"--save-prepared {empty} is a folder; give a file name",
        ),
    }[case]
    options = options or ["--csv", out_csv]
    code, out, err = _predict(capsys, str(model), *map(str, inputs), *map(str, options), "--db", trained.registry_url)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert out_csv.read_text() == "previous results\n"  # untouched, and no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ckpt", "empty", "good.png", "out.csv"]
    assert list(empty.iterdir()) == []


def _bad_file(case: str, folder) -> tuple[str, str]:
    """Writes the bad file of `case` into `folder`; returns its name and the error line's text after the name."""
    if case == "not an image":
        (folder / "notes.png").write_text("not a picture\n")
        return "notes.png", " is not an image, IDX or .npy file (images: .bmp,"
    if case == "blank":
        Image.new("RGB", (64, 64), (200, 200, 200)).save(folder / "blank.png")
        return "blank.png", (
            ": no digit found (the image is blank or has almost no contrast); "
            "if it holds a digit, say its background: --background light or dark"
        )
    if case.startswith("header claims"):
        side = int(case.split()[-1])
        _huge_png(folder / "huge.png", side, side)
        sizes = f"is {side}x{side} pixels" if side * side < 89_478_485 else "claims over 89 million pixels"
        return "huge.png", f" {sizes}; at most 16777216 pixels (4096x4096) are read; downscale it"
    if case == "truncated png":
        (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:300])
        return "cut.png", " is not an image, IDX or .npy file"
    value = {"NaN in .npy": np.nan, "inf in .npy": np.inf, "-inf in .npy": -np.inf}[case]
    _npy(folder / "digits.npy", 3, value)
    return "digits.npy", ": 1 image(s) hold NaN or infinite pixels, the first is [3]"


@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "blank",
        "header claims 5000",
        "header claims 10000",
        "header claims 30000",
        "truncated png",
        "NaN in .npy",
        "inf in .npy",
        "-inf in .npy",
    ],
)
@pytest.mark.parametrize("output", ["stdout", "csv"])
def test_a_bad_file_is_one_line_and_the_others_are_classified(trained, good, tmp_path, capsys, case, output):
    name, message = _bad_file(case, tmp_path)
    bad = tmp_path / name
    csv_path = tmp_path / "out.csv"
    options = ["--csv", str(csv_path)] if output == "csv" else []
    code, out, err = _predict(capsys, str(trained.checkpoint), str(good), str(bad), *options)
    assert code == 1
    assert err.startswith(f"error: {bad}{message}") and err.count("\n") == 1 and "Traceback" not in err
    if output == "csv":
        assert out == f"wrote 1 predictions to {csv_path}\n"
        assert [row["input"] for row in csv.DictReader(csv_path.open())] == [str(good)]
    else:
        assert out.startswith(f"{good}  ") and out.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"good.png", name} | ({"out.csv"} if output == "csv" else set())
    )


def test_only_bad_files_write_nothing_and_exit_1(trained, tmp_path, capsys):
    names = [_bad_file(case, tmp_path)[0] for case in ("blank", "NaN in .npy")]
    code, out, err = _predict(
        capsys, str(trained.checkpoint), *(str(tmp_path / n) for n in names), "--csv", str(tmp_path / "out.csv")
    )
    assert code == 1 and out == "" and err.count("\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_a_clean_npy_file_is_unchanged_by_the_nan_check(tmp_path):
    _npy(tmp_path / "digits.npy", 3, 0.5)
    inputs = load_inputs([tmp_path / "digits.npy"])
    assert inputs.errors == [] and inputs.images.shape == (5, 28, 28) and inputs.images[3, 3, 4] == 128


def test_dark_digit_on_mid_grey_needs_the_background_flag(trained, test_digits, tmp_path, capsys):
    """The border's median is just under half: auto takes it for a dark screen and finds no digit."""
    digit = test_digits[0][0].astype(float) / 255
    grey = Image.fromarray(np.round(120 * (1 - digit)).astype(np.uint8)).resize((84, 84))
    grey.save(tmp_path / "grey.png")
    code, out, err = _predict(capsys, str(trained.checkpoint), str(tmp_path / "grey.png"))
    assert code == 1 and out == "" and err.endswith("--background light or dark\n")
    code, out, err = _predict(capsys, str(trained.checkpoint), str(tmp_path / "grey.png"), "--background", "light")
    assert code == 0 and err == "" and out.split()[1] == str(test_digits[1][0])


@pytest.mark.parametrize("suffix", ["png", "tif", "pgm"])
def test_16_bit_images_are_scaled_not_clipped(test_digits, tmp_path, suffix):
    """Dark ink (20000) on light paper (50000): converted the 8-bit way both clip to white."""
    digit = test_digits[0][0]
    paper = np.round(50000 - digit.astype(float) / 255 * 30000).astype(np.uint16)
    Image.fromarray(paper).resize((84, 84), Image.Resampling.BILINEAR).save(tmp_path / f"seven.{suffix}")
    with Image.open(tmp_path / f"seven.{suffix}") as image:
        assert image.mode in ("I;16", "I")
        assert _correlation(prepare_digit(image), digit) > 0.9


def test_predicting_into_a_closed_pipe_exits_quietly(trained, test_digits, real_data, tmp_path):
    """`digitnet predict ... | head -2`: more output than a pipe holds, so writing must hit the closed end."""
    images, _ = load_split("mnist", "test")
    idx = write_idx(tmp_path / "digits-idx3-ubyte", images[:3000].numpy())
    predict = subprocess.Popen(
        [sys.executable, "-m", "digitnet.cli", "predict", str(trained.onnx), str(idx)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    head = subprocess.run(["head", "-2"], stdin=predict.stdout, capture_output=True, text=True)
    predict.stdout.close()
    assert predict.wait(timeout=300) == 1 and predict.stderr.read() == ""
    assert head.stdout.startswith(f"{idx}[0]  7  ") and head.stdout.count("\n") == 2


class _BatchOfOne(torch.nn.Module):
    """A network whose exported graph has its batch of 1 baked into a Reshape."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.linear(x.reshape(1, 28 * 28)).softmax(1)


def test_one_image_onnx_graphs_give_per_image_results_for_many_images(trained, test_digits, tmp_path):
    """model.onnx takes one image; predict runs it on batches when the graph allows it, else one by one."""
    import onnxruntime as ort

    baked = tmp_path / "baked.onnx"
    torch.onnx.export(
        _BatchOfOne().eval(),
        (torch.zeros(1, 1, 28, 28),),
        str(baked),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
    )
    x = torch.from_numpy(test_digits[0])[:, None].float() / 255
    for path in (trained.onnx, baked):
        session = ort.InferenceSession(str(path))
        assert session.get_inputs()[0].shape[0] == 1
        one_by_one = np.concatenate([session.run(None, {"input": image[None]})[0] for image in x.numpy()])
        probs = load_classifier(str(path)).probabilities(x)
        assert probs.shape == (N, 10) and np.allclose(probs.numpy(), one_by_one, atol=1e-5)
