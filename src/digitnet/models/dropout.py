"""Dropout whose mask costs a fraction of torch's on CPU."""

import torch
import torch.nn.functional as F
from torch import nn

INT64_MIN = torch.iinfo(torch.int64).min


class Dropout(nn.Module):
    """nn.Dropout: each value kept with probability 1 - p and scaled by 1 / (1 - p), in training only.

    On CPU the mask takes 16 random bits per value, four values from each 64-bit draw of torch's seeded
    generator, and has the input's memory layout; torch's CPU dropout spends a draw per value (`bernoulli_`)
    and builds its mask in NCHW even for NHWC input, which made it the costliest op of a `model=cnn`
    training step. p is rounded to a multiple of 2**-16 there. Other devices use torch's fused dropout.
    Evaluation passes the input through, so exported graphs have no trace of it.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p
        dropped = min(round(p * 2**16), 2**16 - 1)  # of the 2**16 values of 16 random bits
        self._threshold = dropped - 2**15  # as int16: values below it drop
        self._scale = 2**16 / (2**16 - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p)
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(INT64_MIN, None)  # all 64 bits
        layout = torch.empty_like(x, device="meta").stride()  # x's own strides whenever x is dense
        bits = words.view(torch.int16)[: x.numel()].as_strided(x.shape, layout)
        return x * (bits >= self._threshold).to(x.dtype).mul_(self._scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
