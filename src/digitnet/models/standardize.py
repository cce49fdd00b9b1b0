"""Per-image standardisation: the first layer of every digitnet model (docs/design.md, "The ONNX contract")."""

import torch
from torch import nn


class PerImageStandardize(nn.Module):
    """(x - mean) / sqrt(var + eps) over each image.

    Raw 0-255 pixels, 0-1 pixels and already standardised pixels all map to the same input, and a
    blank image maps to zeros instead of NaN. Living inside the model keeps exported graphs
    self-contained.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        var = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)
