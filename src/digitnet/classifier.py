"""A trained model behind one interface, loaded from a checkpoint, an ONNX file or the registry."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digitnet.errors import DigitnetError

BATCH = 1000

@dataclass
class Classifier:
    """A trained model behind one interface: float [N,1,28,28] (any pixel scale) -> probabilities [N,C]."""

    probabilities: Callable[[torch.Tensor], torch.Tensor]
    class_names: list[str]
    data_name: str
    source: str  # what was loaded, for messages and reports


def default_device() -> torch.device:
    """CUDA/MPS/... when present, else the CPU."""
    return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")


def classifier_from_checkpoint(path: str | Path, device: torch.device | None = None) -> Classifier:
    from digitnet.checkpoint import load_checkpoint  # handles torch.compile'd keys and foreign files

    module = load_checkpoint(path)
    device = device or default_device()
    net = module.net.to(device).eval()

    @torch.inference_mode()
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(chunk.to(device)).softmax(1).cpu() for chunk in x.split(BATCH)])

    hparams = module.hparams
    return Classifier(probabilities, [str(c) for c in hparams.class_names], hparams.data_name, str(path))


def classifier_from_onnx(model: str | Path | bytes, source: str) -> Classifier:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                       providers=ort.get_available_providers())
    except Exception as err:  # onnxruntime raises its own exception types for bad protobufs
        raise DigitnetError(f"{source} is not a loadable ONNX model ({str(err).splitlines()[0][:200]})") from None
    meta = session.get_modelmeta().custom_metadata_map  # written by digitnet.export
    input_name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    batch = batch_dim if isinstance(batch_dim, int) else BATCH  # the exercise's graphs take 1 image

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        array = x.float().numpy()
        outputs = [session.run(None, {input_name: array[i : i + batch]})[0] for i in range(0, len(array), batch)]
        return torch.from_numpy(np.concatenate(outputs))

    class_names = json.loads(meta["class_names"]) if "class_names" in meta else [str(i) for i in range(10)]
    return Classifier(probabilities, class_names, meta.get("dataset", "mnist"), source)


def classifier_from_record(record, device: torch.device | None = None) -> Classifier:
    """A registry record's checkpoint if it is still on disk, else its stored ONNX bytes."""
    if record.checkpoint and Path(record.checkpoint).is_file():
        classifier = classifier_from_checkpoint(record.checkpoint, device)
        classifier.source = f"registry model {record.id[:8]} ({record.checkpoint})"
        return classifier
    if record.onnx:
        return classifier_from_onnx(record.onnx, f"registry model {record.id[:8]} (stored ONNX)")
    raise DigitnetError(
        f"registry model {record.id[:8]}: checkpoint {record.checkpoint} is gone and no ONNX bytes are stored"
    )


def load_classifier(spec: str, registry_url: str | None = None, device: torch.device | None = None,
                    metric: str = "test/acc", include_partial: bool = False) -> Classifier:
    """`spec` = a .ckpt or .onnx file, `best` / `best:<dataset>` (by `metric`; models tested on part
    of the test split only if `include_partial`), or a registry id."""
    from digitnet.registry import Registry

    path = Path(spec)
    if path.is_file():
        return classifier_from_onnx(path, str(path)) if path.suffix == ".onnx" else classifier_from_checkpoint(path, device)
    if path.suffix in (".ckpt", ".onnx") or os.sep in spec:
        raise DigitnetError(f"model file {spec} not found")
    with Registry(registry_url) as registry:
        if spec == "best" or spec.startswith("best:"):
            record = registry.best(metric, "min" if "loss" in metric else "max", include_partial,
                                   dataset=spec[5:] or None)
        else:
            record = registry.get(spec)
        return classifier_from_record(registry.get(record.id, with_onnx=True), device)
