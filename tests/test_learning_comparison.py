"""The first-against-last comparison that `ampo run` prints and the report shows (cluster/report.py)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
from scipy import stats

from actors.records import scored_groups_to_table
from cluster.report import compare_first_last
from tests.learner_fixtures import make_group


def write_run(tmp_path, versions: dict[int, list[float]]) -> None:
    """One 4-sample group per version; a reward of −2 is a format error (mode None)."""
    groups = [
        make_group(f"g{v}", rewards, modes=[None if r == -2 else 1 for r in rewards], version=v)
        for v, rewards in versions.items()
    ]
    (tmp_path / "rollouts").mkdir()
    # Two files, as a run flushes them, in any order.
    pq.write_table(scored_groups_to_table(groups[3:]), tmp_path / "rollouts" / "step_2.parquet")
    pq.write_table(scored_groups_to_table(groups[:3]), tmp_path / "rollouts" / "step_1.parquet")


def test_first_and_last_windows_with_their_tests(tmp_path) -> None:
    write_run(tmp_path, {
        0: [-2, -2, -2, 0.2], 1: [-2, -2, 0.4, 0.2],   # first window: 5 errors in 8; judged rewards 0.2, 0.4, 0.2
        2: [-2, 0.5, 0.5, 0.5], 3: [0.5, 0.5, 0.6, 0.4],  # (middle versions: not compared)
        4: [0.6, 0.7, 0.8, 0.7], 5: [-2, 0.9, 0.8, 0.7],  # last window: 1 error in 8
    })
    result = compare_first_last(tmp_path / "rollouts")
    assert result is not None and result.versions == (0, 1, 2, 3, 4, 5) and result.window == 2
    errors, reward, judged = result.outcomes
    assert errors.first[0] == pytest.approx(5 / 8) and errors.last[0] == pytest.approx(1 / 8)
    # Fisher's exact test, one-sided (fewer errors in the last window): the hypergeometric tail P(X <= 1) for 6
    # errors in 16 samples, 8 of them in the last window = C(6,0)C(10,8)/C(16,8) + C(6,1)C(10,7)/C(16,8).
    tail = (math.comb(10, 8) + 6 * math.comb(10, 7)) / math.comb(16, 8)
    assert errors.p_value == pytest.approx(tail) and errors.test == "Fisher exact"
    first = [-2, -2, -2, 0.2, -2, -2, 0.4, 0.2]
    last = [0.6, 0.7, 0.8, 0.7, -2, 0.9, 0.8, 0.7]
    assert reward.first[0] == pytest.approx(sum(first) / 8) and reward.last[0] == pytest.approx(sum(last) / 8)
    assert reward.p_value == pytest.approx(stats.ttest_ind(last, first, equal_var=False, alternative="greater").pvalue)
    assert judged.first[2] == 3 and judged.last[2] == 7 and judged.change == pytest.approx(5.2 / 7 - 0.8 / 3)
    table = result.markdown()
    assert "| format-error share | 0.625 ± " in table and "| Fisher exact |" in table
    assert result.as_dict()["format-error share"]["change"] == pytest.approx(-0.5)


def test_the_window_never_overlaps_and_one_version_is_nothing_to_compare(tmp_path) -> None:
    write_run(tmp_path, {0: [0.1, 0.2, 0.3, 0.4], 1: [0.5, 0.6, 0.7, 0.8]})
    result = compare_first_last(tmp_path / "rollouts", window=5)
    assert result is not None and result.window == 1
    (tmp_path / "one").mkdir()
    pq.write_table(pq.read_table(next((tmp_path / "rollouts").glob("step_1*"))).slice(0, 4), tmp_path / "one" / "a.parquet")
    assert compare_first_last(tmp_path / "one") is None
    assert compare_first_last(tmp_path / "missing") is None
