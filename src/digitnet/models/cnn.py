"""The classic PyTorch MNIST example network: two convs, max-pool, dropout, two linear layers."""

from collections.abc import Sequence

from torch import nn

from digitnet.models import check_count, check_counts, check_number, register
from digitnet.models.dropout import Dropout


@register("cnn")
class CNN(nn.Sequential):
    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout_conv: float = 0.25,
        dropout_fc: float = 0.5,
    ):
        check_counts("channels", channels, length=2)
        check_count("hidden", hidden)
        check_number("dropout_conv", dropout_conv, 0, 1)
        check_number("dropout_fc", dropout_fc, 0, 1)
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(1, c1, 3),
            nn.ReLU(inplace=True),  # 28 -> 26
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(inplace=True),  # 26 -> 24
            nn.MaxPool2d(2),  # 24 -> 12
            Dropout(dropout_conv),  # on 64 feature maps per image: torch's nn.Dropout was the costliest op
            nn.Flatten(),
            nn.Linear(c2 * 12 * 12, hidden),
            nn.ReLU(inplace=True),
            Dropout(dropout_fc),
            nn.Linear(hidden, num_classes),
        )
