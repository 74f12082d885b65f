"""Bad input over HTTP: one table of requests the service must refuse, each with its exact answer.

The server here has small limits (200 KB per file, 4 Mpixel, 3 images per request). Every case checks the
status, the error shape, its `type` and the key fact in its message, and that the request left no row
and no file behind; afterwards the service still answers a good request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests import imagegen
from tests.api.conftest import LiveServer, error_of, fresh_database, jpeg, make_settings, png, sha256

MAX_UPLOAD_BYTES = 200_000
MAX_IMAGE_PIXELS = 4_000_000
MAX_IMAGES = 3
BODY_LIMIT = MAX_UPLOAD_BYTES * MAX_IMAGES + 64 * 1024  # what api.app allows a whole request


@pytest.fixture(scope="module")
def limited(
    backend: str, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with small limits, on a fresh database, per backend."""
    folder = tmp_path_factory.mktemp(f"limited-{backend}")
    with fresh_database(backend, folder) as url:
        settings = make_settings(
            demo_model_dir,
            folder,
            url,
            max_upload_bytes=MAX_UPLOAD_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            max_images_per_request=MAX_IMAGES,
        )
        live = LiveServer(settings).start()
        try:
            yield live
        finally:
            live.stop()


# ---- payloads -------------------------------------------------------------------------------------------


def big_png() -> bytes:
    """A real PNG over the per-file limit but well under the whole-body limit."""
    data = imagegen.encode(imagegen.noisy(imagegen.photo(400, 300, seed=7), 60), "PNG")
    assert MAX_UPLOAD_BYTES < len(data) < BODY_LIMIT - 64 * 1024
    return data


def many_pixels_png() -> bytes:
    """2100x2000 = 4.2 Mpixel of flat colour: a few KB on disk, over the 4 Mpixel limit."""
    return imagegen.encode(Image.new("RGB", (2100, 2000), (30, 60, 90)), "PNG")


def ico() -> bytes:
    return imagegen.encode(imagegen.photo(32, 32, seed=3), "ICO")


def pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def image_file(name: str, data: bytes, content_type: str = "image/jpeg", field: str = "images") -> tuple:
    return (field, (name, data, content_type))


@dataclass(frozen=True)
class Case:
    """One bad request and the answer it must get."""

    status: int
    type: str
    says: tuple[str, ...]  # each must appear in the error message
    files: Callable[[], list[tuple]] = list
    data: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/score"
    method: str = "POST"
    chunked: bool = False  # send the body without Content-Length


def good() -> bytes:
    return jpeg(11)


