"""`digitnet predict <model> <inputs...>`: classify image files, folders, IDX or .npy files,
or with `--from-sql URL --table T` the rows of a SQL data table, into a predictions table.

The model is a checkpoint (.ckpt), an ONNX file, a registry id (or unique prefix), or `best` /
`best:<dataset>` (the registry's highest test accuracy over a whole test split). Photos and
drawings of any size and mode are first prepared the way MNIST itself was made (`prepare_digit`);
IDX and .npy arrays are taken as already 28x28 MNIST-style images. A file that cannot be read is
one error line on stderr; the others are still classified (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from digitnet.atomic import write_atomically
from digitnet.classifier import Classifier, load_classifier
from digitnet.data.prepare import BACKGROUNDS, CANVAS, IMAGE_SUFFIXES, NoDigitFound, open_image, prepare_digit
from digitnet.errors import DigitnetError

IDX_IMAGES_MAGIC = b"\x00\x00\x08\x03"  # uint8, 3 dimensions


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    names: list[str]
    images: torch.Tensor  # uint8 [N,28,28], MNIST-style
    errors: list[str]  # one line per file that could not be read, naming it


def _array_images(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (CANVAS, CANVAS) or not np.issubdtype(array.dtype, np.number):
        raise DigitnetError(f"{name} holds an array of {array.dtype} {array.shape}; expected [N,28,28] images")
    if array.dtype != np.uint8:  # floats in [0,1] (or any scale): the model standardises each image anyway
        bad = np.flatnonzero(~np.isfinite(array).all(axis=(1, 2)))
        if len(bad):  # one NaN would make the whole file's scale NaN
            raise DigitnetError(f"{name}: {len(bad)} image(s) hold NaN or infinite pixels, the first is [{bad[0]}]")
        low, high = float(array.min()), float(array.max())
        array = np.round((array - low) / max(high - low, 1e-12) * 255)
    return array.astype(np.uint8)


def _read_image(path: Path, background: str) -> np.ndarray:
    try:
        with open_image(path) as image:
            return prepare_digit(image, background, str(path))[None]
    except NoDigitFound as err:
        if background != "auto":
            raise
        raise DigitnetError(f"{err}; if it holds a digit, say its background: --background light or dark") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):  # PIL's ways of saying "unreadable"
        raise DigitnetError(
            f"{path} is not an image, IDX or .npy file (images: {', '.join(sorted(IMAGE_SUFFIXES))})"
        ) from None


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
        return [str(path)], _read_image(path, background)
    return [f"{path}[{i}]" for i in range(len(images))], images


def expand(paths: Iterable[str]) -> list[Path]:
    """The files named and those in the folders named; a missing input or empty folder is an error."""
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


def load_inputs(files: Iterable[Path | str], background: str = "auto") -> Inputs:
    """Every file read and prepared; one that cannot be is an error line of its own, not the end of the run."""
    names, arrays, errors = [], [np.zeros((0, CANVAS, CANVAS), np.uint8)], []
    for path in files:
        try:
            file_names, images = _read_file(Path(path), background)
        except DigitnetError as err:
            errors.append(str(err))
            continue
        names += file_names
        arrays.append(images)
    return Inputs(names, torch.from_numpy(np.concatenate(arrays)), errors)


# ---------------------------------------------------------------------------- output


def check_output(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if path.is_dir():
        raise DigitnetError(f"{flag} {path} is a folder; give a file name")
    folder = next(p for p in path.absolute().parents if p.exists())  # write_atomically creates the rest
    try:
        with tempfile.TemporaryFile(dir=folder):  # the sure test: access() says yes to root even in /proc
            pass
    except OSError as err:
        raise DigitnetError(f"{flag} {path} cannot be written: {folder} takes no new files ({err.strerror})") from None


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
        "MNIST-like: grayscale, light digit on dark, bounding box fitted into 20x20, centred by mass in 28x28. "
        "A file that cannot be read is reported on stderr and the others are still classified (exit status 1).",
    )
    parser.add_argument("model", help="a .ckpt or .onnx file, a registry id, 'best' or 'best:<dataset>'")
    parser.add_argument("inputs", nargs="*", help="image files (PNG, JPEG, ...), folders of images, IDX or .npy files")
    parser.add_argument("-k", "--top-k", type=int, default=3, help="probabilities shown per input (default 3)")
    parser.add_argument("--csv", type=Path, help="write all class probabilities to this CSV instead of printing")
    parser.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default="auto",
        help="image background: light (ink on paper), dark (like MNIST) or auto-detect (default)",
    )
    parser.add_argument(
        "--save-prepared", type=Path, metavar="PNG", help="also save the prepared 28x28 inputs as a grid"
    )
    parser.add_argument(
        "--db", help="registry URL for ids and 'best' (default: env DIGITNET_REGISTRY or outputs/registry.db)"
    )
    parser.add_argument(
        "--include-partial",
        action="store_true",
        help="'best' also ranks models tested on part of the test split only (trainer.limit_test_batches)",
    )
    sql = parser.add_argument_group("inputs from a SQL data table (see `digitnet data`) instead of files")
    sql.add_argument("--from-sql", metavar="URL", help="SQLAlchemy URL of the database")
    sql.add_argument("--table", help="the data table whose rows to classify")
    sql.add_argument("--split", help="classify this split (default: every row without a label)")
    sql.add_argument(
        "--predictions-table",
        metavar="NAME",
        help="where the predictions go (default: <table>_predictions); a model's earlier rows are replaced",
    )
    sql.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.from_sql:
        return _predict_sql(args)
    if not args.inputs:
        parser.error("give inputs, or --from-sql URL --table T")
    if args.top_k < 1:
        raise DigitnetError(f"--top-k {args.top_k} must be at least 1")
    for path, flag in ((args.csv, "--csv"), (args.save_prepared, "--save-prepared")):
        if path:
            check_output(path, flag)

    files = expand(args.inputs)
    classifier = load_classifier(args.model, args.db, include_partial=args.include_partial)
    inputs = load_inputs(files, args.background)
    for error in inputs.errors:
        print(f"error: {error}", file=sys.stderr)
    if inputs.names:
        _report(args, inputs, classifier)
    return 1 if inputs.errors else 0


def _report(args: argparse.Namespace, inputs: Inputs, classifier: Classifier) -> None:
    probs = classifier.probabilities(inputs.images[:, None].float() / 255)
    if args.save_prepared:
        _save_prepared(args.save_prepared, inputs.images)
    if args.csv:
        _write_csv(args.csv, inputs.names, probs, classifier.class_names)
        print(f"wrote {len(inputs.names)} predictions to {args.csv}")
    else:
        for name, p in zip(inputs.names, probs):
            print(format_line(name, p, classifier.class_names, args.top_k))


def _predict_sql(args: argparse.Namespace) -> int:
    from digitnet.data.sql import Store

    if args.inputs or not args.table:
        raise DigitnetError("--from-sql takes --table T and no input files")
    with Store(args.from_sql, args.table) as store:
        rows = store.read(args.split, labelled=False)  # checks the table before the model is loaded
        classifier = load_classifier(args.model, args.db, include_partial=args.include_partial)
        probs = classifier.probabilities(rows.images[:, None].float() / 255)
        table = store.write_predictions(
            args.predictions_table or f"{args.table}_predictions",
            rows,
            classifier.model_id,
            probs,
            classifier.class_names,
            not args.quiet,
        )
    print(f"wrote {len(rows.ids)} predictions of {classifier.source} into table {table.name!r} at {store.shown_url}")
    return 0
