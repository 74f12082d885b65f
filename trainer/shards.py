"""A round's stage 1 over Celery workers: its pairs split into shards on the `voting` queue.

The round's own process coordinates (`ShardedVoter`): it writes one `vote_shards` row per shard and
sends one task each. A voting worker (`vote_shard`) claims its shard with a conditional update that
raises `attempt`, reads the pairs' images from the image store, votes through the round's engine (its
shard's vLLM endpoint of `EVOQ_ROUND_VLLM_URL`, or a local engine), heartbeats while it votes, and
writes its votes only while its attempt is still the shard's. The coordinator follows the rows: it
reports progress, sends a shard again when its worker's heartbeat is older than
`EVOQ_VOTING_SHARD_TIMEOUT_S` (a lost worker; the old attempt's votes can then no longer land), fails
the round after `EVOQ_VOTING_SHARD_ATTEMPTS` starts, and cancels the shards when the round ends
early. The merged votes become labels exactly as local votes do, and the round stores them once.

Pairs with an image outside the store (a round's synthetic variants) are voted by the round itself,
beside the shards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from iqa.engines.base import Engine, ModelSpec, Sampling
from iqa.models import VoteShard, utcnow
from iqa.settings import PromptProfile, Settings
from iqa.store import ImageStore, service_store
from trainer.pool import image_from_bytes
from trainer.voting import LabelRule, VotingResult, make_label, vote_pairs

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the coordinator reads the shards
HEARTBEAT_S = 2.0  # how often a voting worker writes its progress and heartbeat


class ShardLost(RuntimeError):
    """A shard's worker was lost more often than the settings allow."""


class ShardSuperseded(RuntimeError):
    """This worker's attempt is no longer the shard's (sent again, or cancelled)."""


