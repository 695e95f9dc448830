"""The data and evaluation pipeline (`ampo data check`, `build-states`, `make-demos`, `bc`, `eval`, `report`).

Fast tests drive the stage modules (`cluster.states`, `cluster.demos`, `cluster.evaluation`, `cluster.report`) with a scripted policy and the fault-injecting judge server (fault rate 0:
valid answers derived from a hash of each prompt, or from an answer function the test gives), so every number is
predictable. The slow tests run the commands end to end on the tiny random model: vLLM engines, Ray, and once the
real vLLM OpenAI server as the demonstration expert.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from judge_fixtures import judge_config

from actors.sotopia import SotopiaDataset
from actors.states import RLState, make_state, read_states
from cluster.cli import main as ampo
from cluster.config import ConfigError, load_config
from cluster.episodes import Generation, Message
from cluster.data_check import check_data
from cluster.demos import assemble_demo, demo_prompt, demo_schema, make_demos_async
from cluster.endpoints import Endpoint, RolloutPolicy, judge_endpoint, open_endpoint
from cluster.evaluation import driver_evaluation, eval_metrics, evaluate_async, summarise_results, summary_view
from cluster.report import report
from cluster.states import build_states_async, prefix_goal_prompt
from learner.bc import BCDataError, load_bc_records
from testing.fault_server import FaultConfig, FaultServer, hashed_answer
from reward.answers import AnswerError, parse_goal_scores
from reward.modes import MODE_SECTIONS, format_response, parse_response
from reward.prompts import DIMENSIONS
from prompts import DEFAULT_PROMPTS

SYSTEM_PROMPT = DEFAULT_PROMPTS.system.render()

DATA = SotopiaDataset.load()
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
_SLOT = re.compile(r"\nTurn (\d+): (.+) said:$")


class ScriptedPolicy:
    """Answers every turn in mode 1 (odd turns) or mode 2 (even turns) with a line naming speaker and turn."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        self.calls += 1
        out = []
        for messages in batch:
            match = _SLOT.search(messages[-1]["content"])
            assert match is not None and messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
            turn, name = int(match.group(1)), match.group(2)
            said = f"{name.split()[0]} talks at turn {turn}"
            sections = None if turn % 2 else {"Intent": "i", "Style": "s", "Response": said}
            out.append(Generation(format_response(1 if turn % 2 else 2, sections, said), num_tokens=10 + turn))
        return out


def pipeline_config(judge_url: str, *overrides: str):
    """The tiny test config with both judges pointed at a test server."""
    return load_config(
        TINY_CONFIG,
        [
            f"reward.judge.base_url={judge_url}", "reward.judge.model=fault-judge",
            f"eval.judge.base_url={judge_url}", "eval.judge.model=fault-judge",
            "reward.judge.api_key_env=AMPO_TEST_JUDGE_KEY_UNSET", "eval.judge.api_key_env=AMPO_TEST_JUDGE_KEY_UNSET",
            "reward.judge.timeout_s=5", "eval.judge.timeout_s=5",
            "reward.judge.backoff_base_s=0.01", "reward.judge.backoff_max_s=0.05",
            "eval.judge.backoff_base_s=0.01", "eval.judge.backoff_max_s=0.05",
            *overrides,
        ],
    )


@pytest.fixture
def fault_server():
    with FaultServer(FaultConfig()) as server:
        yield server


# ---- build-states ------------------------------------------------------------------------------------------------


async def test_build_states_round_trip_resume_and_judge_prompt(fault_server, tmp_path):
    config = pipeline_config(fault_server.base_url, "eval.max_turns=3")
    judge = Endpoint(fault_server.base_url, "fault-judge")
    out = tmp_path / "states.parquet"
    policy = ScriptedPolicy()
    first = await build_states_async(config, judge=judge, out_path=out, policy=policy, episodes=[3, 0], progress=False)

    # Two episodes of three utterances: states at turns 0, 1, 2 of each, in the given episode order.
    states = read_states(out)
    assert [(s.env_id, s.turn) for s in states] == [(3, 0), (3, 1), (3, 2), (0, 0), (0, 1), (0, 2)]
    assert first.states == first.prefixes == 6 and first.judged_now == 6 and not first.failed
    assert all(s.system_prompt == SYSTEM_PROMPT for s in states)
    # The round trip: each row is exactly the state of that prefix, with the judge's scores of that prefix.
    for state in states:
        utterances = [line.split(" said: ", 1)[1].rstrip("\n") for line in state.dialog[:-1]]
        expected = make_state(DATA, state.env_id, utterances, (0.0, 0.0))
        scores = parse_goal_scores(hashed_answer(prefix_goal_prompt(expected)))
        assert state == expected.model_copy(update={"system_prompt": SYSTEM_PROMPT, "prior": state.prior})
        assert (state.prior.agent1, state.prior.agent2) == (scores.agent1, scores.agent2)
    assert states[2].dialog[0] == 'Turn 0: ' + DATA.episode(3)[1].name + ' said: "' + DATA.episode(3)[1].first_name + ' talks at turn 0"\n'
    # The judge saw the finished lines only, never the open slot; turn 0 has an empty history.
    assert prefix_goal_prompt(states[0]).startswith("\n\nRead the conversation above")
    assert prefix_goal_prompt(states[2]).startswith(states[2].dialog[0].strip() + "\n\n" + states[2].dialog[1].strip() + "\n\n")
    row = pq.read_table(out).to_pylist()[4]
    assert row["reward_model"]["state_reward"]["step"] == 1 and row["extra_info"]["env_id"] == 0

    # A re-run plays nothing and asks nothing, and writes the same states.
    calls = fault_server.counts()["ok"]
    again = await build_states_async(config, judge=judge, out_path=out, policy=policy, episodes=[3, 0], progress=False)
    assert again.judged_now == 0 and again.from_cache == 6 and fault_server.counts()["ok"] == calls
    assert read_states(out) == states and policy.calls == 3


