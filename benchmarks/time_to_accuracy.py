"""Seconds of training to reach a test accuracy on MNIST: a digitnet recipe vs the classic PyTorch example.

Ours: the recipe (`conf/experiment/<name>.yaml`, composed as `python train.py experiment=<name>` would)
trained by Lightning. The classic: the plain-PyTorch MNIST example setup written out here, i.e. the
same `cnn` network, torchvision MNIST with ToTensor + Normalize((0.1307,), (0.3081,)) through a
DataLoader (batch 64, shuffled), Adadelta(lr=1.0), StepLR(step 1 epoch, gamma 0.7).

Both are evaluated on the full official test set every `--eval-every` training images; the clock
stops during evaluation, so the seconds are training only. A run stops at the first evaluation at
or above `--target`, at the end of its schedule, or after `--max-seconds`.

    python benchmarks/time_to_accuracy.py --recipe speedrun_mnist --target 0.99
    # what an option buys: the recipe as it is and with overrides, in one process
    python benchmarks/time_to_accuracy.py --no-classic \
        --variant module.channels_last=false --variant module.compile=true
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchvision import transforms

from classic import classic_network
from digitnet.data.idx import data_root, load_split
from digitnet.fastpath import settle
from digitnet.train import build_module

CONF = Path(__file__).resolve().parents[1] / "conf"


class TrainingClock:
    """Training seconds (evaluation excluded) and the accuracy curve, evaluated every `every` images."""

    def __init__(self, evaluate: Callable[[], float], every: int, target: float, max_seconds: float):
        self.evaluate, self.every, self.target, self.max_seconds = evaluate, every, target, max_seconds
        self.seconds, self.images, self.next_eval = 0.0, 0, every
        self.curve: list[tuple[int, float, float]] = []  # (images, seconds, accuracy)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def step(self, batch_size: int) -> bool:
        """Count one training step; evaluate when due. True when the run should stop."""
        self.images += batch_size
        if self.images < self.next_eval:
            return False
        return self.check()

    def check(self) -> bool:
        self.seconds += time.perf_counter() - self._started
        self.next_eval += self.every
        accuracy = self.evaluate()
        self.curve.append((self.images, self.seconds, accuracy))
        print(f"  {self.images:7d} images {self.seconds:7.1f} s  test acc {accuracy:.4f}", flush=True)
        self.start()
        return accuracy >= self.target or self.seconds >= self.max_seconds

    def reached(self) -> float | None:
        return next((s for _, s, acc in self.curve if acc >= self.target), None)


class ClockCallback(L.Callback):
    """Drives a TrainingClock from Lightning's training loop."""

    def __init__(self, clock: TrainingClock):
        self.clock = clock

    def on_train_start(self, trainer, pl_module):
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.clock.step(len(batch[1])):
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if not trainer.should_stop:  # the schedule ended between two evaluations
            self.clock.check()


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    correct = sum((net(x).argmax(1) == y).sum().item() for x, y in zip(images.split(1000), labels.split(1000)))
    net.train(was_training)
    return correct / len(labels)


def run_recipe(recipe: str, overrides: list[str], seed: int, args) -> TrainingClock:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"experiment={recipe}", *overrides, f"seed={seed}", "paths.output_dir=."])
    print(f"  {settle(cfg)}")  # trainer.precision / channels_last: auto decided as train.py would
    L.seed_everything(seed, verbose=False)
    datamodule, module = instantiate(cfg.data, download=False), build_module(cfg)
    images, labels = load_split("mnist", "test", cfg.data.root, False)
    test_x = images.unsqueeze(1).float().div(255)  # what the module makes of a batch after the transfer

    def evaluate() -> float:
        if cfg.module.channels_last:
            return accuracy(module, test_x.to(memory_format=torch.channels_last), labels)
        return accuracy(module, test_x, labels)

    clock = TrainingClock(evaluate, args.eval_every, args.target, args.max_seconds)
    trainer = instantiate(
        cfg.trainer,
        callbacks=[ClockCallback(clock)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    return clock


def run_classic(seed: int, args) -> TrainingClock:
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = torchvision.datasets.MNIST(str(data_root()), train=True, transform=transform, download=False)
    test_set = torchvision.datasets.MNIST(str(data_root()), train=False, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    test_x, test_y = next(iter(torch.utils.data.DataLoader(test_set, batch_size=len(test_set))))
    net = classic_network()
    optimizer = torch.optim.Adadelta(net.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    clock = TrainingClock(lambda: accuracy(net, test_x, test_y), args.eval_every, args.target, args.max_seconds)
    net.train()
    clock.start()
    for _ in range(args.classic_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            if clock.step(len(y)):
                return clock
        schedule.step()
    clock.check()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="speedrun_mnist", help="a conf/experiment/ name (an MNIST recipe)")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--eval-every", type=int, default=6400, help="training images between evaluations")
    parser.add_argument("--max-seconds", type=float, default=600, help="training-second budget of each run")
    parser.add_argument("--classic-epochs", type=int, default=14)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also run the recipe with these space-separated overrides (repeatable)",
    )
    parser.add_argument("--no-classic", action="store_true", help="skip the classic example")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clocks: dict[str, TrainingClock] = {}
    for variant in ["", *args.variant]:
        name = f"{args.recipe} {variant}".strip()
        print(f"recipe {name}:")
        clocks[name] = run_recipe(args.recipe, variant.split(), args.seed, args)
    if not args.no_classic:
        print("classic PyTorch MNIST example (cnn, Adadelta 1.0, StepLR 0.7, batch 64):")
        clocks["classic"] = run_classic(args.seed, args)

    load = os.getloadavg()[0]
    print(f"target {args.target:.4f}, threads {torch.get_num_threads()}, load average at the end {load:.2f}")
    for name, clock in clocks.items():
        reached = clock.reached()
        best = max(acc for _, _, acc in clock.curve)
        when = f"{reached:.1f} s" if reached is not None else f"not within {clock.seconds:.1f} s"
        print(f"{name:40s} reached: {when:22s} best test acc {best:.4f}")
    ours, classic = clocks[args.recipe], clocks.get("classic")
    if classic is not None and ours.reached():
        ratio = (classic.reached() or classic.seconds) / ours.reached()
        print(f"ratio classic / ours: {'' if classic.reached() else '> '}{ratio:.1f}x")


if __name__ == "__main__":
    main()
