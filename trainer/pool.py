"""The unlabeled image pool of a round: a folder of image files, decoded as the service decodes uploads.

Images go through `iqa.images.decode_image` (format check, EXIF orientation, RGB) so the trainer sees
the same pixels the API would, then are shrunk to the model's pixel budget: voting and GRPO never need
more, and a pool of large photos would otherwise not fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from iqa.images import ImageRejected, decode_image, downscale_for_model

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_PIXELS = 50_000_000  # the service default for uploads
MIN_SIDE = 16


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), in a stable order so seeds reproduce a round."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, max_pixels: int) -> Image.Image:
    """One decoded, upright RGB image at most `max_pixels` large; raises ImageRejected when unusable."""
    return image_from_bytes(path.read_bytes(), max_pixels)


def image_from_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """`load_image` for bytes already read (from a remote image store)."""
    decoded = decode_image(data, max_bytes=MAX_FILE_BYTES, max_pixels=MAX_PIXELS, min_side=MIN_SIDE)
    return downscale_for_model(decoded.image, max_pixels)


@dataclass
class Pool:
    """The usable images of a round: ids (paths relative to the root), files and pixels, index-aligned."""

    root: Path
    ids: list[str]
    paths: list[Path]
    images: Sequence[Image.Image]  # in memory; a round's variants are read from their files
    rejected: dict[str, str] = field(default_factory=dict)  # id -> why it was left out

    def __len__(self) -> int:
        return len(self.ids)


def load_pool(root: Path, max_pixels: int, paths: Sequence[Path] | None = None) -> Pool:
    """Decode every image under `root` (or the given files); unusable files are reported, not fatal."""
    files = list_images(root) if paths is None else list(paths)
    images: list[Image.Image] = []
    pool = Pool(root, [], [], images)
    for path in files:
        image_id = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            image = load_image(path, max_pixels)
        except (ImageRejected, OSError) as error:
            pool.rejected[image_id] = str(error)
            continue
        pool.ids.append(image_id)
        pool.paths.append(path.resolve())
        images.append(image)
    return pool