@pytest.mark.integration
async def test_build_states_skips_failed_prefixes_and_retries_them_next_run(tmp_path):
    """The judge answers prose for every prefix that already holds turn 1: those states are skipped and counted,
    never scored; a later run against a working judge fills them in."""

    def breaks_after_turn_0(prompt: str) -> str:
        return "I cannot say." if "Turn 1:" in prompt else hashed_answer(prompt)

    out = tmp_path / "states.parquet"
    with FaultServer(FaultConfig(answer=breaks_after_turn_0)) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=4", "reward.judge.parse_rounds=2")
        result = await build_states_async(config, judge=Endpoint(server.base_url, "fault-judge"), out_path=out,
                                          policy=ScriptedPolicy(), episodes=[1], progress=False)
    assert result.prefixes == 4 and result.states == 2 and dict(result.failed) == {"unparseable": 2}
    assert result.failed_prefixes == [(0, 1, 2, "unparseable"), (0, 1, 3, "unparseable")]
    assert [s.turn for s in read_states(out)] == [0, 1]
    assert "skipped (judge failed): 2" in result.describe()

    with FaultServer(FaultConfig()) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=4")
        result = await build_states_async(config, judge=Endpoint(server.base_url, "fault-judge"), out_path=out,
                                          policy=ScriptedPolicy(), episodes=[1], progress=False)
        assert server.counts() == {"ok": 2}
    assert result.states == 4 and not result.failed and [s.turn for s in read_states(out)] == [0, 1, 2, 3]


# ---- make-demos --------------------------------------------------------------------------------------------------


def expert_answer(prompt: str) -> str:
    """A test expert: reads the keys the prompt asks for and fills each with one line; the answer of every
    mode-3 request of the second state carries an inner double quote (a rejection the checker must see)."""
    keys = re.findall(r'^- "(\w+)":', prompt, flags=re.M)
    bad = "Thinking Level 3" in prompt and "Turn 0: " + DATA.episode(1)[1].name in prompt
    values = {key: f"{key.lower()} for this turn" for key in keys}
    values["answer"] = 'I say "no" to that' if bad else "Lovely to see you, could we talk about the trip?"
    return json.dumps(values)


def demo_states() -> list[RLState]:
    return [
        make_state(DATA, 0, [], (0.0, 0.0)),
        make_state(DATA, 1, ['"Hello there."'], (2.0, 3.0)),
        make_state(DATA, 2, ['"Hi."', '"Hey, good to see you."'], (4.0, 1.0)),
    ]


@pytest.mark.integration
async def test_make_demos_all_pass_the_format_checker(tmp_path):
    states = demo_states()
    out = tmp_path / "demos.json"
    with FaultServer(FaultConfig(answer=expert_answer)) as server:
        expert_config = judge_config(server.base_url, parse_rounds=2, greedy_rounds=1, max_tokens=64)
        result = await make_demos_async(states, expert=Endpoint(server.base_url, "fault-judge"),
                                        expert_config=expert_config, out_path=out, progress=False, prompts=DEFAULT_PROMPTS)
        # Every request asked for the schema of its mode (structured output).
        assert all(entry.structured for entry in server.log)
        asked = server.counts()["ok"]

    records = json.loads(out.read_text())
    assert result.asked == 12 and sum(result.accepted.values()) == 11 == len(records)
    assert dict(result.rejected) == {3: 1} and dict(result.reasons) == {"inner_quote": 1}
    assert result.acceptance_rate == pytest.approx(11 / 12)
    assert asked == 13  # the rejected demo was asked in both parse rounds
    for record in records:
        assert set(record) == {"system", "instruction", "input", "output"}
        assert record["system"] == SYSTEM_PROMPT and record["input"] == ""
        assert parse_response(record["output"]).valid
    # State × mode order, each output the mode asked for, under the state's own turn prompt.
    expected = [(s.instruction, m) for s in states for m in (1, 2, 3, 4) if (s.env_id, m) != (1, 3)]
    assert [(r["instruction"], parse_response(r["output"]).mode) for r in records] == expected
    assert records[4]["output"].startswith("Thinking Level: 1\n<|begin_of_answer|>\n\"Lovely")
    assert "mode 3: 2 accepted / 1 rejected" in result.describe() and "inner_quote" in result.describe()
    assert load_bc_records(out, check_format=True)  # the BC reader accepts what make-demos writes

    # A re-run asks nothing and writes the same file.
    with FaultServer(FaultConfig(answer=expert_answer)) as server:
        again = await make_demos_async(states, expert=Endpoint(server.base_url, "fault-judge"),
                                       expert_config=expert_config, out_path=out, progress=False, prompts=DEFAULT_PROMPTS)
        assert server.counts() == {}
    assert again.from_earlier_run == 12 and json.loads(out.read_text()) == records


