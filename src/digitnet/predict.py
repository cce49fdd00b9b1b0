"""`digitnet predict <model> <inputs...>`: classify image files, folders, IDX or .npy files.

The model is a checkpoint (.ckpt), an ONNX file, a registry id (or unique prefix), or `best` /
`best:<dataset>` (the registry's highest test accuracy). Photos and drawings of any size and
mode are first prepared the way MNIST itself was made (`prepare_digit`); IDX and .npy arrays
are taken as already 28x28 MNIST-style images.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from digitnet.errors import DigitnetError

BATCH = 1000
IDX_IMAGES_MAGIC = b"\x00\x00\x08\x03"  # uint8, 3 dimensions
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
BACKGROUNDS = ("auto", "dark", "light")


# ---------------------------------------------------------------------------- models


@dataclass
class Classifier:
    """A trained model behind one interface: float [N,1,28,28] (any pixel scale) -> probabilities [N,C]."""

    probabilities: Callable[[torch.Tensor], torch.Tensor]
    class_names: list[str]
    data_name: str
    source: str  # what was loaded, for messages and reports


def default_device() -> torch.device:
    """CUDA/MPS/... when present, else the CPU."""
    return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")


def classifier_from_checkpoint(path: str | Path, device: torch.device | None = None) -> Classifier:
    from digitnet.export import load_checkpoint  # handles torch.compile'd keys and foreign files

    module = load_checkpoint(path)
    device = device or default_device()
    net = module.net.to(device).eval()

    @torch.inference_mode()
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(chunk.to(device)).softmax(1).cpu() for chunk in x.split(BATCH)])

    hparams = module.hparams
    return Classifier(probabilities, [str(c) for c in hparams.class_names], hparams.data_name, str(path))


def classifier_from_onnx(model: str | Path | bytes, source: str) -> Classifier:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                       providers=ort.get_available_providers())
    except Exception as err:  # onnxruntime raises its own exception types for bad protobufs
        raise DigitnetError(f"{source} is not a loadable ONNX model ({str(err).splitlines()[0][:200]})") from None
    meta = session.get_modelmeta().custom_metadata_map  # written by digitnet.export
    input_name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    batch = batch_dim if isinstance(batch_dim, int) else BATCH  # the exercise's graphs take 1 image

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        array = x.float().numpy()
        outputs = [session.run(None, {input_name: array[i : i + batch]})[0] for i in range(0, len(array), batch)]
        return torch.from_numpy(np.concatenate(outputs))

    class_names = json.loads(meta["class_names"]) if "class_names" in meta else [str(i) for i in range(10)]
    return Classifier(probabilities, class_names, meta.get("dataset", "mnist"), source)


def classifier_from_record(record, device: torch.device | None = None) -> Classifier:
    """A registry record's checkpoint if it is still on disk, else its stored ONNX bytes."""
    if record.checkpoint and Path(record.checkpoint).is_file():
        classifier = classifier_from_checkpoint(record.checkpoint, device)
        classifier.source = f"registry model {record.id[:8]} ({record.checkpoint})"
        return classifier
    if record.onnx:
        return classifier_from_onnx(record.onnx, f"registry model {record.id[:8]} (stored ONNX)")
    raise DigitnetError(
        f"registry model {record.id[:8]}: checkpoint {record.checkpoint} is gone and no ONNX bytes are stored"
    )


def load_classifier(spec: str, registry_url: str | None = None, device: torch.device | None = None,
                    metric: str = "test/acc") -> Classifier:
    """`spec` = a .ckpt or .onnx file, `best` / `best:<dataset>` (by `metric`), or a registry id."""
    from digitnet.registry import Registry

    path = Path(spec)
    if path.is_file():
        return classifier_from_onnx(path, str(path)) if path.suffix == ".onnx" else classifier_from_checkpoint(path, device)
    if path.suffix in (".ckpt", ".onnx") or os.sep in spec:
        raise DigitnetError(f"model file {spec} not found")
    with Registry(registry_url) as registry:
        if spec == "best" or spec.startswith("best:"):
            record = registry.best(metric, "min" if "loss" in metric else "max", dataset=spec[5:] or None)
        else:
            record = registry.get(spec)
        return classifier_from_record(registry.get(record.id, with_onnx=True), device)


