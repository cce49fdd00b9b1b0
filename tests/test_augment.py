"""Batched augmentation: the presets in conf/aug and the ops behind them (CPU, synthetic digits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf

from digitnet.data.augment import AUGMENTATIONS, Augment, _random_affine_theta, affine_theta, build_augment
from digitnet.errors import DigitnetError

AUG_DIR = Path(__file__).resolve().parents[1] / "conf" / "aug"
PRESETS = sorted(p.stem for p in AUG_DIR.glob("*.yaml"))
DEVICES = (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
)


def load_preset(name: str) -> Augment:
    cfg = OmegaConf.load(AUG_DIR / f"{name}.yaml")
    assert cfg.name == name
    return build_augment(cfg)


def ops(generator: torch.Generator | None = None, **settings: dict) -> Augment:
    """The ops named by the keywords, with those settings, in that order."""
    return build_augment({"name": "test", "ops": settings}, generator)


def digit_like(n: int, seed: int = 0) -> torch.Tensor:
    """MNIST-looking batch [n,1,28,28] in [0,1]: a soft light ring and stroke on black,
    inside the central 20x20 box, with random size and slant."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cx, cy, rx, ry = r(12.5, 14.5), r(9, 12), r(3, 6), r(2.5, 4.5)
    ring = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    ring_ink = torch.exp(-(((ring.sqrt() - 1) * rx / 1.2) ** 2))
    slant = r(-0.3, 0.3)
    stroke_x = cx + rx + slant * (yy - cy)  # a stem hanging from the ring, like a 9
    stroke_ink = torch.exp(-(((xx - stroke_x) / 1.2) ** 2)) * ((yy > cy) & (yy < 23)).float()
    return torch.maximum(ring_ink, stroke_ink).clamp(0, 1)[:, None]


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """[B, 2] (row, col) intensity-weighted centre of each image."""
    idx = torch.arange(x.shape[-1], dtype=x.dtype)
    mass = x.sum(dim=(1, 2, 3))
    rows = (x.sum(dim=(1, 3)) * idx).sum(dim=1) / mass
    cols = (x.sum(dim=(1, 2)) * idx).sum(dim=1) / mass
    return torch.stack([rows, cols], dim=1)


def run_seeded(aug: Augment, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    if x.device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    return aug(x)


# --------------------------------------------------------------------------- every preset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_keeps_shape_dtype_device_and_range(preset: str, device: str) -> None:
    x = digit_like(32).to(device)
    out = run_seeded(load_preset(preset), x, 0)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_same_seed_same_output(preset: str) -> None:
    aug, x = load_preset(preset), digit_like(32)
    assert torch.equal(run_seeded(aug, x, 7), run_seeded(aug, x, 7))


@pytest.mark.parametrize("preset", ["light", "strong", "camera", "fashion"])
def test_preset_different_seed_different_output(preset: str) -> None:
    aug, x = load_preset(preset), digit_like(32)
    assert not torch.equal(run_seeded(aug, x, 1), run_seeded(aug, x, 2))


@pytest.mark.parametrize("preset", ["strong", "camera"])
def test_preset_preserves_float64(preset: str) -> None:
    x = digit_like(8).double()
    assert run_seeded(load_preset(preset), x, 0).dtype == torch.float64


def test_none_is_the_identity_and_returns_the_input_itself() -> None:
    x = digit_like(4)
    assert load_preset("none").op_names == []
    assert ops()(x) is x


# --------------------------------------------------------------------------- light / geometry


def test_light_moves_digits_a_little_and_keeps_their_mass() -> None:
    x = digit_like(256)
    out = run_seeded(load_preset("light"), x, 0)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 0.05
    assert changed.float().mean() > 0.95
    # shift <= 2.8 px per axis, zoom/rotation about the centre add a little for off-centre ink
    shift = (centre_of_mass(out) - centre_of_mass(x)).abs()
    assert shift.max() <= 3.5
    assert shift.mean() > 0.5  # it does move them
    mass_ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert mass_ratio.min() > 0.75 and mass_ratio.max() < 1.3  # zoom 0.9..1.1 scales area by s^2


def test_light_uses_torchvision_random_affine_ranges() -> None:
    cfg = OmegaConf.load(AUG_DIR / "light.yaml").ops.warp
    reference = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    assert [-cfg.degrees, cfg.degrees] == list(reference.degrees)
    assert list(cfg.translate) == list(reference.translate)
    assert list(cfg.scale) == list(reference.scale)

    # and the sampled matrices really cover exactly those ranges
    torch.manual_seed(0)
    theta = _random_affine_theta(torch.zeros(4000, 1, 28, 28), 10.0, (0.1, 0.1), (0.9, 1.1), None)
    linear = theta[:, :, :2]
    scale = 1 / linear.det().sqrt()
    angle = torch.rad2deg(torch.atan2(linear[:, 0, 1], linear[:, 0, 0]))
    shift_px = -torch.linalg.solve(linear, theta[:, :, 2]) * 14  # normalised units -> pixels
    assert 9.8 < angle.abs().max() <= 10 + 1e-4
    assert 0.9 - 1e-5 <= scale.min() < 0.905 and 1.095 < scale.max() <= 1.1 + 1e-5
    assert 2.75 < shift_px.abs().max() <= 2.8 + 1e-4


@pytest.mark.parametrize(("angle", "shift", "scale"), [(30.0, (3.0, -2.0), 1.2), (-10.0, (0.5, 1.5), 0.9)])
def test_affine_matrix_means_what_torchvision_affine_means(angle, shift, scale) -> None:
    x = digit_like(1)
    expected = TF.affine(
        x,
        angle=angle,
        translate=list(shift),
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=T.InterpolationMode.BILINEAR,
    )
    theta = affine_theta(torch.tensor([angle]), torch.tensor([shift]), torch.tensor([scale]), (28, 28))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    actual = F.grid_sample(x, grid, align_corners=False)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_elastic_warp_bends_strokes_but_keeps_the_digit() -> None:
    x = digit_like(64)
    out = run_seeded(ops(warp={"elastic_alpha": 1.5, "elastic_sigma": 4.0}), x, 0)
    assert (out - x).abs().amax(dim=(1, 2, 3)).median() > 0.1
    assert (centre_of_mass(out) - centre_of_mass(x)).abs().max() < 2.0
    mass_ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert mass_ratio.min() > 0.7 and mass_ratio.max() < 1.5  # local stretch thins/thickens strokes
    similarity = F.cosine_similarity(out.flatten(1), x.flatten(1))
    assert similarity.median() > 0.8  # another digit-like image scores ~0.6


# --------------------------------------------------------------------------- erasing


def test_erasing_zeroes_one_rectangle_of_the_requested_size() -> None:
    x = torch.ones(200, 1, 28, 28)
    out = run_seeded(ops(erase={"p": 1.0, "scale": (0.05, 0.2), "ratio": (0.5, 2.0)}), x, 0)
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box == 0).all(), "the erased pixels form a filled rectangle"
        assert (image != 0).sum() == image.numel() - box.numel(), "only that rectangle is erased"
        assert 0.03 <= box.numel() / image.numel() <= 0.23  # scale range, up to rounding


