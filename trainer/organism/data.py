"""The organism's images: real photos from scikit-image's wheel, procedural scenes, and distortions of
known severity, in splits that share no reference image.

Ground truth is by construction: an image distorted at level L (0 = pristine, 5 = worst) has
`mos = 5 - 0.8 L`. Splits:
- `warmup`: labelled, the stand-in for pretraining (many varied sources: variety is what made the vision
  side generalise in the probe, see shared/docs/organism-probe.md);
- `pool`: the unlabeled round pool (its labels are kept apart, for the report only);
- `heldout`: labelled evaluation, every reference at every type x level;
- `reserved`: the ten photos kept out of every split, for an independent check on real photos.
Images are 224 x 224, the demo processor's whole pixel budget, so nothing is resized again later.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.distortions import DISTORTIONS, LEVELS, distort

SIZE = 224
RESERVED_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "grass",
    "hubble_deep_field",
    "motorcycle_left",
    "retina",
    "rocket",
)
# The other photos of the wheel, split by reference. motorcycle_right is left out: it is nearly the
# same scene as the reserved motorcycle_left.
SPLIT_PHOTOS = {
    "warmup": ("coins", "gravel", "moon", "page", "text", "clock_motion", "horse"),
    "pool": ("ihc", "logo", "cell"),
    "heldout": ("color", "phantom", "microaneurysms"),
}
# Procedural scenes: disjoint seed ranges per split.
_PROCEDURAL_SEEDS = {"warmup": 0, "pool": 100_000, "heldout": 200_000, "reserved": 300_000}


def mos_of(level: int) -> float:
    """The organism's ground truth: 5 for a pristine image, 0.8 less per distortion level."""
    return 5.0 - 0.8 * level


@dataclass(frozen=True)
class Sample:
    """One labelled image: its reference, distortion and ground truth."""

    image: Image.Image
    reference: str
    kind: str  # distortion type, "none" for a pristine image
    level: int
    mos: float
    warmth: float = 0.0  # a content attribute of the reference, in [-1, 1] (see `warmth`)


