"""The benchmark scripts run end to end (tiny settings: what they print, not how fast anything is)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts, run on real data

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--override", "trainer.limit_train_batches=2", "--override", "trainer.limit_val_batches=1",
        "--override", "trainer.limit_test_batches=1"]


def test_recipe_seconds_refuses_a_run_without_a_test_accuracy(real_data):
    done = subprocess.run(
        [sys.executable, "benchmarks/recipe_seconds.py", "--recipe", "speedrun_mnist", "--repeats", "1", *TINY,
         "--override", "test=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 1
    assert "run wrote no test/acc" in done.stderr and "leave test=true" in done.stderr
    assert "Traceback" not in done.stderr


def test_recipe_seconds_interleaves_the_recipe_and_a_variant_and_summarises_both(real_data):
    done = subprocess.run(
        [sys.executable, "benchmarks/recipe_seconds.py", "--recipe", "speedrun_mnist", "--seeds", "3", "--repeats", "2",
         "--variant", '"model.widths=[8,16,32]"', *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("round")]
    assert runs == ["round 1 seed 3 speedrun_mnist", 'round 1 seed 3 "model.widths=[8,16,32]"',
                    "round 2 seed 3 speedrun_mnist", 'round 2 seed 3 "model.widths=[8,16,32]"']
    summary = done.stdout.split("median s")[1].splitlines()[1:]
    assert summary[0].split()[1] == "1.00"  # the recipe against itself
    fields, seconds = summary[1].rsplit(": ", 1)
    _median, _ratio, accuracy, name = fields.split(maxsplit=3)
    assert name == '"model.widths=[8,16,32]"' and accuracy.endswith("%")
    assert len(seconds.split()) == 2  # one run per round
