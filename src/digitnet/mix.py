"""MixUp and CutMix of whole training batches, with the soft targets that go with them."""

from __future__ import annotations

from torch import nn
from torchvision.transforms import v2


def build_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> nn.Module | None:
    """A module mapping (images [B,C,H,W], labels [B]) to (mixed images, target probabilities [B,num_classes]).

    One Beta(alpha, alpha) mixing weight per batch (torchvision's MixUp/CutMix); with both alphas
    > 0 each batch gets one of the two at random. None when both are 0: nothing to do.
    """
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
