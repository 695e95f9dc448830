"""Where the models of a command are served.

Every LLM outside the policy (goal judge, demonstration expert, episode evaluator, partner) is an OpenAI-compatible
endpoint. A config section whose `base_url` is `local` gets a vLLM OpenAI server started on 127.0.0.1 for a model
folder (the configured rollout model, i.e. the embedded model by default): :func:`open_endpoint` returns an
:class:`Endpoint` that owns the server and stops it on `close`. Sections that name a URL are used as they are.

A model behind an OpenAI-compatible chat API (the partner, or a policy evaluated through its API) is an
:class:`OpenAIChatModel`. The policy of episodes is otherwise :class:`RolloutPolicy`, the `cluster.episodes.Policy` of rollout actors: Ray handles (what
the training driver holds) or plain in-process `actors.rollout.RolloutActor` objects. `build-states` and `eval` get
theirs from :func:`policy_engines`: locally one in-process engine (no Ray to start), on a cluster Ray actors placed
on GPU nodes; either way the same generation code as training (chat template, sampling, token counts). A local
AsyncLLM engine runs its core in a child process, so scripts calling it need the `if __name__ == "__main__":` guard
(the `ampo` entry point has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from actors.config import RolloutConfig
from actors.precision import resolve_dtype
from actors.records import GroupRequest, SamplingSpec
from cluster.config import Config, ConfigError
from cluster.episodes import Generation, Message
from reward.config import JudgeConfig
from reward.server import JudgeServer


log = logging.getLogger(__name__)

LOCAL = "local"
LOCAL_SERVED_NAME = "ampo-local"
"""The model name a started local server registers when the config says `model: local`."""
MAX_LOCAL_CONTEXT = 8192
"""Longest context a started local server accepts (capped by the model's own position limit)."""


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint: base URL and model name, plus the local server behind it when we started
    one. `close` stops that server (idempotent); usable as a context manager."""

    base_url: str
    model: str
    server: JudgeServer | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _position_limit(model_path: Path) -> int:
    """The model's `max_position_embeddings` (from config.json), capped at MAX_LOCAL_CONTEXT."""
    try:
        limit = int(json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 0))
    except (OSError, ValueError):
        limit = 0
    return min(limit, MAX_LOCAL_CONTEXT) if limit > 0 else MAX_LOCAL_CONTEXT


def open_endpoint(
    section: JudgeConfig,
    rollout: RolloutConfig,
    *,
    model_path: str | Path | None = None,
    what: str = "judge",
    startup_timeout_s: float = 600.0,
) -> Endpoint:
    """The endpoint of a judge-like config section (judge, expert, evaluator, partner).

    With `base_url: local` a vLLM OpenAI server is started on 127.0.0.1 serving `model_path` (default: the
    configured rollout model, i.e. the embedded model unless the config names a folder) with the rollout engine's
    dtype and eager mode and the section's `local_kv_cache_memory_bytes` (default: the rollout engine's KV size); the served name is the section's `model`, or `ampo-local` when that is
    `local` too. The context length is the model's own limit (at most 8192) so long judge prompts fit. Otherwise
    the section's URL and model are returned as they are; `model: local` with a remote URL is a config error.
    """
    from cluster.sources import resolve_model

    if section.base_url != LOCAL:
        if section.model == LOCAL:
            raise ConfigError(f"{what}: model `local` only works with base_url `local`; name the model served at {section.base_url}")
        return Endpoint(section.base_url, section.model)
    path = resolve_model(model_path if model_path is not None else rollout.model)
    name = LOCAL_SERVED_NAME if section.model == LOCAL else section.model
    server = JudgeServer(
        path,
        served_model_name=name,
        dtype=resolve_dtype(rollout.dtype, what=f"local {what} server"),
        max_model_len=_position_limit(path),
        kv_cache_memory_bytes=section.local_kv_cache_memory_bytes or rollout.kv_cache_memory_bytes,
        enforce_eager=rollout.enforce_eager,
        startup_timeout_s=startup_timeout_s,
    )
    log.info("starting a local %s server for %s (about half a minute on a CPU)", what, path)
    server.start()
    return Endpoint(server.base_url, name, server)


@contextlib.contextmanager
def judge_endpoint(
    section: JudgeConfig, config: Config, *, model_path: str | Path | None = None, what: str = "judge"
) -> Iterator[tuple[str, str]]:
    """`(base_url, model)` of a judge-like section for the duration of a `with` block: `open_endpoint` with the
    config's rollout engine settings, the started local server (if any) stopped on exit. For callers that only
    need the address, e.g. the training driver's reward pool."""
    with open_endpoint(section, config.rollout, model_path=model_path, what=what) as endpoint:
        yield endpoint.base_url, endpoint.model


