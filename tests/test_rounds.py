"""The round state machine in the database (trainer.lifecycle), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from iqa.db import make_engine, make_sessionmaker
from iqa.models import EvolutionRound, Image, utcnow
from trainer import lifecycle as rounds
from trainer.config import RoundOverrides


@pytest.fixture
def sessions(database_url: str):
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_only_one_round_at_a_time_and_the_lock_is_released_when_it_ends(sessions) -> None:
    with sessions() as session:
        first = rounds.create_round(session, "manual", RoundOverrides(pairs=4), None)
        with pytest.raises(rounds.RoundConflict, match=f"round {first.id} is queued"):
            rounds.create_round(session, "schedule", RoundOverrides(), None)
        assert rounds.current_round(session).id == first.id
        rounds.advance(session, first.id, "voting", worker="host:1")
        rounds.finish(session, first.id, "succeeded")
        assert rounds.current_round(session) is None
        second = rounds.create_round(session, "manual", RoundOverrides(), None)
        assert second.id != first.id and second.lock == 1


def test_states_only_move_forward_and_record_progress(sessions) -> None:
    with sessions() as session:
        round_ = rounds.create_round(session, "manual", RoundOverrides(), None)
        rounds.advance(session, round_.id, "voting", worker="host:7")
        assert rounds.report_progress(session, round_.id, 3, 10) is True
        row = session.get_one(EvolutionRound, round_.id, populate_existing=True)
        assert row.progress == {"stage": "voting", "done": 3, "total": 10}
        assert row.worker == "host:7" and row.started_at is not None and row.heartbeat_at is not None
        rounds.advance(session, round_.id, "training")
        with pytest.raises(RuntimeError, match="cannot go back"):
            rounds.advance(session, round_.id, "voting")
        rounds.finish(session, round_.id, "rejected", gate={"passed": False, "reasons": ["spread"]})
        with pytest.raises(RuntimeError, match="already ended"):
            rounds.advance(session, round_.id, "evaluating")
        with pytest.raises(ValueError, match="not a final state"):
            rounds.finish(session, round_.id, "voting")


def test_cancel_a_queued_round_at_once_and_a_running_one_at_its_next_step(sessions) -> None:
    with sessions() as session:
        queued = rounds.create_round(session, "manual", RoundOverrides(), None)
        assert rounds.request_cancel(session, queued.id).state == "cancelled"
        running = rounds.create_round(session, "manual", RoundOverrides(), None)
        rounds.advance(session, running.id, "voting")
        assert rounds.request_cancel(session, running.id).state == "voting"
        assert rounds.report_progress(session, running.id, 1, 2) is False
        assert rounds.heartbeat(session, running.id) is False
        with pytest.raises(rounds.RoundCancelled):
            rounds.advance(session, running.id, "training")


def test_a_cancel_between_the_runners_read_and_its_write_wins(sessions) -> None:
    """The lost update a fresh-clone CI run once showed: the runner read `queued`, an admin ended the
    queued round, then the runner's write marked it `voting`. Injected here between read and write."""
    with sessions() as session:
        queued = rounds.create_round(session, "manual", RoundOverrides(), None)
    with sessions() as runner:
        read = runner.get_one

        def read_then_cancel(*args, **kwargs):
            row = read(*args, **kwargs)
            runner.commit()  # end the read transaction, as a pooled connection may between statements
            with sessions() as admin:
                assert rounds.request_cancel(admin, queued.id).state == "cancelled"
            runner.get_one = read  # once
            return row

        runner.get_one = read_then_cancel
        with pytest.raises(rounds.RoundCancelled):
            rounds.advance(runner, queued.id, "voting", worker="host:1")
    with sessions() as session:
        row = session.get_one(EvolutionRound, queued.id)
        assert row.state == "cancelled" and row.worker is None and row.lock is None


def test_a_round_whose_worker_died_is_failed_and_frees_the_lock(sessions) -> None:
    with sessions() as session:
        round_ = rounds.create_round(session, "manual", RoundOverrides(), None)
        rounds.advance(session, round_.id, "training", worker="host:99")
        assert rounds.reap_stale_rounds(session, timedelta(minutes=5)) == []
        row = session.get_one(EvolutionRound, round_.id)
        row.heartbeat_at = utcnow() - timedelta(minutes=10)
        session.commit()
        assert rounds.reap_stale_rounds(session, timedelta(minutes=5)) == [round_.id]
        row = session.get_one(EvolutionRound, round_.id, populate_existing=True)
        assert row.state == "failed" and row.lock is None
        assert "host:99 stopped reporting during training" in row.error
        assert rounds.create_round(session, "manual", RoundOverrides(), None).lock == 1


def test_new_images_are_counted_since_the_last_round(sessions) -> None:
    def add_image(session, n: int) -> None:
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

    with sessions() as session:
        add_image(session, 1)
        add_image(session, 2)
        assert rounds.images_since_last_round(session) == 2
        round_ = rounds.create_round(session, "schedule", RoundOverrides(), None)
        rounds.finish(session, round_.id, "succeeded")
        assert rounds.images_since_last_round(session) == 0
        add_image(session, 3)
        assert rounds.images_since_last_round(session) == 1
