"""Evolution rounds as a state machine in the database, shared by the API (trigger, watch, cancel)
and the workers (run, heartbeat, finish).

queued -> voting -> training -> evaluating -> swapping -> succeeded
                                           \\-> rejected (the gate said no; the active model stays)
any running state -> failed (error, or its worker died: no heartbeat) | cancelled (on request)

The `lock` column is 1 for the one round that is queued or running and NULL otherwise; its unique
constraint makes a second concurrent round impossible even across processes and crashes. A round
whose heartbeat is older than the stale timeout is failed by `reap_stale_rounds`, which frees the
lock; the active model is never touched by that.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from iqa.models import ROUND_ACTIVE_STATES, EvolutionRound, Image, utcnow

FINAL_STATES = ("succeeded", "rejected", "failed", "cancelled")
_ORDER = ("queued", "voting", "training", "evaluating", "swapping")


class RoundConflict(RuntimeError):
    """Another round is queued or running."""


class RoundCancelled(RuntimeError):
    """Raised inside a running round when an admin asked to cancel it."""


def create_round(
    session: Session, trigger: str, settings: dict[str, Any], parent_version_id: int | None
) -> EvolutionRound:
    """Queue a new round, or raise RoundConflict when one is already queued or running."""
    round_ = EvolutionRound(
        trigger=trigger,
        settings=settings,
        parent_version_id=parent_version_id,
        progress={"stage": "queued", "done": 0, "total": 0},
    )
    session.add(round_)
    try:
        session.commit()
    except IntegrityError as error:
        session.rollback()
        running = current_round(session)
        detail = f" (round {running.id} is {running.state})" if running else ""
        raise RoundConflict(f"an evolution round is already in progress{detail}") from error
    return round_


def current_round(session: Session) -> EvolutionRound | None:
    """The round holding the lock, if any."""
    return session.scalars(select(EvolutionRound).where(EvolutionRound.lock == 1)).first()


def advance(session: Session, round_id: int, state: str, worker: str | None = None) -> EvolutionRound:
    """Move a running round to the next running state; raise RoundCancelled when cancel was asked."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    if round_.state not in ROUND_ACTIVE_STATES:
        raise RuntimeError(f"round {round_id} already ended ({round_.state})")
    if round_.cancel_requested:
        raise RoundCancelled(f"round {round_id} was cancelled")
    if _ORDER.index(state) < _ORDER.index(round_.state):
        raise RuntimeError(f"round {round_id} cannot go back from {round_.state} to {state}")
    now = utcnow()
    round_.state = state
    round_.progress = {"stage": state, "done": 0, "total": 0}
    round_.heartbeat_at = now
    if round_.started_at is None:
        round_.started_at = now
    if worker:
        round_.worker = worker
    session.commit()
    return round_


def report_progress(session: Session, round_id: int, done: int, total: int) -> bool:
    """Store progress and beat the heart; returns False when a cancel was requested."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    round_.progress = {"stage": round_.state, "done": done, "total": total}
    round_.heartbeat_at = utcnow()
    session.commit()
    return not round_.cancel_requested


def heartbeat(session: Session, round_id: int) -> bool:
    """Mark the round alive; returns False when a cancel was requested."""
    session.execute(
        update(EvolutionRound)
        .where(EvolutionRound.id == round_id, EvolutionRound.lock == 1)
        .values(heartbeat_at=utcnow())
    )
    session.commit()
    cancelled = session.scalar(select(EvolutionRound.cancel_requested).where(EvolutionRound.id == round_id))
    return not cancelled


def finish(session: Session, round_id: int, state: str, **fields: Any) -> EvolutionRound:
    """End a round in a final state, release the lock, and record what happened."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state} is not a final state")
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    round_.state = state
    round_.lock = None
    round_.finished_at = utcnow()
    for name, value in fields.items():
        setattr(round_, name, value)
    session.commit()
    return round_


def request_cancel(session: Session, round_id: int) -> EvolutionRound:
    """Ask a round to stop; a queued round is cancelled at once, a running one at its next check."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    if round_.state in FINAL_STATES:
        return round_
    if round_.state == "queued":
        return finish(session, round_id, "cancelled", error="cancelled before it started")
    round_.cancel_requested = True
    session.commit()
    return round_


def reap_stale_rounds(session: Session, stale_after: timedelta) -> list[int]:
    """Fail rounds whose worker stopped beating (crashed or killed) or that no worker ever took."""
    cutoff = utcnow() - stale_after
    stale = session.scalars(
        select(EvolutionRound).where(
            EvolutionRound.lock == 1,
            func.coalesce(EvolutionRound.heartbeat_at, EvolutionRound.created_at) < cutoff,
        )
    ).all()
    for round_ in stale:
        if round_.state == "queued":
            error = "no worker started the round; the active model was left unchanged"
        else:
            error = (
                f"worker {round_.worker or '?'} stopped reporting during {round_.state}; "
                "the active model was left unchanged"
            )
        finish(session, round_.id, "failed", error=error)
    return [r.id for r in stale]


def images_since_last_round(session: Session) -> int:
    """Images first seen after the newest round was created (all images when there was none)."""
    last = session.scalar(select(func.max(EvolutionRound.created_at)))
    query = select(func.count(Image.id))
    if last is not None:
        query = query.where(Image.first_seen_at > last)
    return session.scalar(query) or 0


def last_round_created(session: Session) -> datetime | None:
    """When the newest round was created, or None."""
    return session.scalar(select(func.max(EvolutionRound.created_at)))
