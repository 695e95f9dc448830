"""Tests for reward.scores: the reward formulas (docs/protocol.md, Rewards), with hand-computed values."""

from __future__ import annotations

import math

import pytest

from reward.scores import (
    FORMAT_ERROR_REWARD,
    RewardBreakdown,
    answer_length_score,
    combine_reward,
    goal_progress_score,
)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (6, 8, 0.75),  # 2 / (10 - 6) = 0.5
        (6, 3, 0.25),  # -3 / 6 = -0.5
        (6, 6, 0.5),
        (0, 0, 0.5),
        (10, 10, 0.5),
        (0, 10, 1.0),  # all headroom gained
        (10, 0, 0.0),  # whole score lost
        (0, 5, 0.75),  # before = 0 only allows gains: 5 / 10
        (10, 5, 0.25),  # before = 10 only allows losses: -5 / 10
        (2.5, 4.0, 0.6),  # 1.5 / 7.5 = 0.2
    ],
)
def test_goal_progress_score(before: float, after: float, expected: float) -> None:
    assert goal_progress_score(before, after) == pytest.approx(expected)


@pytest.mark.parametrize(("before", "after"), [(-1, 5), (5, -0.5), (10.5, 5), (5, 11), (math.nan, 5), (5, math.inf)])
def test_goal_progress_score_rejects_out_of_range(before: float, after: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        goal_progress_score(before, after)


@pytest.mark.parametrize(
    ("n_tokens", "expected"),
    [(0, 1.0), (175, 1.0), (200, 5 / 6), (250, 0.5), (300, 1 / 6), (325, 0.0), (1000, 0.0)],
)
def test_answer_length_score(n_tokens: int, expected: float) -> None:
    assert answer_length_score(n_tokens) == pytest.approx(expected)


def test_answer_length_score_custom_constants() -> None:
    assert answer_length_score(100, target=100.0, scale=50.0) == pytest.approx(0.5)
    assert answer_length_score(75, target=100.0, scale=50.0) == pytest.approx(0.75)
    assert answer_length_score(50, target=100.0, scale=50.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("n_tokens", "scale"), [(-1, 75.0), (10, 0.0), (10, -5.0)])
def test_answer_length_score_rejects_bad_inputs(n_tokens: int, scale: float) -> None:
    with pytest.raises(ValueError):
        answer_length_score(n_tokens, scale=scale)


def test_format_error_gets_minus_two_and_counts() -> None:
    result = combine_reward(format_valid=False, judge_before=6, judge_after=8, answer_tokens=200)
    assert FORMAT_ERROR_REWARD == -2.0
    assert result == RewardBreakdown(
        reward=-2.0, scored=True, format_valid=False, goal_progress=None, length_score=None, failure="invalid format"
    )


@pytest.mark.parametrize(
    ("before", "after", "failure", "recorded"),
    [
        (6, None, "no parsable score after 5 rounds", "no parsable score after 5 rounds"),
        (None, None, None, "missing judge score"),
        (6, 8, "timeout", "timeout"),  # a reason wins over scores that happen to be present
    ],
)
def test_judge_failure_is_not_scored_by_default(
    before: float | None, after: float | None, failure: str | None, recorded: str
) -> None:
    result = combine_reward(
        format_valid=True, judge_before=before, judge_after=after, answer_tokens=200, judge_failure=failure
    )
    assert result == RewardBreakdown(
        reward=None, scored=False, format_valid=True, goal_progress=None, length_score=None, failure=recorded
    )


def test_judge_failure_as_zero_reproduces_reference() -> None:
    result = combine_reward(
        format_valid=True,
        judge_before=6,
        judge_after=None,
        answer_tokens=200,
        judge_failure="timeout",
        judge_failure_as_zero=True,
    )
    assert result == RewardBreakdown(
        reward=0.0, scored=True, format_valid=True, goal_progress=None, length_score=None, failure="timeout"
    )


def test_normal_reward_is_the_product() -> None:
    result = combine_reward(format_valid=True, judge_before=6, judge_after=8, answer_tokens=200)
    assert result.scored and result.format_valid and result.failure is None
    assert result.goal_progress == pytest.approx(0.75)
    assert result.length_score == pytest.approx(5 / 6)
    assert result.reward == pytest.approx(0.75 * 5 / 6)


def test_normal_reward_uses_length_constants() -> None:
    result = combine_reward(
        format_valid=True, judge_before=6, judge_after=3, answer_tokens=100, length_target=100.0, length_scale=50.0
    )
    assert result.reward == pytest.approx(0.25 * 0.5)


def test_valid_judged_response_needs_answer_tokens() -> None:
    with pytest.raises(ValueError, match="answer_tokens"):
        combine_reward(format_valid=True, judge_before=6, judge_after=8, answer_tokens=None)
