"""Deterministic test images made in memory: photos, encodings, damaged files and graded distortions."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFilter


def photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, a few sharp-edged objects and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = []
    for _ in range(3):
        gx, gy = rng.uniform(-1, 1, size=2)
        fx, fy, phase = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        channels.append(128 + 60 * (gx * x + gy * y) + 40 * np.sin(fx * x + phase) * np.cos(fy * y))
    pixels = np.stack(channels, axis=-1)
    for _ in range(3):  # objects with sharp edges, which blur visibly softens
        cx, cy = rng.uniform(0, w / max(w, h)), rng.uniform(0, h / max(w, h))
        inside = (x - cx) ** 2 + (y - cy) ** 2 < rng.uniform(0.05, 0.2) ** 2
        pixels[inside] = 0.3 * pixels[inside] + 0.7 * rng.uniform(0, 255, size=3)
    pixels += rng.normal(0, 6, size=(h, w, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    """`img` saved as `fmt` (JPEG, PNG, WEBP, BMP, TIFF, GIF, ...); lossy formats default to quality 95."""
    if fmt.upper() in ("JPEG", "WEBP", "MPO"):
        kw.setdefault("quality", 95)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    return buffer.getvalue()


def with_exif_orientation(src: bytes | Image.Image, orientation: int) -> bytes:
    """A JPEG whose EXIF says to display it with `orientation` (1-8); the pixel data is left untouched.

    Bytes are not re-encoded, so a decoder that applies the orientation must give exactly the pixels of
    the plain JPEG, transformed.
    """
    jpeg = src if isinstance(src, bytes) else encode(src, "JPEG")
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("with_exif_orientation needs a JPEG")
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    payload = exif.tobytes()  # starts with b"Exif\0\0", as an APP1 segment needs
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first `keep` fraction of `data`, like an interrupted upload."""
    return data[: int(len(data) * keep)]


def corrupt(data: bytes, seed: int = 0, size: int = 64) -> bytes:
    """`data` with `size` random bytes written over its middle.

    PNG and GIF then fail to decode; JPEG, WebP, BMP and TIFF often still decode, to damaged pixels.
    """
    rng = np.random.default_rng(seed)
    start = max(0, len(data) // 2 - size // 2)
    damage = rng.integers(0, 256, size=min(size, len(data)), dtype=np.uint8).tobytes()
    return data[:start] + damage + data[start + len(damage) :]


def decompression_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid all-black 1-bit PNG of `width`x`height`: tiny on disk, huge once decoded.

    20000x20000 gives ~50 KB in well under a second (rows are compressed as a stream, never all held).
    """
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then packed black pixels
    rows_per_block = max(1, (1 << 20) // len(row))
    full_blocks, rest = divmod(height, rows_per_block)
    compressor = zlib.compressobj(9)
    block = row * rows_per_block
    parts = [compressor.compress(block) for _ in range(full_blocks)]
    parts += [compressor.compress(row * rest), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def animated_gif(frames: Sequence[Image.Image], duration_ms: int = 100) -> bytes:
    """An endlessly looping GIF of `frames` (give distinct frames: PIL merges identical neighbours)."""
    first, *rest = frames
    return encode(first, "GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)


def blurred(img: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur: quality falls as `radius` grows."""
    return img.filter(ImageFilter.GaussianBlur(radius))


def noisy(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    """Additive Gaussian noise of `sigma` grey levels: quality falls as `sigma` grows."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0, sigma, size=np.asarray(img).shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
