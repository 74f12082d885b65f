"""Client API keys: created and revoked by an admin, stored as SHA-256 only, checked on /v1/*."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from iqa.models import ApiKey, utcnow

PREFIX = "evoq_"
KEY_CHECK_TTL_S = 2.0  # how soon other processes see a new or revoked key
MAX_CACHED_KEYS = 10_000  # distinct keys remembered at once (wrong ones too); then start afresh


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


class KeyCheck:
    """Who may call /v1/*, read from the database at most once per `ttl_s` for each key sent (and for
    "does any key exist"), so a request does not pay a database trip to be let in.

    This process's own creations and revocations clear it at once (`forget`); other processes see them
    within `ttl_s`.
    """

    def __init__(self, sessions: sessionmaker[Session], ttl_s: float) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self._known: dict[str | None, tuple[float, int | None, bool]] = {}  # digest -> (until, id, any)

    def cached(self, given: str | None, required: bool) -> tuple[int | None, bool] | None:
        """`check`'s answer when it needs no database trip (call it on the event loop), else None."""
        known = self._known.get(digest(given) if given else None)
        if known is None or known[0] <= time.monotonic():
            return None
        return self._answer(given, required, known[1], known[2])

    def check(self, given: str | None, required: bool) -> tuple[int | None, bool]:
        """(the key's id or None, whether the call is refused); a sent key must be valid even while
        /v1/* is open, so a typo never passes silently. May read the database: not on the event loop."""
        if (answer := self.cached(given, required)) is not None:
            return answer
        with self.sessions() as session:
            found = active_key_id(session, given) if given else None
            exists = found is not None or any_active_key(session)
        if len(self._known) >= MAX_CACHED_KEYS:
            self._known.clear()
        self._known[digest(given) if given else None] = (time.monotonic() + self.ttl_s, found, exists)
        return self._answer(given, required, found, exists)

    @staticmethod
    def _answer(
        given: str | None, required: bool, found: int | None, exists: bool
    ) -> tuple[int | None, bool]:
        return found, found is None and (required or exists or given is not None)

    def forget(self) -> None:
        """Read from the database again (a key was just created or revoked here)."""
        self._known.clear()
