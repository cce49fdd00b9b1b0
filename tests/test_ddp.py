"""Data-parallel training (trainer=ddp_cpu: processes on the CPU, gloo): one end of run per training,
evaluation over every image exactly once, the LR schedule as long as each process's steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, run_train
from digitnet.evaluate import evaluate
from digitnet.registry import Registry
from slurm_cluster import slurm_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # DDP runs in three processes, a SLURM cluster

PROCESSES = 3  # 10,000 test images do not split evenly in 3: a padding sampler would test 10,002
BATCH = 2048  # per process: an epoch is ceil(55,000 / 3) // 2048 = 8 steps in each process


@pytest.fixture(scope="module")
def ddp_run(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    url = f"sqlite:///{root / 'registry.db'}"
    result = run_train("trainer=ddp_cpu", f"trainer.devices={PROCESSES}", "model=mlp", "trainer.max_epochs=1",
                       f"data.batch_size={BATCH}", f"registry.url={url}", run_dir=root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", url, result.stdout + result.stderr


def test_a_ddp_run_ends_once(ddp_run):
    run_dir, url, output = ddp_run
    with Registry(url) as registry:
        (record,) = registry.list()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert record.metrics["test/acc"] == metrics["test/acc"]
    assert output.count("result: test/acc=") == 1 and output.count("ONNX model written to") == 1
    assert (run_dir / "model.onnx").is_file()
    assert "sync_dist" not in output  # Lightning warns of epoch-level values logged unsynced


def test_a_ddp_run_tests_every_image_once_like_eval_py(ddp_run, tmp_path):
    run_dir, _, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/images"] == metrics["test/split_images"] == 10_000
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("eval", overrides=[f"ckpt_path='{metrics['best_checkpoint']}'", "progress_bar=false",
                                         "logger=none", "~robustness", "+robustness={rotation: [0]}",
                                         f"paths.output_dir={tmp_path}"])
    assert metrics["test/acc"] == pytest.approx(evaluate(cfg), abs=1e-6)  # one image is 1e-4


def test_the_lr_schedule_spans_the_steps_of_each_process(ddp_run):
    run_dir, _, _ = ddp_run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = -(-55_000 // PROCESSES) // BATCH
    (schedule,) = last["lr_schedulers"]
    assert last["global_step"] == last["planned_steps"] == schedule["total_steps"] == schedule["last_epoch"] == steps


@pytest.mark.slurm
def test_one_training_over_two_slurm_tasks_ends_once(real_data, slurm_cluster, tmp_path):  # noqa: F811
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the script's `python`
    job = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'job.out'}", "slurm/train.sbatch", "model=mlp",
         "trainer.max_epochs=1", "trainer.limit_train_batches=20", "trainer.enable_progress_bar=false",
         f"registry.url={url}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    output = (tmp_path / "job.out").read_text()
    assert job.returncode == 0, job.stderr + output[-3000:]
    assert slurm_cluster.jobs()[job.stdout.strip()] == "COMPLETED"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "run" / "train.log").read_text()  # both tasks trained
    with Registry(url) as registry:
        (record,) = registry.list()
    assert record.metrics["test/images"] == 10_000
    assert output.count("result: test/acc=") == 1 and (tmp_path / "run" / "model.onnx").is_file()


def test_a_sweep_refuses_trials_of_several_processes(tmp_path):
    """Lightning would start a trial's second process with the whole -m command: a sweep of its own."""
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", "trainer=ddp_cpu", "model=mlp", "optim.lr=0.01,0.02",
         f"hydra.sweep.dir={tmp_path}", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 2
    assert "DigitnetError: a sweep trial trains in one process, not 2 (trainer.devices=2" in done.stderr.splitlines()[-1]
    assert not list(tmp_path.rglob("train_ddp_process_*.log")) and not list(tmp_path.rglob("metrics.json"))
