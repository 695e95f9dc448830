"""The replay queue between the reward pool and the learner: bounded, complete groups only, staleness-checked.

Design:

* **Groups are atomic** (AMPO normalises inside a group): ``put`` accepts a whole group or refuses it. A group is a
  :class:`StoredGroup`: its summary here, its tokens in Ray's object store, where the learner ranks read them. A
  group is complete when it holds exactly ``request.sampling.n`` samples with indices 0..n−1, all carrying its
  group id. A group id is accepted at most once over the queue's life (including groups already consumed and
  groups restored from a checkpoint), so a producer that retries after a crash cannot make the learner see a prompt
  twice.
* **Backpressure**: the queue holds at most ``capacity`` groups; ``put`` waits (optionally with a timeout) until
  the learner makes room. A timed-out put raises :class:`QueueTimeout` and leaves the group with the caller, so it
  is never lost silently. Refusals (stale, duplicate, incomplete) are normal outcomes: they are returned (and
  logged), not raised, and the caller counts them: the queue keeps no counters of its own, so every group is
  counted once, in the driver's accounting.
* **Staleness**: a group made by policy version ``v`` is refused once the learner's version exceeds
  ``v + max_staleness``; checked when it arrives (and again if it had to wait for room), and for the waiting groups
  by ``drop_stale``, which the owner of the version calls after every change. The queue keeps no version: it reads
  the owner's through the ``version`` callable it was given. The driver's in-flight cap keeps refusals rare; the
  check here is the guarantee.
* **Checkpoints**: ``snapshot()`` reads the waiting groups from the object store and returns them as an Arrow IPC
  stream (the scored-sample schema) plus a JSON document (requests, order, the ids already seen); ``restore()``
  rebuilds them exactly and puts them back into the object store. Nothing is pickled, so a checkpoint from
  elsewhere cannot run code on load.

The queue is an ordinary asyncio object on the training driver's event loop, where the driver's group tasks put and
its learning loop gets. It is not a Ray actor of its own: it holds summaries and references, which the driver has
anyway, so an actor would only add two remote calls per group, and a checkpoint reads the waiting groups and the
groups still in flight in the same turn of the loop, so no group is saved as both.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import ray

from actors.records import (
    GroupSummary,
    StoredGroup,
    group_request_from_dict,
    group_request_to_dict,
    scored_groups_from_table,
    scored_groups_to_table,
    store,
)
from actors.run_metrics import Gauge, Histogram  # every series also carries the `run` tag

__all__ = ["PutResult", "QueueSnapshot", "QueueTimeout", "ReplayQueue"]

log = logging.getLogger(__name__)

PutResult = Literal["accepted", "stale", "duplicate", "incomplete"]
"""Outcome of :meth:`ReplayQueue.put`; anything but ``accepted`` is a refusal, for that reason."""

_SNAPSHOT_FORMAT = 2
_READABLE_FORMATS = (1, 2)
"""Format 1 (until 2026-12) also stored the queue's counters and version; a restore ignores them."""


class QueueTimeout(TimeoutError):
    """A ``put`` found no room, or a ``get`` found too few groups, within its timeout. Nothing was changed."""


@dataclass(frozen=True)
class QueueSnapshot:
    """Lossless, pickle-free state of a queue: ``arrow`` is an Arrow IPC stream of the waiting groups' samples,
    ``meta`` a JSON document with their requests, their order and every group id seen."""

    arrow: bytes
    meta: str

    def waiting_ids(self) -> list[str]:
        """Ids of the groups waiting in the queue when the snapshot was taken, oldest first."""
        return list(json.loads(self.meta)["order"])


