"""Training throughput (samples/s): digitnet's pipeline vs a plain torchvision DataLoader pipeline.

Same network, same optimizer, same augmentation ranges (RandomAffine(10, (0.1, 0.1), (0.9, 1.1))),
same batch size. The baseline is what most MNIST scripts do: torchvision.datasets.MNIST with PIL
transforms, collated by a DataLoader, in a plain PyTorch loop. Ours is the full Lightning run:
uint8 tensors in memory, one gather per batch, batched augmentation after the device transfer.

    python benchmarks/throughput.py --model cnn --aug light --batches 200 --repeats 3 [--channels-last]

Prints samples/s per pipeline (median of the repeats, each run alternating) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torchvision
from torchvision import transforms

from digitnet.data.datamodule import DigitDataModule
from digitnet.data.idx import data_root
from digitnet.module import DigitClassifier

OPTIM = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.05}
AUGS = {
    "none": ({"name": "none", "ops": {}}, []),
    "light": (
        {"name": "light", "ops": {"warp": {"degrees": 10, "translate": [0.1, 0.1], "scale": [0.9, 1.1]}}},
        [transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))],
    ),
}


class Stopwatch(L.Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def digitnet_pipeline(model: str, aug: str, batch_size: int, batches: int, warmup: int, channels_last: bool) -> float:
    datamodule = DigitDataModule("mnist", batch_size=batch_size, download=False)
    module = DigitClassifier(model={"name": model}, optim=OPTIM, sched={"name": "none"}, aug=AUGS[aug][0],
                             channels_last=channels_last)  # as `python train.py module.channels_last=true`
    watch = Stopwatch(warmup)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[watch],
    )
    trainer.fit(module, datamodule)
    return (batches - warmup) * batch_size / (watch.end - watch.start)


def torchvision_pipeline(model: str, aug: str, batch_size: int, batches: int, warmup: int, workers: int) -> float:
    transform = transforms.Compose([*AUGS[aug][1], transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = torchvision.datasets.MNIST(str(data_root()), train=True, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    net = DigitClassifier(model={"name": model}).net  # the same network, standardising layer included
    optimizer = torch.optim.AdamW(net.parameters(), **{k: v for k, v in OPTIM.items() if not k.startswith("_")})
    net.train()
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i == batches:
            break
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (batches - warmup) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--aug", default="light", choices=sorted(AUGS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="baseline DataLoader workers to try")
    parser.add_argument("--channels-last", action="store_true", help="ours in NHWC layout (config module.channels_last=true)")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)

    runs = {"digitnet": lambda: digitnet_pipeline(
        args.model, args.aug, args.batch_size, args.batches, args.warmup, args.channels_last
    )}
    for w in args.workers:
        runs[f"torchvision (workers={w})"] = lambda w=w: torchvision_pipeline(
            args.model, args.aug, args.batch_size, args.batches, args.warmup, w
        )
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate so machine noise hits every pipeline alike
        for name, run in runs.items():
            results[name].append(run())

    medians = {name: statistics.median(v) for name, v in results.items()}
    best_baseline = max(v for name, v in medians.items() if name != "digitnet")
    print(f"model={args.model} aug={args.aug} batch={args.batch_size} batches={args.batches} "
          f"repeats={args.repeats} threads={torch.get_num_threads()} channels_last={args.channels_last}")
    for name, value in medians.items():
        print(f"{name:28s} {value:9.0f} samples/s  (runs: {', '.join(f'{v:.0f}' for v in results[name])})")
    print(f"speedup vs best baseline: {medians['digitnet'] / best_baseline:.2f}x")


if __name__ == "__main__":
    main()
