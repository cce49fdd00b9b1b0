"""The network of the classic plain-PyTorch MNIST example, the baseline of throughput.py and time_to_accuracy.py."""

from torch import nn

from digitnet.models import build_backbone
from digitnet.models.dropout import Dropout


def classic_network() -> nn.Module:
    """`model=cnn` as the example writes it: the same layers, with torch's own nn.Dropout."""
    net = build_backbone("cnn")
    for i, layer in enumerate(net):
        if isinstance(layer, Dropout):
            net[i] = nn.Dropout(layer.p)
    return net
