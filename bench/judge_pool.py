"""Throughput of the reward pool against a judge with fixed latency.

The pool (``ACTORS`` Ray reward actors, ``CONCURRENCY`` judge calls in flight each, so C = ACTORS x CONCURRENCY in
total) scores ``GROUPS`` groups of ``GROUP_SIZE`` well-formed samples, all submitted at once, against the
fault-injecting test server answering every request after ``LATENCY_S`` with no faults. A perfect pool keeps C calls
in flight all the time and reaches C / latency requests per second; the bench prints the achieved rate, that ideal,
and ends with ``RESULT judge_pool_efficiency=<achieved / ideal>`` (goal >= 0.90).

Run from the repository root: ``.venv/bin/python bench/judge_pool.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, the bench directory rather than the repository root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from actors.records import Group, GroupRequest, Sample  # noqa: E402
from reward.config import JudgeConfig, RewardConfig  # noqa: E402
from testing.fault_server import FaultConfig, FaultServer  # noqa: E402
from reward.modes import format_response  # noqa: E402
from reward.pool import RewardPool  # noqa: E402

LATENCY_S = 0.2
ACTORS = 2
CONCURRENCY = 16
# 3200 calls: a 20 s burst, so that its start and end (the last wave of calls and the scored groups coming back, up to
# half a second together) weigh about as little as they do in a training run, where the pool scores continuously.
GROUPS = 400
GROUP_SIZE = 8

CONTEXT = {
    "turn": 0,
    "dialog": ['Turn 0: Ana said: "Hi Ben!"', "Turn 1: Ben said:"],
    "agent1_name": "Ana",
    "agent2_name": "Ben",
    "agent1_goal": "Borrow Ben's bike.",
    "agent2_goal": "Keep the bike safe.",
    "state_reward": {"agent1": {"score": 5.0}, "agent2": {"score": 5.0}},
}


def make_group(name: str) -> Group:
    request = GroupRequest(group_id=name, state_id=name, prompt_token_ids=(1,), context=CONTEXT)
    samples = tuple(
        Sample(
            group_id=name,
            state_id=name,
            index=i,
            prompt_token_ids=(1,),
            response_token_ids=(2, 3),
            behaviour_logprobs=(-1.0, -1.0),
            policy_version=0,
            text=format_response(1, None, f"Sure, {name} answer {i}."),
            finish_reason="stop",
        )
        for i in range(GROUP_SIZE)
    )
    return Group(request=request, samples=samples)


def main() -> None:
    from testing.tiny_model import build_tiny_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 28)
    with tempfile.TemporaryDirectory() as tmp, FaultServer(FaultConfig(latency_s=LATENCY_S)) as server:
        tokenizer_dir = build_tiny_model(Path(tmp) / "tiny")
        judge = JudgeConfig(
            base_url=server.base_url,
            model="fault-judge",
            max_concurrency=CONCURRENCY,
            timeout_s=10.0,
            max_tokens=64,
        )
        pool = RewardPool(RewardConfig(judge=judge, num_actors=ACTORS), tokenizer_dir)
        pool.wait_ready()
        # Warm up: every actor opens all its connections and runs its code paths once.
        warmup = (CONCURRENCY + GROUP_SIZE - 1) // GROUP_SIZE * ACTORS
        ray.get([pool.score(make_group(f"warmup{i}")).group for i in range(warmup)])
        server.reset()
        calls_before = pool.stats().judge.calls

        groups = [make_group(f"g{i}") for i in range(GROUPS)]
        started = time.monotonic()
        refs = [pool.score(group).group for group in groups]
        results = ray.get(refs)
        elapsed = time.monotonic() - started
        calls = pool.stats().judge.calls - calls_before
        arrivals = sorted(entry.arrived for entry in server.log)
        pool.shutdown()

    requests = GROUPS * GROUP_SIZE
    scored = sum(s.valid for group in results for s in group.samples)
    if scored != requests:
        raise SystemExit(f"only {scored} of {requests} samples were scored; the bench measures a fault-free run")
    concurrency = ACTORS * CONCURRENCY
    achieved = requests / elapsed
    ideal = concurrency / LATENCY_S
    print(f"cpus: {os.cpu_count()} (1-min load average {os.getloadavg()[0]:.1f}); actors: {ACTORS} x {CONCURRENCY} "
          f"calls in flight; judge latency {LATENCY_S} s")
    print(f"requests: {requests} in {elapsed:.2f} s, judge calls counted by the pool: {calls}")
    print(f"server saw at most {server.max_concurrent} concurrent requests; first one {arrivals[0] - started:.3f} s "
          f"after submission, last one {elapsed - (arrivals[-1] - started):.3f} s before the end")
    print(f"achieved: {achieved:.1f} requests/s; ideal C / latency = {concurrency} / {LATENCY_S} = {ideal:.1f} /s")
    print(f"RESULT judge_pool_efficiency={achieved / ideal:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
