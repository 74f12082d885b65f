"""Engines, sessions and migrations for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

import migrations

SQLITE_BUSY_TIMEOUT_S = 10.0


def _normalize_url(url: str) -> URL:
    """Parse `url`; a bare `postgresql://` gets psycopg 3, the driver we install (not psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _set_sqlite_pragmas(dbapi_connection: sqlite3.Connection, foreign_keys: bool) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets the API read while a worker writes; NORMAL is durable enough under WAL.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    finally:
        cursor.close()


def make_engine(url: str, *, foreign_keys: bool = True) -> Engine:
    """An engine tuned for the backend: SQLite shared across threads and processes, PostgreSQL pre-pinged.

    `foreign_keys=False` is for migrations only: SQLite batch mode rebuilds a table by dropping it, and
    with enforcement on that drop would delete (cascade) or refuse on the rows that refer to it.
    """
    parsed = _normalize_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:  # a file path (":memory:" and "" have "." as parent, which exists)
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
            _set_sqlite_pragmas(dbapi_connection, foreign_keys)

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (they are returned from routes and tasks)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` with the installed `migrations` package, independent of the cwd.

    It names no ini file, so `migrations/env.py` leaves the application's logging alone.
    """
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # ConfigParser interpolates `%`, which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str) -> None:
    """Bring the schema at `url` to the newest migration (creating it on an empty database)."""
    command.upgrade(alembic_config(url), "head")


def current_revision(url: str) -> str | None:
    """The migration the database at `url` is at; None for a database never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def check_database(engine: Engine) -> None:
    """Raise (SQLAlchemy's error) unless the database answers a query; for health checks and start-up."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1")).scalar_one()
