"""Replay queue: complete groups only, backpressure, staleness and duplicate refusal, lossless snapshots."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from learner_fixtures import held, make_group, make_groups

from actors.records import (
    GroupRequest,
    SamplingSpec,
    group_request_from_dict,
    group_request_to_dict,
    scored_groups_to_table,
    store,
)
from learner.queue import QueueSnapshot, QueueTimeout, ReplayQueue


def run(coro):
    return asyncio.run(coro)


def at_version(version: int = 0) -> tuple[list[int], object]:
    """A version owned by the test (a one-item list it may change) and the callable the queue reads it through."""
    owner = [version]
    return owner, lambda: owner[0]


def test_put_get_fifo_and_stats() -> None:
    async def main() -> None:
        q = ReplayQueue(capacity=4, max_staleness=1, version=lambda: 0)
        groups = make_groups(3)
        for g in groups:
            assert await q.put(held(g)) == "accepted"
        got = await q.get(2)
        assert [g.group_id for g in got] == ["g0", "g1"]
        assert q.stats() == {"depth": 1, "capacity": 4, "max_staleness": 1, "waiting_puts": 0, "oldest_version": 0}

    run(main())


def test_backpressure_blocks_until_room_and_times_out() -> None:
    async def main() -> None:
        q = ReplayQueue(capacity=2, max_staleness=0, version=lambda: 0)
        a, b, c, d = make_groups(4)
        await q.put(held(a))
        await q.put(held(b))
        with pytest.raises(QueueTimeout, match="not stored"):
            await q.put(held(c), timeout_s=0.05)
        # The timed-out group was not stored and its id stays free.
        assert q.depth() == 2
        blocked = asyncio.create_task(q.put(held(c)))
        await asyncio.sleep(0.05)
        assert not blocked.done() and q.stats()["waiting_puts"] == 1
        # A concurrent put of the same group while the first waits is a duplicate.
        assert await q.put(held(c)) == "duplicate"
        assert [g.group_id for g in await q.get(1)] == ["g0"]
        assert await asyncio.wait_for(blocked, 1.0) == "accepted"
        assert [g.group_id for g in await q.get(2)] == ["g1", "g2"]
        with pytest.raises(QueueTimeout):
            await q.get(1, timeout_s=0.05)
        assert await q.put(held(d)) == "accepted"

    run(main())


def test_cancelled_calls_change_nothing() -> None:
    """The driver cancels its waiting get when a run stops and its group tasks when it shuts down."""

    async def main() -> None:
        q = ReplayQueue(capacity=1, max_staleness=0, version=lambda: 0)
        a, b = make_groups(2)
        getting = asyncio.create_task(q.get(2))
        await q.put(held(a))
        blocked = asyncio.create_task(q.put(held(b)))
        await asyncio.sleep(0.05)
        for task in (getting, blocked):
            task.cancel()
        await asyncio.gather(getting, blocked, return_exceptions=True)
        assert q.depth() == 1 and q.stats()["waiting_puts"] == 0  # the get took nothing
        assert [g.group_id for g in await q.get(1)] == ["g0"]
        assert await q.put(held(b)) == "accepted"  # the cancelled put left its id free

    run(main())


def test_staleness_refused_at_put_and_dropped_by_the_version_owner() -> None:
    async def main() -> None:
        version, read = at_version(0)
        q = ReplayQueue(capacity=8, max_staleness=1, version=read)
        old = make_group("old", [0.1, 0.2], version=0)
        mid = make_group("mid", [0.1, 0.2], version=1)
        new = make_group("new", [0.1, 0.2], version=2)
        for g in (old, mid, new):
            assert await q.put(held(g)) == "accepted"
        assert await q.drop_stale() == 0
        # The learner reaches version 2: "old" lags by 2 > 1 and is dropped; the caller counts it.
        version[0] = 2
        assert await q.drop_stale() == 1
        assert [g.group_id for g in await q.get(2)] == ["mid", "new"]
        assert await q.put(held(make_group("older", [0.1, 0.2], version=0))) == "stale"
        assert await q.drop_stale() == 0

    run(main())


def test_duplicate_refused_even_after_consumption() -> None:
    async def main() -> None:
        q = ReplayQueue(capacity=4, max_staleness=0, version=lambda: 0)
        g = make_group("same", [0.1, 0.2])
        assert await q.put(held(g)) == "accepted"
        assert await q.put(held(g)) == "duplicate"
        await q.get(1)
        assert await q.put(held(g)) == "duplicate"

    run(main())


def test_incomplete_groups_refused() -> None:
    async def main() -> None:
        q = ReplayQueue(capacity=4, max_staleness=0, version=lambda: 0)
        g = make_group("part", [0.1, 0.2, 0.3])
        missing = dataclasses.replace(g, samples=g.samples[:2])
        assert await q.put(held(missing)) == "incomplete"
        repeated = dataclasses.replace(g, samples=(g.samples[0], g.samples[0], g.samples[2]))
        assert await q.put(held(repeated)) == "incomplete"
        foreign = dataclasses.replace(g, samples=(*g.samples[:2], make_group("x", [0.1, 0.2, 0.3]).samples[2]))
        assert await q.put(held(foreign)) == "incomplete"
        # A refusal does not burn the id: the complete group is still welcome.
        assert await q.put(held(g)) == "accepted"

    run(main())


def test_snapshot_restore_is_lossless(ray_local) -> None:
    """A snapshot reads the waiting groups from the object store; a restore puts them back."""

    async def main() -> None:
        q = ReplayQueue(capacity=8, max_staleness=3, version=lambda: 0)
        groups = make_groups(4, version=1)
        # Edge cases of the records: a judge failure (reward None), a format error (mode None), messages.
        groups.append(make_group("edge", [None, -2.0, 0.5], modes=[2, None, 3], version=1))
        msg_req = GroupRequest(
            group_id="msg", state_id="s", messages=({"role": "user", "content": "hi"},), sampling=SamplingSpec(n=2)
        )
        with_messages = make_group("msg", [0.3, 0.4], version=1)
        groups.append(dataclasses.replace(with_messages, request=msg_req))
        for g in groups:
            assert await q.put(store(g)) == "accepted"
        await q.get(1)
        snap = q.snapshot()
        assert isinstance(snap.arrow, bytes) and isinstance(snap.meta, str)

        fresh = ReplayQueue(capacity=8, max_staleness=3, version=lambda: 0)
        assert await fresh.restore(dataclasses.asdict(snap)) == 5
        restored = await fresh.get(5)
        assert ray_local.get([g.ref for g in restored]) == groups[1:]
        # The consumed group's id survives the restore: re-sending it is still a duplicate.
        assert await fresh.put(held(groups[0])) == "duplicate"

    run(main())


def test_group_request_json_round_trip() -> None:
    import json

    req = make_group("r", [0.1]).request
    assert group_request_from_dict(json.loads(json.dumps(group_request_to_dict(req)))) == req
    table = scored_groups_to_table([make_group("r", [0.1])])
    assert table.num_rows == 1


def test_restore_rejects_unknown_format() -> None:
    q = ReplayQueue(capacity=2, max_staleness=0, version=lambda: 0)
    with pytest.raises(ValueError, match="format"):
        run(q.restore(QueueSnapshot(arrow=b"", meta='{"format": 99}')))
