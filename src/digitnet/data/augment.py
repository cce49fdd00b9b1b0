"""Batched, device-agnostic image augmentation for float batches ``[B, C, H, W]`` in ``[0, 1]``.

Every op works on the whole batch at once on ``x.device`` (affine grids, masks, batched
matrix products): no per-sample Python loop and no PIL, so a GPU never waits on the CPU.
Randomness comes from torch's RNG on ``x.device`` (seeded by Lightning's ``seed_everything``)
or from an explicit ``generator`` living on that device.

Each op is a small module registered by name (``@register_op``, like the backbones). A preset,
``conf/aug/<name>.yaml``, lists ops under ``ops`` (op name -> its keywords) in the order they
run; :func:`build_augment` turns it into an :class:`Augment`, a torchvision-v2-style sequence.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digitnet.errors import DigitnetError

# Edges of the high-resolution image in the aliasing simulation are pushed towards crisp ink
# strokes with this sigmoid gain before the non-antialiased downsample (see _resize_aliasing).
_INK_EDGE_GAIN = 12.0


# --------------------------------------------------------------------------- random helpers


def _uniform(n: int, low: float, high: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    """``n`` samples of U(low, high) as float32 on ``like.device``."""
    u = torch.rand(n, device=like.device, generator=gen)
    return low + (high - low) * u


def _bernoulli(n: int, p: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    """``n`` booleans, each True with probability ``p``, on ``like.device``."""
    return torch.rand(n, device=like.device, generator=gen) < p


# --------------------------------------------------------------------------- geometry


def affine_theta(angle_deg: Tensor, shift_px: Tensor, scale: Tensor, size: tuple[int, int]) -> Tensor:
    """Inverse affine matrices ``[B, 2, 3]`` for ``F.affine_grid`` (align_corners=False).

    Same meaning as ``torchvision.transforms.v2.functional.affine`` (checked in the tests):
    rotate by ``angle_deg`` clockwise about the image centre, zoom by ``scale`` (> 1 enlarges
    the digit), then shift by ``shift_px = [B, 2]`` (x right, y down) pixels.
    """
    h, w = size
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # theta maps output to input coordinates: undo the shift, then the rotation and zoom.
    # Normalised coordinates span 2 units per side, hence the h/w factors off the diagonal.
    tx, ty = 2 * shift_px[:, 0] / w, 2 * shift_px[:, 1] / h
    row0 = torch.stack([cos, sin * h / w, -(cos * tx + sin * ty * h / w)], dim=1)
    row1 = torch.stack([-sin * w / h, cos, -(-sin * tx * w / h + cos * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


def _random_affine_theta(
    x: Tensor,
    degrees: float,
    translate: tuple[float, float],
    scale: tuple[float, float],
    gen: torch.Generator | None,
    whole_px: bool = False,
) -> Tensor:
    """Per-sample random rotation/shift/zoom matrices, sampled like torchvision's RandomAffine.
    ``whole_px`` rounds the shifts to whole pixels."""
    b, _, h, w = x.shape
    angle = _uniform(b, -degrees, degrees, x, gen)
    shift_x = _uniform(b, -translate[0] * w, translate[0] * w, x, gen)
    shift_y = _uniform(b, -translate[1] * h, translate[1] * h, x, gen)
    shift = torch.stack([shift_x, shift_y], dim=1)
    zoom = _uniform(b, scale[0], scale[1], x, gen)
    return affine_theta(angle, shift.round() if whole_px else shift, zoom, (h, w))


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each sample of ``x = [B, C, H, W]`` with its own Gaussian ``sigma = [B]`` (pixels).

    A separable blur is two small matrix products, ``K_h @ x @ K_w^T``, with one Gaussian
    matrix per sample: batched, no per-sample kernels or padding. Rows are renormalised to
    sum to 1 (weight falling outside the image goes to the pixels inside), so flat stays flat.
    """

    def gaussian_matrix(n: int) -> Tensor:  # [B, n, n]
        pos = torch.arange(n, device=x.device, dtype=x.dtype)
        dist = pos[:, None] - pos[None, :]
        k = torch.exp(-0.5 * (dist / sigma.to(x.dtype)[:, None, None]) ** 2)
        return k / k.sum(dim=2, keepdim=True)

    h, w = x.shape[-2:]
    return gaussian_matrix(h)[:, None] @ x @ gaussian_matrix(w)[:, None].transpose(-1, -2)