# ---------------------------------------------------------------------------- MNIST-style preparation

FIT_SIZE = 20  # MNIST: the digit's bounding box is scaled to fit 20x20 ...
CANVAS = 28  # ... and placed in 28x28 with its centre of mass in the middle
INK_THRESHOLD = 0.2  # below this fraction of the strongest stroke, a pixel counts as background
MIN_CONTRAST = 0.1  # a brightest-minus-background difference below this means "no digit"


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _ink(image: Image.Image, background: str) -> np.ndarray:
    """Float [H,W] ink intensity, background 0: light-on-dark like MNIST."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255
        if alpha.min() < 1:  # drawings on a transparent canvas: whatever is painted is ink
            return alpha
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    light_background = np.median(_border(gray)) > 0.5 if background == "auto" else background == "light"
    ink = 1 - gray if light_background else gray
    return np.clip(ink - np.median(_border(ink)), 0, None)  # paper or screen level -> 0


def _paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """Paste `patch` with its top-left corner at (top, left), clipped to the canvas."""
    h, w = patch.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    canvas[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]


def prepare_digit(image: Image.Image, background: str = "auto", name: str = "image") -> np.ndarray:
    """Any image -> uint8 [28,28] the way MNIST was made.

    Grayscale (transparent canvases: the alpha channel is the ink), light-on-dark polarity
    (`background`: "auto" looks at the border pixels, or "light"/"dark" for paper/screen),
    background level subtracted and faint pixels dropped, the digit's bounding box scaled to
    fit 20x20 (aspect kept, antialiased) and pasted into 28x28 with its centre of mass at the centre.
    """
    if background not in BACKGROUNDS:
        raise DigitnetError(f"background {background!r} must be one of {BACKGROUNDS}")
    ink = _ink(image, background)
    peak = float(ink.max()) if ink.size else 0.0
    if peak < MIN_CONTRAST:
        raise DigitnetError(f"{name}: no digit found (the image is blank or has almost no contrast)")
    ink = np.where(ink >= INK_THRESHOLD * peak, ink / peak, 0).astype(np.float32)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = FIT_SIZE / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))  # PIL: (w, h)
    digit = np.clip(np.asarray(Image.fromarray(box).resize(size, Image.Resampling.LANCZOS)), 0, 1)
    total = digit.sum()
    cy = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    cx = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    centre = CANVAS / 2  # MNIST's centres of mass sit at pixel 14, half a pixel below the geometric centre
    _paste(canvas, digit, round(centre - cy), round(centre - cx))
    return np.round(canvas * 255).astype(np.uint8)


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    names: list[str]
    images: torch.Tensor  # uint8 [N,28,28], MNIST-style


def _array_images(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (CANVAS, CANVAS) or not np.issubdtype(array.dtype, np.number):
        raise DigitnetError(f"{name} holds an array of {array.dtype} {array.shape}; expected [N,28,28] images")
    if array.dtype != np.uint8:  # floats in [0,1] (or any scale): the model standardises each image anyway
        low, high = float(array.min()), float(array.max())
        array = np.round((array - low) / max(high - low, 1e-12) * 255)
    return array.astype(np.uint8)


def _read_file(path: Path, background: str) -> tuple[list[str], np.ndarray]:
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as err:
        raise DigitnetError(f"cannot read {path}: {err.strerror}") from None
    if head[:4] == IDX_IMAGES_MAGIC:
        from digitnet.data.idx import read_idx

        images = _array_images(read_idx(path, 3).numpy(), str(path))
    elif head == b"\x93NUMPY":
        try:
            images = _array_images(np.load(path, allow_pickle=False), str(path))
        except ValueError as err:
            raise DigitnetError(f"{path} is not a readable .npy array ({err})") from None
    else:
        try:
            with Image.open(path) as image:
                return [str(path)], prepare_digit(image, background, str(path))[None]
        except (UnidentifiedImageError, OSError):
            raise DigitnetError(
                f"{path} is not an image, IDX or .npy file (images: {', '.join(sorted(IMAGE_SUFFIXES))})"
            ) from None
    return [f"{path}[{i}]" for i in range(len(images))], images


def _expand(paths: Iterable[str]) -> list[Path]:
    files = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DigitnetError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DigitnetError(f"input {path} does not exist")
    if not files:
        raise DigitnetError("no inputs given: pass image files, folders, IDX or .npy files")
    return files


def load_inputs(paths: Iterable[str], background: str = "auto") -> Inputs:
    """Every input read and prepared up front, so a bad one stops the run before anything is written."""
    names, arrays = [], []
    for path in _expand(paths):
        file_names, images = _read_file(path, background)
        names += file_names
        arrays.append(images)
    return Inputs(names, torch.from_numpy(np.concatenate(arrays)))


# ---------------------------------------------------------------------------- output


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temp file beside `path`, then rename it: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_csv(path: Path, names: list[str], probs: torch.Tensor, class_names: list[str]) -> None:
    def write(tmp: Path):
        with tmp.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["input", "predicted", "confidence", *class_names])
            for name, p in zip(names, probs.tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                out.writerow([name, class_names[best], f"{p[best]:.6f}", *(f"{v:.6f}" for v in p)])

    write_atomically(path, write)


def _save_prepared(path: Path, images: torch.Tensor) -> None:
    """A grid PNG of the 28x28 images exactly as the model sees them."""
    from torchvision.utils import save_image

    grid = images[:, None].float() / 255
    write_atomically(path, lambda tmp: save_image(grid, tmp, format="png", nrow=16, pad_value=0.5))


def format_line(name: str, probs: torch.Tensor, class_names: list[str], top_k: int) -> str:
    values, indices = probs.topk(min(top_k, len(class_names)))
    ranked = ", ".join(f"{class_names[i]} {v:.3f}" for v, i in zip(values.tolist(), indices.tolist()))
    return f"{name}  {class_names[indices[0]]}  ({ranked})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="digitnet predict",
        description="Classify images with a trained model. Photos and drawings of any size are first made "
        "MNIST-like: grayscale, light digit on dark, bounding box fitted into 20x20, centred by mass in 28x28.",
    )
    parser.add_argument("model", help="a .ckpt or .onnx file, a registry id, 'best' or 'best:<dataset>'")
    parser.add_argument("inputs", nargs="+", help="image files (PNG, JPEG, ...), folders of images, IDX or .npy files")
    parser.add_argument("-k", "--top-k", type=int, default=3, help="probabilities shown per input (default 3)")
    parser.add_argument("--csv", type=Path, help="write all class probabilities to this CSV instead of printing")
    parser.add_argument("--background", choices=BACKGROUNDS, default="auto",
                        help="image background: light (ink on paper), dark (like MNIST) or auto-detect (default)")
    parser.add_argument("--save-prepared", type=Path, metavar="PNG", help="also save the prepared 28x28 inputs as a grid")
    parser.add_argument("--db", help="registry URL for ids and 'best' (default: env DIGITNET_REGISTRY or outputs/registry.db)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise DigitnetError(f"--top-k {args.top_k} must be at least 1")

    inputs = load_inputs(args.inputs, args.background)
    classifier = load_classifier(args.model, args.db)
    probs = classifier.probabilities(inputs.images[:, None].float() / 255)
    if args.save_prepared:
        _save_prepared(args.save_prepared, inputs.images)
    if args.csv:
        _write_csv(args.csv, inputs.names, probs, classifier.class_names)
        print(f"wrote {len(inputs.names)} predictions to {args.csv}")
    else:
        for name, p in zip(inputs.names, probs):
            print(format_line(name, p, classifier.class_names, args.top_k))
    return 0
