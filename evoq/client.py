"""Python client of EvoQuality Service (httpx, sync and async), over the protocol models the API uses.

    from evoq.client import Client
    with Client("http://127.0.0.1:8000", admin_token="...") as client:
        [item] = client.score([Path("photo.jpg")]).results
        round_ = client.wait_for_round(client.start_round(pairs=256, votes=8).id, on_progress=print)

An error answer raises `ServiceError` with the service's status and `{"error": ...}` message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from iqa.protocol import (
    CompareResponse,
    ImageOut,
    ModelsResponse,
    RankResponse,
    RoundOut,
    ScoreMode,
    ScoreResponse,
    VersionOut,
)

FINAL_STATES = ("succeeded", "rejected", "failed", "cancelled")
ImageInput = Path | str | bytes
Progress = Callable[[RoundOut], None]


class ServiceError(RuntimeError):
    """The service answered with an error (4xx or 5xx)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status} {kind}: {message}")
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


def _raise_for(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        error = response.json()["error"]
        kind, message = error.get("type", "error"), error.get("message", response.text)
    except (ValueError, KeyError, TypeError):
        kind, message = "error", response.text[:500]
    raise ServiceError(response.status_code, kind, message, response.headers.get("Retry-After"))


def _file(image: ImageInput, name: str) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return name, image
    path = Path(image)
    return path.name, path.read_bytes()


def _score_form(
    images: Sequence[ImageInput], samples: int | None, reasoning: bool, mode: ScoreMode
) -> dict[str, Any]:
    files = [("images", _file(image, f"image{k}")) for k, image in enumerate(images)]
    data: dict[str, str] = {"mode": mode}
    if samples is not None:
        data["samples"] = str(samples)
    if reasoning:
        data["return_reasoning"] = "true"
    return {"files": files, "data": data}


def _compare_form(a: ImageInput, b: ImageInput, votes: int | None, mode: ScoreMode) -> dict[str, Any]:
    files = {"image_a": _file(a, "a"), "image_b": _file(b, "b")}
    return {"files": files, "data": {"mode": mode} | ({} if votes is None else {"votes": str(votes)})}


def _rank_form(images: Sequence[ImageInput], votes: int | None) -> dict[str, Any]:
    files = [("images", _file(image, f"image{k}")) for k, image in enumerate(images)]
    return {"files": files, "data": {} if votes is None else {"votes": str(votes)}}


class _Common:
    def __init__(self, admin_token: str | None) -> None:
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}


