"""A callback with a bug, for tests of how a run that crashes mid-training is reported."""

import lightning as L


class Boom(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise RuntimeError(f"boom after epoch {trainer.current_epoch}")
