"""Data-parallel training (trainer=ddp_cpu: processes on the CPU, gloo): one end of run per training,
evaluation over every image exactly once, the LR schedule as long as each process's steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

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
    result = run_train(
        "trainer=ddp_cpu",
        f"trainer.devices={PROCESSES}",
        "model=mlp",
        "trainer.max_epochs=1",
        f"data.batch_size={BATCH}",
        "trainer.precision=32-true",  # eval.py evaluates in float32: test/acc must equal it to the image
        f"registry.url={url}",
        run_dir=root / "run",
    )
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
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path='{metrics['best_checkpoint']}'",
                "progress_bar=false",
                "logger=none",
                "~robustness",
                "+robustness={rotation: [0]}",
                f"paths.output_dir={tmp_path}",
            ],
        )
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
        [
            "sbatch",
            "--wait",
            "--parsable",
            f"--output={tmp_path / 'job.out'}",
            "slurm/train.sbatch",
            "model=mlp",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=20",
            "trainer.enable_progress_bar=false",
            f"registry.url={url}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = (tmp_path / "job.out").read_text()
    assert job.returncode == 0, job.stderr + output[-3000:]
    assert slurm_cluster.jobs()[job.stdout.strip()] == "COMPLETED"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "run" / "train.log").read_text()  # both tasks trained
    with Registry(url) as registry:
        (record,) = registry.list()
    assert record.metrics["test/images"] == 10_000
    assert output.count("result: test/acc=") == 1 and (tmp_path / "run" / "model.onnx").is_file()


SWEEP = [
    "trainer=ddp_cpu",
    "model=mlp",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.onnx_export.test_images=500",
    "trainer.enable_progress_bar=false",
    "hydra.sweeper.monitor=val/acc",
]


def train_sweep(*overrides: str, sweep_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "train.py"), "-m", *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)


def config_tree(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "── " in line]


def test_ddp_trials_of_a_sweep_run_in_their_run_dir_and_end_once(real_data, tmp_path):
    """Lightning starts each trial's second process by re-running the -m command: it joins that trial."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    # the grid (seed 0) runs lr=0.01 first; 1e-7 learns nothing, so the median pruner stops it after epoch 0
    done = train_sweep(
        "optim.lr=choice(1e-7,0.01)",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner={name: median, n_startup_trials: 1, n_warmup_steps: 0}",
        f"registry.url={url}",
        sweep_dir=tmp_path / "sweep",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    first, second = study.trials
    assert first.params["optim.lr"] == 0.01 and first.state == TrialState.COMPLETE
    assert second.params["optim.lr"] == 1e-7 and second.state == TrialState.PRUNED
    assert list(first.intermediate_values) == [0, 1] and list(second.intermediate_values) == [0]
    metrics = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert first.value == metrics["val/acc_best"]
    with Registry(url) as registry:
        (record,) = registry.list()  # the pruned trial records nothing
    assert record.metrics["test/acc"] == metrics["test/acc"]
    assert not (tmp_path / "sweep" / "1" / "metrics.json").exists()
    for trial in study.trials:
        run_dir = tmp_path / "sweep" / str(trial.number)
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
        assert config_tree(run_dir / "train_ddp_process_1.log") == config_tree(run_dir / "train.log")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name != "plots") == ["0", "1"]
    assert done.stdout.count("result: test/acc=") + done.stderr.count("result: test/acc=") == 1


def test_ddp_trials_need_the_basic_launcher(tmp_path):
    """A joblib worker's command line is not the sweep's: Lightning could not start the trial's other process."""
    done = train_sweep(
        "optim.lr=choice(0.01)",
        "hydra/launcher=joblib",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.max_failure_rate=0",
        sweep_dir=tmp_path,
    )
    assert done.returncode == 2
    assert "this sweep trial cannot train in 2 processes" in done.stderr.splitlines()[-1]
    assert "hydra/launcher" in done.stderr.splitlines()[-1]
    assert not list(tmp_path.rglob("train_ddp_process_*.log")) and not list(tmp_path.rglob("metrics.json"))
