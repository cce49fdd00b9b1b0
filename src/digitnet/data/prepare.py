"""Any image of a digit -> a 28x28 uint8 image prepared the way MNIST itself was made."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from digitnet.errors import DigitnetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
BACKGROUNDS = ("auto", "dark", "light")

FIT_SIZE = 20  # MNIST: the digit's bounding box is scaled to fit 20x20 ...
CANVAS = 28  # ... and placed in 28x28 with its centre of mass in the middle
INK_THRESHOLD = 0.2  # below this fraction of the strongest stroke, a pixel counts as background
MIN_CONTRAST = 0.1  # a brightest-minus-background difference below this means "no digit"
MAX_PIXELS = 4096 * 4096  # a larger file is no photo or drawing of one digit: refused before decoding
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # how PIL opens 16-bit PNG, PGM and TIFF


class NoDigitFound(DigitnetError):
    """The image is blank or has almost no contrast (under the background polarity assumed)."""


def open_image(path: str | Path) -> Image.Image:
    """An image file opened lazily (no pixel decoded yet), refused if it has more than MAX_PIXELS."""
    too_many = f"at most {MAX_PIXELS} pixels (4096x4096) are read; downscale it"
    try:
        with warnings.catch_warnings():  # PIL warns, then refuses, far above MAX_PIXELS
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DigitnetError(
            f"{path} claims over {Image.MAX_IMAGE_PIXELS // 10**6} million pixels; {too_many}"
        ) from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise DigitnetError(f"{path} is {image.width}x{image.height} pixels; {too_many}")
    return image


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _ink(image: Image.Image, background: str) -> np.ndarray:
    """Float [H,W] ink intensity, background 0: light-on-dark like MNIST."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255
        if alpha.min() < 1:  # drawings on a transparent canvas: whatever is painted is ink
            return alpha
    gray = _gray(image)
    light_background = np.median(_border(gray)) > 0.5 if background == "auto" else background == "light"
    ink = 1 - gray if light_background else gray
    return np.clip(ink - np.median(_border(ink)), 0, None)  # paper or screen level -> 0


def _gray(image: Image.Image) -> np.ndarray:
    """Luma in [0, 1]. 16-bit images are scaled by their range: PIL's convert("L") clips them at 255."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def _paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """Paste `patch` with its top-left corner at (top, left), clipped to the canvas."""
    h, w = patch.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    canvas[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]


def prepare_digit(image: Image.Image, background: str = "auto", name: str = "image") -> np.ndarray:
    """Any image -> uint8 [28,28] the way MNIST was made.

    Grayscale (transparent canvases: the alpha channel is the ink), light-on-dark polarity
    (`background`: "auto" looks at the border pixels, or "light"/"dark" for paper/screen),
    background level subtracted and faint pixels dropped, the digit's bounding box scaled to
    fit 20x20 (aspect kept, antialiased) and pasted into 28x28 with its centre of mass at the centre.
    """
    if background not in BACKGROUNDS:
        raise DigitnetError(f"background {background!r} must be one of {BACKGROUNDS}")
    ink = _ink(image, background)
    peak = float(ink.max()) if ink.size else 0.0
    if peak < MIN_CONTRAST:
        raise NoDigitFound(f"{name}: no digit found (the image is blank or has almost no contrast)")
    ink = np.where(ink >= INK_THRESHOLD * peak, ink / peak, 0).astype(np.float32)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = FIT_SIZE / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))  # PIL: (w, h)
    digit = np.clip(np.asarray(Image.fromarray(box).resize(size, Image.Resampling.LANCZOS)), 0, 1)
    total = digit.sum()
    cy = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    cx = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    centre = CANVAS / 2  # MNIST's centres of mass sit at pixel 14, half a pixel below the geometric centre
    _paste(canvas, digit, round(centre - cy), round(centre - cx))
    return np.round(canvas * 255).astype(np.uint8)
