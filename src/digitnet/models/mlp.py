"""The classic fully connected baseline: 784-128-64-10 with ReLU."""

from collections.abc import Sequence

from torch import nn

from digitnet.models import check_counts, check_number, register


@register("mlp")
class MLP(nn.Sequential):
    def __init__(self, num_classes: int = 10, hidden: Sequence[int] = (128, 64), dropout: float = 0.0):
        check_counts("hidden", hidden, allow_empty=True)  # no hidden layer: a linear classifier
        check_number("dropout", dropout, 0, 1)
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
