"""Reading the official IDX files (MNIST layout) into uint8/int64 tensors, with clear errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from digitnet.errors import DigitnetError

# dataset name -> torchvision class name (which is also the folder under the root)
DATASET_FOLDERS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
CUSTOM = "custom"  # an image folder <root>/custom/<label>/*.png, read by digitnet.data.folder
DATASETS = (*DATASET_FOLDERS, CUSTOM)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08  # the only IDX element type these datasets use


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset root: `root` if given (configs default it to env DIGITNET_DATA), else env DIGITNET_DATA,
    else `data/`."""
    return Path(root or os.environ.get("DIGITNET_DATA") or "data")


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read one uint8 IDX file with `ndim` dimensions, checking its header against its size."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DigitnetError(f"cannot read {path}: {err.strerror}") from None
    if len(raw) < 4 + 4 * ndim or raw[0:2] != b"\0\0" or raw[2] != _UBYTE or raw[3] != ndim:
        raise DigitnetError(
            f"{path} is not a {ndim}-d uint8 IDX file (bad magic number); "
            "delete it to download it again, or replace it with the official file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DigitnetError(
            f"{path} is truncated or corrupt: header says {shape} = {expected} bytes, "
            f"file holds {len(raw) - offset}; delete it to download it again"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    return torch.from_numpy(array.copy())


def _download(dataset: str, root: Path) -> None:
    import torchvision

    getattr(torchvision.datasets, DATASET_FOLDERS[dataset])(str(root), train=True, download=True)


def load_split(
    dataset: str,
    split: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N,28,28] and labels int64 [N] of one split ("train" or "test").

    `class_names` (default the digits) maps the custom dataset's label folders to class indices.
    """
    if dataset == CUSTOM:
        from digitnet.data.folder import load_folder_split

        return load_folder_split(data_root(root) / CUSTOM, split, class_names)
    if dataset not in DATASET_FOLDERS:
        raise DigitnetError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLIT_FILES:
        raise DigitnetError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = data_root(root)
    folder = root / DATASET_FOLDERS[dataset] / "raw"
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    if download and not all((folder / n).exists() for n in names):
        with contextlib.suppress(Exception):  # offline, blocked, disk full: the message below says what to do
            _download(dataset, root)
    missing = [n for n in SPLIT_FILES[split] if not (folder / n).exists()]
    if missing:
        raise DigitnetError(
            f"{dataset} data not found in {folder.resolve()} (could not download it either): "
            f"put {', '.join(names)} there, or set DIGITNET_DATA to a folder holding "
            f"{DATASET_FOLDERS[dataset]}/raw/"
        )
    image_file, label_file = (folder / n for n in SPLIT_FILES[split])
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1).long()
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DigitnetError(
            f"{image_file} holds images of shape {tuple(images.shape)} with {len(labels)} labels "
            f"in {label_file}; expected [N,28,28] and N labels"
        )
    return images, labels