def _elastic_displacement(x: Tensor, alpha_px: float, sigma_px: float, gen: torch.Generator | None) -> Tensor:
    """Smooth random displacement field ``[B, H, W, 2]`` in normalised grid units.

    White noise smoothed by a Gaussian of ``sigma_px`` (Simard et al. 2003), rescaled so each
    sample's RMS displacement is U(0, alpha_px) pixels.
    """
    b, _, h, w = x.shape
    noise = torch.randn(b, 2, h, w, device=x.device, generator=gen)
    field = gaussian_blur(noise, torch.full((b,), sigma_px, device=x.device))
    rms = field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    strength = _uniform(b, 0.0, alpha_px, x, gen)[:, None, None, None]
    field = field / rms * strength
    to_grid_units = torch.tensor([2.0 / w, 2.0 / h], device=x.device)
    return field.permute(0, 2, 3, 1) * to_grid_units


# --------------------------------------------------------------------------- validation


def _is_pair(value: object) -> bool:
    # omegaconf's ListConfig is a Sequence too, so Hydra lists pass unchanged
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2


def _number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DigitnetError(f"aug.ops.{name} must be a number, got {value!r}")
    if not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise DigitnetError(f"aug.ops.{name} must be {bounds}, got {value}")
    return float(value)


def _range(name: str, value: object, low: float, high: float = math.inf) -> tuple[float, float]:
    """A ``[min, max]`` pair (list, tuple or omegaconf ListConfig) with low <= min <= max <= high."""
    if not _is_pair(value):
        raise DigitnetError(f"aug.ops.{name} must be a [min, max] pair, got {value!r}")
    lo = _number(f"{name}[0]", value[0], low, high)
    hi = _number(f"{name}[1]", value[1], low, high)
    if lo > hi:
        raise DigitnetError(f"aug.ops.{name} must be [min, max] with min <= max, got [{lo}, {hi}]")
    return lo, hi


