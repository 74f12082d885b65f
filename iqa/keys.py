"""Client API keys: created and revoked by an admin, stored as SHA-256 only, checked on /v1/*."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from iqa.models import ApiKey, utcnow

PREFIX = "evoq_"


def digest(key: str) -> str:
    """What is stored of a key (a high-entropy random key needs no slow hash)."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """A new key row and the key itself, which is never stored and cannot be shown again."""
    key = PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=digest(key))
    session.add(row)
    session.flush()
    return row, key


def revoke_key(session: Session, key_id: int) -> ApiKey | None:
    """Revoke a key (its rows keep naming it); None when there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def active_key_id(session: Session, key: str) -> int | None:
    """The id of the active key `key`, or None."""
    return session.scalar(
        select(ApiKey.id).where(ApiKey.key_hash == digest(key), ApiKey.revoked_at.is_(None))
    )


def any_active_key(session: Session) -> bool:
    """Whether a key exists: from then on /v1/* requires one."""
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
