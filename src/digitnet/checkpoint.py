"""Loading digitnet checkpoints, with one clear error for anything that is not one."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch

from digitnet.errors import DigitnetError


def load_checkpoint(path: str | Path) -> L.LightningModule:
    """A DigitClassifier from a checkpoint on the CPU; foreign or broken files give a DigitnetError."""
    from digitnet.module import DigitClassifier  # the module pulls in Lightning's full stack

    path = Path(path)
    if not path.is_file():
        raise DigitnetError(f"checkpoint {path} not found; pass a .ckpt file from a run's checkpoints/ folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a zip/pickle at all, or pickled objects that are not weights
        raise DigitnetError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in checkpoint:
        raise DigitnetError(
            f"{path} is not a digitnet checkpoint (no digitnet hyperparameters); "
            "export a checkpoint written by `python train.py` (outputs/.../checkpoints/*.ckpt)"
        )
    # torch.compile wraps modules as `_orig_mod`; the plain module has the same weights without it
    checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    try:
        return DigitClassifier.load_from_checkpoint(buffer, map_location="cpu")
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shape mismatches
        first_line = str(err).strip().splitlines()[-1].strip()
        raise DigitnetError(
            f"{path} does not fit its own model config {dict(hparams['model'])}: {first_line}"
        ) from None


def load_checkpoint_of(path: str | Path, model_name: str, key: str) -> L.LightningModule:
    """`load_checkpoint`, refusing a checkpoint of another model than config `key`'s run builds."""
    module = load_checkpoint(path)
    trained = module.hparams.model.get("name")
    if trained != model_name:
        raise DigitnetError(
            f"{key}={path} holds a model={trained} checkpoint but this run builds model={model_name}; "
            f"add model={trained} to the command"
        )
    return module