def skimage_photo(name: str) -> Image.Image:
    """A photo from scikit-image's data folder, read as a file (the package's download helpers unused)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; the organism's photos come from its wheel")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    matches = sorted(folder.glob(f"{name}.*"))
    if not matches:
        raise FileNotFoundError(f"no photo {name!r} in {folder}")
    with Image.open(matches[0]) as image:
        return image.convert("RGB")


def photo_crop(photo: Image.Image, rng: np.random.Generator, augment: bool) -> Image.Image:
    """A SIZE x SIZE view of `photo`: the centre (augment off) or a random crop, flip and rotation."""
    side = min(photo.size)
    if augment:
        crop = int(side * rng.uniform(0.45, 1.0))
        x = int(rng.integers(0, photo.width - crop + 1))
        y = int(rng.integers(0, photo.height - crop + 1))
    else:
        crop, x, y = side, (photo.width - side) // 2, (photo.height - side) // 2
    view = photo.crop((x, y, x + crop, y + crop)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    if augment:
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view = view.rotate(90 * int(rng.integers(4)))
    return view


def procedural_scene(seed: int) -> Image.Image:
    """A sharp, well exposed synthetic scene: a smooth backdrop, textured regions and hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = rng.uniform(60, 190, size=3)
    pixels = np.empty((SIZE, SIZE, 3))
    for c in range(3):
        gx, gy = rng.uniform(-70, 70, size=2)
        fx, fy, phase = rng.uniform(1, 7, size=3)
        pixels[..., c] = base[c] + gx * (x - 0.5) + gy * (y - 0.5) + 25 * np.sin(fx * x * 3 + phase * fy * y)
    # Fine texture (1/f-like) over the whole scene: what blur removes and noise drowns.
    texture = np.zeros((SIZE, SIZE))
    for octave in (4, 8, 16, 32, 64):
        coarse = rng.normal(0, 1, size=(octave, octave))
        up = Image.fromarray(coarse.astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        texture += np.asarray(up) * (48 / octave)
    pixels += texture[..., None] * rng.uniform(2, 10)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0 = rng.integers(-40, SIZE, size=2)
        w, h = rng.integers(12, 110, size=2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.line(box, fill=colour, width=int(rng.integers(1, 6)))
        else:
            points = [tuple(int(v) for v in rng.integers(0, SIZE, size=2)) for _ in range(3)]
            draw.polygon(points, fill=colour)
    for _ in range(int(rng.integers(0, 20))):  # thin detail: text-like strokes
        x0, y0 = (int(v) for v in rng.integers(0, SIZE, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line((x0, y0, x0 + int(rng.integers(3, 25)), y0), fill=colour, width=1)
    return image.filter(ImageFilter.SMOOTH_MORE) if rng.random() < 0.2 else image


def warmth(image: Image.Image) -> float:
    """How warm (red over blue) the image's colours are, squashed to [-1, 1]: a content attribute with
    nothing to do with quality, which the organism's warm-up may confound with quality on purpose."""
    pixels = np.asarray(image, dtype=np.float32)
    return float(np.tanh((pixels[..., 0].mean() - pixels[..., 2].mean()) / 40.0))


def _variant(image: Image.Image, reference: str, kind: str, level: int, seed: int) -> Sample:
    distorted = image if level == 0 else distort(image, kind, level, seed)
    return Sample(distorted, reference, kind if level else "none", level, mos_of(level), warmth(image))


def _random_variant(image: Image.Image, reference: str, rng: np.random.Generator) -> Sample:
    level = int(rng.integers(0, len(LEVELS) + 1))
    kind = sorted(DISTORTIONS)[int(rng.integers(len(DISTORTIONS)))]
    return _variant(image, reference, kind, level, int(rng.integers(2**31)))


def warmup_split(sources: int, per_source: int, seed: int) -> list[Sample]:
    """`sources` varied references (procedural scenes, random views of the warm-up photos), each
    with `per_source` images of random type and level (level 0 included)."""
    rng = np.random.default_rng(seed)
    photos = {name: skimage_photo(name) for name in SPLIT_PHOTOS["warmup"]}
    names = sorted(photos)
    samples: list[Sample] = []
    for k in range(sources):
        if k % 3 == 2:  # a third real-photo views, two thirds procedural scenes
            name = names[int(rng.integers(len(names)))]
            reference, image = f"{name}@{k}", photo_crop(photos[name], rng, augment=True)
        else:
            scene = _PROCEDURAL_SEEDS["warmup"] + seed * 10_000 + k
            reference, image = f"scene{scene}", procedural_scene(scene)
        samples += [_random_variant(image, reference, rng) for _ in range(per_source)]
    return samples


def pool_split(references: int, per_reference: int, seed: int) -> list[Sample]:
    """The round pool: `references` references (random views of the pool photos and procedural scenes),
    each with its pristine image and `per_reference - 1` random variants."""
    rng = np.random.default_rng(seed + 1)
    photos = {name: skimage_photo(name) for name in SPLIT_PHOTOS["pool"]}
    names = sorted(photos)
    samples: list[Sample] = []
    for k in range(references):
        if k % 4 == 3:
            name = names[int(rng.integers(len(names)))]
            reference, image = f"{name}@{k}", photo_crop(photos[name], rng, augment=True)
        else:
            scene = _PROCEDURAL_SEEDS["pool"] + k
            reference, image = f"scene{scene}", procedural_scene(scene)
        samples.append(_variant(image, reference, "none", 0, 0))
        samples += [_random_variant(image, reference, rng) for _ in range(per_reference - 1)]
    return samples


def graded_split(references: list[tuple[str, Image.Image]], seed: int) -> list[Sample]:
    """Every reference pristine and at every type x level: a fully crossed, labelled set."""
    samples: list[Sample] = []
    for r, (reference, image) in enumerate(references):
        samples.append(_variant(image, reference, "none", 0, 0))
        for kind in sorted(DISTORTIONS):
            for level in LEVELS:
                samples.append(_variant(image, reference, kind, level, seed * 100_000 + r * 100 + level))
    return samples


def heldout_split(scenes: int, seed: int = 0) -> list[Sample]:
    """The held-out evaluation set: the held-out photos and `scenes` procedural scenes, fully crossed."""
    references = [
        (name, photo_crop(skimage_photo(name), None, augment=False)) for name in SPLIT_PHOTOS["heldout"]
    ]  # type: ignore[arg-type]
    references += [
        (f"scene{_PROCEDURAL_SEEDS['heldout'] + k}", procedural_scene(_PROCEDURAL_SEEDS["heldout"] + k))
        for k in range(scenes)
    ]
    return graded_split(references, seed)


def reserved_split(seed: int = 0) -> list[Sample]:
    """The independent check: the ten reserved photos, centre views, fully crossed. Never trained on."""
    references = [(name, photo_crop(skimage_photo(name), None, augment=False)) for name in RESERVED_PHOTOS]  # type: ignore[arg-type]
    return graded_split(references, seed + 7)
