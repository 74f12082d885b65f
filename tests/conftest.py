"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from iqa.db import make_engine, upgrade_database

# --- Databases (iqa.db, migrations): a migrated, empty database per test, on SQLite and PostgreSQL ---

POSTGRES_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"
POSTGRES_START_COMMAND = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for this test session, dropped at the end.

    Fails (never skips) when the server is down: CI runs it, and a silent skip would hide the backend.
    """
    admin = create_engine(
        f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"evoq_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL} ({exc.orig}). "
            f"Start it with: {POSTGRES_START_COMMAND}",
            pytrace=False,
        )
    try:
        yield f"{POSTGRES_SERVER_URL}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _empty_postgres(url: str) -> None:
    """Truncate every table the migrations made (bar Alembic's own), so each test starts empty."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            quote = engine.dialect.identifier_preparer.quote
            tables = [t for t in inspect(connection).get_table_names() if t != "alembic_version"]
            if tables:
                names = ", ".join(quote(t) for t in tables)
                connection.execute(text(f"TRUNCATE TABLE {names} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a database migrated to head and empty: a SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'evoq.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    if request.param == "postgres":
        _empty_postgres(url)
    return url
