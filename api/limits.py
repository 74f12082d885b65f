"""Limits at the door: the body size, enforced while the request streams in, and per-client request rates."""

from __future__ import annotations

import contextlib
import math
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from iqa.service import AtCapacity


class BodyTooLarge(Exception):
    """Raised from `receive` once the body passes the limit; the request is then answered 413."""


class BodySizeLimit:
    """Answer 413 when Content-Length, or the bytes actually received, exceed `max_bytes`.

    The body parser may wrap the error from `receive` into its own response (FastAPI turns it into a
    400), so whatever the app then starts to send is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:
                await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await error_response(413, "too_large", message, {"Connection": "close"})(scope, receive, send)


class RateLimit:
    """Requests per client and window (`limits`' moving window): per API key, or per client address
    while /v1/* is open. In Redis when `EVOQ_RATE_LIMIT_STORAGE` names one, so all replicas share it."""

    def __init__(self, rate: str, storage_url: str) -> None:
        from limits import parse, storage, strategies

        self.item = parse(rate)
        self.storage = storage.storage_from_string(storage_url)
        self.limiter = strategies.MovingWindowRateLimiter(self.storage)

    def hit(self, who: str) -> tuple[bool, int, int]:
        """(allowed, remaining, seconds until a request is allowed again) after counting one for `who`."""
        allowed = self.limiter.hit(self.item, "evoq", who)
        reset, remaining = self.limiter.get_window_stats(self.item, "evoq", who)
        return allowed, remaining, max(1, math.ceil(reset - time.time()))


class EngineAdmission:
    """The door of the bounded engine queue: a model request (`POST /v1/score`, `/v1/compare`,
    `/v1/rank`) beyond `EVOQ_MAX_QUEUED_REQUESTS` gets 503 with Retry-After before its body is read or
    anything is stored, so shedding costs almost nothing while the service is overloaded."""

    PATHS = frozenset({"/v1/score", "/v1/compare", "/v1/rank"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        service = scope["app"].state.service
        try:
            async with service.admitted():
                await self.app(scope, receive, send)
        except AtCapacity as error:
            response = error_response(503, "unavailable", str(error), {"Retry-After": str(error.retry_after)})
            await response(scope, receive, send)