def test_erasing_with_random_values_fills_the_rectangle_with_uniform_noise() -> None:
    x = torch.ones(200, 1, 28, 28)  # U(0, 1) noise is below 1 almost surely
    out = run_seeded(ops(erase={"p": 1.0, "value": "random"}), x, 0)
    noise = out[out != 1.0]
    assert (out != 1.0).flatten(1).any(dim=1).all(), "every image has an erased rectangle"
    assert noise.min() >= 0.0 and noise.max() <= 1.0
    assert 0.45 < noise.mean() < 0.55 and noise.std() > 0.25  # U(0, 1), not one fill value


def test_erasing_probability_and_strong_preset() -> None:
    x = torch.ones(400, 1, 28, 28)
    erased = run_seeded(ops(erase={"p": 0.5}), x, 0).amin(dim=(1, 2, 3)) == 0
    assert 0.4 < erased.float().mean() < 0.6
    assert "erase" in load_preset("strong").op_names


# --------------------------------------------------------------------------- camera


def test_camera_inverts_about_half_the_batch() -> None:
    x = digit_like(512)
    out = run_seeded(load_preset("camera"), x, 0)
    brightness = out.mean(dim=(1, 2, 3))
    inverted = brightness > 0.5
    assert x.mean(dim=(1, 2, 3)).max() < 0.3  # inputs are light ink on black
    assert 0.42 < inverted.float().mean() < 0.58
    assert brightness[inverted].mean() > 0.6 and brightness[~inverted].mean() < 0.3


def test_invert_alone_is_exact() -> None:
    x = digit_like(8)
    torch.testing.assert_close(ops(invert={"p": 1.0})(x), 1 - x)


