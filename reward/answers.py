"""Reading a judge's answers: the JSON object in its text, scores checked against their range, and the goal judge's
answer for both agents. Every answer that cannot be used raises :class:`AnswerError` with its kind, so the judge
client can ask again (a new parse round) and count the failure, never invent a score."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from reward.prompts import AGENTS, GOAL_SCORE_RANGE


class AnswerError(ValueError):
    """A judge answer that cannot be used; ``kind`` is ``unparseable`` or ``out_of_range``."""

    def __init__(self, kind: Literal["unparseable", "out_of_range"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class GoalScores:
    """The goal judge's 0..10 scores (and reasoning) for both agents."""

    agent1: float
    agent2: float
    reasoning1: str = ""
    reasoning2: str = ""

    def of(self, agent: str) -> float:
        """The score of ``agent`` ("agent1" or "agent2")."""
        if agent not in AGENTS:
            raise ValueError(f"unknown agent {agent!r}; expected one of {AGENTS}")
        return self.agent1 if agent == "agent1" else self.agent2


def extract_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a judge answer, tolerating prose, code fences and raw control characters around it.

    First the greedy span from the first ``{`` to the last ``}`` is parsed (the reference's rule); if that fails,
    the first complete object starting at the first ``{`` is decoded and anything after it ignored. Control
    characters inside strings are accepted (``strict=False``). Raises ``AnswerError("unparseable")``.
    """
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end < start:
        raise AnswerError("unparseable", "no JSON object in the answer")
    try:
        value = json.loads(text[start : end + 1], strict=False)
    except json.JSONDecodeError:
        try:
            value, _ = json.JSONDecoder(strict=False).raw_decode(text, start)
        except json.JSONDecodeError as exc:
            raise AnswerError("unparseable", f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(value, dict):
        raise AnswerError("unparseable", f"expected a JSON object, got {type(value).__name__}")
    return value


def to_score(value: Any, low: float, high: float, what: str) -> float:
    """A judge score as a float in ``[low, high]``: numbers and numeric strings are accepted, booleans are not.
    Raises ``AnswerError`` (``unparseable`` for a non-number, ``out_of_range`` for NaN or outside the range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AnswerError("unparseable", f"{what} is not a number: {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise AnswerError("unparseable", f"{what} is not a number: {value!r}") from None
    if not low <= number <= high:  # negated so that NaN fails too
        raise AnswerError("out_of_range", f"{what} = {number!r} is outside [{low}, {high}]")
    return number


def parse_goal_scores(text: str) -> GoalScores:
    """Parse the goal judge's answer: an object with ``agent1`` and ``agent2``, each holding a
    ``score`` in [0, 10] (``reasoning`` is kept when present). Raises ``AnswerError``."""
    data = extract_json_object(text)
    low, high = GOAL_SCORE_RANGE
    scores: list[float] = []
    reasons: list[str] = []
    for agent in AGENTS:
        entry = data.get(agent)
        if not isinstance(entry, dict) or "score" not in entry:
            raise AnswerError("unparseable", f"the answer lacks {agent}.score")
        scores.append(to_score(entry["score"], low, high, f"{agent}.score"))
        reasons.append(str(entry.get("reasoning", "")))
    return GoalScores(agent1=scores[0], agent2=scores[1], reasoning1=reasons[0], reasoning2=reasons[1])
