"""The adaptive-mode experiment's own logic (experiments/adaptive_modes.py): its rule reward, its demonstrations and
the summary that becomes docs/experiments.md's table. The training it drives is the real pipeline, tested elsewhere."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from actors.records import scored_groups_to_table
from experiments.adaptive_modes import KINDS, context_rule, demo_records, summarise, table, window
from reward.modes import parse_response
from tests.learner_fixtures import make_group


def rule(kind: str, mode: int | None) -> float:
    return context_rule(SimpleNamespace(state={"agent1_goal": f"{kind}: get the loan"}, parsed=SimpleNamespace(mode=mode)))


def test_rule_pays_every_mode_alike_in_easy_contexts_and_depth_in_hard_ones() -> None:
    assert [rule("easy", m) for m in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 1.0]
    assert [rule("hard", m) for m in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]


def test_demonstrations_are_well_formed_and_balance_modes_and_kinds() -> None:
    records = demo_records(64)
    parsed = [parse_response(r["output"]) for r in records]
    assert all(p.valid for p in parsed)
    kinds = [r["instruction"].split(" ", 1)[0].lower() for r in records]
    assert Counter(zip(kinds, (p.mode for p in parsed), strict=True)) == {(k, m): 8 for k in KINDS for m in (1, 2, 3, 4)}


def test_summary_buckets_by_kind_and_version_and_counts_mode_term_groups(tmp_path) -> None:
    every_mode = [1, 1, 2, 2, 3, 3, 4, 4]
    groups = [
        make_group("g0", [1.0] * 8, modes=every_mode, version=0, response_lens=4),  # easy, has a mode term
        make_group("g1", [-2.0] + [1.0] * 7, modes=[None, *every_mode[1:]], version=0, response_lens=8),  # easy, error
        make_group("g2", [0.25] * 8, modes=[1] * 8, version=1, response_lens=6),  # hard, one mode only
    ]
    (tmp_path / "rollouts").mkdir()
    pq.write_table(scored_groups_to_table(groups), tmp_path / "rollouts" / "step_1.parquet")
    kind_of_state = {"state-g0": "easy", "state-g1": "easy", "state-g2": "hard"}
    result = summarise(tmp_path, kind_of_state)
    (easy,), (hard,) = result["easy"], result["hard"]
    assert easy["version"] == 0 and easy["samples"] == 16
    assert easy["format_error"] == pytest.approx(1 / 16)
    assert easy["mode1"] == pytest.approx(3 / 16) and easy["mode4"] == pytest.approx(4 / 16)
    assert easy["mode_term"] == 0.5 and easy["tokens"] == 6.0
    assert hard["version"] == 1 and hard["mode1"] == 1.0 and hard["mode_term"] == 0.0

    # Windows weigh policy versions by their samples; the table prints one row per estimator, kind and window.
    entries = [dict(easy), dict(easy, version=1, samples=48, mode_term=1.0)]
    assert window(entries, first=False, size=2)["mode_term"] == pytest.approx((0.5 * 16 + 48) / 64)
    rows = table({"runs": {"ampo": {"by_kind": result}}}, size=1).splitlines()
    assert len(rows) == 2 + 4 and rows[2].startswith("| ampo | easy | 0–0 | 0.19 |") and "| 0.50 | 6 | 16 |" in rows[2]
