"""When the schedule starts a round by itself (trainer.lifecycle), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from iqa.db import make_engine, make_sessionmaker
from iqa.models import EvolutionRound, Image, ModelVersion, utcnow
from iqa.settings import Settings
from trainer import lifecycle as rounds
from trainer.config import RoundOverrides


@pytest.fixture
def sessions(database_url: str):
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _settings(**overrides) -> Settings:
    values = {"round_every_hours": 1.0, "round_min_new_images": 3, "round_stale_after_s": 60, **overrides}
    return Settings(**values)


def _add_images(session, start: int, count: int) -> None:
    for n in range(start, start + count):
        session.add(
            Image(
                sha256=f"{n:064x}",
                storage_key="k",
                width=8,
                height=8,
                format="PNG",
                byte_size=1,
                source="score",
            )
        )
    session.commit()


def _active_version(session) -> ModelVersion:
    version = ModelVersion(name="base", kind="base", path="/m", status="active")
    session.add(version)
    session.commit()
    return version


def test_no_round_until_enough_new_images_arrived(sessions) -> None:
    with sessions() as session:
        active = _active_version(session)
        _add_images(session, 0, 2)
        assert rounds.start_scheduled_round(session, _settings()) is None
        _add_images(session, 2, 1)
        round_ = rounds.start_scheduled_round(session, _settings())
        assert round_ is not None and round_.trigger == "schedule" and round_.parent_version_id == active.id
        assert rounds.start_scheduled_round(session, _settings()) is None  # one at a time


def test_at_most_one_round_per_period(sessions) -> None:
    with sessions() as session:
        _active_version(session)
        _add_images(session, 0, 3)
        first = rounds.start_scheduled_round(session, _settings())
        rounds.finish(session, first.id, "succeeded")
        _add_images(session, 3, 5)
        assert rounds.start_scheduled_round(session, _settings()) is None  # the period has not passed
        first.created_at = utcnow() - timedelta(hours=2)
        session.commit()
        assert rounds.start_scheduled_round(session, _settings()).id != first.id


def test_a_dead_workers_round_does_not_block_the_schedule(sessions) -> None:
    with sessions() as session:
        _active_version(session)
        stuck = rounds.create_round(session, "manual", RoundOverrides(), None)
        rounds.advance(session, stuck.id, "training", worker="gone:1")
        row = session.get_one(EvolutionRound, stuck.id)
        row.created_at = row.heartbeat_at = utcnow() - timedelta(hours=2)
        session.commit()
        _add_images(session, 0, 3)
        new = rounds.start_scheduled_round(session, _settings())
        assert new is not None
        assert session.get_one(EvolutionRound, stuck.id, populate_existing=True).state == "failed"


def test_the_switch_turns_scheduled_rounds_off_but_not_admin_rounds(sessions) -> None:
    with sessions() as session:
        _active_version(session)
        _add_images(session, 0, 5)
        assert rounds.start_scheduled_round(session, _settings(rounds_scheduled=False)) is None
        assert rounds.current_round(session) is None
        manual = rounds.create_round(session, "manual", RoundOverrides(), None)  # an admin's round
        assert manual.lock == 1
        rounds.finish(session, manual.id, "succeeded", created_at=utcnow() - timedelta(hours=2))
        _add_images(session, 5, 5)
        assert rounds.start_scheduled_round(session, _settings()) is not None  # on again: due
