"""Reward formulas of the training reward (docs/protocol.md, Rewards), as pure functions.

A sampled response earns

* ``FORMAT_ERROR_REWARD`` (-2) when it breaks the output format; the judge is not asked;
* otherwise ``goal_progress_score(before, after) * answer_length_score(answer_tokens)``, in [0, 1], where
  ``before``/``after`` are the judge's 0..10 goal scores of the actor without and with the new utterance.

A judge that fails for good yields no trustworthy reward; see :func:`combine_reward` for how that is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_ERROR_REWARD: float = -2.0

JUDGE_SCORE_MIN: float = 0.0
JUDGE_SCORE_MAX: float = 10.0


def _check_judge_score(name: str, value: float) -> None:
    # Written as a negated range test so that NaN is rejected too.
    if not JUDGE_SCORE_MIN <= value <= JUDGE_SCORE_MAX:
        raise ValueError(f"{name} judge score {value!r} is outside [{JUDGE_SCORE_MIN}, {JUDGE_SCORE_MAX}]")


def goal_progress_score(before: float, after: float) -> float:
    """Goal-progress score, in [0, 1] with 0.5 meaning "no change".

    With ``g = after - before``::

        scaled = 0                  if g == 0
               = g / (10 - before)  if g > 0   (share of the remaining headroom gained)
               = g / before         if g < 0   (share of the existing score lost)
        score  = (scaled + 1) / 2

    Examples: 6 -> 8 gives 2/4 = 0.5, so 0.75; 6 -> 3 gives -3/6 = -0.5, so 0.25.

    Both scores must lie in [0, 10], else ValueError. That range check is the whole division guard:
    g > 0 forces before < after <= 10 and g < 0 forces before > after >= 0, so neither denominator can be zero and
    the function is total over [0, 10]².
    """
    _check_judge_score("before", before)
    _check_judge_score("after", after)
    gain = after - before
    if gain > 0:
        scaled = gain / (JUDGE_SCORE_MAX - before)
    elif gain < 0:
        scaled = gain / before
    else:
        scaled = 0.0
    return (scaled + 1.0) / 2.0


def answer_length_score(n_tokens: int, target: float = 250.0, scale: float = 75.0) -> float:
    """Answer-length score, in [0, 1]: ``(clip((target - n) / scale, -1, 1) + 1) / 2``.

    A one-sided penalty on long answers: with the defaults it is 1.0 up to 175 tokens, 0.8333 at 200, 0.5 at 250,
    0.1667 at 300 and 0.0 from 325 on. ``n_tokens`` counts the answer (quotes included, thinking excluded) with the
    policy tokenizer. Raises ValueError for a negative count or a non-positive scale.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    clipped = min(1.0, max(-1.0, (target - n_tokens) / scale))
    return (clipped + 1.0) / 2.0


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward of one sampled response and how it came about.

    * ``reward``: the scalar reward, or None when the sample has no trustworthy reward.
    * ``scored``: True when ``reward`` may be trained on (format errors are scored: -2 is a real reward).
    * ``format_valid``: whether the response passed the format check.
    * ``goal_progress``, ``length_score``: the two factors of the product; None unless both were computed.
    * ``failure``: why no answer reward was computed ("invalid format" or the judge's failure reason), else None.
    """

    reward: float | None
    scored: bool
    format_valid: bool
    goal_progress: float | None
    length_score: float | None
    failure: str | None


def combine_reward(
    *,
    format_valid: bool,
    judge_before: float | None,
    judge_after: float | None,
    answer_tokens: int | None,
    judge_failure: str | None = None,
    judge_failure_as_zero: bool = False,
    length_target: float = 250.0,
    length_scale: float = 75.0,
) -> RewardBreakdown:
    """Combine format check, judge scores and answer length into the final reward.

    * Invalid format: reward ``FORMAT_ERROR_REWARD``, scored; the judge inputs are ignored.
    * Judge failure (``judge_failure`` given, or a judge score missing): by default no reward and not scored, so the
      sample is dropped rather than silently trained on. ``judge_failure_as_zero=True`` instead reproduces the
      reference code, which scores such a sample 0.0; it exists only to compare with the reference. The failure
      reason is recorded either way.
    * Otherwise: ``goal_progress_score(judge_before, judge_after) * answer_length_score(answer_tokens)``.

    Raises ValueError when a valid, judged response comes without ``answer_tokens``, or on out-of-range inputs.
    """
    if not format_valid:
        return RewardBreakdown(
            reward=FORMAT_ERROR_REWARD,
            scored=True,
            format_valid=False,
            goal_progress=None,
            length_score=None,
            failure="invalid format",
        )
    if judge_failure is not None or judge_before is None or judge_after is None:
        return RewardBreakdown(
            reward=0.0 if judge_failure_as_zero else None,
            scored=judge_failure_as_zero,
            format_valid=True,
            goal_progress=None,
            length_score=None,
            failure=judge_failure or "missing judge score",
        )
    if answer_tokens is None:
        raise ValueError("answer_tokens is required for a valid, judged response")
    progress = goal_progress_score(judge_before, judge_after)
    length = answer_length_score(answer_tokens, target=length_target, scale=length_scale)
    return RewardBreakdown(
        reward=progress * length,
        scored=True,
        format_valid=True,
        goal_progress=progress,
        length_score=length,
        failure=None,
    )
