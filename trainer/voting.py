"""Stage 1 of EvoQuality: pseudo-labels for image pairs by majority vote of the current model.

Each pair gets K `c_compare` votes through `iqa.scoring.compare_images` (order balanced and mapped back
to the images, unparsable votes dropped and counted). The paper's label is hard: 1, 0 or 0.5 for a
tie. A soft label K_i / (K_i + K_j) and a vote-margin filter are offered as options; both default off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from PIL import Image

from iqa.engines.base import Engine, Sampling
from iqa.scoring import compare_images
from iqa.settings import PromptProfile

LabelRule = Literal["hard", "soft"]


def pseudo_preference(votes_i: int, votes_j: int) -> float:
    """The paper's p*(x_i, x_j): 1 if i has more votes, 0 if fewer, 0.5 on a tie (0-0 included)."""
    if votes_i > votes_j:
        return 1.0
    if votes_i < votes_j:
        return 0.0
    return 0.5


def soft_label(votes_i: int, votes_j: int) -> float:
    """K_i / (K_i + K_j): keeps the vote confidence; 0.5 when no vote was valid."""
    total = votes_i + votes_j
    return votes_i / total if total else 0.5


def vote_margin(votes_i: int, votes_j: int) -> float:
    """|K_i - K_j| / (K_i + K_j), how decisive the vote was; 0 when no vote was valid."""
    total = votes_i + votes_j
    return abs(votes_i - votes_j) / total if total else 0.0


@dataclass(frozen=True)
class PairLabel:
    """Votes for images i and j (indices into the pool) and the resulting p*(x_i, x_j)."""

    i: int
    j: int
    votes_i: int
    votes_j: int
    invalid: int
    p_star: float

    @property
    def margin(self) -> float:
        """How decisive the vote was (see `vote_margin`)."""
        return vote_margin(self.votes_i, self.votes_j)

    @property
    def tie(self) -> bool:
        """Equal valid votes, including no valid vote at all."""
        return self.votes_i == self.votes_j


def make_label(
    i: int, j: int, votes_i: int, votes_j: int, invalid: int, rule: LabelRule = "hard"
) -> PairLabel:
    """A PairLabel with p* from the hard (paper) or soft rule."""
    p_star = pseudo_preference(votes_i, votes_j) if rule == "hard" else soft_label(votes_i, votes_j)
    return PairLabel(i, j, votes_i, votes_j, invalid, p_star)


class Voter(Protocol):
    """Where a round's stage 1 runs: `vote_pairs` on the round's own engine, or elsewhere with the same
    arguments and result (`trainer.shards.ShardedVoter`); `image_ids` are the pool's ids of `images`."""

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
    ) -> VotingResult: ...


@dataclass(frozen=True)
class VotingResult:
    """Every voted pair (in the order given) and the totals a round reports."""

    labels: list[PairLabel]
    min_margin: float = 0.0

    @property
    def kept(self) -> list[PairLabel]:
        """The labels to train on: those whose vote margin reaches `min_margin` (all by default)."""
        return [label for label in self.labels if label.margin >= self.min_margin]

    @property
    def votes(self) -> int:
        """Votes asked for, valid or not."""
        return sum(label.votes_i + label.votes_j + label.invalid for label in self.labels)

    @property
    def invalid_votes(self) -> int:
        """Unparsable votes, dropped from the counts."""
        return sum(label.invalid for label in self.labels)

    @property
    def invalid_rate(self) -> float:
        """Share of unparsable votes (0 when nothing was voted)."""
        return self.invalid_votes / self.votes if self.votes else 0.0

    @property
    def ties(self) -> int:
        """Pairs with equal valid votes (p* = 0.5 under the hard rule)."""
        return sum(label.tie for label in self.labels)

    def to_rows(self) -> list[dict]:
        """One plain dict per pair for persisting; `kept` says whether it passed the margin filter."""
        return [{**asdict(label), "kept": label.margin >= self.min_margin} for label in self.labels]

    def preferences(self, image_ids: Sequence[str]) -> dict[tuple[str, str], float]:
        """p* of the kept pairs keyed by image id, as `trainer.reward` takes them."""
        return {(image_ids[label.i], image_ids[label.j]): label.p_star for label in self.kept}


async def vote_pairs(
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
    """K votes for every pair, at most `concurrency` pairs in flight (each is up to two engine requests).

    With an even K each image is shown first equally often; with an odd K the extra vote shows
    `images[i]` first (`sample_pairs` orients pairs at random, so that favours no image).
    `progress(done, total)` is called after each pair. An engine error cancels the pairs still
    running and propagates. `image_ids` is unused here (the `Voter` signature: shards need them).
    """
    if votes_per_pair < 1 or concurrency < 1:
        raise ValueError("votes_per_pair and concurrency must be at least 1")
    if not 0.0 <= min_margin <= 1.0:
        raise ValueError(f"min_margin must be in [0, 1], got {min_margin}")
    for i, j in pairs:
        if not (0 <= i < len(images) and 0 <= j < len(images)):
            raise ValueError(f"pair ({i}, {j}) is out of range for {len(images)} images")

    semaphore = asyncio.Semaphore(concurrency)
    labels: list[PairLabel | None] = [None] * len(pairs)
    done = 0

    async def vote(index: int, i: int, j: int) -> None:
        nonlocal done
        async with semaphore:
            # Fetched in a thread: a round's variant images are read from their files on access.
            first, second = await asyncio.to_thread(lambda: (images[i], images[j]))
            result = await compare_images(engine, first, second, votes_per_pair, sampling, profile)
        labels[index] = make_label(i, j, result.votes_a, result.votes_b, result.invalid, rule)
        done += 1
        if progress is not None:
            progress(done, len(pairs))

    tasks = [asyncio.create_task(vote(index, i, j)) for index, (i, j) in enumerate(pairs)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return VotingResult([label for label in labels if label is not None], min_margin)
