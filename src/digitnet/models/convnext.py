"""ConvNeXt-style network sized for 28x28 (Liu et al., 2022, "A ConvNet for the 2020s").

ImageNet's stride-4 patchify stem would leave a 7x7 map after the stem; here a stride-1 3x3 stem
keeps 28x28 and stages run at 28, 14 and 7 px, separated by LayerNorm + 2x2 stride-2 convs.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from digitnet.models import check_counts, check_number, register


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> Linear(4x) -> GELU -> Linear, layer scale, drop path, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6, drop_path: float = 0.0, expansion: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC so LayerNorm and Linear act on channels
        y = (self.gamma * self.mlp(self.norm(y))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


@register("convnext")
class ConvNeXt(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        dims: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (1, 1, 2),
        drop_path: float = 0.0,
        layer_scale: float = 1e-6,
    ):
        check_counts("dims", dims)
        check_counts("depths", depths, length=len(dims))
        check_number("drop_path", drop_path, 0, 1)
        check_number("layer_scale", layer_scale, 0)
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dims[0], 3, padding=1), LayerNorm2d(dims[0]))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # deeper blocks drop more often
        stages: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if i > 0:
                stages += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            stages += [ConvNeXtBlock(dim, layer_scale, rates.pop(0)) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
