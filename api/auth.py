"""Who may call: the admin API needs EVOQ_ADMIN_TOKEN; /v1/* needs a client API key once any key exists
(or with EVOQ_REQUIRE_API_KEYS), sent as a bearer token or in `X-API-Key`."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import ServiceDep, SettingsDep

_bearer = HTTPBearer(auto_error=False, description="EVOQ_ADMIN_TOKEN as a bearer token.")


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """404 when no token is configured (admin API off); 401 unless the bearer token matches."""
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise HTTPException(404, "the admin API is off: set EVOQ_ADMIN_TOKEN to enable it")
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, expected):
        raise HTTPException(401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)


_client_bearer = HTTPBearer(
    auto_error=False, description="A client API key (POST /admin/keys) as a bearer token."
)


async def client_key(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_client_bearer)],
    x_api_key: Annotated[
        str | None, Header(description="A client API key, instead of the bearer token.")
    ] = None,
) -> int | None:
    """The id of the caller's key; None while /v1/* is open (no key exists and none is required).
    A key that is sent must be valid even then: a typo should not pass silently."""
    given = x_api_key or (credentials.credentials if credentials else None)
    required = service.settings.require_api_keys
    answer = service.key_check.cached(given, required)
    if answer is None:
        answer = await asyncio.to_thread(service.key_check.check, given, required)
    key_id, refused = answer
    if refused:
        message = "missing, wrong or revoked API key" if given else "an API key is required"
        raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
    return key_id


ClientKeyDep = Depends(client_key)
ClientKey = Annotated[int | None, ClientKeyDep]


async def rate_limited(request: Request, response: Response, api_key_id: ClientKey) -> None:
    """429 with Retry-After for a client over `EVOQ_RATE_LIMIT`; the limit and what is left in headers."""
    limit = request.app.state.rate_limit
    if limit is None:
        return
    who = (
        f"key:{api_key_id}"
        if api_key_id is not None
        else f"ip:{request.client.host if request.client else '-'}"
    )
    try:
        allowed, remaining, reset = await asyncio.to_thread(limit.hit, who)
    except Exception as error:  # the shared store (Redis) is down: say so, do not let everyone through
        raise HTTPException(
            503,
            f"the rate-limit store is not answering ({type(error).__name__})",
            headers={"Retry-After": "5"},
        ) from error
    headers = {
        "X-RateLimit-Limit": str(limit.item.amount),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset),
    }
    if not allowed:
        raise HTTPException(
            429,
            f"rate limit of {limit.item} exceeded; retry in {reset} s",
            {**headers, "Retry-After": str(reset)},
        )
    response.headers.update(headers)


RateLimitDep = Depends(rate_limited)
