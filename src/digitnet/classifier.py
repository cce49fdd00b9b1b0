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
    model_id: str = ""  # the registry id, or the model file's absolute path (predictions stored in SQL name it)


def default_device() -> torch.device:
    """CUDA/MPS/... when present, else the CPU."""
    return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")


def classifier_from_checkpoint(
    path: str | Path, device: torch.device | None = None, checkpoint: bytes | None = None
) -> Classifier:
    """A checkpoint file's model, or (`checkpoint`) that of checkpoint bytes named `path`."""
    from digitnet.checkpoint import load_checkpoint_from  # handles torch.compile'd keys and foreign files

    module = load_checkpoint_from(Path(path) if checkpoint is None else checkpoint, str(path))
    device = device or default_device()
    net = module.net.to(device).eval()
    if device.type == "cpu":  # NHWC convolutions run about 1.3x faster here (benchmarks/inference.py)
        net = net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(chunk.to(device)).softmax(1).cpu() for chunk in x.split(BATCH)])

    hparams = module.hparams
    return Classifier(probabilities, [str(c) for c in hparams.class_names], hparams.data_name, str(path))


def classifier_from_onnx(model: str | Path | bytes, source: str) -> Classifier:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), providers=ort.get_available_providers()
        )
    except Exception as err:  # onnxruntime raises its own exception types for bad protobufs
        raise DigitnetError(f"{source} is not a loadable ONNX model ({str(err).splitlines()[0][:200]})") from None
    meta = session.get_modelmeta().custom_metadata_map  # written by digitnet.export
    input_name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    run, batch = session.run, batch_dim if isinstance(batch_dim, int) else BATCH
    widen = batch == 1  # the default model.onnx takes one image: batches of many run several times faster

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        nonlocal run, batch, widen
        array = x.float().numpy()
        if widen and len(array) > 1:  # tried once, when many images come (never for serve's single ones)
            widen = False
            batched = _any_batch(model, session, ort)
            if batched is not None:
                run, batch = batched.run, BATCH
        outputs = [run(None, {input_name: array[i : i + batch]})[0] for i in range(0, len(array), batch)]
        return torch.from_numpy(np.concatenate(outputs))

    class_names = json.loads(meta["class_names"]) if "class_names" in meta else [str(i) for i in range(10)]
    return Classifier(probabilities, class_names, meta.get("dataset", "mnist"), source)


def _any_batch(model: str | Path | bytes, session, ort):
    """`session`'s graph (exported for one image) with a symbolic batch axis, if that computes the
    same as one image at a time; None for a graph with the batch baked in (e.g. into a Reshape)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.graph.value_info[:]  # intermediate shapes inferred for batch 1
    input_ = session.get_inputs()[0]
    x = np.random.default_rng(0).random((2, *input_.shape[1:]), dtype=np.float32)
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # a graph that needs its batch of 1 fails here: no error log on the console
    try:
        batched = ort.InferenceSession(proto.SerializeToString(), quiet, providers=session.get_providers())
        together = batched.run(None, {input_.name: x})[0]
    except Exception:  # onnxruntime's own exception types: the graph needs its batch of 1
        return None
    alone = np.concatenate([session.run(None, {input_.name: x[i : i + 1]})[0] for i in range(len(x))])
    return batched if together.shape == alone.shape and np.allclose(together, alone, atol=1e-5) else None


def classifier_from_record(record, device: torch.device | None = None) -> Classifier:
    """A registry record's stored checkpoint, else its checkpoint file if still on disk, else its stored ONNX bytes."""
    if record.ckpt:
        classifier = classifier_from_checkpoint(
            f"registry model {record.id[:8]} (stored checkpoint)", device, record.ckpt
        )
    elif record.checkpoint and Path(record.checkpoint).is_file():
        classifier = classifier_from_checkpoint(record.checkpoint, device)
        classifier.source = f"registry model {record.id[:8]} ({record.checkpoint})"
    elif record.onnx:
        classifier = classifier_from_onnx(record.onnx, f"registry model {record.id[:8]} (stored ONNX)")
    else:
        raise DigitnetError(
            f"registry model {record.id[:8]}: checkpoint {record.checkpoint} is gone and no ONNX bytes are stored"
        )
    classifier.model_id = record.id
    return classifier


def load_classifier(
    spec: str,
    registry_url: str | None = None,
    device: torch.device | None = None,
    metric: str = "test/acc",
    include_partial: bool = False,
) -> Classifier:
    """`spec` = a .ckpt or .onnx file, `best` / `best:<dataset>` (by `metric`; models tested on part
    of the test split only if `include_partial`), or a registry id."""
    from digitnet.registry import Registry

    path = Path(spec)
    if path.is_file():
        classifier = (
            classifier_from_onnx(path, str(path))
            if path.suffix == ".onnx"
            else classifier_from_checkpoint(path, device)
        )
        classifier.model_id = str(path.resolve())
        return classifier
    if path.suffix in (".ckpt", ".onnx") or os.sep in spec:
        raise DigitnetError(f"model file {spec} not found")
    with Registry(registry_url) as registry:
        if spec == "best" or spec.startswith("best:"):
            record = registry.best(
                metric, "min" if "loss" in metric else "max", include_partial, dataset=spec[5:] or None
            )
        else:
            record = registry.get(spec)
        return classifier_from_record(registry.get(record.id, with_onnx=True, with_ckpt=True), device)
