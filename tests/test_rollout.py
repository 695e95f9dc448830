"""RolloutActor: complete groups with per-token behaviour log-probs, concurrent actors, an update during
generation that loses nothing, health, a restart after a crash, Ray options and a clean shutdown."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.config import RolloutConfig
from actors.records import GroupRequest, SamplingSpec
from actors.engine_io import IncompleteGroupError, RolloutError, group_from_output
from actors.rollout import rollout_actor_options

MESSAGES = (
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Hello, how are you today?"},
)


def engine_config(model_dir: Path, **overrides: object) -> RolloutConfig:
    """Small, fast engines: fp32, eager, 64 MiB of KV cache."""
    fields: dict[str, object] = dict(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        weight_update_timeout_s=60.0,
        max_restarts=1,
    )
    fields.update(overrides)
    return RolloutConfig(**fields)


@pytest.fixture(scope="module")
def actors(ray_local, tiny_model_dir):
    from actors.rollout import create_rollout_actors

    handles = create_rollout_actors(engine_config(tiny_model_dir), tiny_model_dir, num=2, num_cpus=1)
    ray_local.get([a.health.remote() for a in handles], timeout=180)
    yield handles
    for handle in handles:
        ray_local.get(handle.shutdown.remote(), timeout=60)
        ray_local.kill(handle, no_restart=True)


def completion(index: int, tokens: list[int], reason: str | None = "length", logprobs: bool = True) -> SimpleNamespace:
    positions = [{t: SimpleNamespace(logprob=-1.0)} for t in tokens] if logprobs else None
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=positions, finish_reason=reason)


def decode(token_ids: list[int]) -> str:
    return " ".join(map(str, token_ids))


def test_group_from_output_never_returns_fewer_than_n():
    request = GroupRequest("g", "s", prompt_token_ids=(1, 2), sampling=SamplingSpec(n=2, max_tokens=2))
    full = SimpleNamespace(finished=True, outputs=[completion(1, [5, 6]), completion(0, [3, 4], "stop")])
    group = group_from_output(request, [1, 2], full, 7, decode)
    assert [s.index for s in group.samples] == [0, 1]
    assert group.samples[0].behaviour_logprobs == (-1.0, -1.0) and group.policy_version == 7
    assert group.samples[1].text == "5 6"
    with pytest.raises(IncompleteGroupError, match="1 of 2 samples"):
        group_from_output(request, [1, 2], SimpleNamespace(finished=True, outputs=[completion(0, [3])]), 0, decode)
    with pytest.raises(IncompleteGroupError, match="finish reason 'abort'"):
        group_from_output(
            request,
            [1, 2],
            SimpleNamespace(finished=True, outputs=[completion(0, [3]), completion(1, [4], "abort")]),
            0,
            decode,
        )
    with pytest.raises(IncompleteGroupError, match="log-prob positions"):
        group_from_output(
            request,
            [1, 2],
            SimpleNamespace(finished=True, outputs=[completion(0, [3]), completion(1, [4], logprobs=False)]),
            0,
            decode,
        )
    with pytest.raises(IncompleteGroupError, match="0 of 2"):
        group_from_output(request, [1, 2], None, 0, decode)


def test_streamed_deltas_merge_into_samples_whose_tokens_carry_their_policy_version():
    """An update lands between the first and the second delta the actor takes: the second delta was produced after
    the first take, when version 0 was served (some of it maybe after the update: the tag errs old), so it is
    tagged 0; the third delta, produced after the second take (version 1 served then), is tagged 1."""
    from actors.engine_io import VersionedOutput

    def delta(*completions, finished=False):
        return SimpleNamespace(finished=finished, outputs=list(completions))

    merged = VersionedOutput(start_version=0)
    merged.add(delta(completion(0, [3, 4], None), completion(1, [5], None)), serving_version=0)
    merged.add(delta(completion(1, [6, 7], None)), serving_version=1)  # the update landed before this take
    merged.add(delta(completion(0, [8], "stop"), completion(1, [9], "length"), finished=True), serving_version=1)
    request = GroupRequest("g", "s", prompt_token_ids=(1, 2), sampling=SamplingSpec(n=2, max_tokens=4))
    group = group_from_output(request, [1, 2], merged, 0, decode)
    first, second = group.samples
    assert first.response_token_ids == (3, 4, 8) and first.token_versions == (0, 0, 1) and first.finish_reason == "stop"
    assert second.response_token_ids == (5, 6, 7, 9) and second.token_versions == (0, 0, 0, 1)
    assert second.behaviour_logprobs == (-1.0,) * 4 and group.policy_version == 0
    # A delta without log-probs spoils its completion, as a final output without them would.
    spoiled = VersionedOutput(start_version=0)
    spoiled.add(delta(completion(0, [3], "stop"), completion(1, [4], "stop", logprobs=False), finished=True), 0)
    with pytest.raises(IncompleteGroupError, match="log-prob positions"):
        group_from_output(request, [1, 2], spoiled, 0, decode)


def test_ray_options_restart_the_actor_but_never_replay_calls():
    config = RolloutConfig(max_restarts=5)
    options = rollout_actor_options(config, num_cpus=2)
    assert options["max_restarts"] == 5 and options["max_task_retries"] == 0 and options["num_cpus"] == 2
    assert options["max_concurrency"] >= 256
    assert rollout_actor_options(config, max_concurrency=8)["max_concurrency"] == 8


@pytest.mark.slow
def test_group_has_n_samples_with_a_logprob_per_token(ray_local, actors, tiny_model_dir):
    from transformers import AutoTokenizer

    request = GroupRequest("g-chat", "s-1", messages=MESSAGES, sampling=SamplingSpec(n=4, max_tokens=24))
    group = ray_local.get(actors[0].generate.remote(request), timeout=60)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected_prompt = tokenizer.apply_chat_template(
        list(MESSAGES), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert group.group_id == "g-chat" and group.policy_version == 0
    assert [s.index for s in group.samples] == [0, 1, 2, 3]
    for sample in group.samples:
        assert list(sample.prompt_token_ids) == list(expected_prompt)
        assert 1 <= len(sample.response_token_ids) <= 24
        assert len(sample.behaviour_logprobs) == len(sample.response_token_ids)
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in sample.behaviour_logprobs)
        assert sample.finish_reason in ("stop", "length")
        assert (sample.finish_reason == "length") == (len(sample.response_token_ids) == 24)
        assert sample.text == tokenizer.decode(list(sample.response_token_ids), skip_special_tokens=True)
        assert sample.state_id == "s-1"


@pytest.mark.slow
def test_the_router_hands_the_group_on_by_reference(ray_local, actors):
    """The training driver waits for the sample count only; the group stays a reference for a reward actor to read."""
    from cluster.accounting import Counts
    from cluster.router import RolloutRouter

    async def resync() -> None:
        raise AssertionError("no actor was lost")

    request = GroupRequest("g-ref", "s-1", messages=MESSAGES, sampling=SamplingSpec(n=3, max_tokens=8))
    samples, group = asyncio.run(RolloutRouter(actors, resync, Counts()).generate(request))
    assert samples == 3 and isinstance(group, ray_local.ObjectRef)
    assert [s.index for s in ray_local.get(group).samples] == [0, 1, 2]


@pytest.mark.slow
def test_prompt_token_ids_are_used_as_given(ray_local, actors):
    prompt = tuple(range(5, 45))
    request = GroupRequest(
        "g-ids",
        "s-2",
        prompt_token_ids=prompt,
        sampling=SamplingSpec(n=3, max_tokens=8, temperature=0.7, top_k=50, top_p=0.9),
    )
    group = ray_local.get(actors[1].generate.remote(request), timeout=60)
    assert len(group.samples) == 3
    assert all(
        s.prompt_token_ids == prompt and len(s.behaviour_logprobs) == len(s.response_token_ids) for s in group.samples
    )


@pytest.mark.slow
def test_two_actors_serve_at_once(ray_local, actors):
    refs = [
        actor.generate.remote(
            GroupRequest(f"g-{i}-{j}", "s", messages=MESSAGES, sampling=SamplingSpec(n=4, max_tokens=32))
        )
        for i, actor in enumerate(actors)
        for j in range(3)
    ]
    groups = ray_local.get(refs, timeout=120)
    assert [g.group_id for g in groups] == [f"g-{i}-{j}" for i in range(2) for j in range(3)]
    assert all(len(g.samples) == 4 for g in groups)
    health = ray_local.get([a.health.remote() for a in actors])
    assert [h["actor"] for h in health] == [0, 1] and health[0]["pid"] != health[1]["pid"]
    assert all(h["tokens_generated"] > 0 and h["requests_in_flight"] == 0 for h in health)


@pytest.mark.slow
def test_update_during_generation_loses_no_request(ray_local, actors, tiny_model_dir):
    from actors.weights import serialize_weights

    actor = actors[0]
    blob = ray_local.put(serialize_weights(perturbed_state(tiny_model_dir).items()))

    long = SamplingSpec(n=4, max_tokens=512)
    refs = [
        actor.generate.remote(GroupRequest(f"long-{i}", "s", prompt_token_ids=tuple(range(3, 40)), sampling=long))
        for i in range(4)
    ]
    wait_in_flight(ray_local, actor, 4)
    assert ray_local.get(actor.update_weights.remote(1, blob), timeout=60) is True
    during = ray_local.get(actor.health.remote())

    groups = ray_local.get(refs, timeout=120)
    assert all(len(g.samples) == 4 and g.policy_version == 0 for g in groups)
    # Tokens sampled after the update carry version 1, those before it version 0, in that order.
    versions = [s.token_versions for g in groups for s in g.samples]
    assert all(len(v) == len(s.response_token_ids) and list(v) == sorted(v) for v, s in
               zip(versions, (s for g in groups for s in g.samples)))
    assert any(v[0] == 0 and v[-1] == 1 for v in versions), "no response spans the update"
    assert all(len(s.behaviour_logprobs) == len(s.response_token_ids) for g in groups for s in g.samples)
    assert during["requests_in_flight"] > 0, "the update did not overlap the generation"
    after = ray_local.get(
        actor.generate.remote(GroupRequest("after", "s", messages=MESSAGES, sampling=SamplingSpec(n=2, max_tokens=8)))
    )
    assert after.policy_version == 1 and ray_local.get(actor.version.remote()) == 1


@pytest.mark.slow
def test_a_drain_update_lets_requests_in_flight_finish_and_holds_new_ones(ray_local, tiny_model_dir):
    """`rollout.weight_update: drain`: the update lands only after the requests in flight finished under the old
    weights, and a request sent meanwhile is admitted after it, under the new version."""
    from actors.rollout import create_rollout_actors
    from actors.weights import serialize_weights

    (actor,) = create_rollout_actors(engine_config(tiny_model_dir, weight_update="drain"), tiny_model_dir, num=1, num_cpus=1)
    try:
        blob = ray_local.put(serialize_weights(perturbed_state(tiny_model_dir).items()))
        long = SamplingSpec(n=2, max_tokens=384)
        refs = [
            actor.generate.remote(GroupRequest(f"long-{i}", "s", prompt_token_ids=tuple(range(3, 40)), sampling=long))
            for i in range(2)
        ]
        wait_in_flight(ray_local, actor, 2)
        update = actor.update_weights.remote(1, blob)
        time.sleep(0.5)  # the update is draining now
        late = actor.generate.remote(GroupRequest("late", "s", messages=MESSAGES, sampling=SamplingSpec(n=2, max_tokens=8)))
        assert ray_local.get(update, timeout=120) is True
        finished, _ = ray_local.wait(refs, num_returns=2, timeout=0)
        assert len(finished) == 2, "the update landed while requests were still in flight"
        assert [g.policy_version for g in ray_local.get(refs)] == [0, 0]
        assert ray_local.get(late, timeout=60).policy_version == 1
    finally:
        ray_local.get(actor.shutdown.remote(), timeout=60)
        ray_local.kill(actor, no_restart=True)


def wait_in_flight(ray_local, actor, count: int, timeout_s: float = 60) -> None:
    """Until `count` requests are being generated on `actor`."""
    deadline = time.monotonic() + timeout_s
    while ray_local.get(actor.health.remote())["requests_in_flight"] < count:
        assert time.monotonic() < deadline, "the long requests never started"
        time.sleep(0.05)


def perturbed_state(model_dir: Path) -> dict:
    """The tiny model's weights with small seeded noise added: an update that changes what the engine computes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.state_dict()


