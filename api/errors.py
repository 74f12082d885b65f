"""One JSON error shape everywhere: `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from iqa.engines.base import EngineUnavailable
from iqa.images import ImageRejected
from iqa.protocol import ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


_WHEN = {
    400: "The body could not be parsed (malformed JSON or multipart).",
    401: "Missing or wrong admin token.",
    404: "Not found (for admin routes also: the admin API is off, EVOQ_ADMIN_TOKEN unset).",
    409: "Conflict with the current state (a round in progress, or a version that cannot be loaded).",
    413: "An upload is over the byte or pixel limits.",
    415: "An upload is not an image type.",
    422: "A missing, malformed or out-of-range field, or an upload that is not a decodable image.",
    429: "Over the client's rate limit (EVOQ_RATE_LIMIT); see Retry-After.",
    503: "The model engine, the database or the task broker is not answering; see Retry-After.",
}


def error_answers(*statuses: int) -> dict[int | str, dict]:
    """The `responses` of a route: each error status it can give, with the one error schema."""
    return {status: {"model": ErrorResponse, "description": _WHEN[status]} for status in statuses}


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The response every error goes out as."""
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _methods_of(request: Request) -> list[str]:
    """Every method some route of the app answers on this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex, allowed = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and allowed and regex.match(request.url.path):
            methods |= set(allowed)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the routes can raise to a clear status and the one error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route of the path; name them all
            headers["Allow"] = ", ".join(_methods_of(request))
        return error_response(exc.status_code, _TYPES.get(exc.status_code, "error"), str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe(list(exc.errors())))

    @app.exception_handler(ImageRejected)
    async def image_rejected(_: Request, exc: ImageRejected) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(503, "engine_unavailable", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def database_unavailable(_: Request, exc: DBAPIError) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(
            503,
            "database_unavailable",
            "the database is not answering; try again shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; it has been logged")
