"""`python eval.py ckpt_path=...`: where a model fails, how sure it is, and how it degrades.

Writes into the run dir: report.md (readable without TensorBoard) beside confusion_matrix.png,
misclassified.png, reliability.png and robustness.png, plus eval_metrics.json; the figures, numbers
and report.md also go to the configured loggers (conf/logger/, TensorBoard events by default).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from digitnet import trackers
from digitnet.atomic import write_atomically
from digitnet.checkpoint import checkpoint_spec
from digitnet.classifier import BATCH, Classifier, load_classifier
from digitnet.config import validate_eval
from digitnet.console import progress
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.robustness import CORRUPTIONS, robustness_table

matplotlib.use("Agg")  # figures are files; no display needed
log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Everything the report shows, computed from test probabilities [N,C] and labels [N]."""

    class_names: list[str]
    probs: torch.Tensor
    labels: torch.Tensor
    n_bins: int = 15  # calibration bins
    metrics: dict = field(init=False)
    per_class: dict = field(init=False)  # precision/recall/f1/support -> list over classes
    confusion: torch.Tensor = field(init=False)  # [true, predicted] counts
    calibration_bins: list = field(init=False)  # (low, high, count, mean confidence, accuracy)
    confusion_metric: MulticlassConfusionMatrix = field(init=False, repr=False)  # plots itself

    def __post_init__(self):
        c = len(self.class_names)
        probs, labels = self.probs, self.labels
        predicted = probs.argmax(1)
        per_class = {
            "precision": multiclass_precision(probs, labels, c, average=None),
            "recall": multiclass_recall(probs, labels, c, average=None),
            "f1": multiclass_f1_score(probs, labels, c, average=None),
        }
        confmat = MulticlassConfusionMatrix(c)
        confmat.update(predicted, labels)
        self.confusion_metric, self.confusion = confmat, confmat.compute()
        self.per_class = {k: v.tolist() for k, v in per_class.items()} | {
            "support": torch.bincount(labels, minlength=c).tolist()
        }
        self.metrics = {
            "test/acc": (predicted == labels).float().mean().item(),
            "test/loss": F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
            **{f"test/{k}_macro": v.mean().item() for k, v in per_class.items()},
            "test/ece": multiclass_calibration_error(probs, labels, c, n_bins=self.n_bins, norm="l1").item(),
            "test/images": len(labels),
        }
        self.calibration_bins = self._bins()

    def _bins(self) -> list[tuple[float, float, int, float, float]]:
        """Top-1 confidence histogram with torchmetrics' bin edges (so its ECE is sum |acc-conf| * share)."""
        confidence, predicted = self.probs.max(1)
        correct = (predicted == self.labels).float()
        edges = torch.linspace(0, 1, self.n_bins + 1)
        index = torch.bucketize(confidence, edges, right=True) - 1  # like torchmetrics: exactly 1.0 is a bin of its own
        bins = []
        for b in range(self.n_bins + 1):
            inside = index == b
            if n := int(inside.sum()):
                low, high = edges[b].item(), edges[min(b + 1, self.n_bins)].item()
                bins.append((low, high, n, confidence[inside].mean().item(), correct[inside].mean().item()))
        return bins

    def confused_pairs(self, top: int) -> list[tuple[str, str, int]]:
        """(true, predicted, count) of the most frequent mistakes."""
        off_diagonal = self.confusion.clone().fill_diagonal_(0)
        counts, flat = off_diagonal.flatten().sort(descending=True)
        c = len(self.class_names)
        return [
            (self.class_names[i // c], self.class_names[i % c], n)
            for n, i in zip(counts.tolist()[:top], flat.tolist()[:top])
            if n > 0
        ]


# ---------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_misclassified(images: torch.Tensor, ev: Evaluation, count: int):
    """The `count` most confidently wrong test images with true/predicted label and confidence."""
    confidence, predicted = ev.probs.max(1)
    wrong = torch.nonzero(predicted != ev.labels).squeeze(1)
    wrong = wrong[confidence[wrong].argsort(descending=True)][:count]
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true {ev.class_names[ev.labels[i]]}\npred {ev.class_names[predicted[i]]} {confidence[i]:.2f}",
            fontsize=7,
            color="firebrick",
        )
    fig.suptitle(f"{len(wrong)} most confident mistakes (of {len(ev.labels) - int((predicted == ev.labels).sum())})")
    return fig


def plot_reliability(ev: Evaluation):
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lows, highs, counts, confs, accs = zip(*ev.calibration_bins)
    ax.bar(
        lows,
        accs,
        width=[h - lo for lo, h in zip(lows, highs)],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy in bin",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot(confs, accs, "o", color="firebrick", markersize=3, label="mean confidence")
    ax.set(
        xlabel="top-1 confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"reliability (ECE {ev.metrics['test/ece']:.4f})",
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_robustness(table: dict[str, list[tuple[float, float]]]):
    cols = min(3, len(table))
    rows = -(-len(table) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(table) :]:
        ax.axis("off")
    for ax, (name, cells) in zip(axes.flat, table.items()):
        strengths, accs = zip(*cells)
        ax.plot(strengths, accs, "o-")
        ax.set(title=name, xlabel=CORRUPTIONS[name][0], ylim=(0, 1))
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test accuracy")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def render_report(classifier: Classifier, ev: Evaluation, table: dict, top_pairs: int) -> str:
    m = ev.metrics
    overall = [
        ["accuracy", f"{m['test/acc']:.4f}"],
        ["loss (NLL)", f"{m['test/loss']:.4f}"],
        ["precision (macro)", f"{m['test/precision_macro']:.4f}"],
        ["recall (macro)", f"{m['test/recall_macro']:.4f}"],
        ["F1 (macro)", f"{m['test/f1_macro']:.4f}"],
        ["expected calibration error", f"{m['test/ece']:.4f}"],
    ]
    if "test/acc_tta_hflip" in m:
        overall.append(
            ["accuracy, mean of the image's and its mirror's probabilities", f"{m['test/acc_tta_hflip']:.4f}"]
        )
    per_class = [
        [name, *(f"{ev.per_class[k][i]:.4f}" for k in ("precision", "recall", "f1")), ev.per_class["support"][i]]
        for i, name in enumerate(ev.class_names)
    ]
    pairs = [[t, p, n] for t, p, n in ev.confused_pairs(top_pairs)]
    robustness = [
        [name, CORRUPTIONS[name][0], " · ".join(f"{s:g}: {a:.3f}" for s, a in rows)] for name, rows in table.items()
    ]
    return (
        "\n\n".join(
            [
                "# Evaluation report",
                f"Model: `{classifier.source}`  \n"
                f"Dataset: {classifier.data_name}, {m['test/images']} official test images",
                "## Test metrics\n\n" + _table(["metric", "value"], overall),
                "## Per class\n\n" + _table(["class", "precision", "recall", "F1", "support"], per_class),
                "## Most confused pairs\n\n"
                + (_table(["true", "predicted", "count"], pairs) if pairs else "No mistakes."),
                "![confusion matrix](confusion_matrix.png)",
                "## Misclassified test images\n\n"
                "Most confident mistakes first: true label, predicted label, confidence.\n\n"
                "![misclassified](misclassified.png)",
                f"## Calibration\n\n"
                f"Expected calibration error (top-1, {ev.n_bins} equal-width bins): {m['test/ece']:.4f}. "
                "Bars under the diagonal are over-confident.\n\n![reliability diagram](reliability.png)",
                "## Robustness\n\nTest accuracy with every test image corrupted at a fixed strength "
                "(rotation sign and shift direction random, seeded).\n\n"
                + _table(["corruption", "strength unit", "strength: accuracy"], robustness)
                + "\n\n![robustness](robustness.png)",
            ]
        )
        + "\n"
    )


def predict(probabilities, x: torch.Tensor, desc: str, progress_bar: bool) -> torch.Tensor:
    """`probabilities(x)` in batches, with a progress bar."""
    return torch.cat([probabilities(chunk) for chunk in progress(x.split(BATCH), desc=desc, enabled=progress_bar)])


def _report(cfg: DictConfig, figures: dict, metrics: dict, files: list[Path]) -> None:
    """Figures as eval/<name>, the metrics as eval/<metric> and the report's files, to every configured logger."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for name, figure in figures.items():
        trackers.log_figure(loggers, f"eval/{name}", figure, 0)
    trackers.log_summary(
        loggers,
        OmegaConf.to_container(cfg, resolve=True),
        {f"eval/{k.removeprefix('test/')}": v for k, v in metrics.items()},
        0,
    )
    for path in files:
        trackers.log_artifact(loggers, path)
    trackers.finish(loggers)


def evaluate(cfg: DictConfig) -> float:
    """Evaluate `cfg.ckpt_path` (checkpoint, ONNX file, registry id or best) and write the report; returns test/acc."""
    if cfg.ckpt_path is None:
        raise DigitnetError("say which model to evaluate: ckpt_path=<.ckpt or .onnx file | registry id | best>")
    validate_eval(cfg)
    run_dir = Path(cfg.paths.output_dir)
    model = checkpoint_spec("ckpt_path", cfg.ckpt_path)
    classifier = load_classifier(model, cfg.registry.url, metric=cfg.best_metric)
    # data=custom: the model's class names are its label folders
    images, labels = load_split(classifier.data_name, "test", root=cfg.data.root, class_names=classifier.class_names)
    images, labels = images[: cfg.data.limit], labels[: cfg.data.limit]
    x = images[:, None].float() / 255  # the training input convention
    log.info("predicting the %s test images with %s ...", f"{len(x):,}", classifier.source)
    probs = predict(classifier.probabilities, x, "test images", cfg.progress_bar)
    ev = Evaluation(list(classifier.class_names), probs, labels, n_bins=cfg.calibration_bins)
    if cfg.tta_hflip:  # test-time augmentation: a metric of its own beside test/acc, never in its place
        mirrored = predict(classifier.probabilities, x.flip(-1), "mirrored test images", cfg.progress_bar)
        ev.metrics["test/acc_tta_hflip"] = ((ev.probs + mirrored).argmax(1) == labels).float().mean().item()
    strengths = OmegaConf.to_container(cfg.robustness, resolve=True)
    table = robustness_table(
        classifier.probabilities, x, labels, strengths, seed=cfg.seed, progress_bar=cfg.progress_bar
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "confusion_matrix": ev.confusion_metric.plot(labels=ev.class_names)[0],
        "misclassified": plot_misclassified(images, ev, cfg.gallery_size),
        "reliability": plot_reliability(ev),
        "robustness": plot_robustness(table),
    }
    for name, figure in figures.items():
        _save(figure, run_dir / f"{name}.png")
    summary = {
        "model": classifier.source,
        "dataset": classifier.data_name,
        **ev.metrics,
        "per_class": ev.per_class,
        "confused_pairs": ev.confused_pairs(cfg.confused_pairs),
        "robustness": table,
    }
    write_atomically(run_dir / "eval_metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    # the report goes last: its presence means every file it links to is there
    report = render_report(classifier, ev, table, cfg.confused_pairs)
    write_atomically(run_dir / "report.md", lambda tmp: tmp.write_text(report))
    _report(cfg, figures, ev.metrics, [run_dir / "report.md", run_dir / "eval_metrics.json"])
    log.info(
        "report: %s  (test/acc=%.4f, ECE=%.4f)",
        (run_dir / "report.md").resolve(),
        ev.metrics["test/acc"],
        ev.metrics["test/ece"],
    )
    return ev.metrics["test/acc"]
