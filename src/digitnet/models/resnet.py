"""A small pre-activation-free ResNet for 28x28 inputs: 3x3 stem, three stages at 28, 14 and 7 px."""

from collections.abc import Sequence

from torch import nn

from digitnet.models import check_counts, register


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), _conv_bn(cout, cout))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


@register("resnet")
class ResNet(nn.Sequential):
    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 1, 1)):
        check_counts("widths", widths)
        check_counts("depths", depths, length=len(widths))
        layers: list[nn.Module] = [_conv_bn(1, widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for i in range(depth):
                layers.append(BasicBlock(cin, width, stride=2 if stage > 0 and i == 0 else 1))
                cin = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        super().__init__(*layers)