@pytest.mark.slow
def test_health_reports_the_actor_s_own_work(ray_local, actors):
    before = ray_local.get(actors[1].health.remote(), timeout=10)
    request = GroupRequest("health", "s", messages=MESSAGES, sampling=SamplingSpec(n=2, max_tokens=8))
    group = ray_local.get(actors[1].generate.remote(request), timeout=120)
    health = ray_local.get(actors[1].health.remote(), timeout=10)
    assert set(health) >= {"actor", "alive", "version", "requests_in_flight", "tokens_generated", "tokens_per_second", "uptime_s"}
    assert health["actor"] == 1 and health["alive"] and health["requests_in_flight"] == 0
    assert health["version"] == group.policy_version == ray_local.get(actors[1].version.remote())
    generated = sum(len(s.response_token_ids) for s in group.samples)
    assert health["tokens_generated"] - before["tokens_generated"] == generated > 0
    assert health["tokens_per_second"] > 0 and health["uptime_s"] > before["uptime_s"]


@pytest.mark.slow
def test_a_killed_actor_restarts_and_takes_the_resent_group(ray_local, actors):
    """The call in flight fails (no task retries); Ray restarts the actor from `model_path` at version 0;
    the driver re-sends the group."""
    import os
    import signal

    from ray.exceptions import RayActorError

    actor = actors[0]
    request = GroupRequest(
        "held", "s", prompt_token_ids=tuple(range(3, 40)), sampling=SamplingSpec(n=4, max_tokens=512)
    )
    held = actor.generate.remote(request)
    before = ray_local.get(actor.health.remote())
    os.kill(before["pid"], signal.SIGKILL)
    with pytest.raises(RayActorError):
        ray_local.get(held, timeout=60)
    deadline = time.monotonic() + 120
    while True:
        try:
            after = ray_local.get(actor.health.remote(), timeout=120)
            break
        except RayActorError:
            assert time.monotonic() < deadline, "the actor did not come back"
            time.sleep(0.5)
    assert after["pid"] != before["pid"] and after["version"] == 0 and after["tokens_generated"] == 0
    assert len(ray_local.get(actor.generate.remote(request), timeout=60).samples) == 4


@pytest.mark.slow
def test_shutdown_is_clean_and_final(ray_local, actors):
    """Runs last: it retires the second actor (the fixture's own shutdown is then a no-op)."""
    actor = actors[1]
    ray_local.get(actor.shutdown.remote(), timeout=60)
    ray_local.get(actor.shutdown.remote(), timeout=10)  # idempotent
    assert ray_local.get(actor.health.remote())["alive"] is False
    with pytest.raises(RolloutError, match="shut down"):
        ray_local.get(
            actor.generate.remote(
                GroupRequest("late", "s", messages=MESSAGES, sampling=SamplingSpec(n=1, max_tokens=4))
            )
        )
