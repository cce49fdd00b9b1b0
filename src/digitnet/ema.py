"""An exponential moving average (EMA) of the weights, used for validation, test, checkpoints and export."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Lightning's weight averaging with one fused EMA update (`torch._foreach_lerp_`) per training step.

    Parameters and buffers (BatchNorm statistics) are averaged. Validation runs on the average, and
    checkpoints hold it as their `state_dict` (the raw weights go to `current_model_state` so a
    resumed run continues both), so the best checkpoint, the test and the ONNX export all use the EMA.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning would put the raw weights back into the model when the test loads the best
        # checkpoint; outside fitting the checkpoint's state_dict (the average) is what we want.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
