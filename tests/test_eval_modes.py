"""Table 1's evaluation modes at small size: a policy without thinking modes, an API model as the policy, and the
thinking-token counts per mode."""

import json

import pytest

from cluster.episodes import Generation, Message
from cluster.endpoints import Endpoint
from cluster.evaluation import evaluate, evaluate_async, summary_view
from prompts import DEFAULT_PROMPTS
from reward.evaluator import NO_THINKING, render_summary, summarise
from reward.modes import END_THINKING, format_response
from testing.fault_server import FaultConfig, FaultServer, hashed_answer, is_evaluation_prompt
from tests.test_pipeline import pipeline_config

SYSTEM_PROMPT = DEFAULT_PROMPTS.system.render()


class PlainPolicy:
    """An instruct model as it is: a sentence with a quoted reply, and the chats it was sent."""

    def __init__(self) -> None:
        self.chats: list[list[Message]] = []

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        self.chats += batch
        return [Generation('Sure, I would say "Nice to see you." and smile.', 9) for _ in batch]


@pytest.mark.integration
async def test_a_policy_without_thinking_modes_gets_no_system_prompt_and_is_read_like_a_partner(tmp_path):
    with FaultServer(FaultConfig()) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=2", "eval.thinking=false")
        policy = PlainPolicy()
        result = await evaluate_async(config, policy=policy, judge=Endpoint(server.base_url, "fault-judge"),
                                      out_path=tmp_path / "plain.jsonl", max_episodes=2, progress=False)
    assert policy.chats and all([m["role"] for m in chat] == ["user"] for chat in policy.chats)
    records = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert all(r["thinking"] is False and r["utterances"] == ['"Nice to see you."'] * 2 for r in records)
    # Its turns count as "no thinking", not as format errors.
    assert result.summary.modes.turns == {NO_THINKING: 4} and result.summary.all.episodes == 2
    assert "| no thinking | 4 | 100.0% | 9.0 | n/a |" in result.markdown


@pytest.mark.integration
def test_an_api_model_is_the_evaluated_policy(tmp_path):
    """`eval.policy` sends the policy's turns to an OpenAI-compatible endpoint, with its own sampling settings."""

    def answer(prompt: str) -> str:
        if is_evaluation_prompt(prompt):
            return hashed_answer(prompt)
        return format_response(1, None, "Happy to help.")  # the API model answers in the thinking format

    with FaultServer(FaultConfig(answer=answer)) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=2", f"eval.policy.base_url={server.base_url}",
                                 "eval.policy.model=fault-judge", "eval.policy.temperature=0.3",
                                 "eval.policy.api_key_env=AMPO_TEST_KEY_UNSET")
        result = evaluate(config, judge=Endpoint(server.base_url, "fault-judge"), policy=Endpoint(server.base_url, "fault-judge"),
                          out_path=tmp_path / "api.jsonl", max_episodes=2, progress=False)
        policy_turns = [entry for entry in server.log if not entry.structured]
    assert len(policy_turns) == 4 and all(entry.temperature == 0.3 for entry in policy_turns)
    records = [json.loads(line) for line in (tmp_path / "api.jsonl").read_text().splitlines()]
    assert all(r["utterances"] == ['"Happy to help."'] * 2 and r["modes"] == [1, 1] for r in records)
    # The API reports the completion's tokens; a thinking count needs a tokenizer, which an API model does not give.
    assert all(r["response_tokens"][0] is not None and r["thinking_tokens"] == [None, None] for r in records)
    assert result.summary.modes.turns == {"1": 4} and result.summary.modes.mean_thinking_tokens == {}


class ModePolicy:
    """Mode 2 at even turns, mode 1 at odd turns."""

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        out = []
        for chat in batch:
            turn = int(chat[-1]["content"].rsplit("Turn ", 1)[-1].split(":", 1)[0])
            sections = None if turn % 2 else {"Intent": "they ask", "Style": "warm", "Response": "Yes."}
            out.append(Generation(format_response(1 if turn % 2 else 2, sections, "Yes."), 20))
        return out


@pytest.mark.integration
async def test_thinking_tokens_are_counted_per_mode_and_reported(tmp_path):
    counted: list[str] = []

    def count(text: str) -> int:
        counted.append(text)
        return len(text.split())

    with FaultServer(FaultConfig()) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=2")
        result = await evaluate_async(config, policy=ModePolicy(), judge=Endpoint(server.base_url, "fault-judge"),
                                      out_path=tmp_path / "t.jsonl", max_episodes=2, count_text=count, progress=False)
    thinking = format_response(2, {"Intent": "they ask", "Style": "warm", "Response": "Yes."}, "Yes.").split(END_THINKING)[0] + END_THINKING
    assert counted == [thinking, thinking]  # only the mode-2 turns are tokenized, from the header to the end tag
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(r["thinking_tokens"] == [len(thinking.split()), 0] for r in records)
    usage = result.summary.modes
    assert usage.mean_thinking_tokens == {"1": 0.0, "2": float(len(thinking.split()))}
    assert f"| 2 | 2 | 50.0% | 20.0 | {len(thinking.split()):.1f} |" in render_summary(result.summary)


def test_the_summary_counts_only_the_models_turns_against_a_partner():
    record = {"run_mode": "vs_partner", "actor_role": "agent2", "modes": [None, 2, None, 1],
              "response_tokens": [None, 30, None, 5], "thinking_tokens": [None, 12, None, 0],
              "agent1_scores": {}, "agent2_scores": {}, "env_id": 0}
    view = summary_view(record)
    assert view["modes"] == [2, 1] and view["tokens"] == [30, 5] and view["thinking_tokens"] == [12, 0]
    assert summarise([view]).modes.mean_thinking_tokens == {"1": 0.0, "2": 12.0}
