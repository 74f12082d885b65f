"""Migrations, engine settings and constraints of iqa.db / iqa.models, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

import migrations
from iqa.db import (
    alembic_config,
    check_database,
    current_revision,
    make_engine,
    make_sessionmaker,
    upgrade_database,
)
from iqa.models import Base, Comparison, Image, ModelVersion, Prediction

HEAD = "0005"  # the newest migration; bump with each new one

# Column name -> nullable, per table: the schema the application relies on.
EXPECTED_COLUMNS = {
    "evolution_rounds": {
        "id": False,
        "state": False,
        "lock": True,
        "trigger": False,
        "settings": False,
        "progress": True,
        "parent_version_id": True,
        "result_version_id": True,
        "metrics": True,
        "gate": True,
        "timings": True,
        "error": True,
        "worker": True,
        "cancel_requested": False,
        "created_at": False,
        "started_at": True,
        "heartbeat_at": True,
        "finished_at": True,
    },
    "vote_shards": {
        "id": False,
        "round_id": False,
        "shard": False,
        "pairs": False,
        "request": False,
        "state": False,
        "attempt": False,
        "worker": True,
        "heartbeat_at": True,
        "done_pairs": False,
        "votes": True,
    },
    "pseudo_labels": {
        "id": False,
        "round_id": False,
        "image_a_id": False,
        "image_b_id": False,
        "votes_a": False,
        "votes_b": False,
        "invalid_votes": False,
        "p_star": False,
        "holdout": False,
    },
    "model_versions": {
        "id": False,
        "name": False,
        "kind": False,
        "path": False,
        "base_path": True,
        "parent_id": True,
        "status": False,
        "untrained": False,
        "created_at": False,
        "activated_at": True,
        "metrics": True,
        "manifest": True,
    },
    "images": {
        "id": False,
        "sha256": False,
        "storage_key": False,
        "width": False,
        "height": False,
        "format": False,
        "byte_size": False,
        "first_seen_at": False,
        "last_seen_at": False,
        "times_seen": False,
        "source": False,
    },
    "api_keys": {"id": False, "name": False, "key_hash": False, "created_at": False, "revoked_at": True},
    "predictions": {
        "id": False,
        "image_id": False,
        "model_version_id": False,
        "api_key_id": True,
        "score": True,
        "score_std": True,
        "valid_samples": False,
        "samples": False,
        "prompt_profile": False,
        "sampling_key": False,
        "latency_ms": False,
        "completions": False,
        "distribution": True,
        "created_at": False,
    },
    "comparisons": {
        "id": False,
        "image_a_id": False,
        "image_b_id": False,
        "model_version_id": False,
        "api_key_id": True,
        "votes_a": False,
        "votes_b": False,
        "invalid_votes": False,
        "prob_a_better": True,
        "prompt_profile": False,
        "sampling_key": False,
        "latency_ms": False,
        "completions": False,
        "created_at": False,
    },
}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _image(sha_char: str = "a", **overrides: object) -> Image:
    fields: dict[str, object] = {
        "sha256": sha_char * 64,
        "storage_key": f"{sha_char * 2}/{sha_char * 2}/{sha_char * 64}",
        "width": 640,
        "height": 480,
        "format": "JPEG",
        "byte_size": 12345,
        "source": "score",
    }
    return Image(**(fields | overrides))


def _model_version(**overrides: object) -> ModelVersion:
    fields: dict[str, object] = {"name": "base", "kind": "base", "path": "ByteDance/EvoQuality"}
    return ModelVersion(**(fields | overrides))


def _prediction(image: Image, model_version: ModelVersion) -> Prediction:
    return Prediction(
        image=image,
        model_version=model_version,
        score=3.25,
        score_std=0.5,
        valid_samples=2,
        samples=3,
        prompt_profile="evoquality",
        sampling_key="k1",
        latency_ms=12.5,
        completions=["<think>ok</think> \\boxed{3.00}", "\\boxed{3.50}", "no answer"],
    )


def test_upgrade_creates_tables_with_expected_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == {*EXPECTED_COLUMNS, "alembic_version"}
    for table, expected in EXPECTED_COLUMNS.items():
        columns = {c["name"]: c["nullable"] for c in inspector.get_columns(table)}
        assert columns == expected, table

    indexes = {
        (table, ix["name"]): ix["column_names"]
        for table in EXPECTED_COLUMNS
        for ix in inspector.get_indexes(table)
    }
    assert indexes[("predictions", "ix_predictions_cache_lookup")] == [
        "image_id",
        "model_version_id",
        "sampling_key",
        "created_at",
    ]
    assert indexes[("images", "ix_images_last_seen_at")] == ["last_seen_at"]
    assert indexes[("comparisons", "ix_comparisons_image_a_id")] == ["image_a_id"]
    assert indexes[("comparisons", "ix_comparisons_image_b_id")] == ["image_b_id"]

    # Names from the naming convention, so later batch migrations can address them.
    assert {c["name"] for c in inspector.get_unique_constraints("images")} == {"uq_images_sha256"}
    assert {c["name"] for c in inspector.get_check_constraints("model_versions")} == {
        "ck_model_versions_kind",
        "ck_model_versions_status",
    }
    assert {fk["name"] for fk in inspector.get_foreign_keys("predictions")} == {
        "fk_predictions_image_id_images",
        "fk_predictions_model_version_id_model_versions",
        "fk_predictions_api_key_id_api_keys",
    }


def test_migration_matches_models(engine: Engine) -> None:
    """The hand-written migration and the ORM models describe the same schema (nothing to autogenerate)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_current_revision_is_head(database_url: str) -> None:
    assert current_revision(database_url) == HEAD