def _pair(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    """One number used for both axes, or an ``[x, y]`` pair."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = _number(name, value, low, high)
        return v, v
    if not _is_pair(value):
        raise DigitnetError(f"aug.ops.{name} must be a number or an [x, y] pair, got {value!r}")
    return _number(f"{name}[0]", value[0], low, high), _number(f"{name}[1]", value[1], low, high)


# --------------------------------------------------------------------------- the ops

# name -> op class; a preset's `ops` keys are these names
AUGMENTATIONS: dict[str, type[BatchOp]] = {}


def register_op(name: str):
    """Class decorator that makes an op usable in presets as `ops: {<name>: {its keywords}}`."""

    def add(cls: type[BatchOp]) -> type[BatchOp]:
        AUGMENTATIONS[name] = cls
        return cls

    return add


class BatchOp(nn.Module):
    """One random op on a float batch ``[B, C, H, W]``, each sample drawn on its own, all at once on
    ``x.device``. Randomness comes from ``generator`` (on that device) if set, else torch's RNG."""

    generator: torch.Generator | None = None


@register_op("hflip")
class RandomHFlip(BatchOp):
    """With probability ``p`` per sample, mirror left-right (clothes yes, digits no)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _number("hflip.p", p, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(_bernoulli(x.shape[0], self.p, x, self.generator)[:, None, None, None], x.flip(-1), x)


@register_op("warp")
class RandomWarp(BatchOp):
    """Random affine and/or elastic warp in a single ``grid_sample`` (zero fill, bilinear).

    Geometry has torchvision ``RandomAffine`` semantics: rotation U(-degrees, degrees),
    shift U(-translate*size, translate*size) pixels per axis, zoom U(scale) (> 1 enlarges).
    ``translate_whole_px`` rounds each shift to whole pixels: without rotation, zoom and elastic
    warp the image then moves exactly (like a padded random crop), with no bilinear blur.
    ``elastic_alpha`` > 0 adds a smooth random displacement (see ``_elastic_displacement``).
    """

    def __init__(
        self,
        degrees: float = 0.0,
        translate: float | Sequence[float] = 0.0,
        translate_whole_px: bool = False,
        scale: Sequence[float] | None = None,
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.degrees = _number("warp.degrees", degrees, 0.0, 180.0)
        self.translate = _pair("warp.translate", translate, 0.0, 1.0)
        if not isinstance(translate_whole_px, bool):
            raise DigitnetError(f"aug.ops.warp.translate_whole_px={translate_whole_px!r} must be true or false")
        self.translate_whole_px = translate_whole_px
        self.scale = (1.0, 1.0) if scale is None else _range("warp.scale", scale, 1e-3)
        self.elastic_alpha = _number("warp.elastic_alpha", elastic_alpha, 0.0)
        self.elastic_sigma = _number("warp.elastic_sigma", elastic_sigma, 0.1, 9.0)

    def forward(self, x: Tensor) -> Tensor:
        gen = self.generator
        theta = _random_affine_theta(x, self.degrees, self.translate, self.scale, gen, self.translate_whole_px)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        if self.elastic_alpha > 0:
            grid = grid + _elastic_displacement(x, self.elastic_alpha, self.elastic_sigma, gen).to(x.dtype)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_op("erase")
class RandomErase(BatchOp):
    """torchvision-RandomErasing-like: with probability ``p`` fill one rectangle with ``value``.

    Area is U(scale) of the image, log aspect ratio U(log ratio); instead of torchvision's
    rejection loop, sides that do not fit are clipped to the image. ``value="random"`` fills
    each erased pixel with U(0, 1) noise, as Zhong et al. do.
    """

    def __init__(
        self,
        p: float = 0.5,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float | str = 0.0,
    ) -> None:
        super().__init__()
        self.p = _number("erase.p", p, 0.0, 1.0)
        self.scale = _range("erase.scale", scale, 1e-6, 1.0)
        self.ratio = _range("erase.ratio", ratio, 1e-3)
        if isinstance(value, str) and value != "random":
            raise DigitnetError(f"aug.ops.erase.value must be a number in [0, 1] or random, got {value!r}")
        self.value = value if value == "random" else _number("erase.value", value, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        gen, (b, _, h, w) = self.generator, x.shape
        area = _uniform(b, self.scale[0], self.scale[1], x, gen) * h * w
        aspect = torch.exp(_uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), x, gen))
        eh = torch.sqrt(area * aspect).round().clamp(1, h)
        ew = torch.sqrt(area / aspect).round().clamp(1, w)
        top = (_uniform(b, 0.0, 1.0, x, gen) * (h - eh + 1)).floor()
        left = (_uniform(b, 0.0, 1.0, x, gen) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # [B, H]
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # [B, W]
        mask = in_rows[:, :, None] & in_cols[:, None, :] & _bernoulli(b, self.p, x, gen)[:, None, None]
        if self.value == "random":
            noise = torch.rand(x.shape, device=x.device, generator=gen, dtype=x.dtype)
            return torch.where(mask[:, None], noise, x)
        return x.masked_fill(mask[:, None], self.value)


@register_op("alias")
class ResizeAliasing(BatchOp):
    """Simulate the webcam client's bilinear resize *without* antialiasing.

    The client shrinks a crisp, high-resolution crop straight to 28x28, which point-samples
    the strokes: jagged edges, uneven stroke width. We upsample by U(factor), harden the
    edges like ink, and shrink back with ``antialias=False``. One factor per batch, since a
    resize has one output size (reading it back is this op's only device sync); each
    sample gets the result with probability ``p``.
    """

    def __init__(self, p: float = 0.5, factor: Sequence[float] = (2.0, 4.0)) -> None:
        super().__init__()
        self.p = _number("alias.p", p, 0.0, 1.0)
        self.factor = _range("alias.factor", factor, 1.0, 16.0)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        f = float(_uniform(1, self.factor[0], self.factor[1], x, self.generator))
        big = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear", align_corners=False)
        big = torch.sigmoid(_INK_EDGE_GAIN * (big - 0.5))
        small = F.interpolate(big, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        chosen = _bernoulli(b, self.p, x, self.generator)[:, None, None, None]
        return torch.where(chosen, small, x)


@register_op("blur")
class RandomBlur(BatchOp):
    """With probability ``p`` per sample, Gaussian blur with sigma ~ U(sigma) pixels (defocus)."""

    def __init__(self, p: float = 0.5, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.p = _number("blur.p", p, 0.0, 1.0)
        self.sigma = _range("blur.sigma", sigma, 0.01, 9.0)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        blurred = gaussian_blur(x, _uniform(b, self.sigma[0], self.sigma[1], x, self.generator))
        return torch.where(_bernoulli(b, self.p, x, self.generator)[:, None, None, None], blurred, x)


@register_op("invert")
class RandomInvert(BatchOp):
    """With probability ``p`` per sample, swap polarity (light-on-dark <-> ink on paper)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _number("invert.p", p, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(_bernoulli(x.shape[0], self.p, x, self.generator)[:, None, None, None], 1.0 - x, x)


@register_op("jitter")
class ContrastBrightness(BatchOp):
    """torchvision-ColorJitter-like factors: contrast blends with the per-image mean by
    U(1-contrast, 1+contrast); brightness multiplies by U(1-brightness, 1+brightness)."""

    def __init__(self, contrast: float = 0.0, brightness: float = 0.0) -> None:
        super().__init__()
        self.contrast = _number("jitter.contrast", contrast, 0.0, 1.0)
        self.brightness = _number("jitter.brightness", brightness, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        b, gen = x.shape[0], self.generator
        c = _uniform(b, 1 - self.contrast, 1 + self.contrast, x, gen).to(x.dtype)[:, None, None, None]
        k = _uniform(b, 1 - self.brightness, 1 + self.brightness, x, gen).to(x.dtype)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + (x - mean) * c) * k


@register_op("noise")
class SensorNoise(BatchOp):
    """Additive Gaussian noise; each sample's standard deviation is U(0, std)."""

    def __init__(self, std: float = 0.05) -> None:
        super().__init__()
        self.std = _number("noise.std", std, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        sample_std = _uniform(x.shape[0], 0.0, self.std, x, self.generator).to(x.dtype)[:, None, None, None]
        noise = torch.randn(x.shape, device=x.device, generator=self.generator, dtype=x.dtype)
        return x + noise * sample_std


# --------------------------------------------------------------------------- the pipeline


class Augment(nn.Sequential):
    """A preset's ops in the order it lists them: a float batch ``[B, C, H, W]`` in ``[0, 1]`` -> same
    shape, dtype and device, clamped to ``[0, 1]``. Without ops it returns the batch itself."""

    @property
    def op_names(self) -> list[str]:
        """Names of the ops, in the order they run."""
        return list(self._modules)

    def forward(self, x: Tensor) -> Tensor:
        if len(self) == 0:
            return x
        if x.dim() != 4 or not x.is_floating_point():
            raise DigitnetError(
                f"augmentation expects a float batch [B, C, H, W] in [0, 1], got {x.dtype} {tuple(x.shape)}"
            )
        return super().forward(x).clamp(0.0, 1.0)


def build_augment(cfg: Mapping, generator: torch.Generator | None = None) -> Augment:
    """An :class:`Augment` from an ``aug`` preset: ``name`` and ``ops`` (op name -> its keywords, in the
    order they run; an op set to null is left out). ``generator``: the ops' source of randomness."""
    misplaced = sorted(set(cfg) - {"name", "ops"})
    if misplaced:
        raise DigitnetError(f"aug.{misplaced[0]}: a preset lists its ops under aug.ops, e.g. aug.ops.warp.degrees=10")
    ops = {}
    for name, kwargs in (cfg.get("ops") or {}).items():
        if kwargs is None:
            continue
        if name not in AUGMENTATIONS:
            raise DigitnetError(f"aug.ops.{name} is not an augmentation op; choose from {sorted(AUGMENTATIONS)}")
        if not isinstance(kwargs, Mapping):
            raise DigitnetError(f"aug.ops.{name}={kwargs!r} must be a mapping of its settings, e.g. {{p: 0.5}}")
        try:
            ops[name] = AUGMENTATIONS[name](**{str(k): v for k, v in kwargs.items()})
        except TypeError as err:  # an unknown keyword
            raise DigitnetError(f"aug.ops.{name}: {err}") from None
        ops[name].generator = generator
    return Augment(OrderedDict(ops))