class RolloutPolicy:
    """`cluster.episodes.Policy` on rollout actors: one request with n=1 per chat, sent to the actor with the
    fewest requests outstanding. `actors` are Ray handles of `RolloutActor` or in-process `RolloutActor`s."""

    def __init__(self, actors: Sequence[Any], *, temperature: float, max_tokens: int, top_p: float = 1.0) -> None:
        if not actors:
            raise ValueError("RolloutPolicy needs at least one rollout actor")
        self.actors = list(actors)
        self.sampling = SamplingSpec(n=1, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_tokens)
        self._load = [0] * len(self.actors)
        self._requests = 0

    @classmethod
    def from_config(cls, actors: Sequence[Any], rollout: RolloutConfig) -> RolloutPolicy:
        """Evaluation sampling: `eval_temperature`, `max_response_tokens`."""
        return cls(actors, temperature=rollout.eval_temperature, max_tokens=rollout.max_response_tokens)

    async def _one(self, messages: list[Message]) -> Generation:
        index = min(range(len(self.actors)), key=self._load.__getitem__)
        self._requests += 1
        request = GroupRequest(
            group_id=f"episode-turn-{self._requests}",
            state_id="episode",
            messages=tuple(messages),
            sampling=self.sampling,
        )
        actor = self.actors[index]
        self._load[index] += 1
        try:
            remote = getattr(actor.generate, "remote", None)
            group = await (remote(request) if remote is not None else actor.generate(request))
        finally:
            self._load[index] -= 1
        sample = group.samples[0]
        return Generation(sample.text, len(sample.response_token_ids))

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        return list(await asyncio.gather(*(self._one(messages) for messages in batch)))


@contextlib.asynccontextmanager
async def policy_engines(config: Config, model_path: str | Path, *, seed: int | None = None) -> AsyncIterator[RolloutPolicy]:
    """The engines of the policy that `build-states` and `eval` play episodes with (seeded with `seed`, default the
    config's), as a `RolloutPolicy` with evaluation sampling; stopped on exit.

    Locally (`cluster.address: local`) one in-process rollout actor: no Ray to start. On a cluster the command runs
    where `ray job submit` put its entrypoint, usually a head node without GPUs, so the engines are the training
    run's rollout role instead: `rollout.num_actors` Ray actors placed with `cluster.rollout_gpus_per_actor` GPUs
    and `cluster.rollout_resources` each, and the episodes are spread over them."""
    from actors.rollout import RolloutActor
    from cluster.ray_cluster import connect, start_rollout_role

    rollout = config.rollout if seed is None else config.rollout.model_copy(update={"seed": seed})
    if config.cluster.address == LOCAL:
        actor = RolloutActor(rollout, model_path)
        try:
            yield RolloutPolicy.from_config([actor], rollout)
        finally:
            await actor.shutdown()
        return
    import ray

    connect(config)
    actors, placement = start_rollout_role(config, model_path, rollout)
    try:
        log.info("policy engines: %d rollout actor(s) placed by Ray for %s", len(actors), model_path)
        await asyncio.wait_for(asyncio.gather(*(actor.health.remote() for actor in actors)), timeout=600)
        yield RolloutPolicy.from_config(actors, rollout)
    finally:
        for actor in actors:
            ray.kill(actor)
        placement.remove()


class OpenAIChatModel:
    """A model behind an OpenAI-compatible chat API: the partner (GPT-4o in the paper) when called, or the evaluated
    policy through :meth:`generate`, which also reports the response's token count from the API's usage.

    The API key is read from the environment variable ``api_key_env`` (or ``api_key_file`` when it is unset), never
    passed in a config; a local server that needs no key works with both unset. Reasoning models return their
    reasoning separately: only the message content is the reply. At most ``max_concurrency`` requests are in flight;
    the client retries rate limits, 5xx and timeouts itself (``max_retries``).
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str = "AMPO_PARTNER_API_KEY",
        api_key_file: Path | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        max_concurrency: int = 30,
        timeout_s: float = 120.0,
        max_retries: int = 5,
    ) -> None:
        api_key = os.environ.get(api_key_env)
        if not api_key and api_key_file is not None:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        # The client insists on a key; a local server ignores it.
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout_s,
                                   max_retries=max_retries)
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self._slots = asyncio.Semaphore(max_concurrency)

    async def _reply(self, messages: list[Message]) -> Generation:
        async with self._slots:
            completion = await self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, top_p=self.top_p,
                max_tokens=self.max_tokens,
            )
        usage = completion.usage
        return Generation(completion.choices[0].message.content or "", usage.completion_tokens if usage else None)

    async def generate(self, batch: list[list[Message]]) -> list[Generation]:
        """One generation per chat, in order (the :class:`Policy` interface)."""
        return list(await asyncio.gather(*(self._reply(messages) for messages in batch)))

    async def __call__(self, batch: list[list[Message]]) -> list[str]:
        """One reply text per chat, in order (the :class:`Partner` interface)."""
        return [generation.text for generation in await self.generate(batch)]

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()
