"""The scoring service: intake, storage, logging, result cache and the engine, without any web framework.

One request's flow per image: hash the bytes; answer from the result cache when this image was already
scored by the active version with the same sampling; else validate and decode, store the original
bytes (content-addressed), log the image row, run the engine, log the prediction. The image is stored
and logged before the model runs, so an engine failure loses nothing that was accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Engine as DBEngine
from sqlalchemy.orm import Session, sessionmaker

from iqa import keys, ranking, records, registry
from iqa.db import check_database, make_engine, make_sessionmaker
from iqa.demo_model import build_demo_model, demo_name, is_demo_model, is_untrained
from iqa.engines.base import Engine, EngineUnavailable, ModelSpec, Sampling
from iqa.images import DecodedImage, ImageRejected, check_content_type, decode_image
from iqa.metrics import CACHE_HITS, IN_FLIGHT, PARSE_FAILURES, SAMPLES, SHED, UNKEPT
from iqa.models import ModelVersion
from iqa.reading import read_compare, read_score
from iqa.scoring import CompareResult, ScoreResult, compare_images, score_image
from iqa.settings import Settings
from iqa.store import service_store

if TYPE_CHECKING:
    from iqa.engines.vllm import StagedModel

log = logging.getLogger(__name__)

DEMO_NAME = "demo (untrained)"
Mode = Literal["sampled", "fast"]  # sampled reasoning completions, or one reading of the answer digits
RETRY_FAILED_ACTIVATION_S = 30.0
MIN_RANK_IMAGES, MAX_RANK_IMAGES = 2, 64


@dataclass(frozen=True)
class Upload:
    """One uploaded file as received."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None
    field: str = "images"


class AtCapacity(EngineUnavailable):
    """`max_queued_requests` client requests are already at the engine (503 at once)."""


@dataclass(frozen=True)
class ScoredImage:
    """The answer for one image of a score request."""

    sha256: str
    score: float | None
    std: float | None
    valid_samples: int
    samples: int
    completions: list[str]
    model: ModelSpec
    prediction_id: int | None  # None: the request asked not to be kept
    cached: bool
    latency_ms: float
    mode: Mode = "sampled"
    distribution: dict[str, float] | None = None  # fast: P(first answer digit), "1".."5"


@dataclass(frozen=True)
class ComparedPair:
    """The answer for a compare request."""

    sha256_a: str
    sha256_b: str
    votes_a: int
    votes_b: int
    invalid: int
    prob_a_better: float | None
    winner: str | None
    completions: list[str]
    model: ModelSpec
    comparison_id: int | None  # None: the request asked not to be kept
    latency_ms: float
    mode: Mode = "sampled"


@dataclass(frozen=True)
class RankedSet:
    """The answer for a rank request: the images as decoded, the votes and fit, the comparison rows."""

    images: list[DecodedImage]
    plan: ranking.RankPlan
    model: ModelSpec
    comparison_ids: dict[tuple[int, int], list[int]]  # per pair (i < j): its logged comparisons


def _winner(prob_a_better: float | None) -> str | None:
    """'a' or 'b' by a reading's probability; None for exactly even or no reading."""
    if prob_a_better is None or prob_a_better == 0.5:
        return None
    return "a" if prob_a_better > 0.5 else "b"


def _where(upload: Upload) -> str:
    """How an error message names an upload: its field and file name."""
    return f"{upload.field} ({upload.filename})" if upload.filename else upload.field


def configured_model(settings: Settings) -> tuple[str, str, bool]:
    """(name, path, untrained) of the configured base model; builds the demo model when none is set."""
    if settings.model is None:
        folder = settings.demo_model_dir
        if not is_demo_model(folder):
            log.warning("no model configured: building the untrained demo model in %s", folder)
            build_demo_model(folder)
        return DEMO_NAME, str(folder.resolve()), True
    untrained = Path(settings.model).is_dir() and is_untrained(settings.model)
    default_name = demo_name(settings.model) or settings.model
    return settings.model_name or default_name, settings.model, untrained