def test_upgrade_fresh_sqlite_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script location comes from the installed package, and a missing data folder is created."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'new' / 'data' / 'evoq.db'}"
    assert current_revision(url) is None
    upgrade_database(url)
    upgrade_database(url)  # idempotent: the app migrates at every start
    assert current_revision(url) == HEAD


def test_downgrade_to_base_then_upgrade_again(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
    assert current_revision(database_url) is None
    engine = make_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade_database(database_url)
        assert current_revision(database_url) == HEAD
        assert set(inspect(engine).get_table_names()) == {*EXPECTED_COLUMNS, "alembic_version"}
    finally:
        engine.dispose()


def test_alembic_cli_reads_url_from_settings(tmp_path: Path) -> None:
    """`alembic -c migrations/alembic.ini` (no sqlalchemy.url in the ini) migrates EVOQ_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    ini = Path(migrations.__file__).parent / "alembic.ini"
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        cwd=tmp_path,
        env={"EVOQ_DATABASE_URL": url, "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> 0001" in result.stderr
    assert current_revision(url) == HEAD


def test_rows_round_trip_with_relationships_json_and_utc(engine: Engine) -> None:
    Session = make_sessionmaker(engine)
    with Session() as session:
        model_version = _model_version(metrics={"srcc": 0.8, "pairs": [1, 2]})
        prediction = _prediction(_image(), model_version)
        session.add(prediction)
        session.commit()
        prediction_id = prediction.id

    with Session() as session:
        loaded = session.get_one(Prediction, prediction_id)
        assert loaded.image.sha256 == "a" * 64
        assert loaded.image.times_seen == 1
        assert loaded.model_version.name == "base"
        assert loaded.model_version.status == "registered"
        assert loaded.model_version.untrained is False
        assert loaded.model_version.metrics == {"srcc": 0.8, "pairs": [1, 2]}
        assert loaded.completions == ["<think>ok</think> \\boxed{3.00}", "\\boxed{3.50}", "no answer"]
        assert loaded.score == 3.25
        # Aware UTC on both backends (SQLite stores no zone at all).
        assert loaded.created_at.tzinfo is UTC
        assert abs(datetime.now(UTC) - loaded.created_at) < timedelta(minutes=1)


def test_server_defaults_apply_to_raw_inserts(engine: Engine) -> None:
    """Defaults live in the schema too, so rows written without the ORM (SQL, other tools) get them."""
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO model_versions (name, kind, path, created_at) VALUES ('m', 'base', 'p', :now)"),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO images (sha256, storage_key, width, height, format, byte_size, "
                "first_seen_at, last_seen_at, source) VALUES ('s', 'k', 1, 1, 'PNG', 1, :now, :now, 'upload')"
            ),
            {"now": now},
        )
        status, untrained = connection.execute(text("SELECT status, untrained FROM model_versions")).one()
        times_seen = connection.execute(text("SELECT times_seen FROM images")).scalar_one()
    assert (status, bool(untrained), times_seen) == ("registered", False, 1)


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    with make_sessionmaker(engine)() as session:
        session.add(_model_version(created_at=datetime.now()))
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_image_sha256_is_unique(engine: Engine) -> None:
    with make_sessionmaker(engine)() as session:
        session.add(_image("b"))
        session.commit()
        session.add(_image("b", storage_key="other"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_model_version_name_is_unique(engine: Engine) -> None:
    with make_sessionmaker(engine)() as session:
        session.add(_model_version(name="v1"))
        session.commit()
        session.add(_model_version(name="v1", path="elsewhere"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with make_sessionmaker(engine)() as session:
        model_version = _model_version()
        session.add(model_version)
        session.commit()
        session.add(
            Comparison(
                image_a_id=12345,
                image_b_id=12346,
                model_version_id=model_version.id,
                votes_a=1,
                votes_b=0,
                invalid_votes=0,
                prob_a_better=1.0,
                prompt_profile="evoquality",
                sampling_key="k",
                latency_ms=1.0,
                completions=["0"],
            )
        )
        with pytest.raises(IntegrityError):
            session.commit()


def test_deleting_an_image_deletes_its_results(engine: Engine) -> None:
    """Images may be pruned; their predictions (cache entries) go with them, in the database itself."""
    with make_sessionmaker(engine)() as session:
        prediction = _prediction(_image("c"), _model_version())
        session.add(prediction)
        session.commit()
        session.execute(text("DELETE FROM images WHERE id = :id"), {"id": prediction.image_id})
        session.commit()
        assert session.scalars(select(Prediction.id)).all() == []
        assert session.scalars(select(ModelVersion.name)).all() == ["base"]


@pytest.mark.parametrize("field", ["kind", "status"])
def test_model_version_check_constraints(engine: Engine, field: str) -> None:
    with make_sessionmaker(engine)() as session:
        session.add(_model_version(**{field: "bogus"}))
        with pytest.raises(IntegrityError, match=f"ck_model_versions_{field}"):
            session.commit()


def test_sessions_keep_objects_readable_after_commit(engine: Engine) -> None:
    with make_sessionmaker(engine)() as session:
        model_version = _model_version(name="kept")
        session.add(model_version)
        session.commit()
    # Detached now; with expire_on_commit the next access would raise DetachedInstanceError.
    assert model_version.name == "kept"
    assert model_version.id is not None


def test_check_database(engine: Engine) -> None:
    check_database(engine)
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(OperationalError):
        check_database(unreachable)


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'evoq.db'}")
    try:
        with engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert pragma == {"journal_mode": "wal", "synchronous": 1, "foreign_keys": 1, "busy_timeout": 10_000}
        assert (tmp_path / "a" / "b" / "evoq.db").is_file()
    finally:
        engine.dispose()


def test_plain_postgresql_url_uses_psycopg3() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:5432/test")
    assert engine.dialect.driver == "psycopg"
    assert engine.pool._pre_ping