def test_hflip_mirrors_about_half_the_batch_exactly() -> None:
    x = digit_like(512)
    out = run_seeded(ops(hflip={"p": 0.5}), x, 0)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    untouched = (out == x).flatten(1).all(1)
    assert (mirrored | untouched).all()
    assert 0.42 < mirrored.float().mean() < 0.58


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved dx px right and dy px down, zero-filled."""
    padded = F.pad(x, (3, 3, 3, 3))
    h, w = x.shape[-2:]
    return padded[..., 3 - dy : 3 - dy + h, 3 - dx : 3 - dx + w]


def test_whole_pixel_translation_moves_images_exactly() -> None:
    x = digit_like(64)
    out = run_seeded(ops(warp={"translate": 0.1, "translate_whole_px": True}), x, 0)  # up to 2.8 px: -3..3
    moves = {(dx, dy): shifted(x, dx, dy) for dx in range(-3, 4) for dy in range(-3, 4)}
    found = []
    for i in range(len(x)):
        hits = [m for m, moved in moves.items() if torch.allclose(out[i], moved[i], atol=1e-5)]
        assert hits, f"image {i} is not an exact whole-pixel shift of its input"
        found.append(hits[0])
    assert len(set(found)) > 10, "shifts vary across the batch"
    blurred = run_seeded(ops(warp={"translate": 0.1}), x, 0)
    assert not torch.allclose(blurred, out, atol=1e-3), "without it the shifts are fractional"


def test_resize_aliasing_hardens_strokes() -> None:
    x = digit_like(16)
    out = ops(alias={"p": 1.0, "factor": (4.0, 4.0)})(x)
    grey = lambda t: ((t > 0.1) & (t < 0.9)).float().mean()  # noqa: E731
    assert grey(out) < 0.6 * grey(x), "edges become crisp like a point-sampled ink stroke"
    assert (centre_of_mass(out) - centre_of_mass(x)).abs().max() < 1.0


def test_blur_spreads_ink_and_keeps_the_mean() -> None:
    x = digit_like(16)
    out = ops(blur={"p": 1.0, "sigma": (1.0, 1.0)})(x)
    assert out.max() < x.max()
    torch.testing.assert_close(out.mean(), x.mean(), atol=5e-3, rtol=0)


def test_noise_and_contrast_change_pixels_without_moving_the_digit() -> None:
    x = digit_like(64)
    out = run_seeded(ops(noise={"std": 0.1}, jitter={"contrast": 0.4, "brightness": 0.3}), x, 0)
    assert (out - x).abs().mean() > 0.01
    assert (centre_of_mass(out) - centre_of_mass(x)).abs().median() < 1.0


# --------------------------------------------------------------------------- randomness source


def test_explicit_generator_ignores_the_global_seed() -> None:
    x = digit_like(16)
    first = run_seeded(ops(torch.Generator().manual_seed(3), warp={"degrees": 20}, noise={"std": 0.1}), x, 1)
    second = run_seeded(ops(torch.Generator().manual_seed(3), warp={"degrees": 20}, noise={"std": 0.1}), x, 2)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"warp": {"rotation": 10}},
            "aug.ops.warp: RandomWarp.__init__() got an unexpected keyword argument 'rotation'",
        ),
        ({"erase": {"p": -0.1}}, "aug.ops.erase.p must be in [0.0, 1.0], got -0.1"),
        ({"invert": {"p": 1.5}}, "aug.ops.invert.p"),
        ({"warp": {"degrees": -1}}, "aug.ops.warp.degrees"),
        ({"warp": {"scale": [1.1, 0.9]}}, "min <= max"),
        ({"warp": {"scale": [0.9]}}, "[min, max]"),
        ({"warp": {"translate": "wide"}}, "aug.ops.warp.translate"),
        ({"blur": {"sigma": [0.0, 1.0]}}, "aug.ops.blur.sigma"),
        ({"noise": {"std": -0.01}}, "aug.ops.noise.std"),
        ({"alias": {"factor": [0.5, 2.0]}}, "aug.ops.alias.factor"),
        ({"jitter": {"contrast": True}}, "number"),
        ({"warp": {"translate_whole_px": "yes"}}, "true or false"),
        ({"erase": {"value": "noise"}}, "number in [0, 1] or random"),
        ({"blurr": {"p": 0.5}}, "aug.ops.blurr is not an augmentation op; choose from ['alias', 'blur', 'erase',"),
        ({"blur": 0.5}, "aug.ops.blur=0.5 must be a mapping of its settings"),
    ],
)
def test_impossible_values_raise_a_clear_error(overrides: dict, message: str) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(AUG_DIR / "camera.yaml"), {"ops": overrides})
    with pytest.raises(DigitnetError) as err:
        build_augment(cfg)
    assert message in str(err.value)


def test_a_flat_setting_outside_ops_is_refused() -> None:
    with pytest.raises(DigitnetError, match=r"aug.degrees: a preset lists its ops under aug.ops"):
        build_augment({"name": "light", "degrees": 10})


def test_non_float_batch_is_rejected() -> None:
    with pytest.raises(DigitnetError, match="float batch"):
        ops(warp={"degrees": 5})(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_ops_run_in_the_order_the_preset_lists_them() -> None:
    x = digit_like(8)
    invert_then_erase = ops(invert={"p": 1.0}, erase={"p": 1.0})(x)
    erase_then_invert = ops(erase={"p": 1.0}, invert={"p": 1.0})(x)
    assert invert_then_erase.amin(dim=(1, 2, 3)).eq(0).all()  # the erased box stays black
    assert erase_then_invert.amax(dim=(1, 2, 3)).eq(1).all()  # the erased box turned white
    assert load_preset("camera").op_names == list(OmegaConf.load(AUG_DIR / "camera.yaml").ops)


def test_a_null_op_is_left_out_and_every_op_is_usable() -> None:
    cfg = OmegaConf.merge(OmegaConf.load(AUG_DIR / "strong.yaml"), {"ops": {"erase": None}})
    assert build_augment(cfg).op_names == ["warp"]
    x = digit_like(4)
    for name in AUGMENTATIONS:  # each op's defaults make a working op
        assert ops(**{name: {}})(x).shape == x.shape
