"""When a scheduled round is due: at most one per period, and only with enough new images."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from iqa import registry, rounds
from iqa.models import EvolutionRound, utcnow
from iqa.settings import Settings


def start_scheduled_round(session: Session, settings: Settings) -> EvolutionRound | None:
    """Queue a `schedule` round when one is due; None when not (or one is already running).

    Stale rounds of dead workers are failed first, so a crash never blocks the schedule for good.
    """
    rounds.reap_stale_rounds(session, timedelta(seconds=settings.round_stale_after_s))
    if rounds.current_round(session) is not None:
        return None
    last = rounds.last_round_created(session)
    if last is not None and utcnow() - last < timedelta(hours=settings.round_every_hours):
        return None
    if rounds.images_since_last_round(session) < settings.round_min_new_images:
        return None
    active = registry.active_version(session)
    try:
        return rounds.create_round(session, "schedule", {}, active.id if active else None)
    except rounds.RoundConflict:
        return None
