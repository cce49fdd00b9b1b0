"""The benchmark scripts run end to end (tiny settings: what they print, not how fast anything is)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from digitnet.fastpath import choose, training_device

pytestmark = pytest.mark.slow  # the benchmark scripts, run on real data

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--override",
    "trainer.limit_train_batches=2",
    "--override",
    "trainer.limit_val_batches=1",
    "--override",
    "trainer.limit_test_batches=1",
]


def test_recipe_seconds_refuses_a_run_without_a_test_accuracy(real_data):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/recipe_seconds.py",
            "--recipe",
            "speedrun_mnist",
            "--repeats",
            "1",
            *TINY,
            "--override",
            "test=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert "run wrote no test/acc" in done.stderr and "leave test=true" in done.stderr
    assert "Traceback" not in done.stderr


def test_recipe_seconds_interleaves_the_recipe_and_a_variant_and_summarises_both(real_data):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/recipe_seconds.py",
            "--recipe",
            "speedrun_mnist",
            "--seeds",
            "3",
            "--repeats",
            "2",
            "--variant",
            '"model.widths=[8,16,32]"',
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("round")]
    assert runs == [
        "round 1 seed 3 speedrun_mnist",
        'round 1 seed 3 "model.widths=[8,16,32]"',
        "round 2 seed 3 speedrun_mnist",
        'round 2 seed 3 "model.widths=[8,16,32]"',
    ]
    summary = done.stdout.split("median s")[1].splitlines()[1:]
    assert summary[0].split()[1] == "1.00"  # the recipe against itself
    fields, seconds = summary[1].rsplit(": ", 1)
    _median, _ratio, accuracy, name = fields.split(maxsplit=3)
    assert name == '"model.widths=[8,16,32]"' and accuracy.endswith("%")
    assert len(seconds.split()) == 2  # one run per round


def test_inference_benchmark_predicts_and_serves_real_images_without_errors(real_data):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/inference.py",
            "--train-batches",
            "20",
            "--images",
            "200",
            "--repeats",
            "1",
            "--clients",
            "20",
            "--requests",
            "40",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("predict round")]
    assert [line.split(":")[0] for line in rounds] == ["predict round 1 checkpoint", "predict round 1 onnx"]
    accuracies = {line.rsplit("accuracy ", 1)[1] for line in rounds}
    assert len(accuracies) == 1 and float(accuracies.pop().rstrip("%")) > 50  # one model, trained on real digits
    assert all("200 images in" in line for line in rounds)
    for name in ("command", "model alone"):
        (summary,) = [line for line in lines if line.startswith(f"predict {name} images/s")]
        ratio = summary.rsplit("onnx/checkpoint ", 1)[1]
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    (serve,) = [line for line in lines if line.startswith("serve:")]
    assert serve.startswith("serve: 20 clients, 40 requests in ") and "errors 0," in serve
    p50, p99 = (float(serve.split(f"{p} ")[1].split(" ms")[0]) for p in ("p50", "p99"))
    assert 0 < p50 <= p99
    assert float(serve.rsplit("accuracy ", 1)[1].rstrip("%")) > 50


def test_throughput_times_the_defaults_and_a_variant_against_the_classic_script(real_data):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--batches",
            "4",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--variant",
            "trainer.precision=32-true module.channels_last=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if "images/s" in line]
    assert len(rows) == 3 and rows[0][2] == "1.00x"
    assert " ".join(rows[0][3:7]) == "classic script (1 worker)"
    precision, layout = choose(training_device("cpu"), convolutional=True)
    defaults, variant = " ".join(rows[1]), " ".join(rows[2])
    assert "python train.py model=cnn aug=light data.batch_size=64 [" in defaults
    assert f"[precision={precision} channels_last={str(layout).lower()}]" in defaults
    assert "module.channels_last=false [precision=32-true channels_last=false]" in variant
    # images/s over the timed batches, and the ratio is that over the classic's
    for row in rows[1:]:
        assert float(row[2].rstrip("x")) == pytest.approx(float(row[0]) / float(rows[0][0]), rel=0.05)
