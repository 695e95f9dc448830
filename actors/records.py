"""The one record type that crosses the roles.

A rollout actor answers a `GroupRequest` with a `Group` of n `Sample`s; the reward pool turns it into a
`ScoredGroup` of `ScoredSample`s; the learner consumes scored groups. Between the reward pool and the learner a
scored group stays in Ray's object store as a `StoredGroup`: its `GroupSummary` (rewards, modes, lengths, no
tokens) is all the driver reads. Groups are atomic: AMPO normalises within the n samples of one prompt, so a group
travels whole, and a sample that could not be scored stays inside its group marked invalid, with a reason.

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
    """The version that served the request when it started: the oldest that produced any of its tokens."""
    text: str
    finish_reason: str
    token_versions: tuple[int, ...] = ()
    """The version that produced each response token, where known (a weight update can land mid-response); empty:
    every token from `policy_version`."""

    def __post_init__(self) -> None:
        if len(self.response_token_ids) != len(self.behaviour_logprobs):
            raise ValueError(
                f"sample {self.group_id}/{self.index}: {len(self.response_token_ids)} response tokens but "
                f"{len(self.behaviour_logprobs)} log-probs"
            )
        if self.token_versions and (
            len(self.token_versions) != len(self.response_token_ids) or min(self.token_versions) < self.policy_version
        ):
            raise ValueError(
                f"sample {self.group_id}/{self.index}: token versions must tag each of the {len(self.response_token_ids)} "
                f"response tokens with a version of at least {self.policy_version}"
            )

    @property
    def versions(self) -> tuple[int, ...]:
        """The policy version of every response token."""
        return self.token_versions or (self.policy_version,) * len(self.response_token_ids)


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
        """Full response tokens (thinking + answer + EOS): AMPO's length measure."""
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


@dataclass(frozen=True)
class SampleSummary:
    """What the driver decides on about one scored sample: its reward and sizes, without a token."""

    group_id: str
    index: int
    policy_version: int
    mode: int | None
    format_valid: bool
    reward: float | None
    prompt_length: int
    response_length: int
    """Full response tokens, as :attr:`ScoredSample.response_length` (AMPO's length measure)."""
    updated_tokens: int
    """Response tokens produced by a newer policy than the one the response started under."""


@dataclass(frozen=True)
class GroupSummary:
    """A scored group without its tokens: enough to queue it, filter it, compute its advantages and balance the
    learner ranks, a few hundred bytes where the group weighs tens of kilobytes."""

    group_id: str
    n: int
    """The number of samples the request asked for (a complete group has exactly these)."""
    samples: tuple[SampleSummary, ...]

    @property
    def policy_version(self) -> int:
        return min(s.policy_version for s in self.samples)


def summarise(group: ScoredGroup) -> GroupSummary:
    """The summary of a scored group (made by the reward actor that scored it)."""
    return GroupSummary(
        group_id=group.group_id,
        n=group.request.sampling.n,
        samples=tuple(
            SampleSummary(
                group_id=s.sample.group_id,
                index=s.sample.index,
                policy_version=s.sample.policy_version,
                mode=s.mode,
                format_valid=s.format_valid,
                reward=s.reward,
                prompt_length=len(s.sample.prompt_token_ids),
                response_length=s.response_length,
                updated_tokens=sum(v > s.sample.policy_version for v in s.sample.versions),
            )
            for s in group.samples
        ),
    )


@dataclass(frozen=True)
class StoredGroup:
    """A scored group that stays in Ray's object store on its way to the learner.

    The driver queues, filters and accounts for groups by their `summary` alone; `ref` (the ``ObjectRef`` of the
    :class:`ScoredGroup`) is read by the learner ranks that train on its samples, and by a checkpoint or the rollout
    log, never on the way.
    """

    summary: GroupSummary
    ref: Any

    @property
    def group_id(self) -> str:
        return self.summary.group_id

    @property
    def policy_version(self) -> int:
        return self.summary.policy_version


def store(group: ScoredGroup) -> StoredGroup:
    """Put a scored group held in this process into the object store (a restored checkpoint, tests, benches)."""
    import ray  # only here: the records themselves are plain data, usable without Ray

    return StoredGroup(summarise(group), ray.put(group))


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
        ("token_versions", pa.list_(pa.int64())),
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


def group_request_to_dict(request: GroupRequest) -> dict[str, Any]:
    """A JSON-ready dict of a request (the inverse of :func:`group_request_from_dict`).

    Used to checkpoint the groups waiting in the replay queue without pickle: the Arrow table holds the samples,
    this holds what the samples cannot carry (messages, sampling, scorer context). ``context`` must itself be
    JSON-compatible (string keys; lists come back as lists).
    """
    return {
        "group_id": request.group_id,
        "state_id": request.state_id,
        "messages": None if request.messages is None else [dict(m) for m in request.messages],
        "prompt_token_ids": None if request.prompt_token_ids is None else list(request.prompt_token_ids),
        "sampling": dataclasses.asdict(request.sampling),
        "context": request.context,
    }


def group_request_from_dict(data: dict[str, Any]) -> GroupRequest:
    """Rebuild a request from :func:`group_request_to_dict` output (after a JSON round trip)."""
    messages = data.get("messages")
    prompt = data.get("prompt_token_ids")
    return GroupRequest(
        group_id=data["group_id"],
        state_id=data["state_id"],
        messages=None if messages is None else tuple(dict(m) for m in messages),
        prompt_token_ids=None if prompt is None else tuple(int(t) for t in prompt),
        sampling=SamplingSpec(**data["sampling"]),
        context=dict(data.get("context") or {}),
    )


_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))
_SCORED_FIELDS = tuple(f.name for f in dataclasses.fields(ScoredSample) if f.name != "sample")


def scored_groups_from_table(table: pa.Table, requests: dict[str, GroupRequest]) -> list[ScoredGroup]:
    """Rebuild scored groups from :func:`scored_groups_to_table` output, the inverse of that function.

    Rows are grouped by ``group_id`` in order of first appearance and keep their row order inside a group;
    ``requests`` maps each group id to its request. Raises ValueError when a group id has no request or the
    table does not have the scored-sample schema.
    """
    if "token_versions" not in table.schema.names:  # written before samples carried per-token versions
        empty = pa.array([[] for _ in range(table.num_rows)], type=pa.list_(pa.int64()))
        table = table.add_column(SCORED_SAMPLE_SCHEMA.get_field_index("token_versions"), "token_versions", empty)
    if not table.schema.equals(SCORED_SAMPLE_SCHEMA):
        raise ValueError(f"table schema does not match SCORED_SAMPLE_SCHEMA: {table.schema}")
    by_group: dict[str, list[ScoredSample]] = {}
    for row in table.to_pylist():
        sample_fields = {name: row[name] for name in _SAMPLE_FIELDS}
        for name in ("prompt_token_ids", "response_token_ids", "behaviour_logprobs", "token_versions"):
            sample_fields[name] = tuple(sample_fields[name])
        scored = ScoredSample(sample=Sample(**sample_fields), **{name: row[name] for name in _SCORED_FIELDS})
        by_group.setdefault(scored.sample.group_id, []).append(scored)
    missing = [gid for gid in by_group if gid not in requests]
    if missing:
        raise ValueError(f"no request for groups {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [ScoredGroup(request=requests[gid], samples=tuple(samples)) for gid, samples in by_group.items()]
