"""eval.py: the report files, metrics that agree with each other, robustness, calibration, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from digitnet.errors import DigitnetError
from digitnet.evaluate import evaluate
from digitnet.robustness import blur, invert, noise, rotate, shift
from tiny_run import tiny_run

LIMIT = 2000
FIGURES = ("confusion_matrix.png", "misclassified.png", "reliability.png", "robustness.png")


def eval_config(*overrides: str, output_dir: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("eval", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    acc = evaluate(eval_config(f"ckpt_path='{trained.checkpoint}'", f"data.limit={LIMIT}", output_dir=out))
    return out, acc, json.loads((out / "eval_metrics.json").read_text())


def test_report_and_figures_are_written(report):
    out, _, _ = report
    text = (out / "report.md").read_text()
    for section in (
        "## Test metrics",
        "## Per class",
        "## Most confused pairs",
        "## Misclassified test images",
        "## Calibration",
        "## Robustness",
    ):
        assert section in text
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", text)) == sorted(FIGURES)  # every figure linked, all exist
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert not list(out.glob(".*.tmp"))


def test_metrics_agree_with_each_other(report, trained):
    out, acc, summary = report
    assert summary["test/images"] == LIMIT and summary["test/acc"] == acc > 0.7
    support, recall, precision = (np.array(summary["per_class"][k]) for k in ("support", "recall", "precision"))
    assert support.sum() == LIMIT
    assert np.isclose((recall * support).sum() / LIMIT, acc)  # support-weighted recall is accuracy
    assert np.isclose(summary["test/recall_macro"], recall.mean())
    f1 = np.array(summary["per_class"]["f1"])
    assert np.allclose(f1, 2 * precision * recall / (precision + recall))
    text = (out / "report.md").read_text()
    assert f"| accuracy | {acc:.4f} |" in text
    assert f"| 1 | {precision[1]:.4f} | {recall[1]:.4f} | {f1[1]:.4f} | {support[1]} |" in text
    pairs = summary["confused_pairs"]
    counts = [n for _, _, n in pairs]
    assert counts == sorted(counts, reverse=True) and all(t != p for t, p, _ in pairs)
    assert sum(counts) <= LIMIT * (1 - acc) + 1e-6
    t, p, n = pairs[0]
    assert f"| {t} | {p} | {n} |" in text


def test_reliability_bins_give_the_reported_ece(trained, report):
    from digitnet.classifier import load_classifier
    from digitnet.data.idx import load_split
    from digitnet.evaluate import Evaluation

    _, _, summary = report
    images, labels = load_split("mnist", "test")
    probs = load_classifier(str(trained.checkpoint)).probabilities(images[:LIMIT, None].float() / 255)
    ev = Evaluation([str(i) for i in range(10)], probs, labels[:LIMIT])
    ece = sum(n * abs(acc - conf) for _, _, n, conf, acc in ev.calibration_bins) / LIMIT
    assert np.isclose(ece, summary["test/ece"], atol=1e-5) and 0 < ece < 0.5
    assert sum(n for _, _, n, _, _ in ev.calibration_bins) == LIMIT


def test_robustness_table_degrades_sensibly(report):
    out, acc, summary = report
    table = {name: dict(cells) for name, cells in summary["robustness"].items()}
    assert sorted(table) == ["blur", "inversion", "noise", "rotation", "scale", "shift"]
    for name, clean in (("rotation", 0), ("shift", 0), ("scale", 1), ("blur", 0), ("noise", 0), ("inversion", 0)):
        assert table[name][clean] == pytest.approx(acc)  # the uncorrupted cell is the test accuracy
    assert table["rotation"][90] < acc - 0.3 and table["shift"][8] < acc - 0.3 and table["inversion"][1] < 0.4
    assert table["rotation"][15] > table["rotation"][45] and table["scale"][0.5] < table["scale"][0.85]
    assert "| inversion | 0 = original, 1 = inverted | 0: " in (out / "report.md").read_text()


@pytest.mark.slow
def test_mirror_tta_is_reported_beside_the_plain_accuracy(trained, report, tmp_path):
    from digitnet.classifier import load_classifier
    from digitnet.data.idx import load_split

    _, acc, plain = report
    assert "test/acc_tta_hflip" not in plain  # off unless asked for
    out = tmp_path / "tta"
    returned = evaluate(
        eval_config(f"ckpt_path='{trained.checkpoint}'", f"data.limit={LIMIT}", "tta_hflip=true", output_dir=out)
    )
    summary = json.loads((out / "eval_metrics.json").read_text())
    assert returned == summary["test/acc"] == acc  # test/acc stays the plain accuracy
    images, labels = load_split("mnist", "test")
    x = images[:LIMIT, None].float() / 255
    probabilities = load_classifier(str(trained.checkpoint)).probabilities
    by_hand = ((probabilities(x) + probabilities(x.flip(-1))).argmax(1) == labels[:LIMIT]).float().mean().item()
    assert summary["test/acc_tta_hflip"] == pytest.approx(by_hand)
    assert by_hand != acc  # the mirror was really used (mirrored digits change some predictions)
    assert (
        f"| accuracy, mean of the image's and its mirror's probabilities | {by_hand:.4f} |"
        in (out / "report.md").read_text()
    )


def test_tensorboard_has_the_confusion_matrix(report):
    out, acc, _ = report
    (events,) = out.glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    assert "eval/confusion_matrix" in board.Tags()["images"]
    assert board.Scalars("eval/acc")[0].value == pytest.approx(acc)


def test_corruptions_do_what_they_say():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0  # a bar in the middle
    gen = torch.Generator().manual_seed(0)
    turned = rotate(x, 90, gen)
    quarter = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert all(min((turned[i] - q[i]).abs().max() for q in quarter) < 1e-4 for i in range(4))
    moved = shift(x, 3.0, gen)

    def centre(a):
        grid = torch.arange(28.0)
        return (
            torch.stack([(a.sum(3) * grid).sum((1, 2)), (a.sum(2) * grid).sum((1, 2))], 1) / a.sum((1, 2, 3))[:, None]
        )

    assert torch.allclose((centre(moved) - centre(x)).norm(dim=1), torch.full((4,), 3.0), atol=0.05)
    assert torch.allclose(blur(x, 1.0, gen).sum(), x.sum(), rtol=1e-4) and blur(x, 0, gen) is x
    assert torch.equal(invert(x, 1.0, gen), 1 - x)
    assert (noise(torch.full((4, 1, 28, 28), 0.5), 0.1, gen) - 0.5).std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.slow
def test_eval_by_registry_id_and_best(trained, tmp_path):
    a = evaluate(
        eval_config(
            f"ckpt_path='{trained.record_id[:8]}'",
            f"registry.url={trained.registry_url}",
            "data.limit=300",
            "logger=none",
            output_dir=tmp_path / "by_id",
        )
    )
    b = evaluate(
        eval_config(
            "ckpt_path=best",
            f"registry.url={trained.registry_url}",
            "data.limit=300",
            "logger=none",
            output_dir=tmp_path / "best",
        )
    )
    assert a == b and (tmp_path / "best" / "report.md").is_file()
    assert (
        f"Model: `registry model {trained.record_id[:8]} (stored checkpoint)`"
        in (tmp_path / "best" / "report.md").read_text()
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("ckpt_path=null", "say which model to evaluate"),
        ("ckpt_path=deadbeef", "no model with id 'deadbeef'"),
        ("+robustness.fog=[1]", r"unknown robustness corruption\(s\) \['fog'\]"),
        ("robustness.rotation=[400]", r"robustness.rotation strengths \[400\] are outside"),
        ("tta_hflip=yes", "tta_hflip=yes must be true or false"),
        ("data.limit=0", r"data.limit=0 must be a positive integer or null"),
        ("calibration_bins=ten", "calibration_bins=ten must be an integer"),
    ],
)
def test_bad_settings_are_clear_errors_and_write_no_report(trained, tmp_path, override, message):
    overrides = [
        f"ckpt_path='{trained.checkpoint}'",
        f"registry.url={trained.registry_url}",
        "data.limit=100",
        override,
    ]
    with pytest.raises(DigitnetError, match=message):
        evaluate(eval_config(*overrides, output_dir=tmp_path))
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_eval_py_command_line(trained, tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 2 and run.stderr.strip() == f"error: model file {tmp_path / 'missing.ckpt'} not found"
