"""iqa.keys.KeyCheck: the per-process view of client keys, on a real database shared by two processes'
worth of checkers (two KeyCheck objects, as two API workers would hold)."""

from __future__ import annotations

import time

from iqa import keys
from iqa.db import make_engine, make_sessionmaker, upgrade_database


def test_a_key_made_or_revoked_elsewhere_takes_effect_within_the_ttl(database_url: str) -> None:
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        sessions = make_sessionmaker(engine)
        here, elsewhere = keys.KeyCheck(sessions, ttl_s=0.5), keys.KeyCheck(sessions, ttl_s=0.5)
        assert here.check(None, required=False) == (None, False)  # open: no key exists
        assert here.check("evoq_typo", required=False) == (None, True)  # a wrong key never passes
        assert here.check(None, required=True) == (None, True)

        with sessions.begin() as session:  # another process makes the first key
            row, key = keys.create_key(session, "alice")
            alice = row.id
        elsewhere.forget()
        assert here.cached(None, required=False) == (None, False), "still the view of the last read"
        assert elsewhere.check(None, required=False) == (None, True), "the maker's process: at once"
        assert elsewhere.check(key, required=False) == (alice, False)
        time.sleep(0.6)
        assert here.cached(None, required=False) is None, "the view expired: the next check reads again"
        assert here.check(None, required=False) == (None, True)
        assert here.check(key, required=False) == (alice, False)

        with sessions.begin() as session:
            keys.revoke_key(session, alice)
        assert here.check(key, required=False) == (alice, False), "cached for at most the ttl"
        time.sleep(0.6)
        assert here.check(key, required=False) == (None, True)
    finally:
        engine.dispose()
