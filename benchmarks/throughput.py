"""Training throughput (images/s): `python train.py model=cnn aug=light data.batch_size=64` vs the classic script.

Ours is digitnet's own `train()` on the config that command composes, defaults included (the precision
and memory layout chosen for the device, the loggers, callbacks and progress bar); only what comes after
the training steps is left out (test, ONNX export, registry record). The classic is the plain-PyTorch
MNIST script most tutorials show: torchvision's MNIST dataset with PIL RandomAffine(10, (0.1, 0.1),
(0.9, 1.1)) + ToTensor + Normalize, a DataLoader with one worker, the same network (`model=cnn`, with
torch's nn.Dropout as the example writes it) in float32, batch 64, Adadelta(lr=1.0), a plain loop. Both
are timed from batch --warmup to the last of --batches, alternating, --repeats times; the medians and
their ratio to the classic's are printed. Where a GPU is present both also run there.

    python benchmarks/throughput.py --batches 200 --repeats 3 \\
        --variant 'trainer.precision=32-true module.channels_last=false'
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from torchvision import transforms

from classic import classic_network
from digitnet.data.idx import data_root
from digitnet.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
COMMAND = ["model=cnn", "aug=light", "data.batch_size=64"]
BATCH = 64


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch(L.Callback):
    """Wall time from the start of training batch `warmup` to the end of the epoch's last one."""

    last: Stopwatch | None = None  # the instance of the latest run (train() builds it from the config)

    def __init__(self, warmup: int):
        self.warmup, self.seconds = warmup, 0.0
        Stopwatch.last = self

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(trainer.strategy.root_device.type)
            self.seconds = -time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            _sync(trainer.strategy.root_device.type)
            self.seconds += time.perf_counter()


def run_ours(overrides: list[str], device: str, batches: int, warmup: int) -> tuple[float, dict]:
    """Images/s of the composed command's training steps, and the run's metrics.json."""
    with tempfile.TemporaryDirectory() as run_dir:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose(
                "train",
                overrides=[
                    *COMMAND,
                    *overrides,
                    f"trainer.accelerator={'gpu' if device == 'cuda' else device}",
                    "trainer.devices=1",
                    "trainer.max_epochs=1",
                    f"trainer.limit_train_batches={batches}",
                    "trainer.limit_val_batches=1",
                    "test=false",
                    "callbacks.onnx_export=null",
                    "registry.enabled=false",
                    "print_config=false",
                    f"+callbacks.stopwatch._target_={__name__}.Stopwatch",
                    f"+callbacks.stopwatch.warmup={warmup}",
                    f"paths.output_dir={run_dir}",
                ],
            )
        train(cfg)
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return (batches - warmup) * BATCH / Stopwatch.last.seconds, metrics


def run_classic(device: str, batches: int, warmup: int) -> float:
    """Images/s of the classic script's training steps."""
    transform = transforms.Compose(
        [
            transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,)),
        ]
    )
    dataset = torchvision.datasets.MNIST(str(data_root()), train=True, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=1)
    net = classic_network().to(device)
    optimizer = torch.optim.Adadelta(net.parameters(), lr=1.0)
    net.train()
    seconds = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            seconds = -time.perf_counter()
        if i == batches:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    _sync(device)
    return (batches - warmup) * BATCH / (seconds + time.perf_counter())


def measure(device: str, args) -> None:
    runs = {"classic script (1 worker)": lambda: run_classic(device, args.batches, args.warmup)}
    chosen: dict[str, str] = {}
    for variant in ["", *args.variant]:
        name = " ".join(["python train.py", *COMMAND, variant]).strip()

        def ours(variant=variant, name=name) -> float:
            images_per_s, metrics = run_ours(variant.split(), device, args.batches, args.warmup)
            chosen[name] = f"precision={metrics['precision']} channels_last={str(metrics['channels_last']).lower()}"
            return images_per_s

        runs[name] = ours
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits every pipeline alike
        for name, run in runs.items():
            results[name].append(run())

    print(
        f"\n{device} ({torch.get_num_threads()} threads): batch {BATCH}, batches {args.warmup}-{args.batches} "
        f"timed, medians of {args.repeats}"
    )
    classic = statistics.median(results["classic script (1 worker)"])
    for name, values in results.items():
        median = statistics.median(values)
        runs_text = ", ".join(f"{v:.0f}" for v in values)
        print(
            f"  {median:7.0f} images/s  {median / classic:5.2f}x  {name}  [{chosen.get(name, 'float32')}] "
            f"(runs: {runs_text})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="training batches per run")
    parser.add_argument("--warmup", type=int, default=20, help="batches before the clock starts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variant", action="append", default=[], help="also run ours with these space-separated overrides (repeatable)"
    )
    args = parser.parse_args()
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        measure(device, args)


if __name__ == "__main__":
    main()
