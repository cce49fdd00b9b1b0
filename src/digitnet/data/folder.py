"""`data=custom`: your own images in `<root>/custom/<label>/*.png`, prepared the way MNIST was made.

Images may have any size and mode (L, RGB, RGBA...); transparent drawings use their alpha
channel as ink, like the seed project's canvases. Each is prepared once by
`digitnet.data.prepare.prepare_digit` into the uint8 [N,28,28] tensors of the fast path, so every
augmentation preset and model works unchanged.

The test split is fixed by the folder's files alone, so `digitnet export` and `eval.py` (which
ask `load_split(name, "test")` without any config) see the same test images as training: per
class, the TEST_FRACTION of files whose names hash lowest. It is stratified and deterministic
(the same files split the same way in any process, on any machine); adding drawings only moves
the few files at a class's cut. Validation is carved out of "train" by the DataModule (`data.val_size`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from digitnet.data.prepare import IMAGE_SUFFIXES, open_image, prepare_digit
from digitnet.errors import DigitnetError

FOLDER = "custom"  # under the dataset root, beside MNIST/ and FashionMNIST/
TEST_FRACTION = 0.15
DIGITS = tuple(str(i) for i in range(10))


def _label_folders(folder: Path, class_names: Sequence[str]) -> list[tuple[int, Path]]:
    class_names = [str(name) for name in class_names]  # data.class_names=[5,7] arrives as numbers
    if not folder.is_dir():
        raise DigitnetError(
            f"no custom dataset at {folder.resolve()}: put images in {folder}/<label>/ (labels {list(class_names)}) "
            "or draw them with `digitnet serve <model>` (collect mode); set DIGITNET_DATA or data.root to its parent"
        )
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise DigitnetError(
            f"{folder} has folders {unknown} that are not class names {list(class_names)}; "
            "rename them or set data.class_names"
        )
    return [(class_names.index(p.name), p) for p in folders]


def _name_hash(path: Path) -> str:
    """Stable across processes and machines (unlike hash()), and independent of the other files."""
    return hashlib.sha1(f"{path.parent.name}/{path.name}".encode()).hexdigest()


def _test_count(n: int) -> int:
    """Every class with two or more images gets at least one test and one training image."""
    return 0 if n < 2 else min(n - 1, max(1, round(TEST_FRACTION * n)))


def split_files(folder: Path, split: str, class_names: Sequence[str] = DIGITS) -> list[tuple[Path, int]]:
    """(image file, class index) pairs of one split ("train" or "test"), sorted by file."""
    if split not in ("train", "test"):
        raise DigitnetError(f"unknown split {split!r}; choose 'train' or 'test'")
    chosen = []
    for label, label_folder in _label_folders(folder, class_names):
        files = sorted(
            (p for p in label_folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_name_hash
        )
        k = _test_count(len(files))
        chosen += [(p, label) for p in (files[:k] if split == "test" else files[k:])]
    if not chosen:
        raise DigitnetError(
            f"the custom dataset {folder} has no {split} images ({', '.join(sorted(IMAGE_SUFFIXES))} files in "
            f"<label>/ folders; a class needs 2 images to have a test image)"
        )
    return sorted(chosen)


@cache
def _prepared(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    """One file prepared like MNIST; cached per process until the file changes (mtime, size)."""
    try:
        with open_image(path) as image:  # refuses more than MAX_PIXELS before decoding
            return prepare_digit(image, "auto", str(path))
    except (UnidentifiedImageError, OSError) as err:
        raise DigitnetError(f"{path} is not a readable image ({err}); delete or replace it") from None


def load_folder_split(
    folder: str | Path, split: str, class_names: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N,28,28] and labels int64 [N] of one split of an image folder."""
    files = split_files(Path(folder), split, class_names or DIGITS)
    images = np.stack([_prepared(p, (s := p.stat()).st_mtime_ns, s.st_size) for p, _ in files])
    return torch.from_numpy(images), torch.tensor([label for _, label in files], dtype=torch.int64)
