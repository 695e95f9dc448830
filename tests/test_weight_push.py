"""Weight pushes into a running engine: after a push of new fp32 weights by either transport, vLLM's
log-probs of a fixed continuation equal those of a transformers model holding the pushed weights, and a
stale tied lm_head would be caught. Also: bucketing, tied-alias handling, version rules and timeouts."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from actors.config import RolloutConfig
from actors.records import GroupRequest, SamplingSpec
from actors.rollout import WeightUpdateTimeout
from actors.weights import WeightBroadcaster, plan_buckets, serialize_weights, weight_specs

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = tuple(range(3, 43))
TOLERANCE = 1e-3
UPDATE_TIMEOUT_S = 3.0
GROUP_TIMEOUT_S = 4.0
"""The gloo group gives up a little after the actor's deadline, so the engine is free soon after a timeout."""


def start_actor(ray_local, tiny_model_dir):
    from actors.rollout import create_rollout_actors

    config = RolloutConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        weight_update_timeout_s=UPDATE_TIMEOUT_S,
        max_restarts=0,
    )
    (handle,) = create_rollout_actors(config, tiny_model_dir, num=1, num_cpus=1)
    ray_local.get(handle.health.remote(), timeout=180)
    yield handle
    ray_local.get(handle.shutdown.remote(), timeout=60)
    ray_local.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def actor(ray_local, tiny_model_dir):
    """The actor the push tests share, in order: versions 1 and 2, then the refusals and the timeout."""
    yield from start_actor(ray_local, tiny_model_dir)


@pytest.fixture
def own_actor(ray_local, tiny_model_dir):
    yield from start_actor(ray_local, tiny_model_dir)


@pytest.fixture(scope="module")
def broadcaster(ray_local, actor):
    """A gloo weight group of the test process (rank 0) and the actor's engine worker (rank 1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    joined = actor.join_weight_group.remote("127.0.0.1", port, 1, 2, "gloo", GROUP_TIMEOUT_S)
    sender = WeightBroadcaster("127.0.0.1", port, 2, "gloo", GROUP_TIMEOUT_S)
    assert ray_local.get(joined, timeout=30) == 1
    yield sender
    sender.close()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The learner's side: a transformers model whose weights are perturbed and pushed, test after test."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def perturb(model: torch.nn.Module, seed: int) -> torch.Tensor:
    """Add seeded noise to every parameter, the (tied) embedding included; returns the embedding as it was."""
    old_embedding = model.get_input_embeddings().weight.detach().clone()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return old_embedding


def engine_continuation(ray_local, actor, prompt: tuple[int, ...] = PROMPT) -> tuple[list[int], list[float]]:
    """A greedy continuation of the prompt and vLLM's log-prob of each of its tokens."""
    request = GroupRequest(
        "score", "s", prompt_token_ids=prompt, sampling=SamplingSpec(n=1, temperature=0.0, max_tokens=24)
    )
    (sample,) = ray_local.get(actor.generate.remote(request), timeout=60).samples
    return list(sample.response_token_ids), list(sample.behaviour_logprobs)


def hf_logprobs(
    model: torch.nn.Module, response: list[int], lm_head: torch.Tensor | None = None, prompt: tuple[int, ...] = PROMPT
) -> list[float]:
    """Teacher-forced log-probs of `response` after the prompt; `lm_head` replaces the output matrix (to
    see what an engine with a stale tied lm_head would report)."""
    ids = torch.tensor([list(prompt) + response])
    with torch.no_grad():
        if lm_head is None:
            logits = model(ids).logits[0]
        else:
            logits = model.model(ids).last_hidden_state[0] @ lm_head.T
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    start = len(prompt) - 1
    return [logprobs[start + i, token].item() for i, token in enumerate(response)]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_push(
    ray_local, actor, model: torch.nn.Module, old_embedding: torch.Tensor, transport: str, prompt: tuple[int, ...] = PROMPT
) -> None:
    response, engine = engine_continuation(ray_local, actor, prompt)
    pushed = max_abs_diff(engine, hf_logprobs(model, response, prompt=prompt))
    stale = max_abs_diff(hf_logprobs(model, response, lm_head=old_embedding, prompt=prompt), hf_logprobs(model, response, prompt=prompt))
    print(f"{transport}: max |vLLM - transformers| = {pushed:.2e}; with a stale tied lm_head it would be {stale:.2e}")
    assert pushed < TOLERANCE
    assert stale > 100 * TOLERANCE, "the perturbation is too small to expose a stale lm_head"


def test_serialized_weights_drop_the_tied_alias_and_round_trip(hf_model):
    import safetensors.torch

    state = hf_model.state_dict()
    assert "lm_head.weight" in state
    loaded = safetensors.torch.load(serialize_weights(state.items()))
    assert "lm_head.weight" not in loaded and set(loaded) == set(state) - {"lm_head.weight"}
    assert all(torch.equal(loaded[name], state[name]) for name in loaded)
    assert sorted(name for name, _, _ in weight_specs(state.items())) == sorted(loaded)