class IQAService:
    """Everything a request needs, built once per process from the settings."""

    def __init__(self, settings: Settings, engine: Engine, db_engine: DBEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db_engine or make_engine(settings.database_url or "")
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.db)
        self.store = service_store(settings)
        self._failed_activations: dict[int, float] = {}  # version id -> when loading it last failed
        self._activation_lock = asyncio.Lock()
        self.round_stale_after = timedelta(seconds=settings.round_stale_after_s)
        self._admitted = 0  # client requests at the engine now (see `admitted`)
        self.key_check = keys.KeyCheck(self.sessions, keys.KEY_CHECK_TTL_S)

    # ---- sampling -------------------------------------------------------------------------------
    def sampling(self, kind: str) -> Sampling:
        """Sampling settings for `kind` ('score' or 'vote') on the active model."""
        constrain = self.settings.constrain_answers
        if constrain is None:
            constrain = self.engine.active.untrained
        return Sampling(
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_new_tokens=self.settings.max_new_tokens,
            constrain=kind if constrain else None,  # type: ignore[arg-type]
        )

    def sampling_key(self, n: int, sampling: Sampling) -> str:
        """The cache key part that says how a result was sampled."""
        return f"{self.settings.prompt_profile};n={n};{sampling.key()}"

    def reading_key(self) -> str:
        """The cache key part of a one-pass reading (deterministic: nothing else changes it)."""
        return f"{self.settings.prompt_profile};mode=fast"

    # ---- intake ---------------------------------------------------------------------------------
    def _decode(self, upload: Upload) -> DecodedImage:
        """Validate and decode; a rejection names the field and file it is about."""
        try:
            check_content_type(upload.content_type)
            return decode_image(
                upload.data,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_image_pixels,
                min_side=self.settings.min_image_side,
            )
        except ImageRejected as error:
            raise ImageRejected(error.status, error.code, f"{_where(upload)}: {error.message}") from error

    def _accept(self, decoded: DecodedImage, source: str) -> int:
        """Store the bytes, then log the row, so a row never points at a missing file."""
        stored = self.store.put(decoded.data, decoded.sha256)
        with self.sessions.begin() as session:
            return records.upsert_image(session, decoded, stored.key, source)

    def _cache_lookup(
        self, sha256: str, version_id: int, key: str, mode: Mode = "sampled"
    ) -> tuple[int, ScoredImage] | None:
        """(image id, cached answer) for this image, version and sampling; read only."""
        with self.sessions() as session:
            hit = records.cached_prediction(session, sha256, version_id, key)
            if hit is None:
                return None
            image, prediction = hit
            model = (
                self.engine.active
                if self.engine.active.version_id == version_id
                else registry.to_spec(prediction.model_version)
            )
            answer = ScoredImage(
                sha256=sha256,
                score=prediction.score,
                std=prediction.score_std,
                valid_samples=prediction.valid_samples,
                samples=prediction.samples,
                completions=prediction.completions,
                model=model,
                prediction_id=prediction.id,
                cached=True,
                latency_ms=0.0,
                mode=mode,
                distribution=prediction.distribution,
            )
            return image.id, answer

    def _intake(
        self, uploads: list[Upload], version_id: int, key: str, mode: Mode = "sampled"
    ) -> tuple[list[ScoredImage | None], list[tuple[int, int, DecodedImage]]]:
        """Cache answers and decoded new images of a request, in one trip off the event loop.

        Every upload is checked first; only when all pass are the cache hits counted as seen and the
        new images stored and logged. Returns the answers (None where the model must run) and the
        (position, image id, decoded image) of the images to score.
        """
        results: list[ScoredImage | None] = []
        new: list[tuple[int, DecodedImage]] = []
        seen_again: list[int] = []
        for index, upload in enumerate(uploads):
            self._check_size(upload)
            hit = self._cache_lookup(hashlib.sha256(upload.data).hexdigest(), version_id, key, mode)
            if hit is None:
                results.append(None)
                new.append((index, self._decode(upload)))
            else:
                seen_again.append(hit[0])
                results.append(hit[1])
        CACHE_HITS.inc(len(seen_again))
        if seen_again:
            with self.sessions.begin() as session:
                for image_id in seen_again:
                    records.touch_image(session, image_id)
        return results, [(index, self._accept(decoded, "score"), decoded) for index, decoded in new]

    # ---- score ----------------------------------------------------------------------------------
    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A place at the engine for one client request, or EngineUnavailable (503) at once when
        `max_queued_requests` are already there: a bounded wait instead of an unbounded queue. Taken by
        `api.limits.EngineAdmission` before the request's body is even read."""
        limit = self.settings.max_queued_requests
        if limit and self._admitted >= limit:
            SHED.inc()
            raise AtCapacity(f"the service is at capacity ({limit} requests at the engine); retry shortly", 1)
        self._admitted += 1
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            self._admitted -= 1
            IN_FLIGHT.dec()

    async def score(
        self,
        uploads: list[Upload],
        samples: int | None = None,
        api_key_id: int | None = None,
        keep: bool = True,
        mode: Mode = "sampled",
    ) -> list[ScoredImage]:
        """Score every upload; all are validated before anything is logged or sent to the model. With
        `keep=False` nothing is stored, logged or read from the cache (and no round ever sees it).
        `mode="fast"` reads the answer-digit distribution in one pass instead of sampling (`samples`
        is then unused)."""
        n = samples or self.settings.score_samples
        sampling = self.sampling("score")
        key = self.sampling_key(n, sampling) if mode == "sampled" else self.reading_key()
        version_id = self.engine.active.version_id
        if keep:
            results, to_score = await asyncio.to_thread(self._intake, uploads, version_id, key, mode)
        else:
            UNKEPT.inc()
            decoded = await asyncio.to_thread(self._decode_all, uploads)
            results, to_score = [None] * len(uploads), [(k, None, d) for k, d in enumerate(decoded)]
        scored = await asyncio.gather(
            *(
                self._score_one(image_id, decoded, n, sampling, key, api_key_id, mode)
                for _, image_id, decoded in to_score
            )
        )
        for (index, _, _), result in zip(to_score, scored, strict=True):
            results[index] = result
        return [r for r in results if r is not None]

    def _decode_all(self, uploads: list[Upload]) -> list[DecodedImage]:
        for upload in uploads:
            self._check_size(upload)
        return [self._decode(upload) for upload in uploads]

    def _check_size(self, upload: Upload) -> None:
        limit = self.settings.max_upload_bytes
        if len(upload.data) > limit:
            message = f"{_where(upload)}: file has {len(upload.data)} bytes; the limit is {limit}"
            raise ImageRejected(413, "too_large", message)

    async def _score_one(
        self,
        image_id: int | None,
        decoded: DecodedImage,
        n: int,
        sampling: Sampling,
        key: str,
        api_key_id: int | None,
        mode: Mode = "sampled",
    ) -> ScoredImage:
        started = time.perf_counter()
        profile = self.settings.prompt_profile
        distribution = None
        if mode == "fast":
            reading = await read_score(self.engine, decoded.image, profile)
            result = ScoreResult(reading.score, reading.std, 0, 0, [], [], reading.model)
            distribution = reading.first_digit
        else:
            result = await score_image(self.engine, decoded.image, n, sampling, profile)
        latency = (time.perf_counter() - started) * 1000
        SAMPLES.labels("score").inc(result.samples)
        PARSE_FAILURES.labels("score").inc(result.samples - result.valid)

        def log_prediction() -> int | None:
            if image_id is None:  # not kept
                return None
            with self.sessions.begin() as session:
                return records.add_prediction(
                    session, image_id, result, profile, key, latency, api_key_id, distribution
                )

        prediction_id = await asyncio.to_thread(log_prediction)
        return ScoredImage(
            sha256=decoded.sha256,
            score=result.score,
            std=result.std,
            valid_samples=result.valid,
            samples=result.samples,
            completions=result.completions,
            model=result.model,
            prediction_id=prediction_id,
            cached=False,
            latency_ms=latency,
            mode=mode,
            distribution=distribution,
        )

    # ---- compare --------------------------------------------------------------------------------
    async def compare(
        self,
        upload_a: Upload,
        upload_b: Upload,
        votes: int | None = None,
        api_key_id: int | None = None,
        keep: bool = True,
        mode: Mode = "sampled",
    ) -> ComparedPair:
        """Votes on which of two images is better; both are stored and logged first (with `keep=False`,
        neither is stored and nothing is logged). `mode="fast"` reads the vote digit's distribution in
        both orders instead of sampling votes (`votes` is then unused)."""
        n = votes or self.settings.compare_votes
        sampling = self.sampling("vote")

        def intake() -> tuple[DecodedImage, DecodedImage, int | None, int | None]:
            a, b = self._decode_all([upload_a, upload_b])
            if not keep:
                UNKEPT.inc()
                return a, b, None, None
            return a, b, self._accept(a, "compare"), self._accept(b, "compare")

        decoded_a, decoded_b, id_a, id_b = await asyncio.to_thread(intake)
        started = time.perf_counter()
        profile = self.settings.prompt_profile
        if mode == "fast":
            reading = await read_compare(self.engine, decoded_a.image, decoded_b.image, profile)
            result = CompareResult(0, 0, 0, reading.prob_a_better, [], [], reading.model)
            key = self.reading_key()
        else:
            result = await compare_images(self.engine, decoded_a.image, decoded_b.image, n, sampling, profile)
            key = self.sampling_key(n, sampling)
        latency = (time.perf_counter() - started) * 1000
        SAMPLES.labels("vote").inc(len(result.completions))
        PARSE_FAILURES.labels("vote").inc(result.invalid)

        def log_comparison() -> int | None:
            if id_a is None or id_b is None:  # not kept
                return None
            with self.sessions.begin() as session:
                return records.add_comparison(
                    session, id_a, id_b, result, self.settings.prompt_profile, key, latency, api_key_id
                )

        comparison_id = await asyncio.to_thread(log_comparison)
        return ComparedPair(
            sha256_a=decoded_a.sha256,
            sha256_b=decoded_b.sha256,
            votes_a=result.votes_a,
            votes_b=result.votes_b,
            invalid=result.invalid,
            prob_a_better=result.prob_a_better,
            winner=_winner(result.prob_a_better) if mode == "fast" else result.winner,
            completions=result.completions,
            model=result.model,
            comparison_id=comparison_id,
            latency_ms=latency,
            mode=mode,
        )

    # ---- rank -----------------------------------------------------------------------------------
    async def rank(
        self,
        uploads: list[Upload],
        budget: int | None = None,
        api_key_id: int | None = None,
        keep: bool = True,
        seed: int | None = None,
    ) -> RankedSet:
        """Rank a set of images by pairwise votes (`iqa.ranking`): all are validated, stored and logged
        first; every comparison is logged like a `/v1/compare` one (nothing with `keep=False`).
        `budget` is the total of votes (default `compare_votes` per image, at least two per design pair)."""
        n = len(uploads)
        design = len(ranking.design_pairs(n, 0)) if n >= 2 else 0
        if not MIN_RANK_IMAGES <= n <= MAX_RANK_IMAGES:
            raise ImageRejected(
                422, "bad_request", f"images: {MIN_RANK_IMAGES} to {MAX_RANK_IMAGES}; got {n}"
            )
        budget = budget or max(2 * design, self.settings.compare_votes * n)
        if budget < 2 * design:
            raise ImageRejected(
                422, "bad_request", f"votes: {n} images need at least {2 * design} (two per first pair)"
            )
        sampling = self.sampling("vote")
        key = self.sampling_key(2, sampling)
        profile = self.settings.prompt_profile

        def intake() -> tuple[list[DecodedImage], list[int | None]]:
            decoded = self._decode_all(uploads)
            first: dict[str, int] = {}
            for k, image in enumerate(decoded):
                if image.sha256 in first:
                    raise ImageRejected(
                        422,
                        "duplicate_image",
                        f"images[{k}] is the same file as images[{first[image.sha256]}]; "
                        "rank distinct images",
                    )
                first[image.sha256] = k
            if not keep:
                UNKEPT.inc()
                return decoded, [None] * n
            return decoded, [self._accept(image, "rank") for image in decoded]

        decoded, ids = await asyncio.to_thread(intake)
        models: dict[int, ModelSpec] = {}
        logged: dict[tuple[int, int], list[int]] = {}

        async def vote(i: int, j: int, k: int) -> tuple[int, int, int]:
            started = time.perf_counter()
            result = await compare_images(
                self.engine, decoded[i].image, decoded[j].image, k, sampling, profile
            )
            latency = (time.perf_counter() - started) * 1000
            models[result.model.version_id] = result.model
            SAMPLES.labels("vote").inc(len(result.completions))
            PARSE_FAILURES.labels("vote").inc(result.invalid)
            id_i, id_j = ids[i], ids[j]
            if id_i is not None and id_j is not None:

                def log_comparison() -> int:
                    with self.sessions.begin() as session:
                        return records.add_comparison(
                            session, id_i, id_j, result, profile, key, latency, api_key_id
                        )

                logged.setdefault((min(i, j), max(i, j)), []).append(await asyncio.to_thread(log_comparison))
            return result.votes_a, result.votes_b, result.invalid

        plan = await ranking.rank(n, budget, 2, vote, seed=0 if seed is None else seed)
        if len(models) != 1:
            raise EngineUnavailable("the model version changed while the set was ranked; ask again", 1)
        return RankedSet(images=decoded, plan=plan, model=next(iter(models.values())), comparison_ids=logged)

    # ---- model version ----------------------------------------------------------------------------
    def _active_spec_in_db(self) -> ModelSpec | None:
        with self.sessions() as session:
            version = registry.active_version(session)
            return registry.to_spec(version) if version else None

    async def follow_active_version(self) -> bool:
        """Swap the engine to the version the database marks active; True when it swapped.

        Every API process runs this every few seconds, so replicas converge on one version after a
        round or a rollback. A version that fails to load is logged and the old one keeps serving.
        """
        async with self._activation_lock:
            wanted = await asyncio.to_thread(self._active_spec_in_db)
            if wanted is None or wanted.version_id == self.engine.active.version_id:
                return False
            failed_at = self._failed_activations.get(wanted.version_id)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_ACTIVATION_S:
                return False
            try:
                await self.engine.activate(wanted)
            except Exception:
                self._failed_activations[wanted.version_id] = time.monotonic()
                log.exception("cannot activate %s; still serving %s", wanted.name, self.engine.active.name)
                return False
            log.info("now serving model version %s", wanted.name)
            return True

    async def activate_version(self, version: ModelSpec, staged: StagedModel | None = None) -> None:
        """Load `version` here (or promote it from where a round `staged` it on the vLLM engine), then
        mark it active for every process (a version that fails to load raises and changes nothing).
        Holds the same lock as the follower, so the two never race."""
        async with self._activation_lock:
            if staged is not None:
                await staged.engine.promote(staged, version)
            else:
                await self.engine.activate(version)

            def mark() -> None:
                with self.sessions() as session:
                    registry.mark_active(session, session.get_one(ModelVersion, version.version_id))
                    session.commit()

            await asyncio.to_thread(mark)

    # ---- health ---------------------------------------------------------------------------------
    async def readiness(self) -> dict:
        """Database and engine status; raises when either cannot serve."""
        await asyncio.to_thread(check_database, self.db)
        engine_status = await self.engine.health()
        return {"database": "ok", "engine": engine_status}


def register_configured_model(settings: Settings, sessions: sessionmaker[Session]) -> ModelSpec:
    """Make sure the configured base model has a version row; return the version to serve."""
    name, path, untrained = configured_model(settings)
    with sessions() as session:
        return registry.to_spec(registry.ensure_base_version(session, name, path, untrained))