def split(count: int, shards: int) -> list[range]:
    """`count` pair positions in at most `shards` contiguous, balanced, non-empty ranges."""
    shards = max(1, min(shards, count))
    size, extra = divmod(count, shards)
    bounds = [k * size + min(k, extra) for k in range(shards + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(shards)]


def _is_store_key(image_id: str) -> bool:
    try:
        return ImageStore.key_for(image_id.rsplit("/", 1)[-1]) == image_id
    except ValueError:
        return False


class ShardedVoter:
    """`trainer.voting.Voter` that sends the round's votes to workers on the `voting` queue.

    `send(round_id, shard)` enqueues one shard's task (a Celery `apply_async` in production).
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        round_id: int,
        parent: ModelSpec,
        send: Callable[[int, int], None],
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.round_id = round_id
        self.parent = parent
        self.send = send

    async def __call__(
        self,
        engine: Engine,
        images: Sequence[Image.Image],
        pairs: Sequence[tuple[int, int]],
        votes_per_pair: int,
        sampling: Sampling,
        profile: PromptProfile,
        concurrency: int = 16,
        progress: Callable[[int, int], None] | None = None,
        *,
        rule: LabelRule = "hard",
        min_margin: float = 0.0,
        image_ids: Sequence[str] | None = None,
    ) -> VotingResult:
        if image_ids is None:
            raise ValueError("sharded voting needs the pool's image ids (store keys)")
        remote = [
            k for k, (i, j) in enumerate(pairs) if _is_store_key(image_ids[i]) and _is_store_key(image_ids[j])
        ]
        here = sorted(set(range(len(pairs))) - set(remote))
        ranges = split(len(remote), self.settings.voting_shards) if remote else []
        request = {
            "model": asdict(self.parent),
            "votes": votes_per_pair,
            "sampling": asdict(sampling),
            "profile": profile,
            "concurrency": concurrency,
            "max_pixels": self.settings.model_max_pixels,
        }
        members = [[remote[k] for k in positions] for positions in ranges]
        await asyncio.to_thread(self._create, members, pairs, image_ids, request)
        counts: dict[int, tuple[int, int, int]] = {}
        done = {"here": 0, "shards": 0}

        def report() -> None:
            if progress is not None:
                progress(done["here"] + done["shards"], len(pairs))

        def step(count: int, total: int) -> None:
            done["here"] = count
            report()

        async def vote_here() -> None:
            if not here:
                return
            subset = [pairs[k] for k in here]
            result = await vote_pairs(
                engine, images, subset, votes_per_pair, sampling, profile, concurrency, step
            )
            for k, label in zip(here, result.labels, strict=True):
                counts[k] = (label.votes_i, label.votes_j, label.invalid)

        local = asyncio.create_task(vote_here())
        follow: asyncio.Task[list[list[Any]]] | None = None
        try:
            for shard in range(len(members)):
                self.send(self.round_id, shard)
            follow = asyncio.create_task(self._follow(members, done, report))
            await asyncio.gather(follow, local)  # the first failure of either ends the voting
            shard_votes = follow.result()
        finally:
            tasks = [task for task in (local, follow) if task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self._cancel_unfinished)
        for shard_members, votes in zip(members, shard_votes, strict=True):
            for k, (a, b, invalid) in zip(shard_members, votes, strict=True):
                counts[k] = (a, b, invalid)
        labels = [make_label(i, j, *counts[k], rule) for k, (i, j) in enumerate(pairs)]
        return VotingResult(labels, min_margin)

    def _create(
        self,
        members: list[list[int]],
        pairs: Sequence[tuple[int, int]],
        image_ids: Sequence[str],
        request: dict[str, Any],
    ) -> None:
        with self.sessions.begin() as session:
            for shard, positions in enumerate(members):
                keys = [[image_ids[pairs[k][0]], image_ids[pairs[k][1]]] for k in positions]
                session.add(VoteShard(round_id=self.round_id, shard=shard, pairs=keys, request=request))

    async def _follow(
        self, members: list[list[int]], done: dict[str, int], report: Callable[[], None]
    ) -> list[list[Any]]:
        """Wait for every shard's votes. A running shard whose heartbeat is stale is sent again (its
        worker is lost); when nothing moved for a timeout, queued shards are sent again too (a lost
        message: duplicates are skipped by the claim), and after `attempts` such timeouts the round fails.
        Queued shards behind busy workers are only waiting: they are never counted as lost."""
        timeout = self.settings.voting_shard_timeout_s
        attempts = self.settings.voting_shard_attempts
        seen: tuple = ()
        moved = resent = time.monotonic()
        while True:
            rows = await asyncio.to_thread(self._rows)
            done["shards"] = sum(len(members[r.shard]) if r.state == "done" else r.done_pairs for r in rows)
            report()
            if all(r.state == "done" for r in rows):
                return await asyncio.to_thread(self._votes)
            now, clock = utcnow(), time.monotonic()
            state = tuple((r.state, r.attempt, r.done_pairs) for r in rows)
            if state != seen:
                seen, moved = state, clock
            for row in rows:
                quiet = row.heartbeat_at is None or (now - row.heartbeat_at).total_seconds() > timeout
                if row.state != "running" or not quiet:
                    continue
                if row.attempt >= attempts:
                    raise ShardLost(f"voting shard {row.shard} was lost {row.attempt} times ({row.worker})")
                if await asyncio.to_thread(self._requeue, row.shard, row.attempt):
                    self._send_again(row.shard)
            if clock - moved > attempts * timeout:
                raise ShardLost(
                    f"no voting shard moved in {attempts * timeout:.0f} s: is a voting worker up?"
                )
            if clock - max(moved, resent) > timeout:
                for row in rows:
                    if row.state == "queued":
                        self._send_again(row.shard)
                resent = clock
            await asyncio.sleep(POLL_S)

    def _send_again(self, shard: int) -> None:
        """Send a shard's task again; a broker that is down now is tried again at the next timeout."""
        try:
            self.send(self.round_id, shard)
        except Exception as error:  # kombu's OperationalError and the like: the broker is away
            log.warning("voting shard %s of round %s not sent again: %s", shard, self.round_id, error)

    def _rows(self) -> list[Any]:
        """What following the shards needs, without their pairs and votes (read every `POLL_S`)."""
        columns = (
            VoteShard.shard, VoteShard.state, VoteShard.attempt, VoteShard.done_pairs,
            VoteShard.heartbeat_at, VoteShard.worker,
        )  # fmt: skip
        with self.sessions() as session:
            return list(session.execute(select(*columns).where(VoteShard.round_id == self.round_id)))

    def _votes(self) -> list[list[Any]]:
        """Every shard's votes, in shard order, once all are done."""
        with self.sessions() as session:
            query = (
                select(VoteShard.votes).where(VoteShard.round_id == self.round_id).order_by(VoteShard.shard)
            )
            return [votes or [] for votes in session.scalars(query)]

    def _requeue(self, shard: int, attempt: int) -> bool:
        """Put a shard whose worker went quiet back in the queue (unless it moved on meanwhile)."""
        with self.sessions.begin() as session:
            moved = session.execute(
                update(VoteShard)
                .where(
                    VoteShard.round_id == self.round_id,
                    VoteShard.shard == shard,
                    VoteShard.attempt == attempt,
                    VoteShard.state == "running",
                )
                .values(state="queued", worker=None, done_pairs=0)
            )
            return moved.rowcount == 1

    def _cancel_unfinished(self) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(VoteShard)
                .where(VoteShard.round_id == self.round_id, VoteShard.state.in_(("queued", "running")))
                .values(state="cancelled")
            )


# ---- the voting worker's side ---------------------------------------------------------------------


