"""TensorBoard's own server, as `tensorboard --logdir` starts it, shows every run's curves and hparams.

Real runs (a single run, a run resumed into a new run dir, a sweep trial) are served by the
`tensorboard` CLI with its default (fast, Rust) data loader; the test reads what its web UI reads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conftest import REPO, compose_config
from digitnet.train import train

pytestmark = pytest.mark.slow  # real runs and a sweep, read back through a TensorBoard server

TINY = [
    "model=mlp",
    "sched=none",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=2",
    "callbacks.onnx_export.test_images=200",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]
CURVES = ["train/loss", "val/acc"]


def logged_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps at which the run's event files hold scalar `tag` (read with TensorBoard's file reader)."""
    steps = {
        event.step
        for path in sorted(run_dir.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == tag
    }
    return sorted(steps)


@contextmanager
def tensorboard(logdir: Path, stderr: Path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    binary = Path(sys.executable).parent / "tensorboard"
    with stderr.open("w") as err:
        server = subprocess.Popen(
            [str(binary), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def fetch(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def poll(read, wanted, seconds: float = 180):
    """`read()` once it returns `wanted` (the server loads event files in the background), else its last answer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = read()
        except OSError:  # not listening yet
            got = None
        if got == wanted or time.monotonic() > deadline:
            return got
        time.sleep(1)


def scalar_steps(base: str, run: str, tag: str) -> list[int]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return [step for _, step, _ in fetch(f"{base}/data/plugin/scalars/scalars?{query}")]


def session_groups(base: str) -> dict[str, dict]:
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    answer = fetch(
        f"{base}/data/plugin/hparams/session_groups", {"startIndex": 0, "sliceSize": 100, "allowedStatuses": statuses}
    )
    return {group["name"]: group for group in answer["sessionGroups"]}


def test_tensorboard_serves_every_step_and_the_final_metrics(real_data, tmp_path):
    train(compose_config(*TINY, "trainer.max_epochs=2", output_dir=tmp_path / "single"))
    last = tmp_path / "single" / "checkpoints" / "last.ckpt"
    train(compose_config(*TINY, "trainer.max_epochs=3", f"ckpt_path={last}", output_dir=tmp_path / "resumed"))
    sweep = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            *TINY,
            "trainer.max_epochs=2",
            "model.dropout=0.0,0.1",
            "hydra.sweeper.study_name=tiny",
            "hydra.sweeper.n_trials=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    runs = {"single": tmp_path / "single", "resumed": tmp_path / "resumed", "sweeps/tiny/0": tmp_path / "sweeps/tiny/0"}

    with tensorboard(tmp_path, tmp_path / "tensorboard.err") as base:
        for run, run_dir in runs.items():
            for tag in CURVES:
                steps = logged_steps(run_dir, tag)
                assert steps and 0 not in steps, (run, tag, steps)  # no stray point at step 0
                assert poll(partial(scalar_steps, base, run, tag), steps) == steps, (run, tag)
        groups = poll(lambda: sorted(session_groups(base)), sorted(runs))
        assert groups == sorted(runs)
        groups = session_groups(base)
    assert "fast data loading" in (tmp_path / "tensorboard.err").read_text()  # the default, Rust loader

    assert len(logged_steps(runs["single"], "train/loss")) == 6
    assert logged_steps(runs["resumed"], "train/loss")[0] > logged_steps(runs["single"], "train/loss")[-1]
    for run, run_dir in runs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        group = groups[run]
        assert group["hparams"]["model.name"] == "mlp" and group["hparams"]["trainer.max_epochs"] == metrics["epochs"]
        final = {m["name"]["tag"]: m for m in group["metricValues"]}
        for tag in ("test/acc", "val/acc_best", "onnx/test_acc", "train_seconds"):
            assert final[tag]["value"] == pytest.approx(metrics[tag], rel=1e-6), (run, tag)
        for tag in ("test/acc", "onnx/test_acc"):  # written at the run's last global step
            assert final[tag]["trainingStep"] == logged_steps(run_dir, "train/loss")[-1] + 1, (run, tag)
