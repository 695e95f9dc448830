"""Routing group requests to the rollout actors: least-loaded first, a group re-sent when its actor dies, a restarted
actor brought back to the current weights before it serves again. A generated group comes back as a reference, for
the reward pool to read: the router only waits for its sample count."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ray import ObjectRef
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from actors.records import GroupRequest
from cluster.accounting import Counts, Occupancy

log = logging.getLogger(__name__)

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
"""What a call to a dead (possibly restarting) actor raises."""
RESTART_TIMEOUT_S = 600
"""How long a lost rollout actor may take to come back (Ray restarts it and its engine loads) before the run fails."""


class RolloutRouter:
    """Sends group requests to the least-loaded rollout actor; re-sends the group when an actor dies and
    brings a restarted actor back to the current weights before it serves again."""

    def __init__(self, actors: Sequence[Any], resync: Callable[[], Awaitable[None]], counts: Counts) -> None:
        self.actors = list(actors)
        self.load = [0] * len(self.actors)
        self._resync = resync
        self._resyncing: asyncio.Lock = asyncio.Lock()
        self.counts = counts
        self.occupancy = Occupancy(len(self.actors))
        """Actors with at least one group in flight: its idle share is the engines' time without work (waiting
        for groups, or for weights when the driver holds groups back until a push lands)."""

    async def generate(self, request: GroupRequest) -> tuple[int, ObjectRef]:
        """Generate one group; returns its sample count and the reference of the group (left unread here)."""
        while True:
            index = min(range(len(self.actors)), key=lambda i: self.load[i])
            self._take(index, +1)
            try:
                samples, group = self.actors[index].generate_by_reference.options(num_returns=2).remote(request)
                return await samples, group
            except ACTOR_LOST as exc:
                self.counts.add("resubmitted_rollout")
                log.warning(
                    "rollout actor %d was lost while generating group %s (%s); Ray restarts it and the group is sent again",
                    index, request.group_id, type(exc).__name__,
                )
                await self._after_loss(index)
            finally:
                self._take(index, -1)

    def _take(self, index: int, delta: int) -> None:
        before = self.load[index]
        self.load[index] += delta
        if (before == 0) != (self.load[index] == 0):
            self.occupancy.change(1 if before == 0 else -1)

    async def _health(self, index: int) -> Any:
        return await self.actors[index].health.remote()

    async def _after_loss(self, index: int) -> None:
        async with self._resyncing:
            waiting = AsyncRetrying(
                stop=stop_after_delay(RESTART_TIMEOUT_S), wait=wait_fixed(1.0), retry=retry_if_exception_type(ACTOR_LOST),
                reraise=True,
            )
            try:
                await waiting(self._health, index)
            except ACTOR_LOST:
                raise RuntimeError(f"rollout actor {index} did not come back within {RESTART_TIMEOUT_S} s") from None
            await self._resync()