def test_buckets_cover_every_tensor_once_within_the_budget():
    specs = [("a", "float32", [10, 10]), ("b", "bfloat16", [3]), ("c", "float32", [1000]), ("d", "int64", [2, 2])]
    buckets = plan_buckets(specs, bucket_bytes=512)
    assert [[index for index, _ in bucket] for bucket in buckets] == [[0, 1], [2], [3]]
    assert all(offset % 64 == 0 for bucket in buckets for _, offset in bucket)
    assert plan_buckets(specs, bucket_bytes=1 << 20) == [[(0, 0), (1, 448), (2, 512), (3, 4544)]]
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(specs, 0)


def test_broadcaster_coexists_with_an_existing_default_group():
    """The learner already owns the default process group; a weight group next to it must not disturb it."""
    code = textwrap.dedent(
        """
        import socket, threading, torch, torch.distributed as dist
        from actors.weights import WeightBroadcaster, WeightGroup, receive_broadcast, weight_specs
        def port():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port()}", rank=0, world_size=1)
        p = port()
        tensors = [("w", torch.randn(300, 7)), ("b", torch.arange(5, dtype=torch.bfloat16))]
        got = {}
        def receive():
            group = WeightGroup("127.0.0.1", p, 1, 2, "gloo", 20.0)
            got.update(receive_broadcast(group, weight_specs(tensors), 1024))
        thread = threading.Thread(target=receive); thread.start()
        sender = WeightBroadcaster("127.0.0.1", p, 2, "gloo", 20.0)
        sender.send(tensors, 1024); thread.join(30)
        assert all(torch.equal(got[name], t) for name, t in tensors)
        x = torch.ones(1); dist.all_reduce(x); assert x.item() == 1.0
        dist.destroy_process_group()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.slow
def test_push_through_the_object_store_matches_transformers(ray_local, actor, hf_model):
    old_embedding = perturb(hf_model, seed=1)
    blob = ray_local.put(serialize_weights(hf_model.state_dict().items()))
    assert ray_local.get(actor.update_weights.remote(1, blob), timeout=60) is True
    assert ray_local.get(actor.version.remote()) == 1
    check_push(ray_local, actor, hf_model, old_embedding, "object store")


@pytest.mark.slow
def test_a_prompt_cached_before_an_update_is_scored_by_the_new_weights(ray_local, own_actor, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    actor = own_actor
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # The prompt is computed once with the current weights, so the engine's prefix cache holds its full KV blocks
    # (vLLM's CPU blocks hold 128 tokens: the prompt fills two); after the update the same prompt must be
    # recomputed, or the continuation's log-probs mix old and new weights.
    prompt = tuple(3 + i % 400 for i in range(300))
    engine_continuation(ray_local, actor, prompt)
    old_embedding = perturb(hf_model, seed=5)
    assert ray_local.get(actor.update_weights.remote(1, ray_local.put(serialize_weights(hf_model.state_dict().items()))), timeout=60)
    check_push(ray_local, actor, hf_model, old_embedding, "object store, prompt cached before the update", prompt)


@pytest.mark.slow
def test_push_through_a_broadcast_group_matches_transformers(ray_local, actor, broadcaster, hf_model):
    old_embedding = perturb(hf_model, seed=2)
    named = list(hf_model.state_dict().items())
    bucket_bytes = 64 << 10  # several buckets for the tiny model
    received = actor.receive_weights.remote(2, weight_specs(named), bucket_bytes)
    broadcaster.send(named, bucket_bytes)
    assert ray_local.get(received, timeout=60) is True
    assert ray_local.get(actor.version.remote()) == 2
    check_push(ray_local, actor, hf_model, old_embedding, "broadcast")


@pytest.mark.slow
def test_versions_only_move_forward(ray_local, actor, broadcaster, hf_model, tiny_model_dir):
    """Re-sent or older versions are ignored by both transports; the engine keeps the version-2 weights."""
    from transformers import AutoModelForCausalLM

    before = engine_continuation(ray_local, actor)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    perturb(other, seed=99)
    named = list(other.state_dict().items())
    assert ray_local.get(actor.update_weights.remote(1, serialize_weights(named)), timeout=60) is False
    received = actor.receive_weights.remote(2, weight_specs(named), 1 << 20)
    broadcaster.send(named, 1 << 20)  # a broadcast is collective: the stale receiver still takes part
    assert ray_local.get(received, timeout=60) is False
    assert ray_local.get(actor.version.remote()) == 2 and ray_local.get(actor.health.remote())["version"] == 2
    assert engine_continuation(ray_local, actor) == before


@pytest.mark.slow
def test_an_update_that_cannot_finish_times_out(ray_local, actor, broadcaster, hf_model):
    """Runs after the pushes: the receiver waits for a broadcast the sender never makes."""
    named = list(hf_model.state_dict().items())
    start = time.monotonic()
    with pytest.raises(WeightUpdateTimeout, match=r"version 3 via broadcast did not finish within 3\.0 s"):
        ray_local.get(actor.receive_weights.remote(3, weight_specs(named), 1 << 20), timeout=60)
    elapsed = time.monotonic() - start
    assert UPDATE_TIMEOUT_S <= elapsed < UPDATE_TIMEOUT_S + 10.0  # the margin is Ray latency on a busy machine
    assert ray_local.get(actor.version.remote()) == 2
    response, logprobs = engine_continuation(ray_local, actor)  # still serving, with the version-2 weights
    assert max_abs_diff(logprobs, hf_logprobs(hf_model, response)) < TOLERANCE
    assert ray_local.get(actor.health.remote())["in_weight_group"] is False
