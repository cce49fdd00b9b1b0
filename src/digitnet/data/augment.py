"""Batched, device-agnostic image augmentation for float batches ``[B, C, H, W]`` in ``[0, 1]``.

Every op works on the whole batch at once on ``x.device`` (affine grids, masks, batched
matrix products): no per-sample Python loop and no PIL, so a GPU never waits on the CPU.
Randomness comes from torch's RNG on ``x.device`` (seeded by Lightning's ``seed_everything``)
or from an explicit ``generator`` living on that device.

Presets live in ``conf/aug/<name>.yaml``; every key except ``name`` is a keyword of
:class:`BatchAugment`, and :func:`build_augment` turns such a config into a module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digitnet.errors import DigitnetError

Op = Callable[[Tensor, "torch.Generator | None"], Tensor]

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


def _elastic_displacement(
    x: Tensor, alpha_px: float, sigma_px: float, gen: torch.Generator | None
) -> Tensor:
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


def _warp(
    x: Tensor,
    gen: torch.Generator | None,
    *,
    degrees: float,
    translate: tuple[float, float],
    translate_whole_px: bool,
    scale: tuple[float, float],
    elastic_alpha: float,
    elastic_sigma: float,
) -> Tensor:
    """Random affine and/or elastic warp in a single ``grid_sample`` (zero fill, bilinear)."""
    theta = _random_affine_theta(x, degrees, translate, scale, gen, translate_whole_px)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if elastic_alpha > 0:
        grid = grid + _elastic_displacement(x, elastic_alpha, elastic_sigma, gen).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- occlusion


def _random_erase(
    x: Tensor,
    gen: torch.Generator | None,
    *,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    value: float | str,
) -> Tensor:
    """torchvision-RandomErasing-like: with probability ``p`` fill one rectangle with ``value``.

    Area is U(scale) of the image, log aspect ratio U(log ratio); instead of torchvision's
    rejection loop, sides that do not fit are clipped to the image. ``value="random"`` fills
    each erased pixel with U(0, 1) noise, as Zhong et al. do.
    """
    b, _, h, w = x.shape
    area = _uniform(b, scale[0], scale[1], x, gen) * h * w
    aspect = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), x, gen))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (_uniform(b, 0.0, 1.0, x, gen) * (h - eh + 1)).floor()
    left = (_uniform(b, 0.0, 1.0, x, gen) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # [B, W]
    mask = in_rows[:, :, None] & in_cols[:, None, :] & _bernoulli(b, p, x, gen)[:, None, None]
    if value == "random":
        noise = torch.rand(x.shape, device=x.device, generator=gen, dtype=x.dtype)
        return torch.where(mask[:, None], noise, x)
    return x.masked_fill(mask[:, None], value)


# --------------------------------------------------------------------------- camera / photometric


def _resize_aliasing(
    x: Tensor, gen: torch.Generator | None, *, p: float, factor: tuple[float, float]
) -> Tensor:
    """Simulate the webcam client's bilinear resize *without* antialiasing.

    The client shrinks a crisp, high-resolution crop straight to 28x28, which point-samples
    the strokes: jagged edges, uneven stroke width. We upsample to a larger size, harden the
    edges like ink, and shrink back with ``antialias=False``. One factor per batch, since a
    resize has one output size (reading it back is this op's only device sync); each
    sample gets the result with probability ``p``.
    """
    b, _, h, w = x.shape
    f = float(_uniform(1, factor[0], factor[1], x, gen))
    big = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear", align_corners=False)
    big = torch.sigmoid(_INK_EDGE_GAIN * (big - 0.5))
    small = F.interpolate(big, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    chosen = _bernoulli(b, p, x, gen)[:, None, None, None]
    return torch.where(chosen, small, x)


def _random_blur(
    x: Tensor, gen: torch.Generator | None, *, p: float, sigma: tuple[float, float]
) -> Tensor:
    """With probability ``p`` per sample, Gaussian blur with sigma ~ U(sigma) pixels (defocus)."""
    b = x.shape[0]
    blurred = gaussian_blur(x, _uniform(b, sigma[0], sigma[1], x, gen))
    return torch.where(_bernoulli(b, p, x, gen)[:, None, None, None], blurred, x)


def _random_hflip(x: Tensor, gen: torch.Generator | None, *, p: float) -> Tensor:
    """With probability ``p`` per sample, mirror left-right (clothes yes, digits no)."""
    return torch.where(_bernoulli(x.shape[0], p, x, gen)[:, None, None, None], x.flip(-1), x)


def _random_invert(x: Tensor, gen: torch.Generator | None, *, p: float) -> Tensor:
    """With probability ``p`` per sample, swap polarity (light-on-dark <-> ink on paper)."""
    return torch.where(_bernoulli(x.shape[0], p, x, gen)[:, None, None, None], 1.0 - x, x)


def _contrast_brightness(
    x: Tensor, gen: torch.Generator | None, *, contrast: float, brightness: float
) -> Tensor:
    """torchvision-ColorJitter-like factors: contrast blends with the per-image mean by
    U(1-contrast, 1+contrast); brightness multiplies by U(1-brightness, 1+brightness)."""
    b = x.shape[0]
    c = _uniform(b, 1 - contrast, 1 + contrast, x, gen).to(x.dtype)[:, None, None, None]
    k = _uniform(b, 1 - brightness, 1 + brightness, x, gen).to(x.dtype)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + (x - mean) * c) * k


def _sensor_noise(x: Tensor, gen: torch.Generator | None, *, std: float) -> Tensor:
    """Additive Gaussian noise; each sample's standard deviation is U(0, std)."""
    b = x.shape[0]
    sample_std = _uniform(b, 0.0, std, x, gen).to(x.dtype)[:, None, None, None]
    noise = torch.randn(x.shape, device=x.device, generator=gen, dtype=x.dtype)
    return x + noise * sample_std


# --------------------------------------------------------------------------- validation


def _is_pair(value: object) -> bool:
    # omegaconf's ListConfig is a Sequence too, so Hydra lists pass unchanged
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2


def _number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DigitnetError(f"aug.{name} must be a number, got {value!r}")
    if not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise DigitnetError(f"aug.{name} must be {bounds}, got {value}")
    return float(value)


def _range(name: str, value: object, low: float, high: float = math.inf) -> tuple[float, float]:
    """A ``[min, max]`` pair (list, tuple or omegaconf ListConfig) with low <= min <= max <= high."""
    if not _is_pair(value):
        raise DigitnetError(f"aug.{name} must be a [min, max] pair, got {value!r}")
    lo = _number(f"{name}[0]", value[0], low, high)
    hi = _number(f"{name}[1]", value[1], low, high)
    if lo > hi:
        raise DigitnetError(f"aug.{name} must be [min, max] with min <= max, got [{lo}, {hi}]")
    return lo, hi


def _pair(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    """One number used for both axes, or an ``[x, y]`` pair."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = _number(name, value, low, high)
        return v, v
    if not _is_pair(value):
        raise DigitnetError(f"aug.{name} must be a number or an [x, y] pair, got {value!r}")
    return _number(f"{name}[0]", value[0], low, high), _number(f"{name}[1]", value[1], low, high)


# --------------------------------------------------------------------------- the module


class BatchAugment(nn.Module):
    """Random augmentation of a float batch ``[B, C, H, W]`` in ``[0, 1]`` -> same shape, dtype,
    device, clamped to ``[0, 1]``. Every op is off by default (0 or None), so ``BatchAugment()``
    is the identity. Ops run in camera-pipeline order: horizontal flip, warp (affine + elastic), random erasing,
    resize aliasing, blur, polarity inversion, contrast/brightness, sensor noise.

    Geometry has torchvision ``RandomAffine`` semantics: rotation U(-degrees, degrees),
    shift U(-translate*size, translate*size) pixels per axis, zoom U(scale) (> 1 enlarges).
    ``translate_whole_px`` rounds each shift to whole pixels: without rotation, zoom and elastic
    warp the image then moves exactly (like a padded random crop), with no bilinear blur.
    """

    def __init__(
        self,
        hflip_p: float = 0.0,
        degrees: float = 0.0,
        translate: float | Sequence[float] = 0.0,
        translate_whole_px: bool = False,
        scale: Sequence[float] | None = None,
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 4.0,
        erase_p: float = 0.0,
        erase_scale: Sequence[float] = (0.02, 0.33),
        erase_ratio: Sequence[float] = (0.3, 3.3),
        erase_value: float | str = 0.0,
        alias_p: float = 0.0,
        alias_factor: Sequence[float] = (2.0, 4.0),
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        invert_p: float = 0.0,
        contrast: float = 0.0,
        brightness: float = 0.0,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        hflip_p = _number("hflip_p", hflip_p, 0.0, 1.0)
        degrees = _number("degrees", degrees, 0.0, 180.0)
        translate = _pair("translate", translate, 0.0, 1.0)
        if not isinstance(translate_whole_px, bool):
            raise DigitnetError(f"aug.translate_whole_px={translate_whole_px!r} must be true or false")
        scale = (1.0, 1.0) if scale is None else _range("scale", scale, 1e-3)
        elastic_alpha = _number("elastic_alpha", elastic_alpha, 0.0)
        elastic_sigma = _number("elastic_sigma", elastic_sigma, 0.1, 9.0)
        erase_p = _number("erase_p", erase_p, 0.0, 1.0)
        erase_scale = _range("erase_scale", erase_scale, 1e-6, 1.0)
        erase_ratio = _range("erase_ratio", erase_ratio, 1e-3)
        if isinstance(erase_value, str) and erase_value != "random":
            raise DigitnetError(f"aug.erase_value must be a number in [0, 1] or random, got {erase_value!r}")
        if erase_value != "random":
            erase_value = _number("erase_value", erase_value, 0.0, 1.0)
        alias_p = _number("alias_p", alias_p, 0.0, 1.0)
        alias_factor = _range("alias_factor", alias_factor, 1.0, 16.0)
        blur_p = _number("blur_p", blur_p, 0.0, 1.0)
        blur_sigma = _range("blur_sigma", blur_sigma, 0.01, 9.0)
        invert_p = _number("invert_p", invert_p, 0.0, 1.0)
        contrast = _number("contrast", contrast, 0.0, 1.0)
        brightness = _number("brightness", brightness, 0.0, 1.0)
        noise_std = _number("noise_std", noise_std, 0.0, 1.0)

        ops: list[tuple[str, Op]] = []
        if hflip_p > 0:
            ops.append(("hflip", partial(_random_hflip, p=hflip_p)))
        if degrees > 0 or translate != (0.0, 0.0) or scale != (1.0, 1.0) or elastic_alpha > 0:
            ops.append(("warp", partial(
                _warp, degrees=degrees, translate=translate, translate_whole_px=translate_whole_px, scale=scale,
                elastic_alpha=elastic_alpha, elastic_sigma=elastic_sigma,
            )))
        if erase_p > 0:
            ops.append(("erase", partial(
                _random_erase, p=erase_p, scale=erase_scale, ratio=erase_ratio, value=erase_value
            )))
        if alias_p > 0:
            ops.append(("alias", partial(_resize_aliasing, p=alias_p, factor=alias_factor)))
        if blur_p > 0:
            ops.append(("blur", partial(_random_blur, p=blur_p, sigma=blur_sigma)))
        if invert_p > 0:
            ops.append(("invert", partial(_random_invert, p=invert_p)))
        if contrast > 0 or brightness > 0:
            ops.append(("contrast_brightness", partial(
                _contrast_brightness, contrast=contrast, brightness=brightness
            )))
        if noise_std > 0:
            ops.append(("noise", partial(_sensor_noise, std=noise_std)))
        self._ops = ops

    @property
    def op_names(self) -> list[str]:
        """Names of the enabled ops, in the order they run."""
        return [name for name, _ in self._ops]

    def extra_repr(self) -> str:
        return "ops=[" + ", ".join(self.op_names) + "]"

    def forward(self, x: Tensor) -> Tensor:
        if not self._ops:
            return x
        if x.dim() != 4 or not x.is_floating_point():
            raise DigitnetError(
                f"BatchAugment expects a float batch [B, C, H, W] in [0, 1], got {x.dtype} {tuple(x.shape)}"
            )
        for _, op in self._ops:
            x = op(x, self.generator)
        return x.clamp(0.0, 1.0)


def build_augment(cfg: Mapping) -> BatchAugment:
    """Build a :class:`BatchAugment` from an ``aug`` config (``name`` + constructor keywords)."""
    kwargs = {str(k): v for k, v in dict(cfg).items() if k != "name"}
    known = set(inspect.signature(BatchAugment.__init__).parameters) - {"self", "generator"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        preset = cfg.get("name", "?")
        raise DigitnetError(
            f"unknown key(s) {unknown} in aug preset {preset!r}; valid keys: {sorted(known)}"
        )
    return BatchAugment(**kwargs)
