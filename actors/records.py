"""The one record type that crosses the roles.

A rollout actor answers a `GroupRequest` with a `Group` of n `Sample`s; the reward pool turns it into a
`ScoredGroup` of `ScoredSample`s; the learner consumes scored groups. Groups are atomic: AMPO
normalises within the n samples of one prompt, so a group travels whole, and a sample that could not
be scored stays inside its group marked invalid, with a reason.

`SCORED_SAMPLE_SCHEMA` is the pyarrow schema of a scored sample, used for the rollout logs (Parquet)
and for checkpointing the groups waiting in the replay queue losslessly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one group request."""

    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 2048


@dataclass(frozen=True)
class GroupRequest:
    """Ask for n responses to one prompt. Exactly one of `messages` (chat messages, templated by the
    served model's tokenizer) or `prompt_token_ids` is given."""

    group_id: str
    state_id: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingSpec = SamplingSpec()
    context: dict[str, Any] = field(default_factory=dict)
    """Whatever the scorer needs about the state (dialogue, names, goals, prior judge scores, turn)."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise ValueError(f"group {self.group_id}: give exactly one of messages or prompt_token_ids")


@dataclass(frozen=True)
class Sample:
    """One sampled response, exactly as the engine produced it (no re-tokenisation)."""

    group_id: str
    state_id: str
    index: int
    prompt_token_ids: tuple[int, ...]
    response_token_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    """Log-probability under the generating policy of each response token (same length as the response)."""
    policy_version: int
    text: str
    finish_reason: str

    def __post_init__(self) -> None:
        if len(self.response_token_ids) != len(self.behaviour_logprobs):
            raise ValueError(
                f"sample {self.group_id}/{self.index}: {len(self.response_token_ids)} response tokens but "
                f"{len(self.behaviour_logprobs)} log-probs"
            )


@dataclass(frozen=True)
class Group:
    """The n samples generated for one request."""

    request: GroupRequest
    samples: tuple[Sample, ...]

    @property
    def group_id(self) -> str:
        return self.request.group_id

    @property
    def policy_version(self) -> int:
        """The oldest policy version among the samples (an update may land mid-generation)."""
        return min(s.policy_version for s in self.samples)


@dataclass(frozen=True)
class ScoredSample:
    """A sample with its reward and everything AMPO and the logs need."""

    sample: Sample
    mode: int | None
    """Thinking mode 1–4, or None when the format is invalid."""
    answer: str | None
    """The quoted utterance from the answer block."""
    format_valid: bool
    judge_before: float | None
    """The actor's goal score of the dialogue before the response (from the RL state)."""
    judge_after: float | None
    """The judge's goal score of the actor after the response is appended."""
    goal_progress: float | None
    answer_tokens: int | None
    length_score: float | None
    reward: float | None
    """Final scalar reward; None when the sample could not be scored (then `failure` says why)."""
    failure: str | None = None

    @property
    def valid(self) -> bool:
        """True when the sample has a trustworthy reward (a format error is a valid reward of −2)."""
        return self.reward is not None

    @property
    def response_length(self) -> int:
        """Full response tokens (thinking + answer + EOS): AMPO's length measure (spec §3.1)."""
        return len(self.sample.response_token_ids)


@dataclass(frozen=True)
class ScoredGroup:
    request: GroupRequest
    samples: tuple[ScoredSample, ...]

    @property
    def group_id(self) -> str:
        return self.request.group_id

    @property
    def policy_version(self) -> int:
        return min(s.sample.policy_version for s in self.samples)


SCORED_SAMPLE_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("state_id", pa.string()),
        ("index", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float64())),
        ("policy_version", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("mode", pa.int8()),
        ("answer", pa.string()),
        ("format_valid", pa.bool_()),
        ("judge_before", pa.float64()),
        ("judge_after", pa.float64()),
        ("goal_progress", pa.float64()),
        ("answer_tokens", pa.int32()),
        ("length_score", pa.float64()),
        ("reward", pa.float64()),
        ("failure", pa.string()),
    ]
)


def scored_groups_to_table(groups: list[ScoredGroup]) -> pa.Table:
    """Flatten scored groups into one Arrow table (one row per sample)."""
    rows: list[dict[str, Any]] = []
    for group in groups:
        for scored in group.samples:
            row = dataclasses.asdict(scored.sample)
            row.update({k: v for k, v in dataclasses.asdict(scored).items() if k != "sample"})
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCORED_SAMPLE_SCHEMA)
