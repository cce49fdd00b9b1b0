"""Nothing lost: a killed or failed write (full disk, read-only folder) leaves the previous file or none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_config
from digitnet.errors import DigitnetError
from digitnet.export import export_checkpoint
from digitnet.module import DigitClassifier
from digitnet.train import train
from tiny_run import tiny_run

QUIET = ["debug=test"]


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a fresh tmpfs of that size (e.g. "1m") under tmp_path, unmounted afterwards."""
    points: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(points)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the disk's free space."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize - leave))


def make_read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def mlp_checkpoint(path: Path, hidden: list[int]) -> Path:
    """A checkpoint of an untrained MLP, as `digitnet export` reads it (no training needed to export)."""
    torch.manual_seed(0)
    module = DigitClassifier(model={"name": "mlp", "hidden": hidden})
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def unchanged(path: Path, stat: tuple[int, int]) -> bool:
    return (path.stat().st_size, path.stat().st_mtime_ns) == stat


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def digitnet_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "digitnet.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_one_error_line(run: subprocess.Popen, *parts: str) -> None:
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write"), stderr[-3000:]
    for part in parts:
        assert part in lines[0]


# ---------------------------------------------------------------------------- digitnet export


@pytest.mark.slow
def test_export_killed_while_writing_keeps_the_previous_file(real_data, tmp_path):
    previous = tmp_path / "existing.onnx"
    export_checkpoint(mlp_checkpoint(tmp_path / "small.ckpt", [16]), previous, test_images=20)
    before = previous.read_bytes()
    stat = (previous.stat().st_size, previous.stat().st_mtime_ns)
    # an ~80 MB graph, so writing it takes long enough to be caught at it
    big = mlp_checkpoint(tmp_path / "big.ckpt", [4096, 4096])
    export = digitnet_cli("export", str(big), "-o", str(previous), "--test-images", "20")
    try:
        while export.poll() is None and not temp_files(tmp_path) and unchanged(previous, stat):
            time.sleep(0.001)  # until the new file's bytes start to go somewhere
        export.send_signal(signal.SIGKILL)
    finally:
        export.communicate()
    assert export.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    assert previous.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("existing")] == ["existing.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("had_previous", [True, False])
def test_export_on_a_full_disk_is_one_error_line_and_no_truncated_file(real_data, tmp_path, small_disk, had_previous):
    disk = small_disk("1m")
    target = disk / "model.onnx"
    if had_previous:
        target.write_bytes(b"the previous model")
    fill(disk, leave=64 * 1024)  # the new graph is ~440 KB
    export = digitnet_cli(
        "export", str(mlp_checkpoint(tmp_path / "mlp.ckpt", [128, 64])), "-o", str(target), "--test-images", "20"
    )
    assert_one_error_line(export, str(target), "No space left on device", "free some disk space")
    if had_previous:
        assert target.read_bytes() == b"the previous model"
    else:
        assert not target.exists()
    assert not temp_files(disk)


@pytest.mark.slow
def test_int8_copy_on_a_full_disk_keeps_the_previous_copy(real_data, tmp_path, small_disk):
    ckpt = mlp_checkpoint(tmp_path / "mlp.ckpt", [128, 64])
    sizes = export_checkpoint(ckpt, tmp_path / "model.onnx", int8=True, test_images=20).metrics()
    disk = small_disk("2m")
    (disk / "model.int8.onnx").write_bytes(b"the previous int8 model")
    fill(disk, leave=sizes["onnx/bytes"] + 32 * 1024)  # room for the float graph, not for its int8 copy
    export = digitnet_cli("export", str(ckpt), "-o", str(disk / "model.onnx"), "--int8", "--test-images", "20")
    assert_one_error_line(export, str(disk / "model.int8.onnx"), "No space left on device")
    assert (disk / "model.int8.onnx").read_bytes() == b"the previous int8 model"
    assert (disk / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    assert not temp_files(disk)


@pytest.mark.slow
def test_export_into_a_read_only_folder_is_one_error_line(real_data, tmp_path, small_disk):
    disk = small_disk("1m")
    make_read_only(disk)
    export = digitnet_cli(
        "export",
        str(mlp_checkpoint(tmp_path / "mlp.ckpt", [16])),
        "-o",
        str(disk / "model.onnx"),
        "--test-images",
        "20",
    )
    assert_one_error_line(export, str(disk / "model.onnx"), "Read-only file system")
    assert not list(disk.iterdir())


# ---------------------------------------------------------------------------- training run, registry export


class FillDisk(L.Callback):
    """Fills the run dir's disk after testing, just before the run writes metrics.json."""

    def __init__(self, disk: str):
        self.disk = Path(disk)

    def on_test_end(self, trainer, pl_module):
        fill(self.disk, leave=0)


def test_training_run_on_a_full_disk_keeps_the_previous_metrics_json(real_data, small_disk):
    run_dir = small_disk("16m")
    (run_dir / "metrics.json").write_text('{"previous": true}\n')
    cfg = compose_config(
        "model=mlp",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.onnx_export=null",
        "++callbacks.fill_disk._target_=test_safe_writes.FillDisk",
        f"++callbacks.fill_disk.disk={run_dir}",
        *QUIET,
        output_dir=run_dir,
    )
    with pytest.raises(DigitnetError) as err:
        train(cfg)
    assert str(err.value).startswith(f"could not write {run_dir / 'metrics.json'}: No space left on device")
    assert "\n" not in str(err.value)
    assert json.loads((run_dir / "metrics.json").read_text()) == {"previous": True}
    assert not temp_files(run_dir)


def test_registry_onnx_out_on_a_full_disk_writes_no_file(real_data, tmp_path_factory, small_disk):
    run = tiny_run(tmp_path_factory)
    disk = small_disk("1m")
    fill(disk, leave=16 * 1024)
    show = digitnet_cli(
        "models", "--db", run.registry_url, "show", run.record_id, "--onnx-out", str(disk / "best.onnx")
    )
    assert_one_error_line(show, str(disk / "best.onnx"), "No space left on device")
    assert not (disk / "best.onnx").exists() and not temp_files(disk)


def test_checkpoint_on_a_full_disk_is_one_error_line_and_no_truncated_checkpoint(real_data, small_disk):
    run_dir = small_disk("1m")  # an MLP checkpoint with its optimizer state is ~1.3 MB
    cfg = compose_config(
        "model=mlp",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "callbacks.onnx_export=null",
        *QUIET,
        output_dir=run_dir,
    )
    with pytest.raises(DigitnetError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"could not write {run_dir / 'checkpoints'}/") and "\n" not in message
    assert "No space left on device" in message
    assert not list((run_dir / "checkpoints").iterdir())


def small_study(tmp_path: Path) -> str:
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="demo", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=3)
    return storage


@pytest.mark.parametrize("had_previous", [True, False])
def test_sweep_report_on_a_full_disk_is_one_error_line_and_no_truncated_file(tmp_path, small_disk, had_previous):
    storage = small_study(tmp_path)
    disk = small_disk("1m")
    if had_previous:
        (disk / "best.yaml").write_text("the previous report\n")
    fill(disk, leave=0)
    report = digitnet_cli("sweep-report", storage, "demo", "--out", str(disk))
    assert_one_error_line(report, str(disk / "best.yaml"), "No space left on device")
    if had_previous:
        assert (disk / "best.yaml").read_text() == "the previous report\n"
    else:
        assert not (disk / "best.yaml").exists()
    assert not temp_files(disk)


def test_sweep_report_into_a_read_only_folder_is_one_error_line(tmp_path, small_disk):
    storage = small_study(tmp_path)
    disk = small_disk("1m")
    make_read_only(disk)
    report = digitnet_cli("sweep-report", storage, "demo", "--out", str(disk / "demo"))
    assert_one_error_line(report, str(disk / "demo" / "best.yaml"), "Read-only file system")
