"""Random comparison pairs for the voting stage, with every image in at least a few pairs.

Each image needs partners both to get a pseudo-label and, in GRPO, to be rewarded at all, so the
sampler guarantees a minimum degree. The floor comes from a circulant graph over a random order of
the images (the fewest pairs that can meet it: ceil(n*d/2)); the remaining pairs are drawn uniformly
from those not yet chosen. Which image of a pair comes first is random too, so with an odd number of
votes the extra first-shown vote favours no index.

`sample_group_pairs` draws the same-reference pairs of the paper's round-2 option: pairs within a
group (a reference image and its synthetic variants), spread over the groups.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def sample_pairs(n_images: int, n_pairs: int, min_degree: int, seed: int) -> list[tuple[int, int]]:
    """n_pairs distinct unordered pairs over range(n_images), each image in >= min_degree of them."""
    if n_images < 0 or n_pairs < 0 or min_degree < 0:
        raise ValueError("n_images, n_pairs and min_degree must not be negative")
    max_pairs = n_images * (n_images - 1) // 2
    if n_pairs > max_pairs:
        raise ValueError(f"{n_pairs} pairs requested; {n_images} images have only {max_pairs} distinct pairs")
    if n_images and min_degree > n_images - 1:
        raise ValueError(
            f"min_degree {min_degree} is impossible with {n_images} images (each has {n_images - 1} partners)"
        )
    needed = math.ceil(n_images * min_degree / 2)
    if n_pairs < needed:
        raise ValueError(
            f"{n_pairs} pairs cannot give {n_images} images {min_degree} partners each (needs {needed})"
        )

    rng = random.Random(seed)
    order = list(range(n_images))
    rng.shuffle(order)
    chosen = {frozenset((order[a], order[b])) for a, b in _circulant_edges(n_images, min_degree)}
    _add_random_pairs(chosen, n_images, n_pairs - len(chosen), rng)

    pairs = [tuple(sorted(pair)) for pair in chosen]
    pairs.sort()  # set order is not reproducible across runs; sort, then shuffle with the seed
    rng.shuffle(pairs)
    return [(i, j) if rng.random() < 0.5 else (j, i) for i, j in pairs]


def _circulant_edges(n: int, degree: int) -> list[tuple[int, int]]:
    """ceil(n*degree/2) edges on a cycle of n nodes giving each node at least `degree` (degree <= n-1)."""
    edges = [(k, (k + offset) % n) for offset in range(1, degree // 2 + 1) for k in range(n)]
    if degree % 2 == 0:
        return edges
    if n % 2 == 0:  # the diameters: a perfect matching
        return edges + [(k, k + n // 2) for k in range(n // 2)]
    # n odd: offset (n-1)/2 walks one cycle through all nodes; take every other edge of it, plus one
    # more for the node left over.
    step = (n - 1) // 2
    walk = [(k * step) % n for k in range(n)]
    matching = [(walk[k], walk[k + 1]) for k in range(0, n - 1, 2)]
    return edges + matching + [(walk[n - 1], walk[0])]


def _add_random_pairs(chosen: set[frozenset[int]], n: int, extra: int, rng: random.Random) -> None:
    """Add `extra` pairs drawn uniformly from those not in `chosen`."""
    free = n * (n - 1) // 2 - len(chosen)
    if extra * 2 <= free:  # sparse: rejection sampling needs at most ~2 draws per pair
        while extra:
            pair = frozenset(rng.sample(range(n), 2))
            if pair not in chosen:
                chosen.add(pair)
                extra -= 1
        return
    every = (frozenset((i, j)) for i in range(n) for j in range(i + 1, n))
    remaining = [pair for pair in every if pair not in chosen]
    chosen.update(rng.sample(remaining, extra))


def sample_group_pairs(groups: Sequence[Sequence[int]], n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """n_pairs distinct pairs, each within one group, spread over the groups as evenly as possible.

    The same-reference pairs of the round-2 option: a group is a reference image and its variants.
    Groups are visited round-robin in a random order, each giving one of its not yet chosen pairs per
    visit, so n_pairs below the number of groups reaches as many references as it can. Orientation is
    random, as in `sample_pairs`.
    """
    if n_pairs < 0:
        raise ValueError("n_pairs must not be negative")
    rng = random.Random(seed)
    candidates = []
    for group in groups:
        members = list(group)
        within = [(members[a], members[b]) for a in range(len(members)) for b in range(a + 1, len(members))]
        rng.shuffle(within)
        if within:
            candidates.append(within)
    available = sum(len(within) for within in candidates)
    if n_pairs > available:
        raise ValueError(f"{n_pairs} pairs requested; the groups have only {available} pairs within them")
    rng.shuffle(candidates)
    pairs: list[tuple[int, int]] = []
    visit = 0
    while len(pairs) < n_pairs:
        for within in candidates:
            if visit < len(within) and len(pairs) < n_pairs:
                pairs.append(within[visit])
        visit += 1
    return [(i, j) if rng.random() < 0.5 else (j, i) for i, j in pairs]


def split_holdout(pairs: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Random (train, holdout) split; round(fraction * len) items are held out, order kept in each part.

    The held-out pseudo-labels judge a new model on pairs it was not trained on (the gate).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    held = set(random.Random(seed).sample(range(len(pairs)), round(fraction * len(pairs))))
    train = [p for k, p in enumerate(pairs) if k not in held]
    holdout = [p for k, p in enumerate(pairs) if k in held]
    return train, holdout