def test_demo_schema_prompt_and_assembly():
    schema = demo_schema(4, section_max_chars=50, answer_max_chars=20)
    assert list(schema["properties"]) == [*MODE_SECTIONS[4], "answer"] == schema["required"]
    assert schema["properties"]["answer"] == {"type": "string", "pattern": '[^"\\\\\\n]{1,20}'}
    assert re.fullmatch(schema["properties"]["History"]["pattern"], "plain words, 'single' quotes")
    assert not re.fullmatch(schema["properties"]["History"]["pattern"], 'a "quote"')
    # Long fields repeat chunks of 50 (xgrammar cannot compile a repetition of a few hundred): 120 admits 150.
    long = demo_schema(2, section_max_chars=120)["properties"]["Intent"]["pattern"]
    assert long == '([^"\\\\\\n]{1,50}){1,3}'
    assert re.fullmatch(long, "x" * 150) and not re.fullmatch(long, "x" * 151) and not re.fullmatch(long, "a\nb")
    assert list(demo_schema(1)["properties"]) == ["answer"]
    prompt = demo_prompt(demo_states()[1], 2)
    assert prompt.startswith(demo_states()[1].instruction.rstrip() + "\n\n---\n") and "Thinking Level 2" in prompt
    assert re.findall(r'^- "(\w+)":', prompt, flags=re.M) == ["Intent", "Style", "Response", "answer"]

    text = json.dumps({"Intent": "they want help", "Style": "warm", "Response": "Sure.", "answer": "Sure, I can help."})
    assert assemble_demo("Here you go: " + text, 2) == format_response(
        2, {"Intent": "they want help", "Style": "warm", "Response": "Sure."}, "Sure, I can help."
    )
    for bad, reason in [
        ("no json at all", "not_json"),
        (json.dumps({"Intent": "x", "Style": "y", "answer": "z"}), "missing_field"),
        (json.dumps({"Intent": "x", "Style": " ", "Response": "r", "answer": "z"}), "empty_field"),
        (json.dumps({"Intent": "x", "Style": "y", "Response": "r", "answer": 'say "hi"'}), "inner_quote"),
        (json.dumps({"Intent": "x\n\nStyle:\nz", "Style": "y", "Response": "r", "answer": "z"}), "format"),
    ]:
        with pytest.raises(AnswerError) as info:
            assemble_demo(bad, 2)
        assert str(info.value).startswith(reason + ":"), str(info.value)


# ---- eval and report ---------------------------------------------------------------------------------------------


