"""Helpers for the reward-service tests: RL states, well-formed and broken responses, groups, judge configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.records import Group, GroupRequest, Sample
from reward.config import JudgeConfig, RewardConfig
from reward.modes import MODE_SECTIONS, format_response

DIALOG: tuple[str, ...] = (
    'Turn 0: Ana Lopez said: "Hi Ben, could I borrow your bike this weekend?"',
    'Turn 1: Ben Okafor said: "Maybe. What do you need it for?"',
    "Turn 2: Ana Lopez said:",
)


def make_context(
    turn: int = 2, before: tuple[float, float] = (6.0, 4.0), dialog: Sequence[str] = DIALOG
) -> dict[str, Any]:
    """An RL state as the reward expects it (the `reward_model` field of a training row); agent1 = Ana speaks at even
    turns."""
    return {
        "turn": turn,
        "dialog": list(dialog),
        "agent1_name": "Ana Lopez",
        "agent2_name": "Ben Okafor",
        "agent1_goal": "Borrow Ben's bike for the weekend.",
        "agent2_goal": "Keep the bike safe without upsetting Ana.",
        "state_reward": {"agent1": {"score": before[0]}, "agent2": {"score": before[1]}},
    }


def response(answer: str, mode: int = 1) -> str:
    """A well-formed response of ``mode`` whose answer block holds ``answer`` (quoted)."""
    sections = {name: f"some {name.lower()} thoughts" for name in MODE_SECTIONS[mode]} or None
    return format_response(mode, sections, answer)


BROKEN_RESPONSE = 'I would just say "hello" without any thinking header.'


def make_group(texts: Sequence[str], context: dict[str, Any] | None = None, group_id: str = "g0") -> Group:
    """A group with one sample per text (token ids are placeholders of the right shapes)."""
    request = GroupRequest(
        group_id=group_id,
        state_id=f"state-{group_id}",
        prompt_token_ids=(1, 2, 3),
        context=context if context is not None else make_context(),
    )
    samples = tuple(
        Sample(
            group_id=group_id,
            state_id=request.state_id,
            index=i,
            prompt_token_ids=(1, 2, 3),
            response_token_ids=tuple(range(5 + i)),
            behaviour_logprobs=tuple(-1.0 for _ in range(5 + i)),
            policy_version=0,
            text=text,
            finish_reason="stop",
        )
        for i, text in enumerate(texts)
    )
    return Group(request=request, samples=samples)


def judge_config(base_url: str, **overrides: Any) -> JudgeConfig:
    """Fast-failing judge settings for tests against a local server."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "model": "fault-judge",
        "api_key_env": "AMPO_TEST_JUDGE_KEY_UNSET",
        # Generous enough that a loaded machine does not turn a good answer into a timeout.
        "timeout_s": 2.0,
        "max_retries": 2,
        "retry_window_s": 0.0,  # failures the tests provoke end after max_retries
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.1,
        "parse_rounds": 3,
        "greedy_rounds": 2,
        "max_concurrency": 8,
        "max_tokens": 64,
    }
    values.update(overrides)
    return JudgeConfig(**values)


def reward_config(base_url: str, num_actors: int = 1, **judge_overrides: Any) -> RewardConfig:
    return RewardConfig(judge=judge_config(base_url, **judge_overrides), num_actors=num_actors)
