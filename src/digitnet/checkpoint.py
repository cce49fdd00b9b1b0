"""Loading digitnet checkpoints, from files or the registry, with one clear error for anything that is not one."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.plugins.io import TorchCheckpointIO

from digitnet.atomic import write_atomically
from digitnet.errors import DigitnetError

log = logging.getLogger(__name__)


def registry_checkpoint(spec: str, registry_url: str | None = None) -> tuple[str, bytes | Path]:
    """The checkpoint of registry model `spec` (an id or unique prefix): its stored bytes, else its
    file if that is still on disk. Returns (the model's full id, the bytes or the path)."""
    from digitnet.registry import Registry

    with Registry(registry_url) as registry:
        record = registry.get(spec, with_ckpt=True)
    if record.ckpt:
        return record.id, record.ckpt
    if record.checkpoint and Path(record.checkpoint).is_file():
        return record.id, Path(record.checkpoint)
    raise DigitnetError(
        f"registry model {record.id[:8]} has no checkpoint stored (recorded with "
        f"registry.store_checkpoint=false or by an older digitnet) and its file {record.checkpoint} is gone"
    )


def _is_file_spec(spec: str | Path) -> bool:
    """A path rather than a registry id: it exists, or looks like a file name."""
    return Path(spec).is_file() or Path(spec).suffix == ".ckpt" or os.sep in str(spec)


def checkpoint_spec(key: str, value: object) -> str:
    """A config value naming a checkpoint (file, registry id or prefix) as a string; Hydra reads an
    unquoted id prefix such as 7e123456 as a number, which cannot be turned back into the id."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise DigitnetError(f"{key}={value} was read as a number; quote a registry id: {key}=\"'<id>'\"")
    return str(value)


def checkpoint_file(spec: str | Path, registry_url: str | None, folder: Path) -> str:
    """A checkpoint file for Lightning (which resumes only from files): `spec` itself, or a registry
    model's stored checkpoint written to `folder`/registry-<id>.ckpt."""
    if _is_file_spec(spec):
        return str(spec)
    record_id, source = registry_checkpoint(str(spec), registry_url)
    if isinstance(source, Path):
        return str(source)
    path = folder / f"registry-{record_id[:8]}.ckpt"
    write_atomically(path, lambda tmp: tmp.write_bytes(source))
    return str(path)


def load_checkpoint(spec: str | Path, registry_url: str | None = None) -> L.LightningModule:
    """A DigitClassifier on the CPU from a checkpoint file or a registry id (`registry_url`: default
    env DIGITNET_REGISTRY or outputs/registry.db); foreign or broken files give a DigitnetError."""
    if _is_file_spec(spec):
        if not Path(spec).is_file():
            raise DigitnetError(
                f"checkpoint {spec} not found; pass a .ckpt file from a run's checkpoints/ folder or a registry id"
            )
        return load_checkpoint_from(Path(spec), str(spec))
    record_id, source = registry_checkpoint(str(spec), registry_url)
    return load_checkpoint_from(source, f"registry model {record_id[:8]}")


def load_checkpoint_from(source: Path | bytes, path: str) -> L.LightningModule:
    """`load_checkpoint` of a file or of checkpoint bytes; `path` names it in messages."""
    from digitnet.module import DigitClassifier  # the module pulls in Lightning's full stack

    try:
        checkpoint = torch.load(
            io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu", weights_only=True
        )
    except Exception as err:  # not a zip/pickle at all, or pickled objects that are not weights
        raise DigitnetError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in checkpoint:
        raise DigitnetError(
            f"{path} is not a digitnet checkpoint (no digitnet hyperparameters); "
            "export a checkpoint written by `python train.py` (outputs/.../checkpoints/*.ckpt)"
        )
    checkpoint["hyper_parameters"] = upgrade_hparams(hparams)
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


# the flat `aug` keys of earlier versions -> (op, its keyword), in the order those ops ran
_FLAT_AUG_KEYS = {
    "hflip_p": ("hflip", "p"),
    **{
        key: ("warp", key)
        for key in ("degrees", "translate", "translate_whole_px", "scale", "elastic_alpha", "elastic_sigma")
    },
    "erase_p": ("erase", "p"),
    "erase_scale": ("erase", "scale"),
    "erase_ratio": ("erase", "ratio"),
    "erase_value": ("erase", "value"),
    "alias_p": ("alias", "p"),
    "alias_factor": ("alias", "factor"),
    "blur_p": ("blur", "p"),
    "blur_sigma": ("blur", "sigma"),
    "invert_p": ("invert", "p"),
    "contrast": ("jitter", "contrast"),
    "brightness": ("jitter", "brightness"),
    "noise_std": ("noise", "std"),
}


def _aug_ops(flat: dict) -> dict:
    """An `aug` preset of the flat kind (every setting a top-level key) as a list of ops."""
    ops: dict[str, dict] = {}
    for key, (op, arg) in _FLAT_AUG_KEYS.items():
        if key in flat:
            ops.setdefault(op, {"p": 0.0} if op in ("hflip", "erase", "alias", "blur", "invert") else {})[arg] = flat[
                key
            ]
    return {"name": flat.get("name", "custom"), "ops": ops}


def upgrade_hparams(hparams: dict) -> dict:
    """The hyperparameters of a checkpoint from an earlier digitnet in today's config format."""
    hparams = dict(hparams)
    if isinstance(hparams.get("aug"), dict) and "ops" not in hparams["aug"]:
        hparams["aug"] = _aug_ops(hparams["aug"])
    if isinstance(hparams.get("optim"), dict) and "_target_" in hparams["optim"]:
        hparams["optim"] = {"_partial_": True, **hparams["optim"]}  # the optimizer class was called by hand
    return hparams


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


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint that keeps the best-so-far when a run resumes into a new run dir.

    Lightning forgets the old run's top-k checkpoints and their scores when the folder changed, so
    the resumed run would test and export its own best epoch even if an earlier one was better.
    Here the old checkpoints are copied into the new folder and tracked as if saved there (so the
    old run dir is never touched). Same class name as Lightning's: its state key in checkpoints
    is the class name, so checkpoints of either class resume with the other.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath is not None and state_dict.get("dirpath") not in (None, self.dirpath):
            state_dict = self._carried_over(state_dict)
        super().load_state_dict(state_dict)

    def _carried_over(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` with its checkpoints (top k, and the best of a callback without a monitor) copied here."""
        old_paths = {*state.get("best_k_models", {}), state.get("best_model_path", "")} - {""}
        if not all(Path(p).is_file() for p in old_paths):
            log.warning("the checkpoints of the run resumed from are gone; its best-so-far is forgotten")
            return state
        moved = {old: str(Path(self.dirpath) / Path(old).name) for old in old_paths}
        for old, new in moved.items():
            write_atomically(Path(new), lambda tmp, old=old: shutil.copyfile(old, tmp))
        return state | {
            "dirpath": self.dirpath,
            "best_k_models": {moved[old]: score for old, score in state.get("best_k_models", {}).items()},
            "best_model_path": moved.get(state.get("best_model_path", ""), ""),
            "kth_best_model_path": moved.get(state.get("kth_best_model_path", ""), ""),
            "last_model_path": "",  # the old run's last.ckpt is not this callback's to replace
        }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writing through `write_atomically`.

    Lightning writes the temp file into the system temp dir and moves it into place, which on
    another file system is a copy (a kill mid-copy leaves a truncated .ckpt); nothing is fsynced,
    and a full disk is a traceback. Here: temp file beside the checkpoint, fsync, rename, one line.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # into a file, torch reports a full disk as a RuntimeError
        write_atomically(Path(path), lambda tmp: tmp.write_bytes(buffer.getbuffer()))
