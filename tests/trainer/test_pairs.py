"""Pair sampling: degree floor, no self or duplicate pairs, reproducible, impossible inputs refused;
same-reference pairs within groups."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.pairs import sample_group_pairs, sample_pairs, split_holdout


def check_pairs(pairs: list[tuple[int, int]], n: int, m: int, d: int) -> None:
    assert len(pairs) == m
    assert all(0 <= i < n and 0 <= j < n and i != j for i, j in pairs)
    assert len({frozenset(p) for p in pairs}) == m, "duplicate unordered pair"
    degree = Counter(i for pair in pairs for i in pair)
    assert all(degree[k] >= d for k in range(n))


@pytest.mark.parametrize(
    ("n", "d", "m"),
    [
        (7, 3, 11),  # n odd, d odd: the floor needs ceil(21/2) = 11 pairs
        (8, 3, 12),  # n even, d odd
        (10, 2, 10),  # a single cycle
        (5, 4, 10),  # complete graph
        (6, 5, 15),  # complete graph, odd degree
        (2, 1, 1),
        (20, 3, 150),  # dense: the extra pairs come from enumerating the rest
        (500, 4, 3000),  # sparse: rejection sampling
        (1, 0, 0),
        (0, 0, 0),
    ],
)
def test_degree_and_distinct(n: int, d: int, m: int) -> None:
    check_pairs(sample_pairs(n, m, d, seed=1), n, m, d)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_feasible_request_is_met(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 25))
    d = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(math.ceil(n * d / 2), n * (n - 1) // 2))
    seed = data.draw(st.integers(0, 2**32))
    check_pairs(sample_pairs(n, m, d, seed), n, m, d)


def test_tight_floor_gives_exact_degrees() -> None:
    pairs = sample_pairs(9, 14, 3, seed=0)  # 9*3 = 27 is odd: eight images of degree 3, one of degree 4
    assert sorted(Counter(i for p in pairs for i in p).values()) == [3] * 8 + [4]


def test_reproducible_from_seed() -> None:
    assert sample_pairs(50, 200, 3, seed=7) == sample_pairs(50, 200, 3, seed=7)
    assert sample_pairs(50, 200, 3, seed=7) != sample_pairs(50, 200, 3, seed=8)


def test_orientation_is_random() -> None:
    pairs = sample_pairs(50, 400, 2, seed=3)
    lower_first = sum(i < j for i, j in pairs)
    assert 100 < lower_first < 300  # about half each way, not always the lower index first


@pytest.mark.parametrize(
    ("n", "m", "d", "message"),
    [
        (5, 11, 0, "only 10 distinct pairs"),
        (5, 5, 3, r"needs 8"),
        (4, 6, 4, "min_degree 4 is impossible"),
        (1, 1, 0, "only 0 distinct pairs"),
        (5, -1, 0, "must not be negative"),
        (5, 3, -1, "must not be negative"),
    ],
)
def test_impossible_requests_raise(n: int, m: int, d: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_pairs(n, m, d, seed=0)


def test_split_holdout() -> None:
    pairs = sample_pairs(30, 100, 2, seed=0)
    train, holdout = split_holdout(pairs, 0.2, seed=5)
    assert len(holdout) == 20 and len(train) == 80
    assert sorted(train + holdout) == sorted(pairs)
    assert train == [p for p in pairs if p in set(train)]  # order kept
    assert split_holdout(pairs, 0.2, seed=5) == (train, holdout)
    assert split_holdout(pairs, 0.2, seed=6) != (train, holdout)


def test_split_holdout_edges() -> None:
    assert split_holdout([(0, 1), (1, 2)], 0.0, seed=0) == ([(0, 1), (1, 2)], [])
    assert split_holdout([], 0.5, seed=0) == ([], [])
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="holdout fraction"):
            split_holdout([(0, 1)], fraction, seed=0)


def test_group_pairs_stay_in_their_group_spread_over_groups_and_reproduce() -> None:
    groups = [[r, 10 + 3 * r, 11 + 3 * r, 12 + 3 * r] for r in range(10)]  # a reference, 3 variants
    group_of = {member: g for g, members in enumerate(groups) for member in members}
    pairs = sample_group_pairs(groups, 25, seed=4)
    assert len(pairs) == 25 and len({frozenset(p) for p in pairs}) == 25
    assert all(i != j and group_of[i] == group_of[j] for i, j in pairs)
    per_group = Counter(group_of[i] for i, _ in pairs)
    assert sorted(per_group.values()) == [2] * 5 + [3] * 5  # round-robin: as even as it gets
    assert len({group_of[i] for i, _ in sample_group_pairs(groups, 7, seed=4)}) == 7  # 7 references
    assert 0 < sum(i < j for i, j in pairs) < 25  # either image may come first
    assert sample_group_pairs(groups, 25, seed=4) == pairs
    assert sample_group_pairs(groups, 25, seed=5) != pairs


def test_group_pairs_are_capped_by_the_groups() -> None:
    groups = [[0], [1, 2], [3, 4, 5]]  # 0 + 1 + 3 pairs within the groups
    every = sample_group_pairs(groups, 4, seed=0)
    assert {frozenset(p) for p in every} == {frozenset(p) for p in [(1, 2), (3, 4), (3, 5), (4, 5)]}
    assert sample_group_pairs([], 0, seed=0) == []
    with pytest.raises(ValueError, match="only 4 pairs"):
        sample_group_pairs(groups, 5, seed=0)
    with pytest.raises(ValueError, match="must not be negative"):
        sample_group_pairs(groups, -1, seed=0)
