"""Weight publishing: the streamed safetensors blob, broadcast bucketing, pushes into a live rollout actor by both
transports while the learner keeps stepping, and loud reporting of failed or late pushes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from learner_fixtures import make_groups, stored

from actors.config import RolloutConfig
from actors.records import GroupRequest, SamplingSpec
from actors.weights import plan_buckets
from learner.config import AlgorithmConfig, LearnerConfig
from learner.publish import BroadcastSender, SafetensorsBlob, WeightPushError

TOLERANCE = 1e-3
PROMPT = tuple(range(3, 43))


def specs_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in tensors.items()]


def test_safetensors_blob_round_trip_and_checks() -> None:
    tensors = {
        "model.embed_tokens.weight": torch.randn(7, 4),
        "model.norm.weight": torch.randn(4).to(torch.bfloat16),
        "scalar": torch.tensor(3.0),
    }
    blob = SafetensorsBlob(specs_of(tensors))
    for name, tensor in tensors.items():
        blob.write(name, tensor)
    first = blob.finish()
    loaded = safetensors.torch.load(bytes(first))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())

    # The next push assembles its file in the same buffer; one of another size gets a new buffer.
    changed = {name: tensor + 1 for name, tensor in tensors.items()}
    again = SafetensorsBlob(specs_of(changed), first)
    for name, tensor in changed.items():
        again.write(name, tensor)
    second = again.finish()
    assert second is first
    assert all(torch.equal(safetensors.torch.load(bytes(second))[n], t) for n, t in changed.items())
    assert SafetensorsBlob(specs_of({"x": torch.zeros(3)}), first)._buffer is not first

    partial = SafetensorsBlob(specs_of(tensors))
    with pytest.raises(ValueError, match="spec says"):
        partial.write("model.norm.weight", torch.randn(5))
    with pytest.raises(ValueError, match="never written"):
        partial.finish()


class _RecordingBroadcaster:
    def __init__(self) -> None:
        self.sent: list[list[str]] = []

    def send(self, named_tensors, bucket_bytes: int):
        self.sent.append([name for name, _ in named_tensors])


def test_broadcast_sender_sends_each_planned_bucket_once_complete() -> None:
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([100, 300, 50, 600, 20, 20])}
    specs = specs_of(tensors)
    bucket_bytes = 1600  # 400 floats per bucket
    recorder = _RecordingBroadcaster()
    sender = BroadcastSender(recorder, ("127.0.0.1", 0, 2))
    sent = sender.send(specs, iter(tensors.items()), bucket_bytes)
    planned = [[specs[i][0] for i, _ in bucket] for bucket in plan_buckets(specs, bucket_bytes)]
    assert recorder.sent == planned and len(planned) > 2
    assert sent == sum(t.numel() * 4 for t in tensors.values())
    with pytest.raises(ValueError, match="out of step"):
        sender.send(specs, iter(reversed(tensors.items())), bucket_bytes)


# --------------------------------------------------------------------------------------------------- live actors


def engine_logprobs(ray, actor) -> tuple[list[int], list[float]]:
    request = GroupRequest("probe", "s", prompt_token_ids=PROMPT, sampling=SamplingSpec(n=1, temperature=0.0, max_tokens=16))
    (sample,) = ray.get(actor.generate.remote(request), timeout=60).samples
    return list(sample.response_token_ids), list(sample.behaviour_logprobs)


def learner_gap(ray, group, actor) -> float:
    """Max |vLLM − learner| log-prob over a greedy continuation the engine samples with the pushed weights."""
    from learner.batches import TrainSample

    tokens, engine = engine_logprobs(ray, actor)
    (learner,) = group.logprobs([TrainSample(PROMPT, tuple(tokens), tuple(engine), 0.0)])
    return max(abs(a - b) for a, b in zip(engine, learner))


@pytest.mark.slow
def test_pushes_reach_a_live_rollout_actor_by_both_transports(ray_local, tiny_model_dir: Path) -> None:
    """2 learner ranks push to a vLLM rollout actor: after each push the engine's log-probs equal the learner's
    (fp32 both), the learner steps on while a push is in flight, and the actor reports the new version."""
    from actors.rollout import create_rollout_actors
    from learner.group import LearnerGroup

    ray = ray_local
    rollout = RolloutConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=64 << 20,
        weight_update_timeout_s=60.0,
        max_restarts=0,
    )
    (actor,) = create_rollout_actors(rollout, tiny_model_dir, num=1, num_cpus=1)
    learner = LearnerConfig(num_ranks=2, micro_batch_size=4, lr=1e-2, mixed_precision="fp32", gradient_checkpointing=False, dist_timeout_s=60.0)
    group = LearnerGroup(learner, tiny_model_dir, algorithm=AlgorithmConfig(max_staleness=4))
    try:
        ray.get(actor.health.remote(), timeout=180)
        before = learner_gap(ray, group, actor)  # same initial weights on both sides
        initial_tokens, initial_engine = engine_logprobs(ray, actor)
        group.connect_rollout([actor], rollout)
        group.step(stored(make_groups(2, prefix="a")), version=0)
        pushed = group.publish(1)
        group.step(stored(make_groups(2, prefix="b")), version=1)  # goes on while version 1 travels
        first = pushed.result(timeout=120)
        assert first.ok and first.transport == "object_store" and ray.get(actor.version.remote()) == 1, first.describe()
        group.publish(2).result(timeout=120)
        object_store_gap = learner_gap(ray, group, actor)

        group.connect_rollout([actor], rollout.model_copy(update={"weight_transport": "broadcast"}))
        group.step(stored(make_groups(2, prefix="c")), version=2)
        report = group.publish(3).result(timeout=120)
        assert report.ok and report.transport == "broadcast", report.describe()
        assert ray.get(actor.version.remote()) == 3
        broadcast_gap = learner_gap(ray, group, actor)
        from learner.batches import TrainSample

        (now,) = group.logprobs([TrainSample(PROMPT, tuple(initial_tokens), tuple(initial_engine), 0.0)])
        moved = max(abs(a - b) for a, b in zip(now, initial_engine))
        print(
            f"max |vLLM - learner| log-prob: initial {before:.1e}, object store {object_store_gap:.1e}, "
            f"broadcast {broadcast_gap:.1e}; the steps moved them by up to {moved:.1e}; "
            f"push latencies {first.seconds} / {report.seconds} s"
        )
        assert moved > 10 * TOLERANCE, "the learner steps must change the weights for the pushes to mean anything"
        assert before < TOLERANCE and object_store_gap < TOLERANCE and broadcast_gap < TOLERANCE
        assert all(r.ok for r in group.publisher.poll())
    finally:
        group.shutdown()
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor, no_restart=True)


@pytest.mark.slow
def test_failed_and_late_pushes_are_reported(ray_local, tiny_model_dir: Path) -> None:
    from learner.group import LearnerGroup

    ray = ray_local

    @ray.remote(num_cpus=0)
    class Stub:
        def __init__(self, behaviour: str) -> None:
            self.behaviour = behaviour

        def health(self) -> dict:
            return {"dtype": "float32"}  # the engine dtype the weights are pushed in

        def update_weights(self, version: int, weights: bytes) -> bool:
            if self.behaviour == "slow":
                time.sleep(5)
            if self.behaviour == "broken":
                raise RuntimeError("engine exploded")
            assert safetensors.torch.load(bytes(weights))
            return True

    actors = [Stub.remote("ok"), Stub.remote("slow"), Stub.remote("broken")]
    learner = LearnerConfig(num_ranks=1, mixed_precision="fp32", gradient_checkpointing=False, dist_timeout_s=60.0)
    group = LearnerGroup(learner, tiny_model_dir, algorithm=AlgorithmConfig())
    try:
        group.connect_rollout(actors, RolloutConfig(weight_update_timeout_s=2.0))
        report = group.publish(7).result(timeout=30)
        assert not report.ok and list(report.seconds) == [0]
        assert report.failures[1] == "no acknowledgement within 2 s"
        assert "engine exploded" in report.failures[2]
        assert "actor 1: no acknowledgement" in report.describe()
        group.publish(8)
        with pytest.raises(WeightPushError, match="engine exploded"):
            group.publisher.wait(timeout_s=30)
    finally:
        group.shutdown()
        for a in actors:
            ray.kill(a)
