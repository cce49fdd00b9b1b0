"""Shared fixtures: the real datasets (via DIGITNET_DATA), tiny IDX files, composed configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The official MNIST/Fashion-MNIST files. Missing data fails the test loudly: never skipped."""
    root = os.environ.get("DIGITNET_DATA")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"set DIGITNET_DATA to a folder holding MNIST/raw and FashionMNIST/raw (got {root!r})")
    return Path(root)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (big-endian dims after a 4-byte magic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A root with a 200/50-image synthetic MNIST (each image's brightness encodes its label)."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    for split, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 20, (n, 28, 28)) + labels[:, None, None] * 20
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path


def compose_config(*overrides: str, output_dir: Path):
    """The config `python train.py <overrides>` would run, outside a Hydra app."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_train(*overrides: str, run_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py` as a user runs it, in its own process."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *overrides,
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory):
    """Training runs of the tests (and their subprocesses) record into a throwaway registry."""
    url = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIGITNET_REGISTRY", url)
        yield url


SERVICES = ("postgres", "browser", "slurm", "network")


def pytest_collection_modifyitems(items):
    """A test that needs a service or a download is slow: the fast tier (-m "not slow") needs none."""
    for item in items:
        if any(item.get_closest_marker(name) for name in SERVICES):
            item.add_marker(pytest.mark.slow)