class Client(_Common):
    """Blocking client; a context manager that closes its connections."""

    def __init__(self, url: str, admin_token: str | None = None, timeout_s: float = 300.0) -> None:
        super().__init__(admin_token)
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        headers = self._admin if admin else {}
        return _raise_for(self.http.request(method, path, headers=headers, **kwargs)).json()

    def score(
        self,
        images: Sequence[ImageInput],
        samples: int | None = None,
        reasoning: bool = False,
        mode: ScoreMode = "sampled",
    ) -> ScoreResponse:
        """Scores of the images (paths or bytes), in order; `mode="fast"`: one deterministic reading."""
        form = _score_form(images, samples, reasoning, mode)
        return ScoreResponse.model_validate(self._call("POST", "/v1/score", **form))

    def compare(
        self, a: ImageInput, b: ImageInput, votes: int | None = None, mode: ScoreMode = "sampled"
    ) -> CompareResponse:
        """Which of two images looks better."""
        form = _compare_form(a, b, votes, mode)
        return CompareResponse.model_validate(self._call("POST", "/v1/compare", **form))

    def rank(self, images: Sequence[ImageInput], votes: int | None = None) -> RankResponse:
        """The images in quality order, with latent scores and 95% intervals."""
        return RankResponse.model_validate(self._call("POST", "/v1/rank", **_rank_form(images, votes)))

    def image(self, sha256: str) -> ImageOut:
        return ImageOut.model_validate(self._call("GET", f"/v1/images/{sha256}"))

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate(self._call("GET", "/v1/models"))

    # ---- admin ----
    def start_round(self, **overrides: Any) -> RoundOut:
        """Queue a round; overrides as in `trainer.config.RoundOverrides` (pairs, votes, steps, ...)."""
        return RoundOut.model_validate(self._call("POST", "/admin/evolutions", admin=True, json=overrides))

    def round(self, round_id: int) -> RoundOut:
        return RoundOut.model_validate(self._call("GET", f"/admin/evolutions/{round_id}", admin=True))

    def rounds(self, limit: int = 50) -> list[RoundOut]:
        rows = self._call("GET", "/admin/evolutions", admin=True, params={"limit": limit})
        return [RoundOut.model_validate(r) for r in rows]

    def cancel_round(self, round_id: int) -> RoundOut:
        return RoundOut.model_validate(self._call("POST", f"/admin/evolutions/{round_id}/cancel", admin=True))

    def versions(self) -> list[VersionOut]:
        return [VersionOut.model_validate(v) for v in self._call("GET", "/admin/models", admin=True)]

    def activate(self, version_id: int) -> VersionOut:
        return VersionOut.model_validate(
            self._call("POST", f"/admin/models/{version_id}/activate", admin=True)
        )

    def wait_for_round(
        self,
        round_id: int,
        on_progress: Progress | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> RoundOut:
        """Poll until the round ends; `on_progress` sees every state it was in. Returns the final row."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            row = self.round(round_id)
            if on_progress is not None:
                on_progress(row)
            if row.state in FINAL_STATES:
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"round {round_id} is still {row.state} after {timeout_s} s")
            time.sleep(poll_s)


class AsyncClient(_Common):
    """The same calls for asyncio code; `async with AsyncClient(url) as client: ...`."""

    def __init__(self, url: str, admin_token: str | None = None, timeout_s: float = 300.0) -> None:
        super().__init__(admin_token)
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        headers = self._admin if admin else {}
        return _raise_for(await self.http.request(method, path, headers=headers, **kwargs)).json()

    async def score(
        self,
        images: Sequence[ImageInput],
        samples: int | None = None,
        reasoning: bool = False,
        mode: ScoreMode = "sampled",
    ) -> ScoreResponse:
        form = _score_form(images, samples, reasoning, mode)
        return ScoreResponse.model_validate(await self._call("POST", "/v1/score", **form))

    async def compare(
        self, a: ImageInput, b: ImageInput, votes: int | None = None, mode: ScoreMode = "sampled"
    ) -> CompareResponse:
        form = _compare_form(a, b, votes, mode)
        return CompareResponse.model_validate(await self._call("POST", "/v1/compare", **form))

    async def rank(self, images: Sequence[ImageInput], votes: int | None = None) -> RankResponse:
        form = _rank_form(images, votes)
        return RankResponse.model_validate(await self._call("POST", "/v1/rank", **form))

    async def image(self, sha256: str) -> ImageOut:
        return ImageOut.model_validate(await self._call("GET", f"/v1/images/{sha256}"))

    async def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate(await self._call("GET", "/v1/models"))

    async def start_round(self, **overrides: Any) -> RoundOut:
        return RoundOut.model_validate(
            await self._call("POST", "/admin/evolutions", admin=True, json=overrides)
        )

    async def round(self, round_id: int) -> RoundOut:
        return RoundOut.model_validate(await self._call("GET", f"/admin/evolutions/{round_id}", admin=True))

    async def rounds(self, limit: int = 50) -> list[RoundOut]:
        rows = await self._call("GET", "/admin/evolutions", admin=True, params={"limit": limit})
        return [RoundOut.model_validate(r) for r in rows]

    async def cancel_round(self, round_id: int) -> RoundOut:
        path = f"/admin/evolutions/{round_id}/cancel"
        return RoundOut.model_validate(await self._call("POST", path, admin=True))

    async def versions(self) -> list[VersionOut]:
        return [VersionOut.model_validate(v) for v in await self._call("GET", "/admin/models", admin=True)]

    async def activate(self, version_id: int) -> VersionOut:
        path = f"/admin/models/{version_id}/activate"
        return VersionOut.model_validate(await self._call("POST", path, admin=True))

    async def wait_for_round(
        self, round_id: int, on_progress: Progress | None = None, poll_s: float = 1.0
    ) -> RoundOut:
        """Poll until the round ends (wrap in `asyncio.timeout` to bound it)."""
        while True:
            row = await self.round(round_id)
            if on_progress is not None:
                on_progress(row)
            if row.state in FINAL_STATES:
                return row
            await asyncio.sleep(poll_s)