def _claim(sessions: sessionmaker[Session], round_id: int, shard: int, worker: str) -> VoteShard | None:
    """Take a queued shard (attempt + 1); None when it is running elsewhere, done or cancelled."""
    with sessions.begin() as session:
        taken = session.execute(
            update(VoteShard)
            .where(VoteShard.round_id == round_id, VoteShard.shard == shard, VoteShard.state == "queued")
            .values(state="running", attempt=VoteShard.attempt + 1, worker=worker, heartbeat_at=utcnow())
        )
        if taken.rowcount != 1:
            return None
        row = session.scalars(
            select(VoteShard).where(VoteShard.round_id == round_id, VoteShard.shard == shard)
        ).one()
        session.expunge(row)
        return row


def _mine(row: VoteShard):
    return (VoteShard.id == row.id, VoteShard.attempt == row.attempt, VoteShard.state == "running")


def _beat(sessions: sessionmaker[Session], row: VoteShard, done: int) -> None:
    with sessions.begin() as session:
        beat = session.execute(
            update(VoteShard).where(*_mine(row)).values(heartbeat_at=utcnow(), done_pairs=done)
        )
        if beat.rowcount != 1:
            raise ShardSuperseded(f"voting shard {row.shard} of round {row.round_id} was taken over")


def _give_up(sessions: sessionmaker[Session], row: VoteShard, error: BaseException) -> None:
    """Mark a shard this worker cannot vote as lost now (no heartbeat), with the error where the round
    reads the worker's name: the round sends it again at its next poll instead of after a timeout, and
    names the error if every attempt fails."""
    reason = f"{row.worker} failed: {type(error).__name__}: {error}"[:200]
    with sessions.begin() as session:
        session.execute(update(VoteShard).where(*_mine(row)).values(heartbeat_at=None, worker=reason))


def _finish(sessions: sessionmaker[Session], row: VoteShard, votes: list[list[int]]) -> bool:
    with sessions.begin() as session:
        done = session.execute(
            update(VoteShard)
            .where(*_mine(row))
            .values(state="done", votes=votes, done_pairs=len(votes), heartbeat_at=utcnow())
        )
        return done.rowcount == 1


async def vote_shard(
    settings: Settings,
    sessions: sessionmaker[Session],
    round_id: int,
    shard: int,
    worker: str,
    engine_for: Callable[[Settings, ModelSpec], Any],
) -> str:
    """Vote one shard (the `voting` queue's task body); returns what became of it.

    `engine_for(settings, spec)` is an async context manager giving the engine to vote with (the
    worker's `WorkerEngines.parent`); `settings` then name this shard's vLLM endpoint first.
    """
    row = await asyncio.to_thread(_claim, sessions, round_id, shard, worker)
    if row is None:
        return "skipped"
    try:
        return await _vote_claimed(settings, sessions, row, engine_for)
    except Exception as error:  # its store or engine failed: hand the shard back at once
        try:
            await asyncio.to_thread(_give_up, sessions, row, error)
        except Exception:  # the database too: the round's timeout takes the shard back
            log.warning("could not hand voting shard %s back", row.shard, exc_info=True)
        raise


async def _vote_claimed(
    settings: Settings,
    sessions: sessionmaker[Session],
    row: VoteShard,
    engine_for: Callable[[Settings, ModelSpec], Any],
) -> str:
    """Vote a shard this worker claimed, heartbeating; "superseded" when another attempt took it."""
    shard = row.shard
    urls = settings.round_vllm_urls
    if len(urls) > 1:
        settings = settings.model_copy(update={"round_vllm_url": urls[shard % len(urls)]})
    request = row.request
    store = service_store(settings)
    keys = sorted({key for pair in row.pairs for key in pair})
    images = await asyncio.to_thread(
        lambda: [image_from_bytes(store.read(key.rsplit("/", 1)[-1]), request["max_pixels"]) for key in keys]
    )
    index = {key: k for k, key in enumerate(keys)}
    pairs = [(index[a], index[b]) for a, b in row.pairs]
    done = 0

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await asyncio.to_thread(_beat, sessions, row, done)

    def step(count: int, total: int) -> None:
        nonlocal done
        done = count

    spec = ModelSpec(**request["model"])
    beating = asyncio.create_task(heartbeat())
    try:
        async with engine_for(settings, spec) as engine:
            voting = asyncio.create_task(
                vote_pairs(
                    engine,
                    images,
                    pairs,
                    request["votes"],
                    Sampling(**request["sampling"]),
                    request["profile"],
                    request["concurrency"],
                    step,
                )
            )
            finished, _ = await asyncio.wait({voting, beating}, return_when=asyncio.FIRST_COMPLETED)
            if beating in finished:  # taken over, cancelled, or the database is gone: stop voting
                voting.cancel()
                await asyncio.gather(voting, return_exceptions=True)
                beating.result()
            result = voting.result()
    except ShardSuperseded:
        return "superseded"
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
    votes = [[label.votes_i, label.votes_j, label.invalid] for label in result.labels]
    landed = await asyncio.to_thread(_finish, sessions, row, votes)
    return "done" if landed else "superseded"
