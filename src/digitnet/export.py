"""ONNX export + verification for the digit-classification exercise (contract: docs/design.md, "The ONNX contract").

`export_onnx(module, path)` writes the graph `net + softmax` (input `input` float32 [1,1,28,28],
output `output` float32 [1,K] probabilities for K classes, opset 17, IR version 8; MNIST models
must have the exercise's K = 10, checked by `OnnxExport` before training), verifies it against
PyTorch on the real test set and only then writes the file. `export_checkpoint` does the same
for a checkpoint file, `OnnxExport` at the end of every fit, `main` for `digitnet export`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import digitnet
from digitnet.atomic import write_atomically
from digitnet.checkpoint import load_checkpoint
from digitnet.console import progress
from digitnet.errors import DigitnetError

log = logging.getLogger(__name__)

OPSET = 17  # the exercise's onnxruntime 1.15/1.16 supports opset <= 17 ...
IR_VERSION = 8  # ... and IR version <= 8
NUM_CLASSES = 10  # the exercise takes argmax over exactly ten probabilities ...
EXERCISE_DATASETS = ("mnist",)  # ... of MNIST-style digits; other datasets export [1,K] for their K classes
MAX_PROB_DIFF = 1e-5
VERIFY_BATCH = 1000
INPUT_CONVENTION = (
    "float32 [N,1,28,28] grayscale; any pixel scale (0-255, 0-1 or standardised): the graph "
    "standardises each image itself; digits light-on-dark like MNIST unless trained with aug=camera"
)


@dataclass
class ExportReport:
    """What one export wrote and measured; `metrics()` is what goes into metrics.json."""

    path: Path
    test_images: int
    torch_test_acc: float
    onnx_test_acc: float
    max_abs_diff: float
    seconds: float
    int8_path: Path | None = None
    int8_test_acc: float | None = None

    def metrics(self) -> dict:
        metrics = {
            "onnx/path": str(self.path),
            "onnx/test_acc": self.onnx_test_acc,
            "onnx/torch_test_acc": self.torch_test_acc,
            "onnx/max_abs_diff": self.max_abs_diff,
            "onnx/test_images": self.test_images,
            "onnx/bytes": self.path.stat().st_size,
            "onnx/seconds": self.seconds,
        }
        if self.int8_path is not None:
            metrics |= {
                "onnx_int8/path": str(self.int8_path),
                "onnx_int8/test_acc": self.int8_test_acc,
                "onnx_int8/bytes": self.int8_path.stat().st_size,
            }
        return metrics

    def summary(self) -> str:
        lines = [
            f"ONNX model written to {self.path} ({self.path.stat().st_size / 1e6:.2f} MB, "
            f"opset {OPSET}, IR {IR_VERSION}), verified in {self.seconds:.1f}s: "
            f"test acc {self.onnx_test_acc:.4f} (PyTorch {self.torch_test_acc:.4f}) on "
            f"{self.test_images} images, max |dprob| {self.max_abs_diff:.1e}"
        ]
        if self.int8_path is not None:
            lines.append(
                f"int8 copy written to {self.int8_path} ({self.int8_path.stat().st_size / 1e6:.2f} MB): "
                f"test acc {self.int8_test_acc:.4f}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------------------- export


def _probabilities_net(module: nn.Module) -> nn.Module:
    """CPU eval copy of `module.net` (standardise -> backbone) followed by softmax."""
    net = module.net
    net = getattr(net, "_orig_mod", net)  # a torch.compile'd net exports as the module it wraps
    return nn.Sequential(copy.deepcopy(net).cpu(), nn.Softmax(dim=1)).eval()


def _check_output(model: nn.Module, class_names: list[str], data_name: str) -> None:
    """One probability per class ([1,10] for the exercise's datasets), and probabilities for a blank
    frame (the client's std-0 case)."""
    with torch.inference_mode():
        probs = model(torch.zeros(1, 1, 28, 28))
    shape = list(probs.shape)
    if shape != [1, len(class_names)]:
        raise DigitnetError(
            f"the model outputs {shape} for {len(class_names)} class names; "
            f"it needs [1, {len(class_names)}] (one probability per class)"
        )
    if data_name in EXERCISE_DATASETS and len(class_names) != NUM_CLASSES:
        raise DigitnetError(
            f"data.name={data_name} models are for the exercise, whose contract is [1,1,28,28] -> "
            f"[1, {NUM_CLASSES}] (one probability per digit), but data.class_names lists {len(class_names)} "
            "classes; use data=custom for another set of classes"
        )
    if not torch.isfinite(probs).all():
        raise DigitnetError("the model outputs NaN for a blank image; its first layer must be PerImageStandardize")


def _to_onnx(model: nn.Module, dynamic_batch: bool) -> onnx.ModelProto:
    """Trace to opset 17. The dynamo exporter only emits opset >= 18 and its down-conversion
    to 17 fails on ReduceMean, so this uses the TorchScript exporter, which targets 17 natively."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own notice of the choice above
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    proto.producer_name, proto.producer_version = "digitnet", digitnet.__version__
    return proto


def _set_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    current = {p.key: p.value for p in proto.metadata_props} | entries
    del proto.metadata_props[:]
    for key, value in current.items():
        proto.metadata_props.add(key=key, value=value)


def _onnx_probabilities(
    proto: onnx.ModelProto, images: torch.Tensor, desc: str = "onnxruntime", progress_bar: bool = True
) -> np.ndarray:
    """Run the file's bytes in onnxruntime over float [N,1,28,28] images, in batches if the graph allows."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    batch = VERIFY_BATCH if not isinstance(batch_dim, int) else batch_dim
    x = images.numpy()
    starts = progress(range(0, len(x), batch), desc=desc, enabled=progress_bar)
    return np.concatenate([session.run(["output"], {"input": x[i : i + batch]})[0] for i in starts])


def _check_contract(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise DigitnetError(f"exported graph fails onnx.checker: {str(err).splitlines()[0]}") from None
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if proto.ir_version > IR_VERSION or opsets.get("ai.onnx", 0) > OPSET:
        raise DigitnetError(
            f"exported graph has IR {proto.ir_version}, opsets {opsets}; the exercise needs IR <= 8, opset <= 17"
        )


def _test_images(
    data_name: str, class_names: list[str], data_root: str | Path | None, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from digitnet.data.idx import load_split

    images, labels = load_split(data_name, "test", root=data_root, class_names=class_names)
    images, labels = images[:limit], labels[:limit]
    return images.unsqueeze(1).float().div(255), labels  # the training input convention


def export_onnx(
    module: L.LightningModule,
    path: str | Path,
    *,
    dynamic_batch: bool = False,
    int8: bool = False,
    data_root: str | Path | None = None,
    test_images: int | None = None,
    progress_bar: bool = True,
) -> ExportReport:
    """Export `module.net` + softmax to `path`, verify it on the test set, then write it.

    Nothing is written unless verification passes: onnx.checker (full), max |dprob| <= 1e-5
    against PyTorch and equal test accuracy. `test_images` limits the test set (default: all).
    `progress_bar` shows bars for the passes over the test set (on a terminal).
    """
    start = time.perf_counter()
    hparams = module.hparams
    class_names, data_name = _classes(module)
    model = _probabilities_net(module)
    _check_output(model, class_names, data_name)
    proto = _to_onnx(model, dynamic_batch)
    _check_contract(proto)

    x, y = _test_images(data_name, class_names, data_root, test_images)
    log.info("verifying %s against PyTorch on %s test images ...", Path(path).name, f"{len(y):,}")
    with torch.inference_mode():
        chunks = progress(x.split(VERIFY_BATCH), desc="PyTorch", enabled=progress_bar)
        torch_probs = torch.cat([model(chunk) for chunk in chunks]).numpy()
    onnx_probs = _onnx_probabilities(proto, x, progress_bar=progress_bar)
    max_abs_diff = float(np.abs(onnx_probs - torch_probs).max())
    torch_acc = float((torch_probs.argmax(1) == y.numpy()).mean())
    onnx_acc = float((onnx_probs.argmax(1) == y.numpy()).mean())
    if not max_abs_diff <= MAX_PROB_DIFF or onnx_acc != torch_acc:  # `not <=` also catches NaN
        raise DigitnetError(
            f"ONNX verification failed: max |dprob| {max_abs_diff:.2e} (limit {MAX_PROB_DIFF:.0e}), "
            f"test acc ONNX {onnx_acc:.4f} vs PyTorch {torch_acc:.4f}; the model uses an op that "
            "exports differently, please report it with the model config"
        )
    _set_metadata(
        proto,
        {
            "dataset": data_name,
            "class_names": json.dumps(class_names),
            "model_name": str(hparams["model"]["name"]),
            "test_accuracy": f"{onnx_acc:.4f}",
            "test_images": str(len(y)),
            "input_convention": INPUT_CONVENTION,
            "output": f"float32 [N,{len(class_names)}] class probabilities (softmax), argmax = predicted class",
            "digitnet_version": digitnet.__version__,
        },
    )
    path = Path(path)
    write_atomically(path, lambda tmp: onnx.save(proto, tmp))
    report = ExportReport(path, len(y), torch_acc, onnx_acc, max_abs_diff, time.perf_counter() - start)
    if int8:
        report.int8_path, report.int8_test_acc = _write_int8(proto, path.with_suffix(".int8.onnx"), x, y, progress_bar)
    return report


def _write_int8(
    proto: onnx.ModelProto, int8_path: Path, x: torch.Tensor, y: torch.Tensor, progress_bar: bool
) -> tuple[Path, float]:
    """Dynamic int8 quantisation: int8 weights, activation ranges computed per input at run time,
    so the raw-0-255 / 0-1 / standardised input contract still holds (a calibrated static range
    would clip inputs of another scale)."""

    def write(tmp: Path) -> float:
        quantized = _quantize(proto, tmp)
        _check_contract(quantized)
        probabilities = _onnx_probabilities(quantized, x, "onnxruntime int8", progress_bar)
        acc = float((probabilities.argmax(1) == y.numpy()).mean())
        _set_metadata(quantized, {"test_accuracy": f"{acc:.4f}", "quantization": "int8 dynamic (onnxruntime)"})
        onnx.save(quantized, tmp)
        return acc

    log.info("quantising to %s and measuring its test accuracy ...", int8_path.name)
    return int8_path, write_atomically(int8_path, write)


def _quantize(proto: onnx.ModelProto, out: Path) -> onnx.ModelProto:
    """Quantise into `out`; from the proto, as from a path the quantiser writes a side file beside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime's CPU ConvInteger kernel only takes uint8 weights. The quantiser's advice to
    # pre-process first is silenced: that step adds opset domains the exercise's runtime lacks.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(proto, out, weight_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(out)


def _classes(module: L.LightningModule) -> tuple[list[str], str]:
    hparams = module.hparams
    return [str(c) for c in hparams.get("class_names", range(NUM_CLASSES))], hparams.get("data_name", "mnist")


def export_checkpoint(checkpoint: str | Path, path: str | Path, **kwargs) -> ExportReport:
    """`export_onnx` for a checkpoint file (kwargs as there)."""
    return export_onnx(load_checkpoint(checkpoint), path, **kwargs)


# ---------------------------------------------------------------------------- training callback


class OnnxExport(L.Callback):
    """At the end of fit, export the best checkpoint to `<run dir>/model.onnx` and verify it.

    `run_metrics` holds the `onnx/...` numbers for metrics.json. `dirpath` defaults to the
    trainer's default_root_dir (the Hydra run dir).
    """

    def __init__(
        self,
        filename: str = "model.onnx",
        dirpath: str | None = None,
        dynamic_batch: bool = False,
        int8: bool = False,
        test_images: int | None = None,
    ):
        self.filename, self.dirpath = filename, dirpath
        self.options = {"dynamic_batch": dynamic_batch, "int8": int8, "test_images": test_images}
        self.run_metrics: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The output contract is checked before training, not after the whole schedule."""
        _check_output(_probabilities_net(pl_module), *_classes(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.fast_dev_run:  # a smoke test writes no checkpoints, so nothing to ship either
            log.info("fast_dev_run: skipping the ONNX export")
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            module = load_checkpoint(best)
        else:
            warnings.warn("no best checkpoint was saved; exporting the current weights to ONNX instead", stacklevel=1)
            module = pl_module
        data_root = getattr(trainer.datamodule, "root", None)  # verify on the data the run used
        path = Path(self.dirpath or trainer.default_root_dir) / self.filename
        progress_bar = trainer.progress_bar_callback is not None
        report = export_onnx(module, path, data_root=data_root, progress_bar=progress_bar, **self.options)
        self.run_metrics = report.metrics()
        log.info(report.summary())


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`digitnet export <ckpt> [-o out.onnx] [--dynamic-batch] [--int8]`."""
    parser = argparse.ArgumentParser(
        prog="digitnet export", description="Export a checkpoint to a verified ONNX file for the exercise."
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt from a run's checkpoints/ folder")
    parser.add_argument("-o", "--output", type=Path, help="ONNX file to write (default: <checkpoint>.onnx)")
    parser.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis instead of 1")
    parser.add_argument("--int8", action="store_true", help="also write an int8-quantised <output>.int8.onnx")
    parser.add_argument("--data-root", help="dataset root for verification (default: $DIGITNET_DATA or data/)")
    parser.add_argument("--test-images", type=int, help="verify on the first N test images only (default: all)")
    args = parser.parse_args(argv)
    # the progress lines of a long verification, on stdout like the summary (stderr: errors only)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    report = export_checkpoint(
        args.checkpoint,
        args.output or args.checkpoint.with_suffix(".onnx"),
        dynamic_batch=args.dynamic_batch,
        int8=args.int8,
        data_root=args.data_root,
        test_images=args.test_images,
    )
    print(report.summary())
    return 0
