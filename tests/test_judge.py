"""The judge client and its prompts: prompt text, JSON extraction and range checks, key handling, and behaviour
against the fault-injecting HTTP server (retries, Retry-After, timeouts, parse rounds, concurrency limit)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from judge_fixtures import DIALOG, judge_config, make_context

from testing.fault_server import FaultConfig, FaultServer
from reward.answers import AnswerError, extract_json_object, parse_goal_scores
from reward.judge import JudgeClient, load_api_key, retry_after_seconds
from reward.prompts import GOAL_SCHEMA, actor_of_turn, build_history, goal_prompt

# ---- prompts ----------------------------------------------------------------------------------------------------


def test_history_appends_the_answer_to_the_open_slot():
    expected = (
        'Turn 0: Ana Lopez said: "Hi Ben, could I borrow your bike this weekend?"\n'
        'Turn 1: Ben Okafor said: "Maybe. What do you need it for?"\n'
        'Turn 2: Ana Lopez said: "To visit my aunt, I will bring it back Sunday."'
    )
    assert build_history(DIALOG, '"To visit my aunt, I will bring it back Sunday."') == expected
    assert build_history(["Turn 0: Ana Lopez said:"], '"Hi"') == 'Turn 0: Ana Lopez said: "Hi"'
    with pytest.raises(ValueError):
        build_history([], '"Hi"')


def test_goal_prompt_structure():
    prompt = goal_prompt(make_context(), '"Sure."')
    history_end = prompt.index('Turn 2: Ana Lopez said: "Sure."')
    # history first, then the participants with names and goals, then the rubric and the JSON format
    order = [
        history_end,
        prompt.index("Agent1: Ana Lopez"),
        prompt.index("Agent1's goal: Borrow Ben's bike for the weekend."),
        prompt.index("Agent2: Ben Okafor"),
        prompt.index("Agent2's goal: Keep the bike safe without upsetting Ana."),
        prompt.index("between 0 and 10"),
        prompt.index('{"agent1": {"reasoning"'),
    ]
    assert order == sorted(order)
    assert prompt.startswith('Turn 0: Ana Lopez said: "Hi Ben')
    with pytest.raises(KeyError, match="agent2_goal"):
        goal_prompt({k: v for k, v in make_context().items() if k != "agent2_goal"}, '"x"')
    assert GOAL_SCHEMA["required"] == ["agent1", "agent2"]
    assert [actor_of_turn(t) for t in range(4)] == ["agent1", "agent2", "agent1", "agent2"]


# ---- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"agent1": {"reasoning": "a", "score": 7}, "agent2": {"reasoning": "b", "score": 3}}',
        'Sure! ```json\n{"agent1": {"reasoning": "a", "score": "7"}, "agent2": {"reasoning": "b", "score": 3.0}}\n```',
        '{"agent1": {"reasoning": "tab\there", "score": 7}, "agent2": {"score": 3}} and {trailing}',
    ],
)
def test_goal_scores_are_extracted_tolerantly(text):
    scores = parse_goal_scores(text)
    assert (scores.agent1, scores.agent2) == (7.0, 3.0)
    assert scores.of("agent1") == 7.0 and scores.of("agent2") == 3.0


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("no json here", "unparseable"),
        ('{"agent1": {"reasoning": "a", "score": 7}, "agent2": {"reasoning": "', "unparseable"),
        ("[1, 2]", "unparseable"),
        ('{"agent1": {"score": 7}}', "unparseable"),
        ('{"agent1": {"score": "seven"}, "agent2": {"score": 3}}', "unparseable"),
        ('{"agent1": {"score": true}, "agent2": {"score": 3}}', "unparseable"),
        ('{"agent1": {"score": 11}, "agent2": {"score": 3}}', "out_of_range"),
        ('{"agent1": {"score": 5}, "agent2": {"score": -0.5}}', "out_of_range"),
        ('{"agent1": {"score": NaN}, "agent2": {"score": 3}}', "out_of_range"),
    ],
)
def test_bad_goal_answers_are_typed(text, kind):
    with pytest.raises(AnswerError) as info:
        parse_goal_scores(text)
    assert info.value.kind == kind


def test_extract_json_object_prefers_the_greedy_span_then_the_first_object():
    assert extract_json_object('x {"a": {"b": 1}} y') == {"a": {"b": 1}}
    assert extract_json_object('{"a": 1} then {"b": 2}') == {"a": 1}


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds({"retry-after": future}) <= 30


# ---- key handling -------------------------------------------------------------------------------------------------


def test_api_key_from_env_or_file_and_never_shown(tmp_path, monkeypatch):
    secret = "sk-test-very-secret-123"
    config = judge_config("http://127.0.0.1:9/v1", api_key_env="AMPO_TEST_KEY")
    monkeypatch.delenv("AMPO_TEST_KEY", raising=False)
    assert load_api_key(config) is None
    monkeypatch.setenv("AMPO_TEST_KEY", secret)
    assert load_api_key(config) == secret
    client = JudgeClient(config)
    assert secret not in repr(client) and secret not in str(client)
    assert secret not in config.model_dump_json()

    monkeypatch.delenv("AMPO_TEST_KEY")
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    assert load_api_key(config.model_copy(update={"api_key_file": key_file})) == secret
    with pytest.raises(ValueError, match="cannot be read") as info:
        load_api_key(config.model_copy(update={"api_key_file": tmp_path / "missing"}))
    assert secret not in str(info.value)


def test_local_endpoint_needs_a_started_server():
    with pytest.raises(ValueError, match="JudgeServer"):
        JudgeClient(judge_config("local"))


# ---- against the fault server --------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_retry_after_is_honoured():
    retry_after = 0.4
    config = FaultConfig(script=["rate_limited", "rate_limited", "ok"], retry_after_s=retry_after)
    with FaultServer(config) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, backoff_max_s=5.0)) as client:
                started = time.monotonic()
                result = await client.goal_scores("p")
                return result, time.monotonic() - started, client.stats()

        result, elapsed, stats = asyncio.run(run())
        arrivals = [entry.arrived for entry in server.log]
    assert result.ok and result.calls == 3
    assert elapsed >= 2 * retry_after
    assert all(b - a >= retry_after - 0.01 for a, b in zip(arrivals, arrivals[1:]))
    assert stats.errors == {"rate_limited": 2} and stats.retries == 2 and stats.calls == 3


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_rate_limit_gives_up_after_max_retries():
    with FaultServer(FaultConfig(script=["rate_limited"] * 10, retry_after_s=0.05)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, max_retries=3)) as client:
                return await client.goal_scores("p"), client.stats()

        result, stats = asyncio.run(run())
    assert result.failure == "rate_limited" and result.value is None and result.calls == 4
    assert stats.failures == {"rate_limited": 1} and stats.errors == {"rate_limited": 4}


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_timeouts_end_in_bounded_time():
    with FaultServer(FaultConfig(script=["timeout"] * 10, hang_s=20)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, timeout_s=0.3, max_retries=2)) as client:
                started = time.monotonic()
                return await client.goal_scores("p"), time.monotonic() - started

        result, elapsed = asyncio.run(run())
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 5  # the hanging handlers did not delay shutdown
    assert result.failure == "timeout" and result.calls == 3
    # 3 attempts x 0.3 s + 2 backoffs <= 0.1 s each, plus slack for a loaded machine
    assert 0.9 <= elapsed < 3.0


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_parse_rounds_switch_to_temperature_one():
    script = ["unparseable", "out_of_range", "unparseable", "ok"]
    with FaultServer(FaultConfig(script=script)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, parse_rounds=5, greedy_rounds=2)) as client:
                return await client.goal_scores("p"), client.stats()

        result, stats = asyncio.run(run())
        log = server.log
    assert result.ok and result.rounds == 4
    assert [entry.temperature for entry in log] == [0.0, 0.0, 1.0, 1.0]
    assert all(entry.structured for entry in log)
    assert stats.errors == {"unparseable": 2, "out_of_range": 1} and stats.retries == 3


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_unparseable_after_all_rounds_is_a_failure_not_a_score():
    with FaultServer(FaultConfig(script=["unparseable"] * 10)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, parse_rounds=3, structured_output=False)) as client:
                return await client.goal_scores("p")

        result = asyncio.run(run())
        log = server.log
    assert result.failure == "unparseable" and result.value is None and result.calls == 3 and result.text
    assert not any(entry.structured for entry in log)


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_an_answer_cut_by_max_tokens_is_never_scored_even_when_it_parses():
    # The injected answers are the valid ones, only marked finish_reason "length": the flag alone must count.
    with FaultServer(FaultConfig(script=["truncated", "ok"])) as server, FaultServer(FaultConfig(script=["truncated"] * 5)) as cut:

        async def run(url: str, rounds: int):
            async with JudgeClient(judge_config(url, parse_rounds=rounds)) as client:
                return await client.goal_scores("p"), client.stats()

        recovered, stats = asyncio.run(run(server.base_url, 3))
        failed, cut_stats = asyncio.run(run(cut.base_url, 2))
    assert recovered.ok and recovered.rounds == 2 and stats.errors == {"truncated": 1} and stats.retries == 1
    assert failed.failure == "truncated" and failed.value is None and failed.rounds == 2
    assert "max_tokens" in (failed.detail or "") and failed.text  # the cut text is kept for the logs
    assert cut_stats.failures == {"truncated": 1} and cut_stats.errors == {"truncated": 2}


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_transport_errors_are_retried_then_reported():
    script = ["server_error", "connection", "bad_response", "ok"]
    with FaultServer(FaultConfig(script=script)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, max_retries=3)) as client:
                return await client.goal_scores("p"), client.stats()

        result, stats = asyncio.run(run())
    assert result.ok and result.calls == 4
    assert stats.errors == {"server_error": 1, "connection": 1, "bad_response": 1}


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_bad_request_is_not_retried():
    with FaultServer(FaultConfig(script=["bad_request", "ok"])) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, max_retries=3)) as client:
                return await client.goal_scores("p")

        result = asyncio.run(run())
    assert result.failure == "bad_request" and result.calls == 1 and "400" in result.detail


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_tokens_per_minute_budget_delays_requests():
    # Budget 6000 tokens/min (100/s). Each request is estimated at ceil(12136 / 4) + 16 = 3050 tokens: the first
    # fits at once, the second only once 100 tokens have drained, about 1 s later.
    with FaultServer() as server:

        async def run():
            config = judge_config(server.base_url, tokens_per_minute=6000, max_tokens=16)
            async with JudgeClient(config) as client:
                return await asyncio.gather(*(client.goal_scores(f"{i}" * 12136) for i in range(2)))

        results = asyncio.run(run())
        arrivals = sorted(entry.arrived for entry in server.log)
    assert all(r.ok for r in results)
    assert 0.8 <= arrivals[1] - arrivals[0] < 3.0


@pytest.mark.timeout(30)
def test_connection_refused_fails_fast():
    async def run():
        # Port 9 (discard) is closed on loopback: every attempt is refused at once.
        async with JudgeClient(judge_config("http://127.0.0.1:9/v1", max_retries=2)) as client:
            started = time.monotonic()
            return await client.goal_scores("p"), time.monotonic() - started

    result, elapsed = asyncio.run(run())
    assert result.failure == "connection" and result.calls == 3 and elapsed < 3


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_a_judge_down_for_a_while_is_waited_for_within_the_retry_window():
    """The judge refuses connections for 1.5 s, then answers. With `max_retries=1` alone the question fails; with a
    retry window it keeps retrying past the two attempts and gets the answer."""
    server = FaultServer()
    server.start()
    url = server.base_url
    server.stop()

    async def ask(window: float):
        async with JudgeClient(judge_config(url, max_retries=1, retry_window_s=window, backoff_base_s=0.1, backoff_max_s=0.2)) as client:
            return await client.goal_scores("p"), client.stats()

    async def down_then_up(window: float):
        back = asyncio.get_running_loop().call_later(1.5, server.start)
        try:
            return await ask(window)
        finally:
            back.cancel()

    try:
        result, stats = asyncio.run(down_then_up(0.0))
        assert result.failure == "connection" and result.calls == 2
        server.stop()
        result, stats = asyncio.run(down_then_up(10.0))
        assert result.failure is None and result.value is not None
        assert result.calls > 2 and stats.errors["connection"] == result.calls - 1 == stats.retries
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_concurrency_limit_holds():
    with FaultServer(FaultConfig(latency_s=0.2)) as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url, max_concurrency=3)) as client:
                started = time.monotonic()
                results = await asyncio.gather(*(client.goal_scores(f"p{i}") for i in range(9)))
                return results, time.monotonic() - started

        results, elapsed = asyncio.run(run())
        assert server.max_concurrent == 3
    assert all(r.ok for r in results)
    assert elapsed >= 3 * 0.2


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_response_format_field_and_hashed_scores_are_deterministic():
    with FaultServer(FaultConfig()) as server:

        async def run():
            config = judge_config(server.base_url, structured_output_field="response_format")
            async with JudgeClient(config) as client:
                return await client.goal_scores("same"), await client.goal_scores("same")

        first, second = asyncio.run(run())
        assert server.log[0].structured
    assert first.value == second.value
    assert json.loads(first.text)["agent1"]["score"] == first.value.agent1
    assert not math.isnan(first.value.agent2)
