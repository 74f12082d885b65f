"""Image intake: turn uploaded bytes into an upright RGB image, or say exactly why not.

Pure functions, no web framework: the API maps `ImageRejected.status`/`code` to its answer.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
_ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP, TIFF, GIF"

# Magic numbers, to name what PIL could not open: a damaged file of an accepted format, or a format
# PIL cannot read at all (iPhones upload HEIC; people upload PDFs).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"%PDF-", "PDF"),
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageRejected(ValueError):
    """An upload that cannot be scored: `status` is the HTTP status, `code` a stable machine type."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """A checked upload: the original bytes (stored and hashed as sent) and the upright RGB pixels."""

    sha256: str
    data: bytes = field(repr=False)
    image: Image.Image = field(repr=False)
    width: int
    height: int
    format: str
    byte_size: int


def check_content_type(content_type: str | None) -> None:
    """Refuse uploads that declare a non-image type (415); clients that send none or a generic one pass."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media or media == "application/octet-stream":
        return
    kind, _, subtype = media.partition("/")
    if kind == "image" and subtype:
        return
    raise ImageRejected(
        415,
        "unsupported_media_type",
        f"content type {content_type!r} is not accepted; send image/* or application/octet-stream",
    )


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int) -> DecodedImage:
    """Check and decode an upload; raises only `ImageRejected`, whatever the bytes.

    The pixel count is checked from the header before any pixel is decoded. PIL's own bomb guard
    (`Image.MAX_IMAGE_PIXELS`) still applies on top, so with `max_pixels` above it PIL refuses first.
    """
    if not data:
        raise ImageRejected(422, "empty_file", "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(413, "too_large", f"file has {len(data)} bytes; the limit is {max_bytes} bytes")
    with _pil_warnings_pinned():
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as exc:
            raise _rejection(exc, data, None) from exc
        fmt = im.format or "unknown"
        if fmt not in ACCEPTED_FORMATS:
            raise _unsupported(fmt)
        width, height = im.size
        if width * height > max_pixels:
            raise ImageRejected(
                413,
                "too_many_pixels",
                f"image has {width * height} pixels ({width}x{height}); the limit is {max_pixels}",
            )
        try:
            im.load()  # the first frame of animations and multi-page files
            ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
        except Exception as exc:
            raise _rejection(exc, data, fmt) from exc
    if min(rgb.size) < min_side:
        raise ImageRejected(
            422,
            "too_small",
            f"image is {rgb.width}x{rgb.height}; both sides must be at least {min_side} pixels",
        )
    return DecodedImage(
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        image=rgb,
        width=rgb.width,
        height=rgb.height,
        format=fmt,
        byte_size=len(data),
    )


def downscale_for_model(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink to at most `max_pixels`, keeping the aspect ratio: the model sees no more than that anyway.

    Returns `image` itself when it already fits. `reducing_gap` lets PIL `reduce()` huge images first,
    which is much faster and, at 3, indistinguishable from plain LANCZOS.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, not {max_pixels}")
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    if new_w * new_h > max_pixels:  # float rounding, or a side clamped to 1 (extreme aspect ratio)
        if new_w >= new_h:
            new_w = max_pixels // new_h
        else:
            new_h = max_pixels // new_w
    return image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_for_transport(image: Image.Image, max_pixels: int) -> bytes:
    """The model-sized image as JPEG for a remote model server.

    Quality 95 with full-resolution chroma (4:4:4), so transport adds no artefacts the model could score.
    No EXIF is written: the pixels are already upright.
    """
    small = downscale_for_model(_to_rgb(image), max_pixels)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


@contextmanager
def _pil_warnings_pinned() -> Iterator[None]:
    """Make PIL's warnings behave the same whatever the process's warning filters are.

    The bomb warning becomes an error (so a huge image is refused, never decoded); PIL's other warnings
    (odd metadata in client files) are not actionable and must not turn into errors under `-W error`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _rejection(exc: Exception, data: bytes, fmt: str | None) -> ImageRejected:
    """Say what is wrong with bytes PIL failed on; `fmt` is None when PIL could not identify them."""
    if isinstance(exc, _BOMB):
        return ImageRejected(413, "too_many_pixels", f"image has too many pixels to decode safely: {exc}")
    if fmt is None:
        fmt = _sniff(data)
        if fmt is None:
            return ImageRejected(
                422, "not_an_image", f"the file is not an image in a known format; accepted: {_ACCEPTED_TEXT}"
            )
        if fmt not in ACCEPTED_FORMATS:
            return _unsupported(fmt)
    # PIL says "image file is truncated" or "Truncated File Read"
    if "truncated" in str(exc).lower() or _cut_short(data):
        return ImageRejected(
            422, "truncated_image", "image is truncated: the file ends before the image data does"
        )
    reason = "its header cannot be read" if isinstance(exc, UnidentifiedImageError) else str(exc)
    return ImageRejected(422, "corrupt_image", f"{fmt} image is corrupt and cannot be decoded: {reason}")


def _unsupported(fmt: str) -> ImageRejected:
    return ImageRejected(
        422, "unsupported_format", f"{fmt} files are not accepted; accepted formats: {_ACCEPTED_TEXT}"
    )


def _sniff(data: bytes) -> str | None:
    """The format the magic number names, for files PIL cannot open."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIC"
    return None


def _cut_short(data: bytes) -> bool:
    """Whether a WebP or TIFF header points past the end of the file (PIL calls such files unreadable)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    if data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:
        return int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big") >= len(data)
    return False


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for the model: 16-bit grey scaled (not clipped) to 8 bits, transparency flattened on white."""
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba)
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")
