"""The order in which the training driver hands out RL states, and the cursor a checkpoint keeps of it.

States come in a seeded order, epoch after epoch (a new permutation per epoch when `data.shuffle`), so a run and its
resumption see the same sequence: the cursor (epoch, position, groups issued, groups in flight) is all a checkpoint
needs to continue without skipping or repeating a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.states import RLState


@dataclass
class DataCursor:
    """Where the driver is in the stream of RL states (JSON in checkpoints)."""

    seed: int
    epoch: int = 0
    position: int = 0
    issued: int = 0
    """Groups issued since the start of training (group ids are `g<issued index>`)."""
    pending: list[list[Any]] = field(default_factory=list)
    """[group index, state index] of groups issued but not yet in the queue: re-issued first on resume."""

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "issued": self.issued, "pending": self.pending}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataCursor:
        return cls(**data)


class StateStream:
    """RL states in a seeded order, epoch after epoch (shuffled per epoch when `shuffle`)."""

    def __init__(self, states: Sequence[RLState], cursor: DataCursor, shuffle: bool) -> None:
        if not states:
            raise ValueError("no RL states to train on")
        self.states = states
        self.cursor = cursor
        self.shuffle = shuffle
        self._order = self._epoch_order(cursor.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.states))
        return np.random.default_rng([self.cursor.seed, epoch]).permutation(len(self.states))

    def next_index(self) -> int:
        if self.cursor.position >= len(self._order):
            self.cursor.epoch += 1
            self.cursor.position = 0
            self._order = self._epoch_order(self.cursor.epoch)
        index = int(self._order[self.cursor.position])
        self.cursor.position += 1
        return index