async def test_eval_self_play_judged_and_resumed(fault_server, tmp_path):
    config = pipeline_config(fault_server.base_url, "eval.max_turns=2")
    out = tmp_path / "eval.jsonl"
    judge = Endpoint(fault_server.base_url, "fault-judge")
    result = await evaluate_async(config, policy=ScriptedPolicy(), judge=judge, out_path=out, max_episodes=3,
                                  progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # Episodes are appended as they finish (so an interruption keeps every finished one), in any order.
    assert sorted(r["env_id"] for r in records) == [0, 1, 2] and all(r["evaluation_error"] is None for r in records)
    for record in records:  # the scores are the judge's, as integers, for both agents
        answer = json.loads(hashed_answer(fault_server_prompt(record)))
        assert record["agent1_scores"] == {k: list(v) for k, v in answer["agent_1_evaluation"].items()}
    goals = [r["agent1_scores"]["goal"][1] for r in records]
    assert result.summary.all.actor["goal"].mean == pytest.approx(sum(goals) / 3)
    assert result.metrics()["eval/goal_actor"] == pytest.approx(sum(goals) / 3)
    assert result.summary.modes.turns == {"1": 3, "2": 3}
    assert out.with_name("eval.summary.md").read_text() == result.markdown

    calls = fault_server.counts()["ok"]
    again = await evaluate_async(config, policy=ScriptedPolicy(), judge=judge, out_path=out, max_episodes=3,
                                 progress=False)
    assert fault_server.counts()["ok"] == calls and again.text == result.text


async def test_eval_against_a_partner_plays_both_sides(fault_server, tmp_path):
    # The partner section starts from a dotted override (it is null by default) and sets its sampling.
    config = pipeline_config(fault_server.base_url, "eval.max_turns=2", f"eval.partner.base_url={fault_server.base_url}",
                             "eval.partner.model=fault-judge", "eval.partner.temperature=0.7", "eval.partner.top_p=0.9")
    server = Endpoint(fault_server.base_url, "fault-judge")
    seen = len(fault_server.log)
    result = await evaluate_async(config, policy=ScriptedPolicy(), judge=server, partner=server,
                                  out_path=tmp_path / "vs.jsonl", max_episodes=2, progress=False)
    requests = fault_server.log[seen:]
    partner_turns = [r for r in requests if not r.structured]  # the evaluator's requests carry the schema
    assert len(partner_turns) == 4 and all(r.temperature == 0.7 and r.top_p == 0.9 for r in partner_turns)
    assert all(r.temperature == 0.0 for r in requests if r.structured)
    records = [json.loads(line) for line in (tmp_path / "vs.jsonl").read_text().splitlines()]
    assert sorted((r["env_id"], r["actor_role"]) for r in records) == [(0, "agent1"), (0, "agent2"), (1, "agent1"), (1, "agent2")]
    assert all(r["run_mode"] == "vs_partner" for r in records)
    # The model speaks turn 0 as agent 1 and turn 1 as agent 2; only its own turns count in the mode usage.
    assert result.summary.modes.turns == {"1": 2, "2": 2}
    actor_goals = [r[f"{r['actor_role']}_scores"]["goal"][1] for r in records]
    assert result.summary.all.actor["goal"].mean == pytest.approx(sum(actor_goals) / 4)


class ScriptedActor:
    """A stand-in rollout actor: `generate(request)` answers like ScriptedPolicy, as a one-sample group."""

    async def generate(self, request):
        from actors.records import Group, Sample

        generation = (await ScriptedPolicy()([list(request.messages)]))[0]
        sample = Sample(request.group_id, request.state_id, 0, (1,), (2, 3), (-1.0, -1.0), 0, generation.text, "stop")
        return Group(request, (sample,))


async def test_driver_evaluation_follows_the_full_and_hard_schedule(fault_server, tmp_path):
    config = pipeline_config(fault_server.base_url, "eval.max_turns=1", "eval.max_episodes=null", "eval.hard_only=true",
                             "eval.full_every_steps=4", "algorithm.total_steps=6")
    hook = driver_evaluation(config, judge=Endpoint(fault_server.base_url, "fault-judge"), out_dir=tmp_path)
    driver = type("Driver", (), {"rollout_actors": [ScriptedActor()]})()
    played = {}
    for step in (0, 2, 4, 6):
        metrics = await hook(driver, step)
        played[step] = len((tmp_path / f"step_{step:06d}.jsonl").read_text().splitlines())
        assert ("eval/goal_actor" in metrics) == (step != 2) and "eval/hard_goal_actor" in metrics
    # Full evaluations at steps 0, 4 (a multiple of full_every_steps) and 6 (the last); the hard subset at step 2.
    assert played == {0: len(DATA), 2: len(DATA.hard_ids), 4: len(DATA), 6: len(DATA)}


def fault_server_prompt(record: dict) -> str:
    from reward.prompts import evaluation_prompt

    return evaluation_prompt(record["complete_intro"], record["dialog"])


@pytest.mark.integration
async def test_eval_excludes_episodes_the_judge_cannot_score(tmp_path):
    def broken(prompt: str) -> str:
        return "no idea" if "agent_1_evaluation" in prompt else hashed_answer(prompt)

    with FaultServer(FaultConfig(answer=broken)) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=1")
        result = await evaluate_async(config, policy=ScriptedPolicy(), judge=Endpoint(server.base_url, "fault-judge"),
                                      out_path=tmp_path / "e.jsonl", max_episodes=2, progress=False)
    assert result.summary.excluded == 2 and result.summary.exclusion_reasons == {"unparseable": 2}
    assert result.summary.all.episodes == 0 and eval_metrics(result.summary) == {"eval/episodes": 0.0, "eval/excluded": 2.0}


def scores(values: list[int]) -> dict[str, list]:
    return {d.name: [f"why {d.name}", v] for d, v in zip(DIMENSIONS, values)}


def episode(env_id: int, hard: bool, agent1: list[int] | None, agent2: list[int] | None, modes: list, tokens: list,
            **extra) -> dict:
    """A results record as `ampo eval` writes it (the fields the summary reads, plus run settings)."""
    return {
        "env_id": env_id, "actor_role": "agent1", "run_mode": "self_play", "hard": hard, "modes": modes,
        "response_tokens": tokens, "agent1_scores": agent1 and scores(agent1), "agent2_scores": agent2 and scores(agent2),
        "evaluation_error": None if agent1 else "unparseable", **extra,
    }


FIXTURE = [
    # BEL REL KNO SEC SOC FIN GOAL
    episode(0, True, [8, 2, 4, 0, 0, 1, 7], [6, 1, 2, -2, 0, -1, 5], [1, 2, None, 3], [10, 20, 30, 40]),
    episode(5, False, [9, 3, 6, 0, -1, 2, 9], [7, 2, 4, 0, 0, 0, 6], [2, 2], [50, 70]),
    episode(7, False, None, None, [4], [100]),
]


def test_report_tables_with_hand_checked_numbers(tmp_path):
    results = tmp_path / "eval.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = [{"step": s, "reward_mean": 0.5 + s / 10, "format_error_ratio": 0.5 / s, "kl": 0.01 * s, "entropy": 1.0,
              **{f"mode_fraction/{m}": 0.25 for m in (1, 2, 3, 4)}} for s in (1, 2, 3)]
    steps.insert(0, {"step": 0, "eval/goal_actor": 6.0, "eval/goal_avg": 5.5})
    steps.append({"step": 3, "eval/goal_actor": 7.0, "eval/goal_avg": 6.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))

    result = report([results], run_dir=run_dir, out_dir=tmp_path / "report")
    md = result.markdown.read_text()
    text = result.text.read_text()
    # All (episodes 0 and 5): GOAL actor 7, 9 -> 8.00 ± 1.00; opponent 5, 6 -> 5.50 ± 0.50; average 6, 7.5 -> 6.75
    # ± 0.75. Overall actor 22/7 and 28/7 -> 3.57 ± 0.43; opponent 11/7, 19/7 -> 2.14 ± 0.57; average 33/14 and
    # 47/14 -> 2.86 ± 0.50. Hard (episode 0 only): GOAL 7 / 5 / 6, overall 3.14 / 1.57 / 2.36.
    assert "| GOAL (goal) | 8.00 ± 1.00 | 5.50 ± 0.50 | 6.75 ± 0.75 |" in md
    assert "| overall | 3.57 ± 0.43 | 2.14 ± 0.57 | 2.86 ± 0.50 |" in md
    assert "| SEC (secret) | 0.00 ± 0.00 | -1.00 ± 1.00 | -0.50 ± 0.50 |" in md
    assert "| GOAL (goal) | 7.00 ± 0.00 | 5.00 ± 0.00 | 6.00 ± 0.00 |" in md
    assert "| overall | 3.14 ± 0.00 | 1.57 ± 0.00 | 2.36 ± 0.00 |" in md
    assert "episodes: 3, evaluated: 2, excluded: 1 {'unparseable': 1}" in md
    assert "not the full Sotopia benchmark of 450 (70 hard): these figures are not comparable" in md
    # One self-play file: the Table 1 row reads the average of both agents (GOAL 6.75, overall 2.86; hard 6.00, 2.36).
    assert "| 1 self-play, 0 vs-partner | 6.75 | 2.86 | 6.00 | 2.36 | — | — | — | — |" in md
    assert "all: GOAL actor 8.00 / avg 6.75, overall actor 3.57 / avg 2.86; hard: GOAL actor 7.00 / avg 6.00, " \
           "overall actor 3.14 / avg 2.36" in md
    # Mode usage over every record: modes 1, 2, 2, 2, 3, 4 and one broken format; mode 2 tokens (20+50+70)/3.
    assert "| 2 | 3 | 42.9% | 46.7 |" in md and "| invalid | 1 | 14.3% | 30.0 |" in md
    assert re.search(r"GOAL \(goal\)\s+8\.00 ± 1\.00\s+5\.50 ± 0\.50\s+6\.75 ± 0\.75", text)
    assert {p.name for p in result.plots} == {"reward.png", "format_error_ratio.png", "mode_mix.png", "kl.png",
                                              "entropy.png", "eval_goal.png"}
    assert all(p.stat().st_size > 1000 for p in result.plots) and "![eval_goal](eval_goal.png)" in md

    # The authors' JSON list layout (no run settings, excluded by reward -100) gives the same tables.
    authors = tmp_path / "authors.json"
    plain = [{k: v for k, v in r.items() if k not in ("run_mode", "modes", "response_tokens", "evaluation_error")}
             for r in FIXTURE]
    plain[2]["rewards"] = [-100]
    authors.write_text(json.dumps(plain))
    again = report([authors], out_dir=tmp_path / "report2")
    assert "| overall | 3.57 ± 0.43 | 2.14 ± 0.57 | 2.86 ± 0.50 |" in again.markdown.read_text()
    assert again.plots == []


