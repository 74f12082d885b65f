"""Pair-aware batching for GRPO: every generation batch holds both images of each pair it trains on.

The fidelity reward compares a rollout of x_i with the mean and variance of its partner x_j's rollouts
in the same step, so a step must hold whole pairs. `plan_steps` chooses the images of each step;
`PairAwareSampler` lays them out exactly as TRL's `RepeatSampler` would (each image repeated G times in
a row, each generation batch repeated `num_iterations * steps_per_generation` times), which is what
`GRPOTrainer`'s dataloader and `_prepare_inputs` expect.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def plan_steps(
    pairs: Sequence[tuple[int, int]], images_per_step: int, num_steps: int, seed: int
) -> list[list[int]]:
    """The images of each step: `images_per_step` distinct rows made of whole pairs.

    Pairs are taken in a shuffled order, each once per pass (a new shuffle starts when all were used);
    a step takes the next pairs that fit (a pair sharing an image with the step costs one slot). When no
    pair fits the free slots (one slot left and every pair would add two images), the slots repeat
    images already in the step: more rollouts of an image whose pair is complete, so no image is ever
    trained without its partner.
    """
    if images_per_step < 2:
        raise ValueError("a step needs room for at least one pair (images_per_step >= 2)")
    if not pairs:
        raise ValueError("no training pairs")
    rng = random.Random(seed)
    queue: list[tuple[int, int]] = []
    steps: list[list[int]] = []
    for _ in range(num_steps):
        members: list[int] = []
        present: set[int] = set()
        refilled = False
        while len(members) < images_per_step:
            if not queue:
                if refilled:  # a whole fresh pass had nothing that fits
                    break
                queue = list(pairs)
                rng.shuffle(queue)
                refilled = True
            room = images_per_step - len(members)
            pick = next((k for k, (i, j) in enumerate(queue) if len({i, j} - present) <= room), None)
            if pick is None:
                if refilled:
                    break
                queue = []  # nothing left in this pass fits: start the next pass
                continue
            i, j = queue.pop(pick)
            for image in (i, j):
                if image not in present:
                    present.add(image)
                    members.append(image)
        members += [members[k % len(members)] for k in range(images_per_step - len(members))]
        steps.append(members)
    return steps


class PairAwareSampler(Sampler[int]):
    """TRL's RepeatSampler layout with generation batches of whole pairs (see the module docstring).

    With several processes, each process's share of a generation batch is planned separately, since
    TRL computes rewards per process: pairs are never split across processes.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        images_per_step: int,
        num_generations: int,
        num_batches: int,
        repeat_count: int = 1,
        num_processes: int = 1,
        seed: int = 0,
    ) -> None:
        self.num_generations = num_generations
        self.repeat_count = repeat_count
        self.num_processes = num_processes
        # One planned step per process share of each generation batch, in dataloader order.
        self.steps = plan_steps(pairs, images_per_step, num_batches * num_processes, seed)

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.steps), self.num_processes):
            batch = [row for step in self.steps[start : start + self.num_processes] for row in step]
            for _ in range(self.repeat_count):
                for row in batch:
                    yield from [row] * self.num_generations

    def __len__(self) -> int:
        return sum(len(step) for step in self.steps) * self.num_generations * self.repeat_count
