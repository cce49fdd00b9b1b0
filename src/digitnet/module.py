"""The LightningModule: standardise -> backbone, cross-entropy, accuracy metrics, optimizer + schedule."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import lightning as L
import matplotlib
import torch
import torchvision
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from digitnet import trackers
from digitnet.data.augment import build_augment
from digitnet.ema import EMA
from digitnet.errors import DigitnetError, check_number
from digitnet.fastpath import keep_gradients_channels_last
from digitnet.mix import build_mix
from digitnet.models import PerImageStandardize, build_backbone
from digitnet.optim import build_optimizer, build_scheduler

matplotlib.use("Agg")  # confusion matrices are rendered off-screen, also on machines without a display
# conversion and augmentation after the transfer belong to the model by design (docs/design.md, "Data flow")
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")


class DigitClassifier(L.LightningModule):
    """Classifies 28x28 grayscale images; `net` maps float [B,1,28,28] at any pixel scale to logits."""

    def __init__(
        self,
        model: Mapping,
        optim: Mapping | None = None,
        sched: Mapping | None = None,
        aug: Mapping | None = None,
        class_names: Sequence[str] = tuple(str(i) for i in range(10)),
        data_name: str = "mnist",
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        """`model`, `optim`, `sched` and `aug` are those config groups; the keywords from `label_smoothing` on are
        the training options of `conf/module/` (each off by default, so older checkpoints load unchanged)."""
        super().__init__()
        self.save_hyperparameters()
        check_number("module.label_smoothing", label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)")
        for key, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            check_number(f"module.{key}", alpha, lambda v: v >= 0, ">= 0 (0 switches it off)")
        if ema_decay is not None:
            check_number("module.ema_decay", ema_decay, lambda v: 0 < v < 1, "in (0, 1) or null")
        for key, switch in (("channels_last", channels_last), ("compile", compile)):
            if not isinstance(switch, bool):
                raise DigitnetError(f"module.{key}={switch} must be true or false")
        backbone_cfg = dict(model)
        self.net = nn.Sequential(PerImageStandardize(), build_backbone(num_classes=len(class_names), **backbone_cfg))
        self.augment = build_augment(aug or {})
        self.mix = build_mix(mixup_alpha, cutmix_alpha, len(class_names))  # None when off
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        num_classes = len(class_names)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # metric objects sum over the images of all processes (DDP), so a process with fewer images weighs less
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.test_images = SumMetric()  # what test/acc is over: limit_test_batches may stop short of the split
        self.val_acc_best = MaxMetric()
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._loss: torch.Tensor | None = None  # the last training loss, checked for NaN/inf now and then
        self._checkpoint_plan: int | None = None  # planned optimizer steps of a checkpoint resumed from
        self.checkpoint_metrics: dict[str, float] = {}  # the fit's metrics when the loaded checkpoint was saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        """Only for fitting: a checkpoint loaded for export or evaluation keeps the plain layout and forward."""
        if stage == "fit" and self.hparams.channels_last:  # NHWC kernels; [B,1,28,28] inputs are NHWC already
            self.to(memory_format=torch.channels_last)
            keep_gradients_channels_last(self.net)
        if stage == "fit" and self.hparams.compile:  # in place: state_dict keys (checkpoints) stay the plain net's
            self.net.compile()

    def configure_callbacks(self) -> list[L.Callback]:
        """module.ema_decay: validation, test, checkpoints and model.onnx use the EMA of the weights."""
        return [] if self.hparams.ema_decay is None else [EMA(self.hparams.ema_decay)]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 [B,28,28] -> float [B,1,28,28] in [0,1] on the device; augment training batches there."""
        x, y = batch
        x = x.unsqueeze(1).float().div_(255)
        if self.trainer is not None and self.trainer.training:
            x = self.augment(x)
            if self.mix is not None:  # y becomes target probabilities [B, num_classes]
                x, y = self.mix(x, y)
        return x, y

    def _step(self, batch):
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), logits.argmax(1), y

    def training_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        # checking every step would wait for the device each step: check on logging steps and before validation
        # (a NaN/inf loss leaves NaN weights, so the next check still sees it)
        self._loss = loss.detach()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self._require_finite_loss()
        if batch_idx == 0:
            self._log_images("train/augmented_samples", batch[0])
        first_of_epoch = not self.train_acc.update_called
        self.train_acc.update(preds, y if y.ndim == 1 else y.argmax(1))  # mixed batches: the larger share
        self.log("train/loss", loss, prog_bar=True)
        if first_of_epoch:  # a metric object is logged once: Lightning computes and resets it at the epoch's end
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _require_finite_loss(self) -> None:
        if self._loss is not None and not torch.isfinite(self._loss):
            raise DigitnetError(
                f"training loss became {self._loss.item()} by epoch {self.current_epoch}, step {self.global_step}; "
                "the last good checkpoint is checkpoints/last.ckpt. Lower optim.lr or add a warmup (sched=cosine)"
            )

    def on_validation_start(self):
        self._require_finite_loss()  # before a checkpoint could keep NaN weights

    def on_train_start(self):
        self.val_acc_best.reset()  # forget the sanity-check validation, not the epochs before a resume
        if "val/acc_best" in self.checkpoint_metrics:
            self.val_acc_best.update(self.checkpoint_metrics["val/acc_best"])
        planned = int(self.trainer.estimated_stepping_batches)
        if self._checkpoint_plan not in (None, planned) and self.hparams.sched.get("name", "none") != "none":
            # the restored LR schedule keeps its old length: OneCycle would fail when it runs out, cosine would
            # rise again
            raise DigitnetError(
                f"the checkpoint's {self.hparams.sched['name']} LR schedule was planned for {self._checkpoint_plan} "
                f"steps but this run plans {planned} (trainer.max_epochs, data.batch_size or limit_train_batches "
                "changed). Resume with the original settings, or start a new schedule from these weights with "
                "init_from=<checkpoint> instead of ckpt_path"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["planned_steps"] = int(self.trainer.estimated_stepping_batches)
        checkpoint["fit_metrics"] = self._fit_metrics()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_plan = checkpoint.get("planned_steps")
        self.checkpoint_metrics = checkpoint.get("fit_metrics", {})

    def _fit_metrics(self) -> dict[str, float]:
        """The scalars logged so far, with this epoch's train/acc (Lightning logs it after the checkpoint):
        what a run resumed from this checkpoint with no epoch left to train reports."""
        metrics = {k: v.item() for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if self.train_acc.update_called:
            metrics["train/acc"] = self.train_acc.compute().item()
        return metrics

    def validation_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        self.val_acc.update(preds, y)
        self.val_confusion.update(preds, y)
        self.val_loss.update(loss, weight=len(y))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self):
        self.val_acc_best(self.val_acc.compute())
        # the same on every process (val_acc is synced); sync_dist says so to Lightning
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        self._log_confusion("val/confusion_matrix", self.val_confusion)

    def test_step(self, batch, batch_idx: int):
        loss, preds, y = self._step(batch)
        self.test_acc.update(preds, y)
        self.test_confusion.update(preds, y)
        self.test_loss.update(loss, weight=len(y))
        self.log("test/loss", self.test_loss)
        self.log("test/acc", self.test_acc)
        self.test_images.update(len(y))
        self.log("test/images", self.test_images)

    def on_test_epoch_end(self):
        loaders = self.trainer.test_dataloaders
        split = sum(len(loader.dataset) for loader in (loaders if isinstance(loaders, list) else [loaders]))
        self.log("test/split_images", float(split), sync_dist=True)
        self._log_confusion("test/confusion_matrix", self.test_confusion)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.net, self.hparams.optim)
        scheduler = build_scheduler(optimizer, self.hparams.sched, int(self.trainer.estimated_stepping_batches))
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _log_images(self, tag: str, x: torch.Tensor):
        """A grid of what the model sees (after augmentation), once per epoch."""
        if self.loggers:
            trackers.log_image(
                self.loggers, tag, torchvision.utils.make_grid(x[:64].clamp(0, 1), nrow=8), self.current_epoch
            )

    def _log_confusion(self, tag: str, metric: MulticlassConfusionMatrix):
        if self.loggers and not self.trainer.sanity_checking:
            fig, _ = metric.plot(labels=list(self.hparams.class_names))
            trackers.log_figure(self.loggers, tag, fig, self.global_step)
        metric.reset()
