"""Synthetic scored groups for the learner tests: built directly as records, no engine and no judge.

Token ids are random ids of the tiny test model's vocabulary (special tokens excluded), behaviour log-probs are
random negative numbers unless given, so every field of the record types is exercised.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from actors.records import GroupRequest, SamplingSpec, Sample, ScoredGroup, ScoredSample, StoredGroup, summarise, store

# The tiny model's tokenizer has 3 special tokens (ids 0-2) and a vocabulary of about 500 ids.
FIRST_ID, LAST_ID = 3, 480


def make_group(
    group_id: str,
    rewards: Sequence[float | None],
    *,
    modes: Sequence[int | None] | None = None,
    version: int = 0,
    prompt_len: int = 12,
    response_lens: Sequence[int] | int = 8,
    seed: int = 0,
    behaviour_logprobs: Sequence[Sequence[float]] | None = None,
) -> ScoredGroup:
    """One complete scored group with n = len(rewards) samples.

    ``modes`` defaults to mode 1..4 cycling; a None reward marks a judge failure (invalid, with a failure reason),
    a None mode a format error. All samples share one random prompt; responses are random and distinct.
    """
    rng = random.Random(f"{group_id}/{seed}")
    n = len(rewards)
    modes = [1 + i % 4 for i in range(n)] if modes is None else list(modes)
    lens = [response_lens] * n if isinstance(response_lens, int) else list(response_lens)
    prompt = tuple(rng.randint(FIRST_ID, LAST_ID) for _ in range(prompt_len))
    request = GroupRequest(
        group_id=group_id,
        state_id=f"state-{group_id}",
        prompt_token_ids=prompt,
        sampling=SamplingSpec(n=n, max_tokens=max(lens)),
        context={"turn": 0, "names": ["A", "B"]},
    )
    samples = []
    for i in range(n):
        response = tuple(rng.randint(FIRST_ID, LAST_ID) for _ in range(lens[i]))
        logprobs = (
            tuple(float(x) for x in behaviour_logprobs[i])
            if behaviour_logprobs is not None
            else tuple(-rng.uniform(0.5, 4.0) for _ in range(lens[i]))
        )
        sample = Sample(
            group_id=group_id,
            state_id=request.state_id,
            index=i,
            prompt_token_ids=prompt,
            response_token_ids=response,
            behaviour_logprobs=logprobs,
            policy_version=version,
            text=f"response {i} of {group_id}",
            finish_reason="stop",
        )
        reward = rewards[i]
        mode = modes[i]
        samples.append(
            ScoredSample(
                sample=sample,
                mode=mode,
                answer=None if mode is None else f'"answer {i}"',
                format_valid=mode is not None,
                judge_before=5.0,
                judge_after=None if reward is None else 6.0,
                goal_progress=None if reward is None else 0.1,
                answer_tokens=None if mode is None else 3,
                length_score=None if mode is None else 1.0,
                reward=reward,
                failure="judge failed after retries" if reward is None else None,
            )
        )
    return ScoredGroup(request=request, samples=tuple(samples))


def make_groups(count: int, *, n: int = 4, version: int = 0, prefix: str = "g", seed: int = 0) -> list[ScoredGroup]:
    """``count`` groups of ``n`` samples with distinct rewards (so advantages are non-zero) and varied lengths."""
    groups = []
    for g in range(count):
        rng = random.Random(f"{prefix}{g}/{seed}")
        rewards = [round(rng.uniform(-1.0, 1.0), 3) for _ in range(n)]
        lens = [rng.randint(4, 12) for _ in range(n)]
        groups.append(make_group(f"{prefix}{g}", rewards, version=version, response_lens=lens, seed=seed))
    return groups


def held(group: ScoredGroup) -> StoredGroup:
    """A stored group whose reference is the group itself, for tests of code that reads the summary only (no Ray;
    the learner ranks and a queue snapshot need :func:`actors.records.store`)."""
    return StoredGroup(summarise(group), group)


def stored(groups: Sequence[ScoredGroup]) -> list[StoredGroup]:
    """The groups put into the object store of the running Ray, as the reward pool leaves them for the learner."""
    return [store(g) for g in groups]
