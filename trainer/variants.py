"""The paper's round-2 option: synthetic variants of every pool image, to pair with their reference.

Each variant has a random distortion type and level (`trainer.distortions.random_variants`), made from
the pool image as loaded, so at the model's pixel budget. Type and level are recorded in
`variants.json` for audit only: the current model's votes on the same-reference pairs decide the
labels, as for every other pair.

Variants are written as PNG (lossless, so a JPEG variant keeps exactly its artifacts) into a folder of
the round's version: the training process loads images by path, and the published version keeps the
files it was trained on. Voting and scoring read them back on access, so a pool of thousands of images
with ten variants each never sits in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from trainer.distortions import random_variants
from trainer.pool import Pool

VARIANTS_DIR = "variants"  # inside the version folder
INDEX_FILE = "variants.json"


class PoolImages(Sequence[Image.Image]):
    """The pool's decoded images, then the variant files, read from disk each time one is asked for."""

    def __init__(self, images: Sequence[Image.Image], files: Sequence[Path]) -> None:
        self.images = images
        self.files = files

    def __len__(self) -> int:
        return len(self.images) + len(self.files)

    def __getitem__(self, index: int) -> Image.Image:  # ints only: a round never slices the pool
        if index < 0:
            index += len(self)
        if index < len(self.images):
            return self.images[index]
        with Image.open(self.files[index - len(self.images)]) as image:
            return image.convert("RGB")


def variant_seed(seed: int, index: int) -> int:
    """The seed of pool image `index`'s variants in a round seeded `seed` (distinct per image)."""
    return (seed * 1_000_003 + index) % 2**32


def add_variants(
    pool: Pool,
    per_image: int,
    seed: int,
    folder: Path,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Pool, list[list[int]]]:
    """The pool extended by `per_image` variants of each image (files in `folder`), and its groups.

    Variant k (1-based) of image `<id>` is `<id>#vKK`; its index follows all the originals. Group r
    holds pool index r and the indices of its variants, for `trainer.pairs.sample_group_pairs`.
    `progress(done, total)` is called after each pool image. CPU-bound: call it in a thread.
    """
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, not {per_image}")
    folder.mkdir(parents=True, exist_ok=True)
    n = len(pool)
    ids: list[str] = []
    paths: list[Path] = []
    groups = [[r] for r in range(n)]
    index = []
    for r, image in enumerate(pool.images):
        for k, (kind, level, variant) in enumerate(
            random_variants(image, per_image, variant_seed(seed, r)), 1
        ):
            variant_id = f"{pool.ids[r]}#v{k:02d}"
            path = folder / f"{r:05d}-v{k:02d}.png"
            variant.save(path, format="PNG")
            groups[r].append(n + len(ids))
            ids.append(variant_id)
            paths.append(path.resolve())
            index.append(
                {
                    "id": variant_id,
                    "reference": pool.ids[r],
                    "file": path.name,
                    "distortion": kind,
                    "level": level,
                }
            )
        if progress is not None:
            progress(r + 1, n)
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    extended = Pool(
        pool.root, pool.ids + ids, pool.paths + paths, PoolImages(pool.images, paths), pool.rejected
    )
    return extended, groups
