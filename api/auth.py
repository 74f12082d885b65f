"""Bearer-token guard of the admin API; the token comes from EVOQ_ADMIN_TOKEN only."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SettingsDep

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
