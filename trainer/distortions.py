"""Synthetic distortions of known severity, KADID-style: several types, each at levels 1 (mild) to 5.

Two users: the model organism's labelled data (quality falls with the level, by construction), and the
paper's round-2 option, which gives every pool image random variants to pair with their reference
(the type and level are never used as labels there). Every function is deterministic for a given
`seed`, so a split or a round can be rebuilt bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

LEVELS = (1, 2, 3, 4, 5)

# Severity per level, chosen so that level 5 is clearly bad and level 1 just visible at 224x224.
_BLUR_RADIUS = (0.6, 1.1, 1.7, 2.5, 3.5)
_NOISE_SIGMA = (6.0, 12.0, 20.0, 30.0, 45.0)
_JPEG_QUALITY = (40, 20, 12, 7, 3)
_DARKEN = (0.8, 0.63, 0.48, 0.35, 0.24)
_CONTRAST = (0.75, 0.55, 0.4, 0.28, 0.18)
_PIXELATE = (1.5, 2.0, 3.0, 4.0, 6.0)


def _blur(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(_BLUR_RADIUS[level - 1]))


def _noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, _NOISE_SIGMA[level - 1], size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY[level - 1])
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _darken(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(_DARKEN[level - 1])


def _contrast(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(_CONTRAST[level - 1])


def _pixelate(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    factor = _PIXELATE[level - 1]
    small = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
    return image.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.NEAREST)


DISTORTIONS = {
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "dark": _darken,
    "contrast": _contrast,
    "pixelate": _pixelate,
}


def distort(image: Image.Image, kind: str, level: int, seed: int = 0) -> Image.Image:
    """`image` (RGB) with distortion `kind` at `level` (1..5); level 0 returns the image unchanged."""
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; one of {sorted(DISTORTIONS)}")
    if level == 0:
        return image.copy()
    if level not in LEVELS:
        raise ValueError(f"level must be 0..5, not {level}")
    return DISTORTIONS[kind](image.convert("RGB"), level, np.random.default_rng(seed))


def random_variants(
    image: Image.Image, count: int, seed: int, kinds: tuple[str, ...] = tuple(DISTORTIONS)
) -> list[tuple[str, int, Image.Image]]:
    """`count` variants of `image`, each of a random type and level: (kind, level, variant)."""
    rng = np.random.default_rng(seed)
    variants = []
    for k in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        level = int(rng.integers(1, len(LEVELS) + 1))
        variants.append((kind, level, distort(image, kind, level, seed=seed * 1000 + k)))
    return variants
