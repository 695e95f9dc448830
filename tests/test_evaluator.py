"""The Sotopia evaluator (prompt, parsing, reformat retry, exclusion) and the results summariser, with
hand-checked numbers."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from judge_fixtures import judge_config

from reward.evaluator import (
    EpisodeEvaluator,
    load_results,
    parse_evaluation,
    render_summary,
    summarise,
)
from testing.fault_server import FaultConfig, FaultServer, hashed_answer
from reward.answers import AnswerError
from reward.judge import JudgeClient
from reward.prompts import DIMENSIONS, EVAL_SCHEMA, evaluation_prompt, reformat_prompt

NAMES = [d.name for d in DIMENSIONS]
INTRO = "Here is the context of this interaction:\nScenario: two friends share a bike.\nAna's goal: borrow it."
DIALOG = ['Turn 0: Ana said: "Can I borrow your bike?"', 'Turn 1: Ben said: "Sure, until Sunday."']


def scores(values: list[float]) -> dict[str, list]:
    """Dimension -> [reasoning, score] in the order BEL, REL, KNO, SEC, SOC, FIN, GOAL."""
    return {name: [f"why {name}", value] for name, value in zip(NAMES, values)}


def evaluation_json(agent1: list[float], agent2: list[float]) -> str:
    return json.dumps({"agent_1_evaluation": scores(agent1), "agent_2_evaluation": scores(agent2)})


# ---- prompt and parsing -----------------------------------------------------------------------------------------


def test_evaluation_prompt_holds_intro_dialogue_dimensions_and_schema():
    prompt = evaluation_prompt(INTRO, DIALOG)
    assert prompt.startswith(INTRO + "\n\n" + DIALOG[0] + "\n" + DIALOG[1] + "\n\n")
    for dim, (low, high) in zip(NAMES, [(0, 10), (-5, 5), (0, 10), (-10, 0), (-10, 0), (-5, 5), (0, 10)]):
        assert f'"{dim}"' in prompt and f"from {low} to {high}" in prompt.split(f'"{dim}"')[1].split("\n")[0]
    assert json.dumps(EVAL_SCHEMA) in prompt
    assert "<<<TEXT\nbroken\nTEXT>>>" in reformat_prompt("broken", EVAL_SCHEMA)


def test_parse_evaluation_pairs_and_tolerated_objects():
    text = evaluation_json([8, 2, 4, 0, 0, 1, 6], [6, 0, 2, -2, 0, -1, 4])
    agent1, agent2 = parse_evaluation("Here you go:\n" + text)
    assert agent1["goal"] == ("why goal", 6.0) and agent2["secret"] == ("why secret", -2.0)
    as_objects = json.loads(text)
    as_objects["agent_2_evaluation"]["goal"] = {"reasoning": "r", "score": "4"}
    assert parse_evaluation(json.dumps(as_objects))[1]["goal"] == ("r", 4.0)


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda d: d["agent_1_evaluation"].pop("goal"), "unparseable"),
        (lambda d: d.pop("agent_2_evaluation"), "unparseable"),
        (lambda d: d["agent_1_evaluation"].__setitem__("goal", [7]), "unparseable"),
        (lambda d: d["agent_1_evaluation"].__setitem__("relationship", ["r", 6]), "out_of_range"),
        (lambda d: d["agent_2_evaluation"].__setitem__("secret", ["r", 1]), "out_of_range"),
    ],
)
def test_parse_evaluation_rejects(mutate, kind):
    data = json.loads(evaluation_json([8, 2, 4, 0, 0, 1, 6], [6, 0, 2, -2, 0, -1, 4]))
    mutate(data)
    with pytest.raises(AnswerError) as info:
        parse_evaluation(json.dumps(data))
    assert info.value.kind == kind


# ---- evaluation against the fault server ------------------------------------------------------------------------


def _evaluate(server: FaultServer, **overrides):
    async def run():
        async with JudgeClient(judge_config(server.base_url, **overrides)) as client:
            record = {"env_id": 3, "complete_intro": INTRO, "dialog": DIALOG, "actor_role": "agent1"}
            return await EpisodeEvaluator(client).evaluate(record)

    return asyncio.run(run())


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_evaluation_ok_is_in_range():
    with FaultServer() as server:
        result = _evaluate(server)
        assert server.log[0].structured and server.log[0].temperature == 0.0
    assert not result.excluded and result.calls == 1 and not result.reformatted
    for dim in DIMENSIONS:
        for agent in (result.agent1, result.agent2):
            assert dim.low <= agent[dim.name][1] <= dim.high


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_unreadable_answer_is_reformatted_once():
    # Only the reformat request (it quotes the text between <<<TEXT markers) gets a readable answer.
    def answer(prompt: str) -> str:
        return hashed_answer(prompt) if "<<<TEXT" in prompt else "Agent 1 was rather believable, I'd say 7."

    with FaultServer(FaultConfig(answer=answer)) as server:
        result = _evaluate(server)
        prompts = len({entry.prompt_key for entry in server.log})
    assert not result.excluded and result.reformatted and result.calls == 2 and prompts == 2


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_failed_reformat_excludes_the_episode():
    # The script applies per prompt: the first question and the reformat request both get out-of-range scores.
    with FaultServer(FaultConfig(script=["out_of_range"])) as server:
        result = _evaluate(server)
    assert result.excluded and result.reason == "out_of_range" and result.agent1 is None and result.calls == 2


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_an_evaluation_cut_by_max_tokens_excludes_the_episode():
    # A cut answer is not reformatted (the reformat could only invent the missing scores): excluded and counted.
    with FaultServer(FaultConfig(script=["truncated"])) as server:
        result = _evaluate(server)
    assert result.excluded and result.reason == "truncated" and result.agent1 is None and result.calls == 1


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_unreachable_judge_excludes_with_the_transport_reason():
    with FaultServer(FaultConfig(script=["server_error"] * 5)) as server:
        result = _evaluate(server, max_retries=1)
    assert result.excluded and result.reason == "server_error" and result.calls == 2


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_evaluate_all_annotates_records(tmp_path):
    records = [
        {"env_id": i, "complete_intro": INTRO + str(i), "dialog": DIALOG, "actor_role": "agent1"} for i in range(3)
    ]
    with FaultServer() as server:

        async def run():
            async with JudgeClient(judge_config(server.base_url)) as client:
                return await EpisodeEvaluator(client).evaluate_all(records)

        annotated = asyncio.run(run())
    path = tmp_path / "results.json"
    path.write_text(json.dumps(annotated))
    loaded = load_results(path)
    assert [r["excluded"] for r in loaded] == [False] * 3
    assert summarise(loaded).all.episodes == 3


# ---- summary ------------------------------------------------------------------------------------------------------

RECORDS = [
    # actor agent1: overall 21/7 = 3; opponent 9/7
    {
        "env_id": 0,
        "actor_role": "agent1",
        "agent1_scores": scores([8, 2, 4, 0, 0, 1, 6]),
        "agent2_scores": scores([6, 0, 2, -2, 0, -1, 4]),
        "modes": [1, 3, None],
        "tokens": [40, 200, 90],
    },
    # hard by flag; actor agent2: overall 18/7; opponent (agent1) 21/7
    {
        "env_id": 5,
        "hard": True,
        "actor_role": "agent2",
        "agent1_scores": scores([9, 3, 5, 0, 0, 2, 2]),
        "agent2_scores": scores([7, 1, 3, 0, -1, 0, 8]),
        "modes": [2, 3],
        "tokens": [100, 260],
    },
    # excluded: never scored
    {
        "env_id": 7,
        "actor_role": "agent1",
        "agent1_scores": {},
        "agent2_scores": {},
        "excluded": True,
        "exclusion_reason": "unparseable",
        "modes": [4],
        "tokens": [500],
    },
    # actor agent1: overall 20/7; opponent 7/7
    {
        "env_id": 12,
        "actor_role": "agent1",
        "agent1_scores": scores([10, 0, 0, 0, 0, 0, 10]),
        "agent2_scores": scores([5, -1, 0, 0, -2, 0, 5]),
    },
]


def test_summary_hand_checked(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    summary = summarise(load_results(path))
    assert (summary.records, summary.excluded, summary.exclusion_reasons) == (4, 1, {"unparseable": 1})
    everything = summary.all
    assert everything.episodes == 3
    # GOAL: actor 6, 8, 10; opponent 4, 2, 5; average 5, 5, 7.5
    assert everything.actor["goal"].mean == pytest.approx(8.0)
    assert everything.actor["goal"].std == pytest.approx(math.sqrt(8 / 3))
    assert everything.opponent["goal"].mean == pytest.approx(11 / 3)
    assert everything.opponent["goal"].std == pytest.approx(math.sqrt((1 / 9 + 25 / 9 + 16 / 9) / 3))
    assert everything.average["goal"].mean == pytest.approx(17.5 / 3)
    # overall: actor 21/7, 18/7, 20/7; average (21+9)/14, (18+21)/14, (20+7)/14
    assert everything.actor["overall"].mean == pytest.approx(59 / 21)
    assert everything.opponent["overall"].mean == pytest.approx((9 + 21 + 7) / 21)
    assert everything.average["overall"].mean == pytest.approx((30 + 39 + 27) / 42)
    # secret: actor 0, 0, 0; opponent -2, 0, 0
    assert everything.actor["secret"].std == 0.0 and everything.opponent["secret"].mean == pytest.approx(-2 / 3)

    hard = summary.hard
    assert hard.episodes == 1
    assert (hard.actor["goal"].mean, hard.opponent["goal"].mean, hard.average["goal"].mean) == (8.0, 2.0, 5.0)
    assert hard.actor["goal"].std == 0.0

    # modes over all 4 records (the excluded one too): 1, 3, invalid, 2, 3, 4
    assert summary.modes.turns == {"1": 1, "2": 1, "3": 2, "4": 1, "invalid": 1}
    assert summary.modes.share["3"] == pytest.approx(2 / 6)
    assert summary.modes.mean_tokens == {"1": 40.0, "2": 100.0, "3": 230.0, "4": 500.0, "invalid": 90.0}
    assert summary.hard_modes.turns == {"2": 1, "3": 1}


def test_hard_subset_by_real_episode_id():
    summary = summarise(RECORDS, hard_ids={12})
    assert summary.hard.episodes == 2  # env 5 (flag) and env 12 (id), wherever they sit in the list
    assert summary.hard.actor["goal"].mean == pytest.approx(9.0)
    assert summary.hard.actor["goal"].std == pytest.approx(1.0)


def test_command_line_summary(tmp_path, capsys):
    from reward.evaluator import main

    results, hard = tmp_path / "results.json", tmp_path / "hard.json"
    results.write_text(json.dumps(RECORDS))
    hard.write_text("[12]")
    main([str(results), "--hard-ids", str(hard), "--style", "text"])
    out = capsys.readouterr().out
    assert "hard (2 episodes)" in out and "excluded: 1" in out


def test_reference_exclusion_marker_and_render():
    legacy = dict(RECORDS[0], rewards=[0.0, -100.0])
    summary = summarise([legacy, RECORDS[3]])
    assert summary.excluded == 1 and summary.all.episodes == 1
    markdown = render_summary(summarise(RECORDS))
    assert "| GOAL (goal) | 8.00 ± 1.63 | 3.67 ± 1.25 | 5.83 ± 1.18 |" in markdown
    assert "hard (1 episodes)" in markdown and "| 3 | 2 | 33.3% | 230.0 |" in markdown
    text = render_summary(summarise(RECORDS), style="text")
    assert "overall" in text and "|" not in text
    assert "n/a" in render_summary(summarise([RECORDS[0]]))  # no hard episode


def _summary(goal_avg: float, overall_avg: float, goal_actor: float, overall_actor: float, hard: bool = True):
    from reward.evaluator import ResultsSummary, Stat, SubsetSummary

    def subset(episodes: int) -> SubsetSummary:
        side = lambda g, o: {"goal": Stat(g, 0.0, episodes), "overall": Stat(o, 0.0, episodes)}  # noqa: E731
        return SubsetSummary(episodes, side(goal_actor, overall_actor), side(0.0, 0.0), side(goal_avg, overall_avg))

    return ResultsSummary(10, 0, {}, subset(10), subset(2 if hard else 0), None, None)


def test_table1_layout_over_runs_with_mean_and_std_between_runs():
    from reward.evaluator import run_mode_of, table1_markdown

    runs = [("self_play", _summary(8.0, 3.5, 9.9, 9.9)), ("self_play", _summary(9.0, 3.9, 9.9, 9.9)),
            ("vs_partner", _summary(0.0, 0.0, 7.5, 3.6, hard=False))]
    header, _, row = table1_markdown(runs).splitlines()
    assert header.startswith("| runs | self-play Sotopia GOAL | self-play Sotopia overall | self-play Hard GOAL |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Self-play reads the two agents' average: GOAL 8 and 9 -> 8.50 ± 0.71 (sample std between runs).
    assert cells[:5] == ["2 self-play, 1 vs-partner", "8.50 ± 0.71", "3.70 ± 0.28", "8.50 ± 0.71", "3.70 ± 0.28"]
    # Against a partner the model's side counts; no hard episodes in that run: a dash.
    assert cells[5:] == ["7.50", "3.60", "—", "—"]
    assert run_mode_of([{"run_mode": "vs_partner"}]) == "vs_partner"
    assert run_mode_of([{"actor_role": "agent1"}, {"actor_role": "agent2"}]) == "vs_partner"  # the authors' files
    assert run_mode_of([{"actor_role": "agent1"}]) == "self_play"
    with pytest.raises(ValueError, match="mixes run modes"):
        run_mode_of([{"run_mode": "vs_partner"}, {"run_mode": "self_play"}])
