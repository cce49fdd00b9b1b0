"""train_seconds and test accuracy of a recipe against variants of it, runs interleaved, with medians.

Each run is the real command, `python train.py experiment=<recipe> seed=<seed> <overrides>`, in its
own process; its `train_seconds` and `test/acc` come from the run's metrics.json. The recipe and its
variants take turns (recipe, variant 1, ..., recipe, ...), so a slow spell of a noisy machine hits
them alike; the summary gives each one's median seconds and its ratio to the recipe's.

    # the speedrun as it is vs the previous speedrun net, seeds 1 and 2, three rounds
    python benchmarks/recipe_seconds.py --recipe speedrun_mnist --seeds 1 2 --repeats 3 \\
        --variant '"model.widths=[48,96,192]" model.pool_before_norm=false model.global_pool=false'
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={recipe}",
        f"seed={seed}",
        *overrides,
        "registry.enabled=false",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed: {shlex.join(command)}\n{done.stderr.strip()[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "test/acc" not in metrics:
        sys.exit(
            f"run wrote no test/acc: {shlex.join(command)}\n"
            "this benchmark reports test accuracy beside the seconds: leave test=true"
        )
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="speedrun_mnist", help="a conf/experiment/ name")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="overrides for one variant, in one shell-quoted string (repeatable)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all seeds and variants")
    parser.add_argument("--override", action="append", default=[], help="an override for every run (repeatable)")
    args = parser.parse_args()

    variants = {args.recipe: [], **{v: shlex.split(v) for v in args.variant}}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    accuracy: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        run_dirs = (Path(scratch) / str(i) for i in itertools.count())
        for round_ in range(1, args.repeats + 1):
            for seed in args.seeds:
                for name, overrides in variants.items():
                    metrics = run(args.recipe, seed, [*overrides, *args.override], next(run_dirs))
                    seconds[name].append(metrics["train_seconds"])
                    accuracy[name, seed] = metrics["test/acc"]
                    print(
                        f"round {round_} seed {seed} {name}: train_seconds {metrics['train_seconds']:.1f} "
                        f"test/acc {metrics['test/acc']:.4f}",
                        flush=True,
                    )

    base = statistics.median(seconds[args.recipe])
    print("\nmedian s  ratio  test/acc per seed  variant: all train_seconds")
    for name in variants:
        median = statistics.median(seconds[name])
        runs = " ".join(f"{s:.1f}" for s in seconds[name])
        accs = " / ".join(f"{accuracy[name, seed]:.2%}" for seed in args.seeds)
        print(f"{median:8.1f}  {median / base:5.2f}  {accs:17s}  {name}: {runs}")


if __name__ == "__main__":
    main()
