"""The multi-turn episode runner, driven by scripted test doubles for the policy and the partner.

The doubles answer from the open slot at the end of each prompt ("Turn t: <name> said:"), so a script decides what
each character says at each turn; the policy's answers are in the thinking-mode format, the partner's are free text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from actors.prompts import complete_intro
from actors.sotopia import SotopiaDataset
from cluster.endpoints import OpenAIChatModel
from cluster.episodes import EpisodeRecord, EpisodeRunner, Generation, Message, load_records
from reward.modes import format_response
from prompts import DEFAULT_PROMPTS

SYSTEM_PROMPT = DEFAULT_PROMPTS.system.render()

DATA = SotopiaDataset.load()
Script = Callable[[str, int], str]
"""(speaker name, turn) -> what that speaker says."""


def _slot(messages: list[Message]) -> tuple[str, int]:
    match = re.search(r"\nTurn (\d+): (.+) said:$", messages[-1]["content"])
    assert match is not None, "every prompt must end with the speaker's open slot"
    return match.group(2), int(match.group(1))


def chatter(name: str, turn: int) -> str:
    return f"{name.split()[0]} talks at turn {turn}"


class ScriptedPolicy:
    """Answers in mode 1 on odd turns and mode 2 on even turns; can crash on a given call to simulate a failure."""

    def __init__(self, script: Script = chatter, crash_on_call: int | None = None) -> None:
        self.script = script
        self.crash_on_call = crash_on_call
        self.calls: list[list[list[Message]]] = []

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        self.calls.append(batch)
        if len(self.calls) == self.crash_on_call:
            raise RuntimeError("the rollout actor died")
        out = []
        for messages in batch:
            name, turn = _slot(messages)
            said = self.script(name, turn)
            if turn % 2:
                text = format_response(1, None, said)
            else:
                text = format_response(2, {"Intent": "i", "Style": "s", "Response": said}, said)
            out.append(Generation(text, num_tokens=100 + turn))
        return out

    def asked(self) -> list[tuple[str, int]]:
        return [_slot(messages) for batch in self.calls for messages in batch]


class ScriptedPartner:
    def __init__(self, script: Script = chatter) -> None:
        self.script = script
        self.calls: list[list[list[Message]]] = []

    async def __call__(self, batch: list[list[Message]]) -> list[str]:
        self.calls.append(batch)
        return [f'Sure. "{self.script(*_slot(messages))}" I smile.' for messages in batch]


def leaves_at(who: str, when: int) -> Script:
    def script(name: str, turn: int) -> str:
        return "I have to leave the conversation now" if (name, turn) == (who, when) else chatter(name, turn)

    return script


async def test_self_play_alternates_speakers_until_max_turns(tmp_path: Path) -> None:
    policy = ScriptedPolicy()
    records = await EpisodeRunner(policy, max_turns=5).run(DATA, [0], tmp_path / "out.jsonl")
    (record,) = records
    assert record.dialog == [
        'Turn 0: Noah Bergstrom said: "Noah talks at turn 0"\n',
        'Turn 1: Daniel Mensah said: "Daniel talks at turn 1"\n',
        'Turn 2: Noah Bergstrom said: "Noah talks at turn 2"\n',
        'Turn 3: Daniel Mensah said: "Daniel talks at turn 3"\n',
        'Turn 4: Noah Bergstrom said: "Noah talks at turn 4"\n',
    ]
    assert record.end_reason == "max_turns"
    assert (record.env_id, record.actor_role, record.run_mode, record.hard) == (0, "agent1", "self_play", True)
    assert record.utterances == [f'"{line.split(" said: ")[1][1:-2]}"' for line in record.dialog]
    assert record.modes == [2, 1, 2, 1, 2]
    assert record.response_tokens == [100, 101, 102, 103, 104]
    assert record.fullout[1] == format_response(1, None, "Daniel talks at turn 1")
    assert record.complete_intro == complete_intro(*DATA.episode(0))
    assert (record.agent1_name, record.agent2_name) == ("Noah Bergstrom", "Daniel Mensah")
    assert record.agent1_goal.startswith("Sell the cargo bike") and "<" not in record.agent1_goal
    assert record.agent1_intro.endswith("Daniel Mensah's goal: Unknown")
    assert "Noah Bergstrom's goal: Unknown" in record.agent2_intro
    # One policy call per turn; each prompt is the speaker's, with the thinking system prompt and the dialogue so far.
    assert policy.asked() == [("Noah Bergstrom", 0), ("Daniel Mensah", 1), ("Noah Bergstrom", 2),
                              ("Daniel Mensah", 3), ("Noah Bergstrom", 4)]
    turn_3 = policy.calls[3][0]
    assert [m["role"] for m in turn_3] == ["system", "user"] and turn_3[0]["content"] == SYSTEM_PROMPT
    assert turn_3[1]["content"].startswith("Put yourself in the shoes of Daniel Mensah")
    assert turn_3[1]["content"].endswith("\n".join([*record.dialog[:3], "Turn 3: Daniel Mensah said:"]))


async def test_leaving_ends_the_episode(tmp_path: Path) -> None:
    policy = ScriptedPolicy(leaves_at("Noah Bergstrom", 2))
    (record,) = await EpisodeRunner(policy).run(DATA, [0], tmp_path / "out.jsonl")
    assert record.end_reason == "left"
    assert len(record.utterances) == 3
    assert record.dialog[-1] == 'Turn 2: Noah Bergstrom said: "I have to leave the conversation now"\n'


async def test_prompt_length_cut_off_leaves_the_open_slot_empty(tmp_path: Path) -> None:
    """A token counter that grows with the dialogue: the prompt of turn 3 is the first one over the limit."""

    def count_tokens(messages: list[Message]) -> int:
        return messages[-1]["content"].count(" said:")  # turn t's prompt holds t + 1 dialogue lines

    runner = EpisodeRunner(ScriptedPolicy(), count_tokens=count_tokens, max_prompt_tokens=3)
    (record,) = await runner.run(DATA, [0], tmp_path / "out.jsonl")
    assert record.end_reason == "prompt_too_long"
    assert len(record.utterances) == len(record.fullout) == 3
    assert record.dialog[-1] == "Turn 3: Daniel Mensah said:"
    assert len(record.dialog) == 4


async def test_each_step_batches_every_unfinished_episode(tmp_path: Path) -> None:
    script = leaves_at("Noah Bergstrom", 0)  # episode 0 ends at once; episodes 1 and 2 run to the limit
    policy = ScriptedPolicy(script)
    records = await EpisodeRunner(policy, max_turns=3).run(DATA, [0, 1, 2], tmp_path / "out.jsonl")
    assert [len(batch) for batch in policy.calls] == [3, 2, 2]
    assert [r.env_id for r in records] == [0, 1, 2]
    assert [len(r.utterances) for r in records] == [1, 3, 3]


async def test_max_active_bounds_the_episodes_in_play(tmp_path: Path) -> None:
    policy = ScriptedPolicy()
    records = await EpisodeRunner(policy, max_turns=2, max_active=2).run(DATA, [0, 1, 2], tmp_path / "out.jsonl")
    assert [len(batch) for batch in policy.calls] == [2, 2, 1, 1]
    assert [r.env_id for r in records] == [0, 1, 2]


async def test_interrupted_run_resumes_without_replaying_finished_episodes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # Episode 0 ends at turn 0, episode 6 at turn 1, episode 9 would need 4 turns: the crash in the third call hits it.
    script = leaves_at("Noah Bergstrom", 0)

    def stops_early(name: str, turn: int) -> str:
        return "I left the conversation" if (name, turn) == ("Priya Raman", 1) else script(name, turn)

    crashing = ScriptedPolicy(stops_early, crash_on_call=3)
    runner = EpisodeRunner(crashing, max_turns=4)
    with pytest.raises(RuntimeError, match="the rollout actor died"):
        await runner.run(DATA, [0, 6, 9], out)
    assert sorted(r.env_id for r in load_records(out)) == [0, 6]

    resumed = ScriptedPolicy(stops_early)
    records = await EpisodeRunner(resumed, max_turns=4).run(DATA, [0, 6, 9], out)
    # Only the unfinished episode is played again, from turn 0.
    assert resumed.asked() == [("Amara Okafor", 0), ("Noah Bergstrom", 1), ("Amara Okafor", 2), ("Noah Bergstrom", 3)]
    assert [(r.env_id, r.end_reason, len(r.utterances)) for r in records] == [(0, "left", 1), (6, "left", 2),
                                                                               (9, "max_turns", 4)]
    on_disk = [json.loads(line)["env_id"] for line in out.read_text().splitlines()]
    assert sorted(on_disk) == [0, 6, 9]

    # A third run has nothing left to play.
    idle = ScriptedPolicy()
    assert await EpisodeRunner(idle, max_turns=4).run(DATA, [0, 6, 9], out) == records
    assert idle.calls == []


async def test_a_torn_last_line_is_cut_before_resuming(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    await EpisodeRunner(ScriptedPolicy(), max_turns=2).run(DATA, [0], out)
    with out.open("a") as handle:
        handle.write('{"env_id": 1, "actor_r')  # the writer died mid-line
    assert [r.env_id for r in load_records(out)] == [0]
    records = await EpisodeRunner(ScriptedPolicy(), max_turns=2).run(DATA, [0, 1], out)
    assert [r.env_id for r in records] == [0, 1]
    assert [r.env_id for r in load_records(out)] == [0, 1]


async def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    await EpisodeRunner(ScriptedPolicy(), max_turns=2).run(DATA, [0], out)
    with pytest.raises(ValueError, match="from a run with run_mode, max_turns, hide_private_info = .*write to another"):
        await EpisodeRunner(ScriptedPolicy(), max_turns=3).run(DATA, [0, 1], out)


async def test_vs_partner_plays_every_episode_from_both_sides(tmp_path: Path) -> None:
    policy, partner = ScriptedPolicy(), ScriptedPartner()
    runner = EpisodeRunner(policy, partner=partner, max_turns=3)
    records = await runner.run(DATA, [0, 1], tmp_path / "out.jsonl")
    assert {r.run_mode for r in records} == {"vs_partner"}
    assert [(r.env_id, r.actor_role) for r in records] == [(0, "agent1"), (1, "agent1"), (0, "agent2"), (1, "agent2")]
    as_agent1, as_agent2 = records[0], records[2]
    # The model speaks on its own agent's turns only; the partner's turns have no mode and no token count.
    assert as_agent1.modes == [2, None, 2] and as_agent1.response_tokens == [100, None, 102]
    assert as_agent2.modes == [None, 1, None] and as_agent2.response_tokens == [None, 101, None]
    assert as_agent2.fullout[0] == 'Sure. "Noah talks at turn 0" I smile.'
    assert as_agent2.dialog[0] == 'Turn 0: Noah Bergstrom said: "Noah talks at turn 0"\n'
    # The partner gets the user message alone (no thinking system prompt); the model always gets it.
    assert all(len(chat) == 1 and chat[0]["role"] == "user" for batch in partner.calls for chat in batch)
    assert all(chat[0]["content"] == SYSTEM_PROMPT for batch in policy.calls for chat in batch)
    # Each step sends one batch to each side, both sides of all episodes at once.
    assert [len(batch) for batch in policy.calls] == [2, 2, 2] and [len(b) for b in partner.calls] == [2, 2, 2]


async def test_evaluate_hook_fills_the_scores_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"

    async def evaluate(record: EpisodeRecord) -> EpisodeRecord:
        goal = 10 if record.end_reason == "left" else 3
        return record.model_copy(update={"agent1_scores": {"goal": ("reached it", goal)},
                                         "agent2_scores": {"goal": ("did not", 0)}})

    runner = EpisodeRunner(ScriptedPolicy(leaves_at("Noah Bergstrom", 0)), max_turns=2, evaluate=evaluate)
    records = await runner.run(DATA, [0, 1], out)
    assert [r.agent1_scores for r in records] == [{"goal": ("reached it", 10)}, {"goal": ("reached it", 3)}]
    assert sorted((r.env_id, r.agent1_scores["goal"][1]) for r in load_records(out)) == [(0, 10), (1, 3)]


async def test_a_failing_evaluator_stops_the_run_but_keeps_the_scored_episodes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"

    async def evaluate(record: EpisodeRecord) -> EpisodeRecord:
        if record.env_id == 1:
            raise RuntimeError("judge unreachable")
        return record.model_copy(update={"agent1_scores": {"goal": ("ok", 5)}})

    policy = ScriptedPolicy(leaves_at("Noah Bergstrom", 0))  # episode 0 ends in the first step
    with pytest.raises(RuntimeError, match="judge unreachable"):
        await EpisodeRunner(policy, max_turns=2, evaluate=evaluate).run(DATA, [0, 1], out)
    assert [(r.env_id, r.agent1_scores) for r in load_records(out)] == [(0, {"goal": ("ok", 5)})]


async def test_an_interruption_keeps_what_the_judge_finishes_soon_and_stops(tmp_path: Path) -> None:
    """Ctrl-C while played episodes wait for a slow judge: the run stops after the grace period instead of waiting
    for every judgement; what was judged in time is on disk, the rest is played again next time."""
    import asyncio

    out = tmp_path / "out.jsonl"
    asked: set[int] = set()

    async def evaluate(record: EpisodeRecord) -> EpisodeRecord:
        asked.add(record.env_id)
        await asyncio.sleep(0.05 if record.env_id == 0 else 3600)  # episode 1's judge never answers in time
        return record.model_copy(update={"agent1_scores": {"goal": ("ok", 5)}})

    runner = EpisodeRunner(ScriptedPolicy(), max_turns=2, evaluate=evaluate, interrupt_grace_s=0.5)
    run = asyncio.ensure_future(runner.run(DATA, [0, 1], out))
    while asked != {0, 1}:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):  # within the grace (0.5 s), not the judge's hour
        await asyncio.wait_for(run, timeout=10)
    assert [r.env_id for r in load_records(out)] == [0]
    resumed = ScriptedPolicy()
    await EpisodeRunner(resumed, max_turns=2).run(DATA, [0, 1], out)
    assert len(resumed.asked()) == 2  # episode 1's two turns, episode 0 is kept


async def test_a_policy_that_loses_outputs_is_an_error(tmp_path: Path) -> None:
    async def lossy(batch: list[list[Message]]) -> list[Generation]:
        return [Generation("x")] * (len(batch) - 1)

    with pytest.raises(RuntimeError, match="the policy returned 1 outputs for 2 prompts"):
        await EpisodeRunner(lossy).run(DATA, [0, 1], tmp_path / "out.jsonl")


def test_runner_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        EpisodeRunner(ScriptedPolicy(), max_turns=0)
    with pytest.raises(ValueError, match="max_active must be >= 1 or None"):
        EpisodeRunner(ScriptedPolicy(), max_active=0)


@pytest.mark.integration
async def test_openai_partner_talks_to_a_chat_completions_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in OpenAI-compatible server on loopback checks what the partner sends."""
    seen: list[tuple[str, dict]] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers["Authorization"], body))
        reply = f'Well, "{body["messages"][-1]["content"][-6:]}"'
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
        })

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("TEST_PARTNER_KEY", "sk-test")
    partner = OpenAIChatModel(base_url=f"http://127.0.0.1:{port}/v1", model="gpt-4o", api_key_env="TEST_PARTNER_KEY",
                            temperature=0.0, max_tokens=64, max_retries=0)
    try:
        replies = await partner([[{"role": "user", "content": f"prompt {n}"}] for n in ("one", "two")])
    finally:
        await partner.close()
        await runner.cleanup()
    assert replies == ['Well, "pt one"', 'Well, "pt two"']
    assert all(auth == "Bearer sk-test" for auth, _ in seen)
    assert {(body["model"], body["temperature"], body["max_tokens"]) for _, body in seen} == {("gpt-4o", 0.0, 64)}
    assert all(body["messages"][0]["role"] == "user" and len(body["messages"]) == 1 for _, body in seen)