def test_coverage_names_the_full_benchmark_only_when_every_episode_is_there():
    from cluster.report import benchmark_coverage

    full = [{"env_id": i, "hard": i < 70} for i in range(450)]
    assert benchmark_coverage(full) == "Episodes: the full Sotopia benchmark (450 episodes, 70 hard)."
    # Against a partner every episode is played twice; that is still the full benchmark.
    assert benchmark_coverage(full + [dict(r) for r in full]).startswith("Episodes: the full")
    assert benchmark_coverage(full[:449]).startswith("Episodes: 449 (70 hard), not the full Sotopia benchmark")


def test_summary_view_counts_only_the_models_turns_against_a_partner():
    record = episode(2, False, [5] * 7, [5] * 7, [None, 3, None, 1], [None, 80, None, 20], run_mode="vs_partner",
                     actor_role="agent2")
    view = summary_view(record)
    assert view["modes"] == [3, 1] and view["tokens"] == [80, 20]
    summary = summarise_results([record])
    assert summary.modes.turns == {"1": 1, "3": 1}


def test_report_command_prints_the_tables(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "policy-self_play-all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    assert ampo(["report", "--config", str(TINY_CONFIG), f"cluster.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "== " + str(run_dir / "eval" / "policy-self_play-all.jsonl") + " ==" in out
    assert (run_dir / "report" / "report.md").is_file() and "report written to" in out
    assert ampo(["report", "--run-dir", str(tmp_path / "empty")]) == 1
    assert "nothing to report" in capsys.readouterr().err


# ---- readers and data check --------------------------------------------------------------------------------------


def training_row(state: RLState, **changes) -> dict:
    from actors.states import training_rows

    row = training_rows([state], SYSTEM_PROMPT)[0]
    for dotted, value in changes.items():
        node = row
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return row


def raw_record(source: RLState, **changes) -> dict:
    """The authors' raw record of a state (docs/protocol.md, RL states), with `changes` applied."""
    record = {
        "dialog": list(source.dialog), "env_id": source.env_id, "turn": source.turn, "instruction": source.instruction,
        "agent1_name": source.agent1_name, "agent2_name": source.agent2_name, "agent1_goal": source.agent1_goal,
        "agent2_goal": source.agent2_goal, "rollout": 0,
        "state": {"agent1": {"score": 3.0}, "agent2": {"score": 4.0}, "step": source.turn},
    }
    record.update(changes)
    return record


def test_state_reader_errors_name_file_row_and_field(tmp_path):
    state = demo_states()[1]
    good = raw_record(state)
    bad_rows = {
        "missing field 'instruction'": {k: v for k, v in good.items() if k != "instruction"},
        "field 'state.agent1.score': Input should be less than or equal to 10": raw_record(state, state={"agent1": {"score": 11}, "agent2": {"score": 4}}),
        "field 'state.agent2.score': Input should be greater than or equal to 0": raw_record(state, state={"agent1": {"score": 1}, "agent2": {"score": -1}}),
        "field 'dialog': Value error, the last line must be the open slot": raw_record(state, dialog=['Turn 0: A said: "hi"\n']),
        "does not match the open slot": raw_record(state, turn=3),
        "field 'env_id': Input should be greater than or equal to 0": raw_record(state, env_id=-1),
        "field 'turn': Input should be a valid integer": raw_record(state, turn="one"),
        "expected a record, got list": ["not", "a", "record"],
    }
    path = tmp_path / "states.json"
    path.write_text(json.dumps([good, *bad_rows.values()]))
    check = check_data(path, max_errors=20)
    assert check.kind == "RL states" and (check.rows, check.valid) == (9, 1) and not check.ok
    for row, (message, _) in enumerate(bad_rows.items(), start=1):
        assert any(e.startswith(f"{path}: row {row}: ") and message in e for e in check.errors), (message, check.errors)

    # Training rows (Parquet-style records) name their nested fields too.
    rows = [training_row(state, **{"reward_model.state_reward.agent2": {"score": 12.0}}),
            training_row(state, prompt=[{"role": "system", "content": "s"}]),
            training_row(state, **{"reward_model.turn": None})]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    check = check_data(path)
    assert len(check.errors) == 1 and check.errors[0].startswith(f"{path}: line 4: not valid JSON")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = check_data(path)
    assert check.errors[0].startswith(f"{path}: row 0: field 'state.agent2.score'")
    assert check.errors[1] == f"{path}: row 1: missing field 'prompt[user]'"
    assert check.errors[2] == f"{path}: row 2: missing field 'turn'"


def bc_record(output: str | None = None, **changes) -> dict:
    record = {"system": SYSTEM_PROMPT, "instruction": demo_states()[0].instruction, "input": "",
              "output": output or format_response(1, None, "Hello, nice to meet you.")}
    record.update(changes)
    return record


def test_bc_reader_errors_name_file_row_and_field(tmp_path):
    bad_rows = {
        "expected a record with instruction/output, got str": "just text",
        "field 'instruction': Field required": {k: v for k, v in bc_record().items() if k != "instruction"},
        "field 'output' is empty": bc_record(output="  "),
        "field 'input': Input should be a valid string": bc_record(input=3),
        "field 'system': Input should be a valid string": bc_record(system=["a"]),
        "field 'output' is not a thinking-mode response: no thinking-level header": bc_record(output="Hello!"),
        "field 'output' is not a thinking-mode response: answer must be one double-quoted utterance":
            bc_record(output='Thinking Level: 1\n<|begin_of_answer|>\n"a "b" c"\n<|end_of_answer|>'),
    }
    path = tmp_path / "bc.json"
    path.write_text(json.dumps([bc_record(), *bad_rows.values()]))
    check = check_data(path, max_errors=20)
    assert check.kind.startswith("behaviour-cloning") and (check.rows, check.valid) == (8, 1)
    assert check.facts[0] == "modes: 1: 1" and "1 of 1 system prompts are prompts.system" in check.facts[1]
    for row, message in enumerate(bad_rows, start=1):
        assert any(e == f"{path}: row {row}: {message}" or (e.startswith(f"{path}: row {row}: ") and message in e)
                   for e in check.errors), (message, check.errors)
    with pytest.raises(BCDataError) as error:
        load_bc_records(path, check_format=True)
    assert all(f"{path}: row {row}: " in str(error.value) for row in range(1, len(bad_rows) + 1)), error.value
    assert len(load_bc_records(_write(tmp_path / "ok.json", [bc_record()]), check_format=True)) == 1
    for content, message in [("{", "not valid JSON"), ('{"a": 1}', "expected a JSON list of alpaca records")]:
        with pytest.raises(BCDataError, match=message):
            load_bc_records(_write_text(tmp_path / "broken.json", content), check_format=True)
    with pytest.raises(BCDataError, match=r"line 2: not valid JSON"):
        load_bc_records(_write_text(tmp_path / "broken.jsonl", json.dumps(bc_record()) + "\n{oops\n"), check_format=True)
    assert load_bc_records(_write_text(tmp_path / "free.json", json.dumps([bc_record(output="Hi")])), check_format=False)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_data_check_command_output(tmp_path, capsys, monkeypatch):
    from actors.states import write_states

    states_file = write_states(demo_states(), tmp_path / "states.parquet", SYSTEM_PROMPT)
    assert ampo(["data", "check", str(states_file)]) == 0
    out = capsys.readouterr().out
    assert f"{states_file}: RL states\n  rows: 3, valid: 3, invalid: 0\n" in out
    assert "layout: training rows (system prompt baked in)" in out and "turns 0..2" in out
    assert "prior goal scores, mean: agent1 2.00, agent2 1.33" in out and "checked 1: 1 OK, 0 with errors" in out

    bad = _write(tmp_path / "bc.json", [bc_record(), bc_record(output="Hello!")])
    scenarios = Path(__file__).resolve().parent.parent / "actors" / "scenarios"
    assert ampo(["data", "check", str(bad), str(scenarios), "--max-errors", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: behaviour-cloning records (alpaca)\n  rows: 2, valid: 1, invalid: 1\n  modes: 1: 1\n" \
           "  prompts: 1 of 1 system prompts are prompts.system; 1 of 1 turn prompts follow prompts.turn\n  first errors:\n" \
           f"    {bad}: row 1: field 'output' is not a thinking-mode response: no thinking-level header\n  FAILED" in out
    assert f"{scenarios}: Sotopia scenario folder\n  rows: 36, valid: 36, invalid: 0\n  episodes: 36 (hard: 12)" in out
    assert "checked 2: 1 OK, 1 with errors" in out

    # Against another system prompt (an override names the template), the same states file is a mismatch.
    other = _write_text(tmp_path / "system.txt", "You are a helpful assistant.")
    assert ampo(["data", "check", str(states_file), f"prompts.system={other}"]) == 1
    out = capsys.readouterr().out
    assert f"row 0: the system prompt is not prompts.system ({other}): line 1: the template gives 'You are a helpful " \
           "assistant.', the file has 'You are an expert conversationalist" in out

    # Without a FILE: the config's data (bundled scenarios, and the states file an override names).
    assert ampo(["data", "check", "--config", str(TINY_CONFIG), f"data.train_states={states_file}"]) == 0
    assert "checked 2: 2 OK" in capsys.readouterr().out

    # A Hugging Face dataset file is downloaded first (here the download is a local copy of the same layout).
    seen = {}

    def fake_download(repo_id: str, filename: str, repo_type: str, **_: object) -> str:
        seen.update(repo_id=repo_id, filename=filename, repo_type=repo_type)
        return str(states_file)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert ampo(["data", "check", "hf://iiiiwis/AMPO/data/train_rl.parquet"]) == 0
    assert seen == {"repo_id": "iiiiwis/AMPO", "filename": "data/train_rl.parquet", "repo_type": "dataset"}
    assert ampo(["data", "check", str(tmp_path / "missing.json")]) == 1
    assert "no such file or folder" in capsys.readouterr().out


# ---- endpoints and the rollout policy ----------------------------------------------------------------------------


def test_open_endpoint_uses_remote_sections_as_given():
    config = load_config(TINY_CONFIG)
    remote = config.reward.judge.model_copy(update={"base_url": "https://judge.example/v1", "model": "qwen2.5-72b-instruct"})
    endpoint = open_endpoint(remote, config.rollout)
    assert (endpoint.base_url, endpoint.model, endpoint.server) == ("https://judge.example/v1", "qwen2.5-72b-instruct", None)
    endpoint.close()
    with pytest.raises(ConfigError, match="model `local` only works with base_url `local`"):
        open_endpoint(remote.model_copy(update={"model": "local"}), config.rollout, what="judge")
    with judge_endpoint(remote, config) as (base_url, model):
        assert (base_url, model) == ("https://judge.example/v1", "qwen2.5-72b-instruct")


def test_a_local_server_takes_the_sections_kv_cache_size_or_the_rollout_engines(monkeypatch, tiny_model_dir):
    import cluster.endpoints

    started = []

    class Server:  # records what the local server would be started with
        base_url = "http://127.0.0.1:1/v1"

        def __init__(self, path, **settings):
            started.append(settings)

        def start(self):
            pass

    monkeypatch.setattr(cluster.endpoints, "JudgeServer", Server)
    config = load_config(TINY_CONFIG, [f"rollout.model={tiny_model_dir}", "rollout.kv_cache_memory_bytes=268435456"])
    open_endpoint(config.eval.judge, config.rollout)
    open_endpoint(config.eval.judge.model_copy(update={"local_kv_cache_memory_bytes": 1 << 30}), config.rollout)
    assert [s["kv_cache_memory_bytes"] for s in started] == [268435456, 1 << 30]


async def test_rollout_policy_sends_one_sample_per_chat_to_the_least_loaded_actor():
    import asyncio

    from actors.records import Group, Sample

    class FakeActor:
        def __init__(self) -> None:
            self.requests = []

        async def generate(self, request):
            self.requests.append(request)
            await asyncio.sleep(0.01)
            sample = Sample(request.group_id, request.state_id, 0, (1,), (5, 6, 7), (-1.0, -1.0, -1.0), 0,
                            f"reply to {request.messages[-1]['content']}", "stop")
            return Group(request, (sample,))

    class RemoteStyle:
        """What a Ray handle looks like to the policy: `generate.remote(request)` gives an awaitable."""

        def __init__(self, actor: FakeActor) -> None:
            self.generate = type("M", (), {"remote": staticmethod(actor.generate)})()

    local, remote = FakeActor(), FakeActor()
    config = load_config(TINY_CONFIG).rollout
    policy = RolloutPolicy.from_config([local, RemoteStyle(remote)], config)
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    out = await policy(batch)
    assert [g.text for g in out] == [f"reply to q{i}" for i in range(4)] and all(g.num_tokens == 3 for g in out)
    assert len(local.requests) == len(remote.requests) == 2
    request = local.requests[0]
    assert request.sampling.n == 1 and request.sampling.temperature == config.eval_temperature == 0.7
    assert request.sampling.max_tokens == config.max_response_tokens


# ---- end to end on the tiny model (slow) -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_build_states_eval_and_report_commands_on_the_tiny_model(tiny_model_dir, fault_server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--config", str(TINY_CONFIG), f"rollout.model={tiny_model_dir}", f"cluster.run_dir={run_dir}",
              f"reward.judge.base_url={fault_server.base_url}", "reward.judge.model=fault-judge",
              f"eval.judge.base_url={fault_server.base_url}", "eval.judge.model=fault-judge",
              "eval.max_turns=2", "rollout.max_response_tokens=16"]
    assert ampo(["build-states", *common, "--max-episodes", "2", "--seed", "3"]) == 0
    states = read_states(run_dir / "train_rl.parquet")  # the name `ampo train` looks for
    assert [(s.env_id, s.turn) for s in states] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "RL states: 4 written" in capsys.readouterr().out
    # Deterministic given the seed: a fresh run elsewhere writes the same states. One episode at a time:
    # the engine is seeded once (per-request seeds crash the CPU engine), so concurrent episodes sample
    # from one random stream whose interleaving depends on timing.
    for name in ("b", "c"):
        assert ampo(["build-states", *common, "--episodes", "0", "--seed", "3", "--out", str(tmp_path / f"{name}.parquet")]) == 0
    assert read_states(tmp_path / "b.parquet") == read_states(tmp_path / "c.parquet")

    assert ampo(["eval", *common, "--max-episodes", "2", "--policy", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    results = run_dir / "eval" / f"{tiny_model_dir.name}-self_play-all.jsonl"
    assert f"results: {results}" in out and "all (2 episodes)" in out
    assert ampo(["report", *common[:4]]) == 0
    assert "GOAL (goal)" in capsys.readouterr().out and (run_dir / "report" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bc_command_trains_on_make_demos_output(ray_local, tiny_model_dir, tmp_path, capsys):
    # The stages chain through the run folder: bc finds make-demos' output without a flag.
    run = f"cluster.run_dir={tmp_path / 'run'}"
    assert ampo(["bc", "--config", str(TINY_CONFIG), run]) == 2
    assert "data.bc_data: no demonstrations at" in capsys.readouterr().err  # says which stage writes it
    with FaultServer(FaultConfig(answer=expert_answer)) as server:
        assert ampo(["make-demos", "--config", str(TINY_CONFIG), run, f"reward.judge.base_url={server.base_url}",
                     "reward.judge.model=fault-judge", "reward.judge.api_key_env=AMPO_TEST_JUDGE_KEY_UNSET",
                     "--max-states", "2"]) == 0
    # The opening turns of episodes 0 and 1; the test expert spoils mode 3 of episode 1 (see expert_answer).
    assert "demonstrations: 7 of 8 accepted (87.5%)" in capsys.readouterr().out
    out_dir = tmp_path / "run" / "bc_model"
    assert ampo(["bc", "--config", str(TINY_CONFIG), run, f"rollout.model={tiny_model_dir}", "bc.epochs=1", "bc.batch_size=4",
                 "bc.cutoff_len=1024", "learner.mixed_precision=fp32"]) == 0
    assert (out_dir / "config.json").is_file() and len((out_dir / "bc_metrics.jsonl").read_text().splitlines()) == 2
    assert f"behaviour-cloned model written to {out_dir}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_demos_with_the_real_vllm_server_as_expert(tiny_model_dir, tmp_path, capsys):
    """The tiny random model behind vLLM's OpenAI server: structured output alone makes its demonstrations
    well-formed, so (nearly) all of them pass the checker, and every one written does."""
    import time

    out = tmp_path / "demos.json"
    started = time.monotonic()
    assert ampo(["make-demos", "--config", str(TINY_CONFIG), f"rollout.model={tiny_model_dir}",
                 "reward.judge.api_key_env=AMPO_TEST_JUDGE_KEY_UNSET", "reward.judge.timeout_s=60",
                 "--max-states", "2", "--section-chars", "40", "--answer-chars", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    print(f"\n{printed}\nreal expert: {time.monotonic() - started:.0f} s")
    assert len(records) >= 6 and all(parse_response(r["output"]).valid for r in records)
