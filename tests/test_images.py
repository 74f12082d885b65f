"""Image intake (iqa.images): accepted formats, orientation, flattening, every rejection, fuzzed bytes."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from iqa.images import (
    DecodedImage,
    ImageRejected,
    check_content_type,
    decode_image,
    downscale_for_model,
    encode_for_transport,
)
from tests.imagegen import (
    animated_gif,
    blurred,
    corrupt,
    decompression_bomb_png,
    encode,
    noisy,
    photo,
    truncated,
    with_exif_orientation,
)

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 50_000_000, "min_side": 16}  # settings defaults
CODES = {
    "empty_file",
    "too_large",
    "too_many_pixels",
    "too_small",
    "not_an_image",
    "truncated_image",
    "corrupt_image",
    "unsupported_format",
    "unsupported_media_type",
}
PHOTO = photo()  # 96x64
JPEG = encode(PHOTO, "JPEG")
PNG = encode(PHOTO, "PNG")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def decode(data: bytes, **limits: int) -> DecodedImage:
    return decode_image(data, **{**LIMITS, **limits})


def rejection(data: bytes, **limits: int) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode(data, **limits)
    return info.value


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


# ---- accepted files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        pytest.param("JPEG", {}, 4, id="jpeg"),
        pytest.param("MPO", {"save_all": True, "append_images": [photo(seed=1)]}, 4, id="mpo"),
        pytest.param("PNG", {}, 0, id="png"),
        pytest.param("WEBP", {}, 4, id="webp-lossy"),
        pytest.param("WEBP", {"lossless": True}, 0, id="webp-lossless"),
        pytest.param("BMP", {}, 0, id="bmp"),
        pytest.param("TIFF", {}, 0, id="tiff"),
        pytest.param("TIFF", {"compression": "tiff_deflate"}, 0, id="tiff-deflate"),
        pytest.param("TIFF", {"compression": "jpeg"}, 6, id="tiff-jpeg"),
        pytest.param("GIF", {}, 4, id="gif"),
    ],
)
def test_accepted_formats_decode_to_rgb_of_the_right_size(fmt: str, options: dict, tolerance: float) -> None:
    data = encode(PHOTO, fmt, **options)
    decoded = decode(data)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == (96, 64)
    assert decoded.byte_size == len(data)
    assert decoded.data == data
    assert np.abs(pixels(decoded.image) - pixels(PHOTO)).mean() <= tolerance


@pytest.mark.parametrize(
    ("source", "fmt", "expected"),
    [
        pytest.param(Image.new("L", (32, 32), 77), "PNG", (77, 77, 77), id="grey"),
        pytest.param(Image.new("1", (32, 32), 1), "BMP", WHITE, id="1-bit"),
        pytest.param(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", RED, id="cmyk-jpeg"),
        pytest.param(solid(GREEN).convert("P"), "PNG", GREEN, id="palette"),
        # 16-bit grey is scaled to 8 bits (0x8080 -> 0x80), not clipped to white as PIL's convert() does
        pytest.param(
            Image.fromarray(np.full((32, 32), 0x8080, np.uint16)), "PNG", (128,) * 3, id="grey16-png"
        ),
        pytest.param(
            Image.fromarray(np.full((32, 32), 0x8080, np.uint16)), "TIFF", (128,) * 3, id="grey16-tiff"
        ),
    ],
)
def test_other_pixel_modes_become_rgb(source: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    image = decode(encode(source, fmt)).image
    assert image.mode == "RGB"
    assert np.abs(pixels(image) - np.array(expected)).max() <= 2


# EXIF orientation -> how the stored pixels must be transformed to show the picture upright.
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    plain = decode(JPEG).image
    upright = decode(with_exif_orientation(JPEG, orientation))
    expected = ORIENTATIONS[orientation](np.asarray(plain))
    assert (upright.height, upright.width) == expected.shape[:2]
    assert np.array_equal(np.asarray(upright.image), expected)


def test_orientation_6_turns_the_top_left_corner_to_the_top_right() -> None:
    marked = PHOTO.copy()
    marked.paste(RED, (0, 0, 16, 16))
    decoded = decode(with_exif_orientation(marked, 6))
    assert (decoded.width, decoded.height) == (64, 96)
    top_right = decoded.image.getpixel((decoded.width - 8, 8))
    assert np.abs(np.array(top_right) - RED).max() <= 8
    assert np.abs(np.array(decoded.image.getpixel((8, 8))) - RED).max() > 100


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda frames: animated_gif(frames), id="gif"),
        pytest.param(
            lambda frames: encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), id="tiff"
        ),
        pytest.param(
            lambda frames: encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
            id="webp",
        ),
    ],
)
def test_multi_frame_files_give_the_first_frame(make: Callable[[list[Image.Image]], bytes]) -> None:
    data = make([solid(RED), solid(GREEN), solid(BLUE)])
    image = decode(data).image
    assert image.size == (32, 32)
    assert np.abs(pixels(image) - np.array(RED)).max() <= 2


def _half_transparent() -> Image.Image:
    """Left: transparent red; middle: half-transparent black; right: opaque blue."""
    image = Image.new("RGBA", (48, 16), (255, 0, 0, 0))
    image.paste((0, 0, 0, 128), (16, 0, 32, 16))
    image.paste((0, 0, 255, 255), (32, 0, 48, 16))
    return image


def _transparent_then_blue() -> Image.Image:
    """GIF transparency is all or nothing: left two thirds transparent red, right third opaque blue."""
    image = Image.new("RGBA", (48, 16), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (32, 0, 48, 16))
    return image


@pytest.mark.parametrize(
    ("source", "fmt", "expected"),
    [
        pytest.param(_half_transparent(), "PNG", [WHITE, (127, 127, 127), BLUE], id="rgba-png"),
        pytest.param(_half_transparent(), "WEBP", [WHITE, (127, 127, 127), BLUE], id="rgba-webp"),
        pytest.param(_half_transparent(), "TIFF", [WHITE, (127, 127, 127), BLUE], id="rgba-tiff"),
        pytest.param(
            _half_transparent().convert("LA"), "PNG", [WHITE, (127, 127, 127), (29, 29, 29)], id="la-png"
        ),
        pytest.param(_transparent_then_blue(), "GIF", [WHITE, WHITE, BLUE], id="gif"),
    ],
)
def test_transparency_is_flattened_on_white(
    source: Image.Image, fmt: str, expected: list[tuple[int, int, int]]
) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    image = decode(encode(source, fmt, **options)).image
    assert image.mode == "RGB"
    for x, color in zip((8, 24, 40), expected, strict=True):
        assert np.abs(np.array(image.getpixel((x, 8))) - color).max() <= 2, (x, image.getpixel((x, 8)))


def test_sha256_is_of_the_original_bytes() -> None:
    first, second = decode(JPEG), decode(bytes(JPEG))
    assert first.sha256 == second.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert decode(PNG).sha256 != first.sha256  # same pixels, other bytes


def test_repr_leaves_out_the_bytes_and_pixels() -> None:
    text = repr(decode(PNG))
    assert "sha256=" in text
    assert "data=" not in text
    assert len(text) < 300


# ---- rejections -------------------------------------------------------------------------------------


REJECTIONS = [
    pytest.param(b"", {}, 422, "empty_file", ["empty"], id="empty"),
    pytest.param(
        JPEG, {"max_bytes": 1024}, 413, "too_large", [f"{len(JPEG)} bytes", "1024"], id="too-many-bytes"
    ),
    # the byte limit comes before anything is parsed
    pytest.param(b"x" * 2048, {"max_bytes": 1024}, 413, "too_large", ["2048"], id="too-many-bytes-not-image"),
    pytest.param(
        PNG, {"max_pixels": 6000}, 413, "too_many_pixels", ["6144 pixels", "96x64", "6000"], id="pixels"
    ),
    # the pixel limit is read from the header: a truncated file is refused for its size, not decoded
    pytest.param(
        truncated(PNG), {"max_pixels": 6000}, 413, "too_many_pixels", ["6144"], id="pixels-from-header"
    ),
    pytest.param(
        decompression_bomb_png(10_000, 6_000),
        {},
        413,
        "too_many_pixels",
        ["60000000 pixels", "10000x6000", "50000000"],
        id="pixels-over-limit",
    ),
    # over PIL's own bomb limit (2 x 89478485): PIL refuses while identifying, before our check
    pytest.param(decompression_bomb_png(), {}, 413, "too_many_pixels", ["400000000 pixels"], id="bomb"),
    # over PIL's warning limit (89478485) but within ours: the warning is an error, never a decode
    pytest.param(
        decompression_bomb_png(10_000, 10_000),
        {"max_pixels": 200_000_000},
        413,
        "too_many_pixels",
        ["100000000 pixels"],
        id="bomb-warning",
    ),
    pytest.param(encode(photo(12, 40), "PNG"), {}, 422, "too_small", ["12x40", "16"], id="too-small"),
    pytest.param(b"hello, this is a text file\n" * 20, {}, 422, "not_an_image", ["not an image"], id="text"),
    pytest.param(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        {},
        422,
        "not_an_image",
        ["not an image", "JPEG"],
        id="random-bytes",
    ),
    *(
        pytest.param(
            truncated(encode(PHOTO, fmt, **options)), {}, 422, "truncated_image", ["truncated"], id=name
        )
        for name, fmt, options in [
            ("truncated-jpeg", "JPEG", {}),
            ("truncated-png", "PNG", {}),
            ("truncated-gif", "GIF", {}),
            ("truncated-bmp", "BMP", {}),
            ("truncated-webp", "WEBP", {}),
            ("truncated-tiff", "TIFF", {}),
            ("truncated-tiff-deflate", "TIFF", {"compression": "tiff_deflate"}),
        ]
    ),
    pytest.param(JPEG[:40], {}, 422, "truncated_image", ["truncated"], id="truncated-in-jpeg-header"),
    pytest.param(corrupt(PNG), {}, 422, "corrupt_image", ["PNG image is corrupt"], id="corrupt-png"),
    pytest.param(
        corrupt(encode(PHOTO, "GIF")), {}, 422, "corrupt_image", ["GIF image is corrupt"], id="corrupt-gif"
    ),
    pytest.param(
        PNG[:8] + bytes(range(200)),
        {},
        422,
        "corrupt_image",
        ["PNG", "header cannot be read"],
        id="png-bad-header",
    ),
    pytest.param(encode(PHOTO, "ICO"), {}, 422, "unsupported_format", ["ICO", "JPEG, PNG"], id="ico"),
    pytest.param(encode(PHOTO, "PPM"), {}, 422, "unsupported_format", ["PPM"], id="ppm"),
    pytest.param(encode(PHOTO, "TGA"), {}, 422, "unsupported_format", ["TGA"], id="tga"),
    pytest.param(
        b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n",
        {},
        422,
        "unsupported_format",
        ["PDF", "JPEG, PNG"],
        id="pdf",
    ),
    pytest.param(
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        {},
        422,
        "unsupported_format",
        ["HEIC"],
        id="heic",
    ),
    pytest.param(
        encode(PHOTO, "AVIF") if features.check("avif") else b"",
        {},
        422,
        "unsupported_format",
        ["AVIF"],
        id="avif",
        marks=pytest.mark.skipif(not features.check("avif"), reason="PIL built without AVIF"),
    ),
]


@pytest.mark.parametrize(("data", "limits", "status", "code", "fragments"), REJECTIONS)
def test_rejections_say_what_is_wrong(
    data: bytes, limits: dict[str, int], status: int, code: str, fragments: list[str]
) -> None:
    started = time.monotonic()
    exc = rejection(data, **limits)
    assert time.monotonic() - started < 2
    assert (exc.status, exc.code) == (status, code)
    assert exc.message == str(exc)
    for fragment in fragments:
        assert fragment in str(exc)


def test_pixel_limit_does_not_rely_on_pils_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    exc = rejection(decompression_bomb_png())
    assert (exc.status, exc.code) == (413, "too_many_pixels")
    assert "400000000 pixels (20000x20000); the limit is 50000000" in str(exc)


def _jpeg_with_odd_exif() -> bytes:
    """A fine JPEG whose EXIF tag claims more data than there is: PIL warns, and should just skip it."""
    ifd = struct.pack(">HHHII", 1, 0x010E, 2, 1000, 26) + bytes(4)  # ImageDescription, 1000 chars
    payload = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd
    return JPEG[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + JPEG[2:]


@pytest.mark.parametrize("process_filter", ["ignore", "error", "always"])
def test_answers_do_not_depend_on_the_process_warning_filters(process_filter: str) -> None:
    bomb = decompression_bomb_png(10_000, 10_000)  # PIL warns: over 89478485 pixels
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter(process_filter)
        exc = rejection(bomb, max_pixels=200_000_000)
        decoded = decode(_jpeg_with_odd_exif())
    assert exc.code == "too_many_pixels"
    assert np.array_equal(np.asarray(decoded.image), np.asarray(decode(JPEG).image))
    assert seen == []


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "image/jpeg",
        "image/png",
        "IMAGE/PNG",
        "image/heic",
        "image/jpeg; q=1",
        "application/octet-stream",
    ],
)
def test_image_and_generic_content_types_pass(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json", "multipart/form-data", "image", "image/", "video/mp4"]
)
def test_other_content_types_are_415(content_type: str) -> None:
    with pytest.raises(ImageRejected) as info:
        check_content_type(content_type)
    assert (info.value.status, info.value.code) == (415, "unsupported_media_type")
    assert repr(content_type) in str(info.value)


# ---- fuzzing: any bytes give an image or ImageRejected, quickly ------------------------------------------

SMALL = photo(40, 24, seed=7)
SEED_FILES = [
    encode(SMALL, "JPEG"),
    encode(SMALL, "PNG"),
    encode(SMALL.convert("RGBA"), "PNG"),
    encode(SMALL, "WEBP"),
    encode(SMALL, "BMP"),
    encode(SMALL, "TIFF"),
    encode(SMALL, "TIFF", compression="tiff_deflate"),
    encode(SMALL, "GIF"),
    animated_gif([SMALL, blurred(SMALL, 2)]),
    with_exif_orientation(SMALL, 6),
    encode(SMALL, "MPO", save_all=True, append_images=[SMALL]),
    encode(SMALL, "ICO"),
]
MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBP",
]


def _mutate(case: tuple[bytes, list[tuple[int, int]], float]) -> bytes:
    data, edits, keep = case
    damaged = bytearray(data[: max(1, int(len(data) * keep))])
    for position, value in edits:
        damaged[position % len(damaged)] = value
    return bytes(damaged)


ANY_BYTES = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS), st.binary(max_size=512)),
    st.tuples(
        st.sampled_from(SEED_FILES),
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
        st.floats(0.05, 1.0),
    ).map(_mutate),
)


@settings(max_examples=400, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.too_slow])
@given(data=ANY_BYTES)
def test_any_bytes_give_an_image_or_image_rejected(data: bytes) -> None:
    try:
        decoded = decode_image(data, max_bytes=1_000_000, max_pixels=4_000_000, min_side=1)
    except ImageRejected as exc:
        assert exc.status in (413, 415, 422)
        assert exc.code in CODES
        assert str(exc)
    else:
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (decoded.width, decoded.height)
        assert decoded.width * decoded.height <= 4_000_000


# ---- downscaling and transport ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "budget"),
    [
        ((4000, 3000), 1_003_520),
        ((3000, 4000), 1_003_520),
        ((1001, 999), 1000),
        ((97, 61), 5000),
        ((640, 64), 784),
    ],
)
def test_downscale_keeps_aspect_ratio_within_budget(size: tuple[int, int], budget: int) -> None:
    width, height = size
    out = downscale_for_model(Image.new("RGB", size, (10, 120, 200)), budget)
    assert out.width * out.height <= budget
    assert out.width * out.height > 0.8 * budget  # uses the budget, not far below it
    assert abs(out.width - out.height * width / height) <= max(1, width / height)  # rounding only
    assert out.getpixel((out.width // 2, out.height // 2)) == (10, 120, 200)


@pytest.mark.parametrize("size", [(100_000, 16), (16, 100_000)])
def test_downscale_of_extreme_aspect_ratio_still_fits(size: tuple[int, int]) -> None:
    out = downscale_for_model(Image.new("RGB", size), 784)
    assert out.size == ((784, 1) if size[0] > size[1] else (1, 784))


def test_downscale_returns_the_same_image_when_within_budget() -> None:
    assert downscale_for_model(PHOTO, 96 * 64) is PHOTO


def test_downscale_matches_plain_lanczos() -> None:
    big = photo(1200, 900, seed=2)
    out = downscale_for_model(big, 30_000)
    reference = big.resize(out.size, Image.Resampling.LANCZOS)
    assert np.abs(pixels(out) - pixels(reference)).mean() < 1.0


def test_downscale_refuses_a_budget_below_one_pixel() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        downscale_for_model(PHOTO, 0)


def test_encode_for_transport_is_a_faithful_model_sized_jpeg() -> None:
    big = photo(1200, 900, seed=2)
    data = encode_for_transport(big, 100_000)
    sent = decode(data)
    expected = downscale_for_model(big, 100_000)
    assert sent.format == "JPEG"
    assert sent.image.size == expected.size
    assert np.abs(pixels(sent.image) - pixels(expected)).mean() < 1.5


def test_encode_for_transport_keeps_fine_colour_detail() -> None:
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2], stripes[:, 1::2] = RED, BLUE  # chroma subsampling would smear these into purple
    sent = decode(encode_for_transport(Image.fromarray(stripes), 1_000_000)).image
    assert np.abs(pixels(sent) - stripes).mean() < 3


def test_encode_for_transport_keeps_upright_pixels_upright() -> None:
    upright = decode(with_exif_orientation(JPEG, 6)).image
    sent = Image.open(io.BytesIO(encode_for_transport(upright, 1_000_000)))
    assert sent.size == (64, 96)
    assert "exif" not in sent.info


# ---- the test-image helpers themselves ------------------------------------------------------------------


def test_bomb_file_is_small_quick_and_declares_its_size() -> None:
    started = time.monotonic()
    data = decompression_bomb_png(20_000, 20_000)
    assert time.monotonic() - started < 2
    assert len(data) < 300_000
    assert int.from_bytes(data[16:20], "big") == int.from_bytes(data[20:24], "big") == 20_000
    small = decode(decompression_bomb_png(40, 30)).image  # the same construction, decodable
    assert small.size == (40, 30)
    assert pixels(small).max() == 0


def test_photos_are_deterministic_per_seed() -> None:
    assert np.array_equal(np.asarray(photo(seed=3)), np.asarray(photo(seed=3)))
    assert not np.array_equal(np.asarray(photo(seed=3)), np.asarray(photo(seed=4)))


def _sharpness(image: Image.Image) -> float:
    grey = pixels(image.convert("L"))
    return float(
        np.var(grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    )


def test_distortions_get_worse_with_strength() -> None:
    sharpness = [_sharpness(blurred(PHOTO, radius)) for radius in (0.5, 1, 2, 4)]
    assert sharpness == sorted(sharpness, reverse=True)
    errors = [np.abs(pixels(noisy(PHOTO, sigma)) - pixels(PHOTO)).mean() for sigma in (2, 5, 10, 20)]
    assert errors == sorted(errors)
    assert np.array_equal(np.asarray(noisy(PHOTO, 5, seed=1)), np.asarray(noisy(PHOTO, 5, seed=1)))
