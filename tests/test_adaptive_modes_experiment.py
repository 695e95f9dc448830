"""The adaptive-mode experiment's own logic (experiments/adaptive_modes.py): its rule reward, its demonstrations and
the summary that becomes docs/experiments.md's table. The training it drives is the real pipeline, tested elsewhere."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from actors.records import scored_groups_to_table
from scipy import stats

from experiments.adaptive_modes import KINDS, WINDOW_KEYS, Comparison, context_rule, demo_records, hypothesis_tests, summarise, window
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
        # easy, has a mode term: a tie, so AMPO's length term alone (lengths 2 < 4 < 6 < 8 by mode)
        make_group("g0", [1.0] * 8, modes=every_mode, version=0, response_lens=[2, 2, 4, 4, 6, 6, 8, 8]),
        make_group("g1", [-2.0] + [1.0] * 7, modes=[None, *every_mode[1:]], version=0, response_lens=8),  # easy, error
        make_group("g2", [0.25] * 8, modes=[1] * 8, version=1, response_lens=6),  # hard, one mode only
    ]
    (tmp_path / "rollouts").mkdir()
    pq.write_table(scored_groups_to_table(groups), tmp_path / "rollouts" / "step_1.parquet")
    kind_of_state = {"state-g0": "easy", "state-g1": "easy", "state-g2": "hard"}
    result = summarise(tmp_path, kind_of_state, "ampo")
    (easy,), (hard,) = result["easy"], result["hard"]
    assert easy["version"] == 0 and easy["samples"] == 16
    assert easy["format_error"] == pytest.approx(1 / 16)
    assert easy["mode1"] == pytest.approx(3 / 16) and easy["mode4"] == pytest.approx(4 / 16)
    assert easy["mode_term"] == 0.5 and easy["tokens"] == 6.5
    assert easy["reward"] == 1.0  # the −2 of the format error is not a rule reward
    # Mean advantage of level 1 in the easy bucket: g0's two level-1 samples get tanh(3 / sd(2, 4, 6, 8)) = tanh(1.162)
    # (A^S = 0 in a tie); g1's level-1 sample gets only A^S: mean 0.625, sd sqrt(7.875 / 7), so 0.375 / 1.0607.
    g1_sample_term = 0.375 / math.sqrt(7.875 / 7)
    assert easy["adv1"] == pytest.approx((2 * math.tanh(3 / math.sqrt(20 / 3)) + g1_sample_term) / 3, rel=1e-5)
    assert hard["version"] == 1 and hard["mode1"] == 1.0 and hard["mode_term"] == 0.0 and hard["adv1"] == 0.0
    # GRPO: g0 is all ties, so every advantage there is 0.
    assert summarise(tmp_path, kind_of_state, "grpo")["easy"][0]["adv1"] == pytest.approx(g1_sample_term / 3, rel=1e-5)


def entry(version: int, shares: tuple[float, float, float, float], samples: int = 16, **extra: float) -> dict[str, float]:
    base = dict.fromkeys((*WINDOW_KEYS, "adv1", "adv2", "adv3", "adv4"), 0.0)
    return base | {f"mode{m}": s for m, s in zip((1, 2, 3, 4), shares, strict=True)} | {"version": version, "samples": samples} | extra


def test_windows_weigh_versions_by_samples_and_give_the_mean_level() -> None:
    entries = [entry(0, (1.0, 0, 0, 0), tokens=10), entry(1, (0, 0, 0.5, 0.5), samples=48, tokens=30)]
    last = window(entries, first=False, size=2)
    assert last["tokens"] == pytest.approx((10 * 16 + 30 * 48) / 64)
    # shares 0.25, 0, 0.375, 0.375 (sum 1): mean level 0.25 + 1.125 + 1.5 = 2.875
    assert last["level"] == pytest.approx(2.875) and last["samples"] == 64
    assert window(entries, first=True, size=1)["level"] == 1.0


def test_welch_and_one_sample_tests_with_effect_sizes() -> None:
    t = Comparison("H1", "x", "ampo", (0.5, 0.6, 0.7), "grpo", (0.2, 0.3, 0.4), "greater")
    # Equal variances (0.01 each): d = 0.3 / 0.1 = 3; Welch t = 0.3 / sqrt(0.01/3 + 0.01/3) = 3.674 on 4 df.
    assert t.difference == pytest.approx(0.3) and t.effect_size == pytest.approx(3.0)
    assert t.p_value == pytest.approx(stats.t.sf(0.3 / math.sqrt(0.02 / 3), 4), rel=1e-6)
    one = Comparison("H1", "x", "ampo", (0.1, 0.2, 0.3), "0", None, "greater")
    assert one.effect_size == pytest.approx(2.0) and one.p_value == pytest.approx(stats.t.sf(0.2 / (0.1 / math.sqrt(3)), 2))


def test_the_pre_registered_tests_read_the_right_runs() -> None:
    def run(level1: float, tokens: float) -> dict:
        first = [entry(v, (0.25, 0.25, 0.25, 0.25), tokens=50) for v in range(2)]
        last = [entry(v, (level1, 0, 0, 1 - level1), tokens=tokens) for v in range(2, 4)]
        return {"by_kind": {"easy": first + last}}

    runs = {("tie", "ampo", s): run(0.6 + s / 100, 40) for s in (1, 2, 3)} | {("tie", "grpo", s): run(0.2 + s / 100, 60) for s in (1, 2, 3)}
    h1 = {t.claim.split(",")[0]: t for t in hypothesis_tests(runs, size=2)}
    assert h1["level-1 share"].a == pytest.approx((0.61, 0.62, 0.63)) and h1["level-1 share"].b == pytest.approx((0.21, 0.22, 0.23))
    assert h1["level-1 share"].p_value < 1e-4 and h1["response tokens"].difference == pytest.approx(-20)
    rises = next(t for t in hypothesis_tests(runs, size=2) if t.claim.startswith("AMPO's level-1 share rises"))
    assert rises.a == pytest.approx((0.36, 0.37, 0.38)) and rises.b is None
    assert all(t.hypothesis == "H1" for t in hypothesis_tests(runs, size=2))  # no mixed runs: no H2/H3 tests


def test_advantage_table_weighs_versions_by_each_modes_samples_and_the_transfer_test_pairs_designs() -> None:
    from experiments.adaptive_modes import advantage_table, transfer_test

    # Level 1: 0.5 of 16 samples at +1.0, then 0.25 of 48 at −0.2: (8 · 1.0 + 12 · −0.2) / 20 = 0.28.
    entries = [entry(0, (0.5, 0.5, 0, 0), adv1=1.0, adv2=0.5), entry(1, (0.25, 0.75, 0, 0), samples=48, adv1=-0.2, adv2=0.5)]
    runs = {("tie", "ampo", 1): {"by_kind": {"easy": entries}}}
    rows = advantage_table(runs).splitlines()
    assert rows[2] == "| tie | ampo | easy | +0.280 | +0.500 | +0.000 | +0.000 | 1 |" and len(rows) == 3
    assert transfer_test(runs, size=1) == []  # needs both designs
    runs |= {("mixed", "ampo", 1): {"by_kind": {"easy": [entry(0, (0.1, 0.9, 0, 0))], "hard": [entry(0, (0, 0, 0, 1.0))]}}}
    level1, _ = transfer_test(runs, size=1)
    assert level1.a == pytest.approx((0.25,)) and level1.b == pytest.approx((0.1,))