class ReplayQueue:
    """Bounded FIFO of complete scored groups (see the module docstring).

    Args:
        capacity: most groups held at once; ``put`` waits while the queue is full.
        max_staleness: how many versions a group's policy may lag behind the learner's current version.
        version: returns the learner's current policy version, which its owner (the driver) keeps; call
            :meth:`drop_stale` after every change.
    """

    def __init__(self, capacity: int, max_staleness: int, version: Callable[[], int]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.version = version
        self._groups: collections.deque[StoredGroup] = collections.deque()
        self._seen: set[str] = set()  # ids ever accepted: waiting or consumed
        self._reserved: set[str] = set()  # ids of puts waiting for room
        self._changed = asyncio.Condition()
        self._waiting_puts = 0
        self._depth = Gauge("ampo_queue_depth", "Scored groups waiting in the replay queue.")
        self._put_wait = Histogram(
            "ampo_queue_put_wait_seconds",
            "Time a put waited for room in the replay queue (backpressure).",
            boundaries=[0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0],
        )
        self._staleness = Histogram(
            "ampo_queue_staleness",
            "Policy-version lag of the groups handed to the learner.",
            boundaries=[0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5],
        )
        self._depth.set(0)

    # ----------------------------------------------------------------------------------------------- producer side

    async def put(self, group: StoredGroup, timeout_s: float | None = None) -> PutResult:
        """Add a complete group, waiting while the queue is full.

        Returns ``"accepted"`` or the refusal reason (``"incomplete"``, ``"duplicate"``, ``"stale"``). Raises
        :class:`QueueTimeout` when no room appeared within ``timeout_s`` seconds (None: wait indefinitely); the
        group is then not stored and its id stays free for a retry.
        """
        problem = _incompleteness(group.summary)
        if problem is not None:
            log.warning("refused incomplete group %s: %s", group.group_id, problem)
            return "incomplete"
        if group.group_id in self._seen or group.group_id in self._reserved:
            log.warning("refused duplicate group %s", group.group_id)
            return "duplicate"
        if self._lag(group) > self.max_staleness:
            return self._refuse_stale(group)
        self._reserved.add(group.group_id)  # a concurrent put of the same group is then a duplicate
        started = time.monotonic()
        async with self._changed:
            self._waiting_puts += 1
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self._groups) < self.capacity), timeout_s)
            except asyncio.TimeoutError:
                raise QueueTimeout(
                    f"replay queue full ({len(self._groups)}/{self.capacity} groups) for {timeout_s} s; "
                    f"group {group.group_id} was not stored"
                ) from None
            finally:  # timed out, cancelled, or stored below without yielding to the event loop in between
                self._waiting_puts -= 1
                self._reserved.discard(group.group_id)
            self._put_wait.observe(time.monotonic() - started)
            if self._lag(group) > self.max_staleness:  # the learner moved on while we waited
                return self._refuse_stale(group)
            self._seen.add(group.group_id)
            self._groups.append(group)
            self._depth.set(len(self._groups))
            self._changed.notify_all()
        return "accepted"

    # ------------------------------------------------------------------------------------------------ learner side

    async def get(self, k: int, timeout_s: float | None = None) -> list[StoredGroup]:
        """Take the ``k`` oldest groups, waiting until there are k. They are fresh for the current version as long
        as its owner called :meth:`drop_stale` after changing it. Raises :class:`QueueTimeout` when fewer than
        ``k`` groups arrived within ``timeout_s`` (nothing is taken).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self._groups) >= k), timeout_s)
            except asyncio.TimeoutError:
                raise QueueTimeout(
                    f"replay queue holds {len(self._groups)} of the {k} groups asked for after {timeout_s} s"
                ) from None
            batch = [self._groups.popleft() for _ in range(k)]
            for group in batch:
                self._staleness.observe(self._lag(group))
            self._depth.set(len(self._groups))
            self._changed.notify_all()
        return batch

    async def drop_stale(self) -> int:
        """Drop the waiting groups that the current version made too stale (call after every version change);
        returns how many, for the caller to count."""
        async with self._changed:
            fresh = collections.deque(g for g in self._groups if self._lag(g) <= self.max_staleness)
            for group in self._groups:
                if self._lag(group) > self.max_staleness:
                    self._log_stale(group)
            dropped = len(self._groups) - len(fresh)
            self._groups = fresh
            self._depth.set(len(self._groups))
            self._changed.notify_all()
        return dropped

    # ------------------------------------------------------------------------------------------------- inspection

    def depth(self) -> int:
        """Groups waiting now."""
        return len(self._groups)

    def stats(self) -> dict[str, Any]:
        """State now: depth, capacity, staleness limit, puts waiting for room, the oldest waiting group's version
        (the counts of groups are the driver's)."""
        return {
            "depth": len(self._groups),
            "capacity": self.capacity,
            "max_staleness": self.max_staleness,
            "waiting_puts": self._waiting_puts,
            "oldest_version": min((g.policy_version for g in self._groups), default=None),
        }

    # ------------------------------------------------------------------------------------------------ checkpoints

    def snapshot(self) -> QueueSnapshot:
        """The waiting groups (read from the object store) and every id seen, in a pickle-free form."""
        groups = ray.get([g.ref for g in self._groups])
        sink = pa.BufferOutputStream()
        table = scored_groups_to_table(groups)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        meta = {
            "format": _SNAPSHOT_FORMAT,
            "order": [g.group_id for g in groups],
            "requests": [group_request_to_dict(g.request) for g in groups],
            # Ids of puts still waiting for room are not state: those groups are not stored and their callers retry.
            "seen": sorted(self._seen),
        }
        return QueueSnapshot(arrow=sink.getvalue().to_pybytes(), meta=json.dumps(meta))

    async def restore(self, snapshot: QueueSnapshot | dict[str, Any]) -> int:
        """Replace the queue's state with a snapshot's; returns the number of waiting groups restored.

        Accepts the :class:`QueueSnapshot` or its fields as a dict. Restored groups may exceed ``capacity``
        (producers then wait until the learner drains them). Refuses while puts are waiting, because their
        reserved ids would be lost.
        """
        if isinstance(snapshot, dict):
            snapshot = QueueSnapshot(**snapshot)
        meta = json.loads(snapshot.meta)
        if meta.get("format") not in _READABLE_FORMATS:
            raise ValueError(f"unknown replay-queue snapshot format {meta.get('format')!r}")
        table = pa.ipc.open_stream(snapshot.arrow).read_all()
        requests = {r["group_id"]: group_request_from_dict(r) for r in meta["requests"]}
        groups = {g.group_id: store(g) for g in scored_groups_from_table(table, requests)}
        if sorted(groups) != sorted(meta["order"]):
            raise ValueError("replay-queue snapshot is inconsistent: table groups differ from the recorded order")
        async with self._changed:
            if self._waiting_puts:
                raise RuntimeError(f"cannot restore while {self._waiting_puts} puts are waiting for room")
            self._groups = collections.deque(groups[gid] for gid in meta["order"])
            self._seen = set(meta["seen"])
            self._depth.set(len(self._groups))
            self._changed.notify_all()
        log.info("replay queue restored: %d waiting groups, %d ids seen", len(self._groups), len(self._seen))
        return len(self._groups)

    # ------------------------------------------------------------------------------------------------- internals

    def _lag(self, group: StoredGroup) -> int:
        return self.version() - group.policy_version

    def _refuse_stale(self, group: StoredGroup) -> PutResult:
        self._log_stale(group)
        return "stale"

    def _log_stale(self, group: StoredGroup) -> None:
        log.warning(
            "stale group %s left out: policy version %d, learner at %d, max staleness %d",
            group.group_id,
            group.policy_version,
            self.version(),
            self.max_staleness,
        )


def _incompleteness(group: GroupSummary) -> str | None:
    """Why a group is not complete, or None when it is."""
    n = group.n
    if len(group.samples) != n:
        return f"{len(group.samples)} samples, expected n={n}"
    indices = sorted(s.index for s in group.samples)
    if indices != list(range(n)):
        return f"sample indices {indices} are not 0..{n - 1}"
    strangers = {s.group_id for s in group.samples} - {group.group_id}
    if strangers:
        return f"samples from other groups {sorted(strangers)}"
    return None

