"""The gate inside a real round: a deliberately broken candidate is rejected and the active model stays.

The round is real (database, image store, voting by the demo model, GRPO in a child process); only the
candidate's answers are replaced, on purpose, by a scripted engine that is broken in a known way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from iqa import registry
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.engines.base import (
    Engine,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    ReadingRequest,
    ReadingResult,
)
from iqa.models import EvolutionRound, ModelVersion
from iqa.settings import Settings
from iqa.store import ImageStore
from tests.worker.conftest import log_photos
from tests.worker.test_inprocess_rounds import TINY_ROUND
from trainer.config import RoundOverrides
from trainer.lifecycle import WorkerEngines, create_round, execute_round


class BrokenEngine:
    """A candidate that answers every request with the same text."""

    def __init__(self, spec: ModelSpec, answer: str) -> None:
        self.active = spec
        self.answer = answer

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult([self.answer] * request.n, self.active)

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """The same opinion for every image: every candidate equally likely."""
        return ReadingResult([[-2.3] * len(request.candidates) for _ in request.prefixes], self.active)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("<think>fine</think> \\boxed{3.00}", "collapsed"),  # the same score for every image
        ("I cannot rate this picture.", "parse-failure rate"),  # unparsable text
    ],
    ids=["same-score", "unparsable"],
)
def test_a_broken_candidate_is_rejected(
    answer: str, reason: str, demo_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'evoq.db'}"
    upgrade_database(url)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=url,
        model=str(demo_model_dir),
        device="cpu",
        **{**TINY_ROUND, "round_holdout_fraction": 0.5},
    )
    sessions = make_sessionmaker(make_engine(url))
    store = ImageStore(tmp_path / "images")
    log_photos(sessions, store, 6)
    with sessions() as session:
        base = registry.ensure_base_version(session, "demo (untrained)", str(demo_model_dir), True)
        round_id = create_round(session, "manual", RoundOverrides(seed=0), base.id).id

    class BrokenCandidate(WorkerEngines):
        """The worker's engines, with the candidate's answers replaced."""

        @asynccontextmanager
        async def candidate(self, spec: ModelSpec) -> AsyncIterator[Engine]:
            yield BrokenEngine(spec, answer)  # type: ignore[misc]

    state = asyncio.run(execute_round(round_id, settings, sessions, BrokenCandidate(settings, sessions)))

    assert state == "rejected"
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert row.state == "rejected" and row.lock is None
        assert row.gate["passed"] is False and any(reason in r for r in row.gate["reasons"]), row.gate
        assert reason in row.error
        active = session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).one()
        assert active.id == base.id  # the active model keeps serving
        candidate = session.get_one(ModelVersion, row.result_version_id)
        assert candidate.status == "registered" and Path(candidate.path).is_dir()