CASES = {
    "empty-file": Case(
        422, "empty_file", ("empty.jpg", "empty", "0 bytes"), lambda: [image_file("empty.jpg", b"")]
    ),
    "file-over-limit": Case(
        413,
        "too_large",
        ("big.png", str(MAX_UPLOAD_BYTES)),
        lambda: [image_file("big.png", big_png(), "image/png")],
    ),
    "body-over-limit": Case(
        413,
        "too_large",
        (str(BODY_LIMIT),),
        lambda: [image_file("huge.jpg", os.urandom(BODY_LIMIT + 50_000))],
    ),
    "chunked-body-over-limit": Case(
        413,
        "too_large",
        (str(BODY_LIMIT),),
        lambda: [image_file("huge.jpg", os.urandom(BODY_LIMIT + 50_000))],
        chunked=True,
    ),
    "decompression-bomb": Case(
        413,
        "too_many_pixels",
        ("bomb.png", "400000000 pixels"),
        lambda: [image_file("bomb.png", imagegen.decompression_bomb_png(), "image/png")],
    ),
    "too-many-pixels": Case(
        413,
        "too_many_pixels",
        ("2100x2000", str(MAX_IMAGE_PIXELS)),
        lambda: [image_file("wide.png", many_pixels_png(), "image/png")],
    ),
    "tiny-image": Case(
        422, "too_small", ("8x8", "16"), lambda: [image_file("tiny.png", png(1, w=8, h=8), "image/png")]
    ),
    "text-file": Case(
        422,
        "not_an_image",
        ("notes.txt", "not an image"),
        lambda: [image_file("notes.txt", b"just some notes\n", "application/octet-stream")],
    ),
    "random-bytes": Case(
        422, "not_an_image", ("not an image",), lambda: [image_file("noise.jpg", os.urandom(4000))]
    ),
    "truncated-jpeg": Case(
        422,
        "truncated_image",
        ("cut.jpg", "truncated"),
        lambda: [image_file("cut.jpg", imagegen.truncated(jpeg(12)))],
    ),
    "truncated-png": Case(
        422,
        "truncated_image",
        ("cut.png", "truncated"),
        lambda: [image_file("cut.png", imagegen.truncated(png(12)), "image/png")],
    ),
    "corrupt-png": Case(
        422,
        "corrupt_image",
        ("PNG", "corrupt"),
        lambda: [image_file("bad.png", imagegen.corrupt(png(13)), "image/png")],
    ),
    "unsupported-ico": Case(
        422,
        "unsupported_format",
        ("ICO", "not accepted"),
        lambda: [image_file("icon.ico", ico(), "image/x-icon")],
    ),
    "unsupported-pdf": Case(
        422,
        "unsupported_format",
        ("PDF",),
        lambda: [image_file("doc.pdf", pdf(), "application/octet-stream")],
    ),
    "text-content-type": Case(
        415,
        "unsupported_media_type",
        ("text/plain",),
        lambda: [image_file("photo.jpg", good(), "text/plain")],
    ),
    "wrong-field-name": Case(
        422,
        "invalid_request",
        ("images", "required"),
        lambda: [image_file("photo.jpg", good(), field="image")],
    ),
    "missing-images": Case(422, "invalid_request", ("images", "required"), data={"samples": "2"}),
    "compare-missing-image-b": Case(
        422,
        "invalid_request",
        ("image_b", "required"),
        lambda: [image_file("a.jpg", good(), field="image_a")],
        path="/v1/compare",
    ),
    "compare-truncated-image-b": Case(
        422,
        "truncated_image",
        ("image_b", "truncated"),
        lambda: [
            image_file("a.jpg", good(), field="image_a"),
            image_file("b.jpg", imagegen.truncated(jpeg(14)), field="image_b"),
        ],
        path="/v1/compare",
    ),
    "samples-0": Case(
        422, "invalid_request", ("samples", "got 0"), lambda: [image_file("a.jpg", good())], {"samples": "0"}
    ),
    "samples-1000": Case(
        422,
        "invalid_request",
        ("samples", "64", "got 1000"),
        lambda: [image_file("a.jpg", good())],
        {"samples": "1000"},
    ),
    "samples-abc": Case(
        422,
        "invalid_request",
        ("samples", "integer"),
        lambda: [image_file("a.jpg", good())],
        {"samples": "abc"},
    ),
    "votes-1": Case(
        422,
        "invalid_request",
        ("votes", "got 1"),
        lambda: [
            image_file("a.jpg", good(), field="image_a"),
            image_file("b.jpg", jpeg(15), field="image_b"),
        ],
        {"votes": "1"},
        path="/v1/compare",
    ),
    "votes-1000": Case(
        422,
        "invalid_request",
        ("votes", "got 1000"),
        lambda: [
            image_file("a.jpg", good(), field="image_a"),
            image_file("b.jpg", jpeg(15), field="image_b"),
        ],
        {"votes": "1000"},
        path="/v1/compare",
    ),
    "too-many-images": Case(
        422,
        "invalid_request",
        ("images", f"at most {MAX_IMAGES}", f"got {MAX_IMAGES + 1}"),
        lambda: [image_file(f"p{i}.jpg", jpeg(20 + i)) for i in range(MAX_IMAGES + 1)],
    ),
    "good-and-truncated-together": Case(
        422,
        "truncated_image",
        ("second.jpg", "truncated"),
        lambda: [image_file("first.jpg", jpeg(30)), image_file("second.jpg", imagegen.truncated(jpeg(31)))],
    ),
    "unknown-path": Case(404, "not_found", ("Not Found",), path="/v1/nothing-here", method="GET"),
    "wrong-method": Case(405, "method_not_allowed", ("Method Not Allowed",), method="GET"),
}


def send(live: LiveServer, case: Case) -> httpx.Response:
    if case.method == "GET":
        return live.http.get(case.path)
    files = case.files()
    if not case.chunked:
        return live.http.post(case.path, files=files or None, data=case.data)
    # The same multipart body, streamed in pieces: httpx then sends Transfer-Encoding: chunked.
    body = httpx.Request("POST", live.url + case.path, files=files, data=case.data)
    content = body.read()
    pieces = (content[i : i + 65536] for i in range(0, len(content), 65536))
    response = live.http.post(
        case.path, content=pieces, headers={"content-type": body.headers["content-type"]}
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    return response


def snapshot(live: LiveServer) -> tuple[dict[str, int], list[Path]]:
    return live.counts(), live.stored_files()


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_request_is_refused_with_a_clear_error(limited: LiveServer, case: Case) -> None:
    before = snapshot(limited)

    response = send(limited, case)

    assert response.status_code == case.status, response.text
    error = error_of(response)
    assert error["type"] == case.type, error
    for fact in case.says:
        assert fact in error["message"], (fact, error["message"])
    assert snapshot(limited) == before  # no image, prediction or comparison row, no stored file


def test_after_the_bad_requests_the_service_still_answers(limited: LiveServer) -> None:
    """Run after the table: the refused requests created nothing, and a good request works."""
    assert limited.counts() == {"images": 0, "predictions": 0, "comparisons": 0}
    assert limited.stored_files() == []
    data = good()

    response = limited.score(data, samples=2)

    assert response.status_code == 200, response.text
    [item] = response.json()["results"]
    assert item["sha256"] == sha256(data) and 1.0 <= item["score"] <= 5.0
    assert limited.counts() == {"images": 1, "predictions": 1, "comparisons": 0}
    assert limited.stored_path(sha256(data)).read_bytes() == data
    assert limited.http.get("/readyz").status_code == 200


def test_an_upload_at_the_limit_is_accepted(limited: LiveServer) -> None:
    """The per-file limit is inclusive: a file of exactly the limit is scored."""
    data = jpeg(40)
    padded = data + b"\0" * (MAX_UPLOAD_BYTES - len(data))  # JPEG decoders ignore bytes after EOI
    assert len(padded) == MAX_UPLOAD_BYTES

    response = limited.score(padded, samples=2)

    assert response.status_code == 200, response.text
    row = limited.image_row(sha256(padded))
    assert row is not None and row.byte_size == MAX_UPLOAD_BYTES
