"""A tiny sweep as the web UIs show it: one MLflow run per trial, the study in optuna-dashboard.

Both UIs are started as a user starts them (`mlflow ui`, `optuna-dashboard`) on 127.0.0.1 and a
free port; the tests read their JSON APIs and save the docs' screenshots (headless Chromium).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO
from test_serve import _save_screenshot, browser  # noqa: F401 (a fixture)
from test_tensorboard import fetch, poll
from test_trackers import TINY

pytestmark = pytest.mark.slow  # a sweep tracked in MLflow, read back through its dashboards

STUDY = "tiny"


@pytest.fixture(scope="module")
def sweep(real_data, tmp_path_factory) -> Path:
    """Where `python train.py -m ... logger=mlflow` ran: sweeps/tiny/study.db and outputs/mlflow.db."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            *TINY,
            "trainer.max_epochs=1",
            "logger=mlflow",
            "model.dropout=0.0,0.1",
            f"hydra.sweeper.study_name={STUDY}",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler=grid",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return cwd


@contextmanager
def web_ui(*command: str, cwd: Path):
    """Run `command --host 127.0.0.1 --port <free>`; yields its base URL."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    binary = str(Path(sys.executable).parent / command[0])
    with (cwd / f"{command[0]}.log").open("w") as log:
        server = subprocess.Popen(
            [binary, *command[1:], "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sweep_logs_one_mlflow_run_per_trial_in_the_studys_experiment(sweep, browser):  # noqa: F811
    store = f"sqlite:///{sweep / 'outputs' / 'mlflow.db'}"  # the default store, beside where train.py ran
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.params["model.dropout"] for run in runs) == ["0.0", "0.1"]
    assert all(run.info.status == "FINISHED" and "test/acc" in run.data.metrics for run in runs)
    assert sorted(run.info.run_name for run in runs) == [f"sweeps/{STUDY}/{n}" for n in "01"]  # the trial dirs

    with web_ui("mlflow", "ui", "--backend-store-uri", store, "--workers", "1", cwd=sweep) as base:
        search = f"{base}/api/2.0/mlflow/runs/search"
        served = poll(lambda: len(fetch(search, {"experiment_ids": [experiment.experiment_id]})["runs"]), 2)
        assert served == 2
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs")  # the runs table, not the GenAI overview
        page.get_by_text(runs[0].info.run_name).first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Close", exact=True).click()  # the assistant side panel
        _save_screenshot(page.screenshot(), REPO / "docs" / "mlflow_ui.png")


def test_optuna_dashboard_serves_the_study(sweep, browser):  # noqa: F811
    storage = f"sqlite:///{sweep / 'sweeps' / STUDY / 'study.db'}"
    with web_ui("optuna-dashboard", storage, cwd=sweep) as base:
        studies = poll(lambda: [s["study_name"] for s in fetch(f"{base}/api/studies")["study_summaries"]], [STUDY])
        assert studies == [STUDY]
        (summary,) = fetch(f"{base}/api/studies")["study_summaries"]
        detail = fetch(f"{base}/api/studies/{summary['study_id']}?after=0")
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert [t["state"] for t in trials] == ["Complete", "Complete"]
        assert sorted(p["param_external_value"] for t in trials for p in t["params"]) == ["0.0", "0.1"]
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(f"{base}/dashboard/studies/{summary['study_id']}")
        page.get_by_text("Best Trial (number=").first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot .point").first.wait_for(timeout=60_000)  # the history plot drawn
        _save_screenshot(page.screenshot(), REPO / "docs" / "optuna_dashboard.png")
