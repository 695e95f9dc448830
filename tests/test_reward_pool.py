"""The reward scorer and the Ray reward pool: hand-computed rewards, failures kept explicit, custom rewards, and
200 samples against a server that injects 30 % faults, with every count checked against what it injected."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter

import pytest
from judge_fixtures import BROKEN_RESPONSE, make_context, make_group, response, reward_config
from prometheus_client.parser import text_string_to_metric_families

from testing.fault_server import OUTCOMES, FaultConfig, FaultServer
from actors.records import summarise
from reward.metrics import FORMAT_ERROR_MODE
from reward.pool import RewardPool, RewardScorer, load_tokenizer
from reward.prompts import goal_prompt
from reward.scores import answer_length_score


def fixed_answer(agent1: int, agent2: int):
    text = json.dumps({"agent1": {"reasoning": "a", "score": agent1}, "agent2": {"reasoning": "b", "score": agent2}})
    return lambda prompt: text


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def score(config, tokenizer, group):
    async def run():
        scorer = RewardScorer(config, tokenizer)
        try:
            return await scorer.score(group), scorer.stats()
        finally:
            await scorer.aclose()

    return asyncio.run(run())


# ---- the scorer, without Ray -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_rewards_hand_computed(tokenizer):
    answer = '"To visit my aunt, I will bring it back on Sunday."'
    texts = [response(answer, mode=1), response(answer.replace("aunt", "uncle"), mode=3), BROKEN_RESPONSE]
    with FaultServer(FaultConfig(answer=fixed_answer(8, 2))) as server:
        # turn 2: agent1 acts, s0 = 6, s1 = 8: (8 - 6) / (10 - 6) = 0.5 -> 0.75
        scored, stats = score(reward_config(server.base_url), tokenizer, make_group(texts, make_context(turn=2)))
        assert server.counts() == {"ok": 2}  # the broken response never reached the judge
        # turn 3: agent2 acts, s0 = 4, s1 = 2: -2 / 4 = -0.5 -> 0.25
        odd, _ = score(reward_config(server.base_url), tokenizer, make_group(texts[:1], make_context(turn=3)))
    first, second, broken = scored.samples
    tokens = len(tokenizer.tokenize(answer))
    assert first.answer_tokens == tokens and first.length_score == answer_length_score(tokens) == 1.0
    assert (first.mode, first.answer, first.judge_before, first.judge_after) == (1, answer, 6.0, 8.0)
    assert first.goal_progress == 0.75 and first.reward == 0.75 and first.failure is None
    assert second.mode == 3 and second.reward == 0.75
    assert broken.reward == -2.0 and not broken.format_valid and broken.mode is None
    assert broken.failure.startswith(FORMAT_ERROR_MODE + ": ")
    assert [s.sample.index for s in scored.samples] == [0, 1, 2] and scored.group_id == "g0"
    assert broken.response_length == len(broken.sample.response_token_ids)
    assert odd.samples[0].judge_before == 4.0 and odd.samples[0].judge_after == 2.0 and odd.samples[0].reward == 0.25
    assert stats.by_mode == {"1": 1, "3": 1, FORMAT_ERROR_MODE: 1} and stats.invalid == {} and stats.groups == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_judge_failure_is_never_a_score(tokenizer):
    texts = [response('"Fine."')]
    with FaultServer(FaultConfig(script=["server_error"] * 10)) as server:
        strict, stats = score(reward_config(server.base_url, max_retries=1), tokenizer, make_group(texts))
        server.reset()
        config = reward_config(server.base_url, max_retries=1).model_copy(update={"judge_failure_as_zero": True})
        as_zero, _ = score(config, tokenizer, make_group(texts))
    sample = strict.samples[0]
    assert sample.reward is None and not sample.valid and sample.failure == "server_error" and sample.format_valid
    assert stats.invalid == {"server_error": 1} and stats.judge.failures == {"server_error": 1}
    assert as_zero.samples[0].reward == 0.0 and as_zero.samples[0].failure == "server_error"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_identical_answers_share_one_question_and_bad_state_is_explicit(tokenizer):
    texts = [response('"Same."'), response('"Same."', mode=2), response('"Other."')]
    with FaultServer() as server:
        scored, stats = score(reward_config(server.base_url), tokenizer, make_group(texts))
        assert server.counts() == {"ok": 2} and stats.judge.questions == 2
        assert scored.samples[0].judge_after == scored.samples[1].judge_after
        context = {k: v for k, v in make_context().items() if k != "state_reward"}
        bad, bad_stats = score(reward_config(server.base_url), tokenizer, make_group(texts, context))
    assert [s.failure for s in bad.samples] == ["bad_state"] * 3 and all(s.reward is None for s in bad.samples)
    assert bad_stats.invalid == {"bad_state": 3}


@pytest.mark.timeout(60)
def test_custom_reward_replaces_the_judge(tokenizer):
    custom = {"custom_reward": "reward.custom:answer_length_reward"}
    config = reward_config("http://127.0.0.1:9/v1").model_copy(update=custom)
    scored, stats = score(config, tokenizer, make_group([response('"Hi."'), BROKEN_RESPONSE]))
    assert scored.samples[0].reward == 1.0 and scored.samples[0].judge_after is None
    assert scored.samples[1].reward == -2.0
    assert stats.judge.calls == 0
    # The format-error reward is a setting (the paper's −2 by default); the sample stays invalid for the mode term.
    flat = config.model_copy(update={"format_error_reward": 1.0})
    scored, _ = score(flat, tokenizer, make_group([response('"Hi."'), BROKEN_RESPONSE]))
    assert scored.samples[1].reward == 1.0 and scored.samples[1].mode is None and not scored.samples[1].format_valid
    with pytest.raises(ValueError, match="module:function"):
        RewardScorer(config.model_copy(update={"custom_reward": "no_colon"}), tokenizer)


# ---- the Ray pool -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server():
    with FaultServer() as server:
        yield server


@pytest.fixture(scope="module")
def pool(ray_local, fault_server, tiny_model_dir):
    # Fast failures: one HTTP retry, two parse rounds (the second at temperature 1). The 1.5 s timeout leaves room
    # for a loaded machine: a request the server never saw must not time out, or the counts could not match.
    config = reward_config(
        fault_server.base_url,
        num_actors=2,
        timeout_s=1.5,
        max_retries=1,
        parse_rounds=2,
        greedy_rounds=1,
        max_concurrency=16,
        backoff_base_s=0.01,
        backoff_max_s=0.1,
    )
    reward_pool = RewardPool(config, tiny_model_dir, num_cpus=0.5)
    reward_pool.wait_ready()
    yield reward_pool
    reward_pool.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pool_under_30_percent_faults(pool, fault_server, ray_local):
    faults = {kind: 1.0 for kind in OUTCOMES if kind != "ok"}
    fault_server.reset(FaultConfig(fault_rate=0.3, mix=faults, hang_s=5.0, retry_after_s=0.05, seed=7, latency_s=0.01))
    before = pool.stats()
    groups = []
    for g in range(25):
        texts = [response(f'"Answer {g}-{i}: shall we meet at {i} pm?"', mode=1 + i % 4) for i in range(7)]
        texts.append(BROKEN_RESPONSE)
        groups.append(make_group(texts, make_context(turn=g % 2), group_id=f"g{g}"))
    started = time.monotonic()
    refs = [pool.score(group).group for group in groups]
    scored_groups = ray_local.get(refs, timeout=150)
    elapsed = time.monotonic() - started
    stats = pool.stats()
    counts = fault_server.counts()

    failures: dict[str, int] = {}
    scored = 0
    for group, scored_group in zip(groups, scored_groups):
        assert scored_group.group_id == group.group_id
        assert [s.sample for s in scored_group.samples] == list(group.samples)  # whole and in order
        context = group.request.context
        for sample in scored_group.samples:
            if not sample.format_valid:
                assert sample.reward == -2.0 and sample.failure.startswith(FORMAT_ERROR_MODE)
                continue
            outcomes = fault_server.outcomes_for(goal_prompt(context, sample.answer))
            assert outcomes, "every well-formed sample was judged"
            if sample.reward is None:
                # the reason is what the server did last to this sample's question
                assert sample.failure == outcomes[-1] and sample.failure in OUTCOMES
                failures[sample.failure] = failures.get(sample.failure, 0) + 1
            else:
                assert outcomes[-1] == "ok" and sample.failure is None and 0.0 <= sample.reward <= 1.0
                scored += 1
    assert scored + sum(failures.values()) == 175 and scored > 100

    delta_calls = stats.judge.calls - before.judge.calls
    assert delta_calls == sum(counts.values())
    for kind in OUTCOMES:
        if kind != "ok":
            assert stats.judge.errors[kind] - before.judge.errors[kind] == counts[kind], kind
    assert stats.judge.succeeded - before.judge.succeeded == counts["ok"] == scored
    assert stats.judge.questions - before.judge.questions == 175
    assert stats.judge.retries - before.judge.retries == delta_calls - 175
    assert {k: v - before.invalid[k] for k, v in stats.invalid.items() if v - before.invalid[k]} == failures
    assert stats.by_mode[FORMAT_ERROR_MODE] - before.by_mode[FORMAT_ERROR_MODE] == 25
    assert stats.samples - before.samples == 200 and stats.judge.in_flight == 0
    # Worst case per question: 2 rounds x 2 attempts x 1.5 s timeouts + backoffs; with 32 in flight the whole run
    # takes seconds. A hang would hit the ray.get timeout instead.
    assert elapsed < 60
    assert_prometheus_matches(pool, stats, ray_local)
    report = {k: counts[k] for k in OUTCOMES}
    print(f"\nfault test: server outcomes {report}; sample failures {failures}; scored {scored}/175; {elapsed:.1f} s")


def scrape_pool_metrics(pool, ray_module) -> dict[tuple[str, str], float]:
    """The pool actors' ``ampo_*`` series on the node's Prometheus endpoint, summed over the actors, keyed by
    (series name, tag value). Ray exports custom metrics with a ``ray_`` prefix."""
    worker_ids = set(
        ray_module.get(
            [a.__ray_call__.remote(lambda self: ray_module.get_runtime_context().get_worker_id()) for a in pool.actors]
        )
    )
    port = ray_module.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_ampo_") and sample.labels.get("WorkerId") in worker_ids:
                tag = sample.labels.get("kind") or sample.labels.get("mode") or sample.labels.get("reason") or ""
                totals[(sample.name, tag)] += sample.value
    return totals


def assert_prometheus_matches(pool, stats, ray_module, deadline_s: float = 45.0) -> None:
    """Poll the exported metrics (flushed every few seconds) until they equal the pool's own counts."""
    expected: Counter[tuple[str, str]] = Counter()
    for kind, n in stats.judge.errors.items():
        expected[("ray_ampo_judge_errors_total", kind)] = n
    for mode, n in stats.by_mode.items():
        expected[("ray_ampo_reward_samples_total", mode)] = n
    for reason, n in stats.invalid.items():
        expected[("ray_ampo_reward_invalid_samples_total", reason)] = n
    expected[("ray_ampo_judge_retries_total", "*")] = stats.judge.retries
    expected[("ray_ampo_judge_latency_seconds_count", "")] = stats.judge.calls
    give_up = time.monotonic() + deadline_s
    while True:
        totals = scrape_pool_metrics(pool, ray_module)
        totals[("ray_ampo_judge_retries_total", "*")] = sum(
            v for (name, _), v in totals.items() if name == "ray_ampo_judge_retries_total"
        )
        got = {key: totals.get(key, 0) for key in expected}
        if got == dict(expected) or time.monotonic() > give_up:
            break
        time.sleep(1.0)
    assert got == dict(expected)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pool_keeps_many_groups_in_flight(pool, fault_server, ray_local):
    fault_server.reset(FaultConfig(latency_s=1.0))
    groups = [make_group([response(f'"Hello {g}-{i}."') for i in range(4)], group_id=f"c{g}") for g in range(8)]
    started = time.monotonic()
    # Every other group goes as a reference, as the driver hands on what a rollout actor returned, with its size.
    pending = [pool.score(ray_local.put(g), len(g.samples)) if i % 2 else pool.score(g) for i, g in enumerate(groups)]
    assert sum(pool.load()) == 32 and min(pool.load()) == 16  # spread over both actors at once
    results = ray_local.get([p.group for p in pending], timeout=60)
    # The small object the driver reads says what the group holds.
    assert ray_local.get([p.summary for p in pending]) == [summarise(r) for r in results]
    elapsed = time.monotonic() - started
    assert [r.group_id for r in results] == [g.group_id for g in groups]
    assert all(s.valid for group in results for s in group.samples)
    # 32 questions of 1 s each would take 32 s one at a time; the two actors run them all at once.
    assert fault_server.max_concurrent >= 16 and elapsed < 8.0
    assert pool.load() == [0, 0]


def test_pool_refuses_a_local_endpoint_without_a_server(tiny_model_dir):
    with pytest.raises(ValueError, match="JudgeServer"):
        RewardPool(reward_config("local"), tiny_model_dir)
