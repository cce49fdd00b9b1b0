"""IDX reading (real and synthetic files), clear errors for bad data, the stratified split, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_idx
from digitnet.data.datamodule import DigitDataModule, stratified_split
from digitnet.data.idx import load_split, read_idx
from digitnet.errors import DigitnetError


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_real_files_load_as_uint8_tensors(real_data, dataset):
    train_x, train_y = load_split(dataset, "train", download=False)
    test_x, test_y = load_split(dataset, "test", download=False)
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert set(train_y.unique().tolist()) == set(test_y.unique().tolist()) == set(range(10))
    assert 0 < train_x.float().mean() < 255


def test_synthetic_idx_roundtrip(tmp_path):
    array = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    read = read_idx(write_idx(tmp_path / "x-idx3-ubyte", array), 3)
    assert torch.equal(read, torch.from_numpy(array.astype(np.uint8)))


def test_wrong_magic_is_named(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(10))
    with pytest.raises(DigitnetError, match=r"labels.*bad magic"):
        read_idx(path, 3)  # a 1-d label file where images are expected


def test_truncated_file_is_named(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DigitnetError, match=r"imgs is truncated or corrupt"):
        read_idx(path, 3)


def test_missing_data_names_folder_files_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    with pytest.raises(DigitnetError) as err:
        load_split("fashion", "train", download=False)
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "DIGITNET_DATA" in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "\n" not in message


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = torch.arange(1000) % 10
    labels[:300] = 3  # an unbalanced class
    train_idx, val_idx = stratified_split(labels, 100, seed=1)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    expected = torch.bincount(labels) * 100 / 1000
    assert (torch.bincount(labels[val_idx], minlength=10) - expected).abs().max() <= 1
    assert torch.equal(stratified_split(labels, 100, seed=1)[1], val_idx)
    assert not torch.equal(stratified_split(labels, 100, seed=2)[1], val_idx)


def test_real_split_is_stratified_and_test_is_the_official_split(real_data):
    dm = DigitDataModule("mnist", val_size=5000, download=False)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 55000 and len(dm.val_set) == 5000
    train_share = torch.bincount(dm.train_set.labels) / 55000
    val_share = torch.bincount(dm.val_set.labels) / 5000
    assert (train_share - val_share).abs().max() < 0.001
    official_x, official_y = load_split("mnist", "test", download=False)
    assert torch.equal(dm.test_set.images, official_x) and torch.equal(dm.test_set.labels, official_y)
    # no training or validation image is a test image (byte for byte)
    seen = {bytes(img.numpy()) for img in torch.cat([dm.train_set.images, dm.val_set.images])}
    assert not any(bytes(img.numpy()) in seen for img in official_x)


def test_batches_are_one_gather_of_uint8(tiny_mnist, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    dm = DigitDataModule("mnist", batch_size=32, val_size=50, download=False)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 28, 28) and x.dtype == torch.uint8 and y.shape == (32,)
    # images encode their labels in brightness: the gather kept images and labels together
    assert torch.equal((x.float().mean((1, 2)) // 20).long(), y)
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 50


def test_val_size_larger_than_train_set_is_refused(tiny_mnist, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    with pytest.raises(DigitnetError, match=r"data.val_size=200 must be between 1 and 199"):
        DigitDataModule("mnist", val_size=200, download=False).setup("fit")
