"""The LightningDataModule: whole splits in memory as uint8 tensors, one index gather per batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError


class TensorBatches(Dataset):
    """Images uint8 [N,28,28] and labels [N]; `__getitems__` lets the DataLoader fetch a whole batch
    with one gather instead of collating N single samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _whole_batch(batch):
    """The batch is already assembled by `__getitems__`."""
    return batch


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train_idx, val_idx) with every class in val in proportion to its share of `labels`."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=generator)
    by_class = perm[torch.argsort(labels[perm], stable=True)]  # shuffled within each class
    counts = torch.bincount(labels)
    quota = counts * val_size / len(labels)
    take = quota.floor().long()
    # largest remainders get the leftover samples so the quotas add up to val_size exactly
    take[torch.argsort(quota - take, descending=True)[: val_size - int(take.sum())]] += 1
    starts = torch.cumsum(counts, 0) - counts
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for start, k in zip(starts.tolist(), take.tolist()):
        is_val[by_class[start : start + k]] = True
    val_idx = torch.nonzero(is_val).squeeze(1)
    return torch.nonzero(~is_val).squeeze(1), val_idx[torch.randperm(len(val_idx), generator=generator)]


class DigitDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or an image folder (`custom`): a stratified train/val split of the
    training split, the test split as test. `load_split` decides where the splits come from.
    `val_size` is a number of images or a fraction (0 < val_size < 1) of the training split.

    Batches are (uint8 [B,28,28], int64 [B]); conversion and augmentation happen on the training
    device in `DigitClassifier.on_after_batch_transfer`.
    """

    def __init__(
        self,
        name: str = "mnist",
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: float = 5000,
        seed: int = 0,
        num_workers: int = 0,
        class_names: Sequence[str] | None = None,
        download: bool = True,
    ):
        super().__init__()
        self.name, self.root, self.download = name, root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.seed, self.num_workers = val_size, seed, num_workers
        self.class_names = list(class_names) if class_names else [str(i) for i in range(10)]
        self.train_set = self.val_set = self.test_set = None

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_split(self.name, split, self.root, self.download, self.class_names)
        if len(labels) and labels.max() >= len(self.class_names):  # cross-entropy would fail mid-training
            raise DigitnetError(
                f"the {self.name} {split} split has label {labels.max().item()} but data.class_names names "
                f"{len(self.class_names)} classes (labels 0-{len(self.class_names) - 1}): list a name for "
                "every label in data.class_names, or fix the labels"
            )
        return images, labels

    def _val_count(self, train_count: int) -> int:
        count = round(self.val_size * train_count) if 0 < self.val_size < 1 else int(self.val_size)
        if not 0 < count < train_count:
            raise DigitnetError(
                f"data.val_size={self.val_size} must be between 1 and {train_count - 1} "
                f"(the {self.name} training set has {train_count} images)"
            )
        return count

    def prepare_data(self) -> None:
        # downloads once, on rank 0; reads both splits so bad labels or a bad val_size stop the run
        # before any logger or checkpoint writes a file
        train_count = len(self._split("train")[1])
        val_count = self._val_count(train_count)
        self._split("test")
        if self.trainer is not None:
            self._check_val_check_interval(train_count - val_count)

    def _check_val_check_interval(self, train_images: int) -> None:
        """trainer.val_check_interval=<N batches> must fit in an epoch (Lightning says so only after the
        loggers started) unless check_val_every_n_epoch=None counts the batches across epochs."""
        trainer = self.trainer
        interval = trainer.val_check_interval
        if not isinstance(interval, int) or trainer.check_val_every_n_epoch is None:
            return
        share = math.ceil(train_images / trainer.world_size)  # under DDP each process gets its share
        drop_last = train_images > self.batch_size  # as in _loader
        batches = share // self.batch_size if drop_last else math.ceil(share / self.batch_size)
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if interval > batches:
            raise DigitnetError(
                f"trainer.val_check_interval={interval} is more than the {batches} training batches of an epoch "
                f"(data.batch_size={self.batch_size}, trainer.limit_train_batches={limit}): give at most "
                f"{batches}, or a fraction of an epoch such as 0.5"
            )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            images, labels = self._split("train")
            train_idx, val_idx = stratified_split(labels, self._val_count(len(labels)), self.seed)
            self.train_set = TensorBatches(images[train_idx], labels[train_idx])
            self.val_set = TensorBatches(images[val_idx], labels[val_idx])
        if stage in ("test", None) and self.test_set is None:
            self.test_set = TensorBatches(*self._split("test"))

    def _loader(
        self, dataset: TensorBatches, batch_size: int, train: bool = False, sampler: Sampler | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train and len(dataset) > batch_size,  # no tiny last batch for BatchNorm
            collate_fn=_whole_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def _eval_sampler(self, dataset: TensorBatches) -> Sampler | None:
        """Under DDP every process evaluates its share of the split, each image exactly once: Lightning's
        default DistributedSampler would pad the shares to equal length with repeated images."""
        shares = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **shares) if shares else None

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, sampler=self._eval_sampler(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, sampler=self._eval_sampler(self.test_set))
