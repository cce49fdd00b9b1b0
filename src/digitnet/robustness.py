"""Test accuracy under fixed-strength corruptions: rotation, shift, scale, blur, noise, inversion.

Each corruption maps a float batch [N,1,28,28] in [0,1] and one strength to a corrupted batch,
on the batch's device, with the batched geometry and blur of `digitnet.data.augment`. Unlike
training augmentation the strength is fixed (only the direction is random: rotation sign, shift
angle), so each table cell measures one well-defined difficulty.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from digitnet.console import progress
from digitnet.data.augment import affine_theta, gaussian_blur
from digitnet.errors import DigitnetError

log = logging.getLogger(__name__)


def _affine(x: Tensor, angle: Tensor, shift: Tensor, zoom: float) -> Tensor:
    theta = affine_theta(angle, shift, torch.full_like(angle, zoom), tuple(x.shape[-2:]))
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_sign(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (len(x),), device=x.device, generator=gen).float() * 2 - 1


def rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate every image by `degrees`, clockwise or anticlockwise at random."""
    return _affine(x, degrees * _random_sign(x, gen), torch.zeros(len(x), 2, device=x.device), 1.0)


def shift(x: Tensor, pixels: float, gen: torch.Generator) -> Tensor:
    """Move every image by `pixels` in a random direction."""
    angle = torch.rand(len(x), device=x.device, generator=gen) * 2 * math.pi
    offset = pixels * torch.stack([angle.cos(), angle.sin()], dim=1)
    return _affine(x, torch.zeros(len(x), device=x.device), offset, 1.0)


def scale(x: Tensor, zoom: float, gen: torch.Generator) -> Tensor:
    """Zoom about the centre: > 1 enlarges the digit (and may cut it), < 1 shrinks it."""
    return _affine(x, torch.zeros(len(x), device=x.device), torch.zeros(len(x), 2, device=x.device), zoom)


def blur(x: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    """Gaussian blur with `sigma` pixels (0: unchanged)."""
    return x if sigma == 0 else gaussian_blur(x, torch.full((len(x),), float(sigma), device=x.device))


def noise(x: Tensor, std: float, gen: torch.Generator) -> Tensor:
    """Additive Gaussian noise of `std` (pixel range 0-1), clipped to [0, 1]."""
    return (x + std * torch.randn(x.shape, device=x.device, generator=gen, dtype=x.dtype)).clamp(0, 1)


def invert(x: Tensor, amount: float, gen: torch.Generator) -> Tensor:
    """Blend towards the negative: 0 unchanged, 1 dark ink on light paper (0.5 would be flat grey)."""
    return x * (1 - amount) + (1 - x) * amount


# name -> (what the strength means, corruption, (lowest, highest) valid strength)
CORRUPTIONS: dict[str, tuple[str, Callable[[Tensor, float, torch.Generator], Tensor], tuple[float, float]]] = {
    "rotation": ("degrees", rotate, (0, 180)),
    "shift": ("pixels", shift, (0, 28)),
    "scale": ("zoom factor", scale, (0.05, 5)),
    "blur": ("Gaussian sigma, pixels", blur, (0, 9)),
    "noise": ("Gaussian std, pixels in [0, 1]", noise, (0, 1)),
    "inversion": ("0 = original, 1 = inverted", invert, (0, 1)),
}


def robustness_table(
    probabilities: Callable[[Tensor], Tensor],
    x: Tensor,
    labels: Tensor,
    strengths: Mapping[str, Sequence[float]],
    seed: int = 0,
    progress_bar: bool = True,
) -> dict[str, list[tuple[float, float]]]:
    """{corruption: [(strength, accuracy), ...]} for float images `x` [N,1,28,28] in [0,1]."""
    unknown = sorted(set(strengths) - set(CORRUPTIONS))
    if unknown:
        raise DigitnetError(f"unknown robustness corruption(s) {unknown}; choose from {sorted(CORRUPTIONS)}")
    for name, levels in strengths.items():
        low, high = CORRUPTIONS[name][2]
        bad = [s for s in levels if not low <= s <= high]
        if bad:
            raise DigitnetError(f"robustness.{name} strengths {bad} are outside [{low}, {high}]")
    cells = sum(len(levels) for levels in strengths.values())
    log.info("robustness: accuracy on %d corrupted copies of the %s test images ...", cells, f"{len(x):,}")
    table = {}
    with progress(total=cells, desc="robustness", enabled=progress_bar) as bar:
        for name, levels in strengths.items():
            corrupt = CORRUPTIONS[name][1]
            rows = []
            for strength in levels:
                bar.set_postfix_str(f"{name} {strength:g}")
                gen = torch.Generator(device=x.device).manual_seed(seed)  # every cell sees the same directions
                predicted = probabilities(corrupt(x, float(strength), gen)).argmax(1)
                rows.append((float(strength), (predicted == labels.to(predicted.device)).float().mean().item()))
                bar.update()
            table[name] = rows
            log.info("robustness %-9s %s", name, "  ".join(f"{s:g}: {a:.4f}" for s, a in rows))
    return table
