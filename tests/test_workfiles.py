"""The append-only JSON-lines files of a run: durable appends, torn lines, and the rewind a resume makes."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.workfiles import append_json_line, read_json_lines, rewind_json_lines


def test_rewind_keeps_the_checkpoints_lineage_and_moves_the_rest_aside(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    for step in (0, 1, 2, 3, 4):
        append_json_line(log, {"step": step, "reward_mean": step / 10})
    with log.open("a") as handle:
        handle.write('{"step": 5, "rew')  # the driver was killed mid-write
    moved = rewind_json_lines(log, 2)
    assert moved == 3  # steps 3 and 4, and the torn line
    assert [r["step"] for r in read_json_lines(log)] == [0, 1, 2]
    aside = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [3, 4] and aside[2] == '{"step": 5, "rew'
    append_json_line(log, {"step": 3, "reward_mean": 0.9})  # the resumed run does step 3 again
    assert [r["step"] for r in read_json_lines(log)] == [0, 1, 2, 3]


def test_rewind_of_a_file_within_the_checkpoint_changes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "consumed.jsonl"
    assert rewind_json_lines(log, 4) == 0  # no file yet
    append_json_line(log, {"step": 1, "groups": ["g0", "g1"]})
    before = log.read_bytes()
    assert rewind_json_lines(log, 1) == 0
    assert log.read_bytes() == before and not (tmp_path / "consumed.discarded.jsonl").exists()
