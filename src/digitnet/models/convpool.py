"""A small VGG-style net for fast training: `depth` x conv3x3-BN-ReLU then 2x2 max-pool, per stage
(28 -> 14 -> 7 -> 3 px).

Pooling after every conv keeps the expensive layers at low resolution, so a training step costs
a fraction of a ResNet's of the same width (which runs whole blocks at 28x28); see the speedrun recipe.
`space_to_depth=2` folds each 2x2 pixel block into 4 channels first (lossless, 28 -> 14 px), so every
stage runs at half the resolution: a quarter of the arithmetic for the same widths.
`pool_before_norm` pools right after each stage's last conv, so its BatchNorm and ReLU (and their
backward passes) run on a quarter of the values. `global_pool` ends the last stage with a max over all
its positions instead of a 2x2 pool, which on an odd-sized map (3x3, 7x7) ignores the last row and column.
"""

from collections.abc import Sequence

from torch import nn

from digitnet.errors import DigitnetError
from digitnet.models import check_count, check_counts, check_number, register


@register("convpool")
class ConvPoolNet(nn.Sequential):
    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
        dropout: float = 0.0,
        space_to_depth: int = 1,
        pool_before_norm: bool = False,
        global_pool: bool = False,
    ):
        check_counts("widths", widths)
        check_count("depth", depth)
        check_number("dropout", dropout, 0, 1)
        if space_to_depth < 1 or 28 % space_to_depth:
            raise DigitnetError(
                f"model.space_to_depth={space_to_depth} must divide the 28-px image: 1, 2, 4, 7, 14 or 28"
            )
        size = 28 // space_to_depth
        if size >> len(widths) < 1:
            raise DigitnetError(
                f"model=convpool: {len(widths)} stages (model.widths) leave no pixels: each stage halves the "
                f"{size}-px image (28 px / space_to_depth); use fewer widths or a smaller space_to_depth"
            )
        layers: list[nn.Module] = [nn.PixelUnshuffle(space_to_depth)] if space_to_depth > 1 else []
        cin = space_to_depth**2
        for stage, width in enumerate(widths, 1):
            last_stage = stage == len(widths)
            pool = nn.AdaptiveMaxPool2d(1) if global_pool and last_stage else nn.MaxPool2d(2)
            for _ in range(depth):
                layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=False))
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            if (
                pool_before_norm
            ):  # max-pool commutes with ReLU and a positively scaled BatchNorm: mostly the statistics change
                layers.insert(-2, pool)
            else:
                layers.append(pool)
            size = 1 if global_pool and last_stage else size // 2
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * size * size, num_classes)]
        super().__init__(*layers)
