"""Training prompts and the order a run takes them in.

Each epoch (one pass over the prompts) is a fresh permutation seeded by (seed + epoch), consumed in
order, so the order is a function of (seed, position) alone and a resumed run needs no RNG state.
Under ``mlx.launch`` every process advances the same order by a whole global micro-batch and
takes its own slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np


@dataclass
class PromptSet:
    """Tokenised prompts (chat template applied) and their text for the judge."""

    ids: list
    texts: list

    def __len__(self):
        return len(self.ids)

    def subset(self, idx) -> "PromptSet":
        return PromptSet([self.ids[i] for i in idx], [self.texts[i] for i in idx])


class PromptOrder:
    """Which prompts each micro-batch gets. ``position`` counts the prompts consumed by all
    processes together and lives in ``state`` (the loop's resumable state, which a checkpoint
    keeps; any object with a ``position``); ``step_start`` is the position at the start of the
    current step."""

    def __init__(self, n_prompts: int, seed: int, batch_size: int, rank: int = 0, world: int = 1, state=None):
        self.n, self.seed, self.batch_size, self.rank, self.world = n_prompts, seed, batch_size, rank, world
        self.state = state if state is not None else SimpleNamespace(position=0)
        self.step_start = self.state.position

    @property
    def position(self) -> int:
        return self.state.position

    @position.setter
    def position(self, value: int) -> None:
        self.state.position = value

    def begin_step(self) -> None:
        self.step_start = self.position

    @property
    def epoch(self) -> int:
        """The pass over the prompts that the current step's first prompt comes from."""
        return self.step_start // max(1, self.n)

    def take(self) -> list:
        """This process's prompt indices of the next global micro-batch."""
        idx = self._next(self.batch_size * self.world)
        return idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def _next(self, k: int) -> list:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.position, self.n)
            perm = np.random.RandomState(self.seed + epoch).permutation(self.n)
            take = min(k - len(out), self.n - pos)
            out.extend(int(i) for i in perm[pos : pos + take])
            self.position += take
        return out
