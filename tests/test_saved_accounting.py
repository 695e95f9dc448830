"""What a checkpoint records of the groups in flight (`cluster.accounting.saved_accounting`), by hand."""

from __future__ import annotations

from cluster.accounting import saved_accounting

LIVE = {"issued": 10, "generated": 9, "scored": 8, "queued": 5, "refused": 1, "dropped": 0, "consumed": 4, "filtered": 0}
"""Live counts: g0-g4 accepted by the queue (g0-g3 consumed), g5 refused as stale and replaced, g6-g9 in flight."""


def test_groups_in_flight_are_left_out_of_the_saved_counts_and_listed_for_reissue() -> None:
    pending = {"g9": (3, "issued"), "g7": (1, "scored"), "g8": (2, "generated"), "g6": (0, "scored")}
    reissue, saved = saved_accounting(LIVE, pending)
    assert reissue == [[6, 0], [7, 1], [8, 2], [9, 3]]  # in issue order, with their state indices
    # issued 10 - 4, generated 9 - 3 (g6, g7, g8), scored 8 - 2 (g6, g7); the rest as counted.
    assert saved == {**LIVE, "issued": 6, "generated": 6, "scored": 6}
    # The identity a resumed run closes on holds for what was saved: scored = queued + refused.
    assert saved["scored"] == saved["queued"] + saved["refused"]
    assert LIVE["queued"] == 5  # the caller's counts are not changed

