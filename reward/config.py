"""Configuration owned by the scoring role: the judge endpoint and the reward formula."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from actors.config import ConfigSection


class JudgeConfig(ConfigSection):
    """An OpenAI-compatible judge endpoint. The API key is read at run time from `api_key_env` or
    `api_key_file`; it never lives in the config, so dumping a config cannot leak it."""

    base_url: str = "local"
    """Endpoint base URL (e.g. https://host/v1), or `local` to start vLLM's OpenAI server on 127.0.0.1
    serving the rollout model."""
    model: str = "local"
    """Model name sent to the endpoint (paper: qwen2.5-72b-instruct for rewards, gpt-4o-2024-08-06 for
    evaluation); `local` means the name the local server registers."""
    local_kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    """KV-cache memory of the local server started for `base_url: local` (null: the rollout engine's
    `rollout.kv_cache_memory_bytes`). A judge's prompts are long (a whole episode and its rubric for the evaluator)
    and every call in flight holds its own cache, so a local judge may need more than the policy's engine."""
    api_key_env: str = "AMPO_JUDGE_API_KEY"
    """Environment variable holding the API key (unset is fine for a local server)."""
    api_key_file: Path | None = None
    """File holding the API key; used when the environment variable is unset."""
    max_concurrency: int = Field(30, ge=1)
    """Judge calls in flight at once per reward actor (paper: 30 processes)."""
    requests_per_minute: float | None = Field(None, gt=0)
    """Request budget (null: unlimited)."""
    tokens_per_minute: float | None = Field(None, gt=0)
    """Prompt+completion token budget, estimated before each call (null: unlimited)."""
    timeout_s: float = Field(120.0, gt=0)
    """Timeout of one HTTP call."""
    max_retries: int = Field(5, ge=0)
    """HTTP retries per call on 429, 5xx, timeouts and connection errors (exponential backoff with jitter,
    honouring Retry-After)."""
    backoff_base_s: float = Field(1.0, gt=0)
    """First backoff delay; doubled on each retry."""
    backoff_max_s: float = Field(60.0, gt=0)
    """Longest backoff delay."""
    retry_window_s: float = Field(600.0, ge=0)
    """Transient failures go on being retried (same backoff) past `max_retries` until this long after a call's first
    attempt, so a judge that is down or refusing for minutes (restarted, redeployed, over its rate limit) costs time,
    not samples; meanwhile generation waits for the groups being scored. 0: `max_retries` alone decides."""
    parse_rounds: int = Field(5, ge=1)
    """Rounds of asking again when an answer cannot be parsed (authors' code: 5)."""
    greedy_rounds: int = Field(2, ge=0)
    """The first rounds use temperature 0.0, later ones temperature 1.0 (authors' code: 2)."""
    max_tokens: int = Field(1024, ge=16)
    """Completion budget of one judge answer."""
    structured_output: bool = True
    """Ask the server for JSON matching the answer schema (vLLM supports it), so even a weak judge parses."""
    structured_output_field: Literal["structured_outputs", "response_format"] = "structured_outputs"
    """How the schema is sent: vLLM's `structured_outputs` request extension, or the standard OpenAI
    `response_format` of type json_schema (accepted by the OpenAI API and by vLLM)."""


class RewardConfig(ConfigSection):
    """The reward service: judge, pool size and the reward formula (docs/protocol.md, Rewards)."""

    judge: JudgeConfig = JudgeConfig()
    """Goal-progress judge (paper: Qwen2.5-72B-Instruct, temperature 0)."""
    num_actors: int = Field(2, ge=1)
    """Reward actors in the pool."""
    max_restarts: int = Field(-1, ge=-1)
    """Ray restarts of a dead reward actor (-1: unlimited). A reward actor holds no state of its own (the group it
    was scoring is sent again), so the default never gives up on one; each re-sent group is counted."""
    length_target: float = Field(250.0, gt=0)
    """Answer length (policy tokens) where the length score is 0.5 (paper: 250)."""
    length_scale: float = Field(75.0, gt=0)
    """Tokens over which the length score falls from 1 to 0.5 and from 0.5 to 0 (paper: 75)."""
    format_error_reward: float = -2.0
    """Reward of a response that breaks the thinking-mode format (paper: −2). Such a sample also disables AMPO's mode
    term for its group, whatever this value."""
    judge_failure_as_zero: bool = False
    """Reproduce the reference, which scores a failed judge call 0. Off: such a sample is
    marked invalid with its reason and never scored."""
    max_unscored_ratio: float = Field(0.5, ge=0, le=1)
    """Stop the run when more than this share of a step's samples could not be scored (judge failures) for
    `unscored_patience` steps in a row: the judge is down or misconfigured, and training on the rest would learn
    from a biased few. 1 never stops."""
    unscored_patience: int = Field(3, ge=1)
    """Consecutive steps above `max_unscored_ratio` before the run stops (a brief outage is ridden out)."""
    custom_reward: str | None = None
    """Optional `module:function` returning a reward for a scored-sample context, replacing the judge reward."""
