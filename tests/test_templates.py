"""Prompt templates: the shipped ones render, a user's own replace them everywhere, and a broken one stops the run."""

import json
import re
from pathlib import Path

import pytest

from actors.prompts import complete_intro, render_turn_prompt
from actors.sotopia import SotopiaDataset
from actors.states import make_state, read_states
from cluster.config import ConfigError, load_config
from cluster.episodes import Generation, Message
from cluster.demos import demo_prompt, make_demos_async
from cluster.endpoints import Endpoint
from cluster.evaluation import evaluate_async
from cluster.states import build_states_async
from prompts import DEFAULT_PROMPTS, SPECS, PromptSet, PromptTemplate, TemplateError, resolve_path
from reward.modes import format_response
from reward.prompts import evaluation_prompt, goal_prompt, reformat_prompt
from judge_fixtures import judge_config
from testing.fault_server import FaultConfig, FaultServer, hashed_answer, is_evaluation_prompt
from tests.test_pipeline import pipeline_config

DATA = SotopiaDataset.load()
ROOT = Path(__file__).resolve().parent.parent

# Values that every template of the role accepts; the test renders each shipped template with them.
SAMPLE_VALUES = {
    "system": {},
    "turn": {"name": "Ana", "turn": 3, "background": "BACKGROUND", "dialog": "DIALOG"},
    "background": {"scenario": "SCENARIO", "agent1_name": "Ana", "agent2_name": "Ben", "agent1_background": "BIO1",
                   "agent2_background": "BIO2", "agent1_goal": "GOAL1", "agent2_goal": "GOAL2"},
    "goal_judge": {"history": "HISTORY", "agent1_name": "Ana", "agent2_name": "Ben", "agent1_goal": "GOAL1",
                   "agent2_goal": "GOAL2"},
    "evaluator": {"intro": "INTRO", "dialog": "DIALOG", "schema": "SCHEMA"},
    "reformat": {"text": "TEXT", "schema": "SCHEMA"},
    "demo": {"turn_prompt": "TURN PROMPT", "level": 2, "mode_name": "Intentional Analysis",
             "sections": ["Intent", "Style", "Response"], "keys": ["Intent", "Style", "Response", "answer"],
             "example": "EXAMPLE"},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_shipped_template_renders_every_value_it_is_given(name):
    template = getattr(DEFAULT_PROMPTS, name)
    assert template.source == str(resolve_path(f"ampo:{name}.txt")) and Path(template.source).is_file()
    text = template.render(**SAMPLE_VALUES[name])
    assert text and "{{" not in text and "{%" not in text and not text.endswith("\n")
    for value in SAMPLE_VALUES[name].values():
        if isinstance(value, str) and name != "demo":
            assert value in text, (name, value)
    assert template.placeholders >= SPECS[name].required


def test_the_shipped_turn_prompt_keeps_the_authors_layout():
    env, agent1, agent2 = DATA.episode(0)
    slot = f"Turn 0: {agent1.name} said:"
    prompt = render_turn_prompt(env, agent1, agent2, 0, [slot])
    assert prompt.startswith(f"Put yourself in the shoes of {agent1.name}") and prompt.endswith("\n\n" + slot)
    assert "\nHere is the context of this interaction:\nScenario: " in prompt
    assert f"\n{agent2.name}'s goal: Unknown\nYou are at Turn 0." in prompt


def test_the_demo_template_branches_on_the_mode():
    state = make_state(DATA, 0, [], (0.0, 0.0))
    assert "Thinking Level 1 (Reactive Response): reply at once" in demo_prompt(state, 1)
    four = demo_prompt(state, 4)
    assert "in this order: History, Goal, Intent, Assess, Strategy, Deduction, Integration, Style, Response." in four
    assert re.findall(r'^- "(\w+)":', four, flags=re.M)[-1] == "answer"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_template_with_an_unknown_placeholder_stops_the_config_naming_file_and_value(tmp_path):
    bad = write(tmp_path / "turn.txt", "{{ background }}\n{{ dialogue }}\n{{ dialog }}")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"prompts.turn={bad}"])
    assert bad in str(info.value) and "{{ dialogue }}" in str(info.value) and "prompts.turn" in str(info.value)


def test_a_template_without_a_required_placeholder_stops_the_config(tmp_path):
    bad = write(tmp_path / "judge.txt", "{{ history }}\nHow did {{ agent1_name }} do with {{ agent1_goal }}?")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"prompts.goal_judge={bad}"])
    assert bad in str(info.value) and "lacks the required placeholder {{ agent2_goal }}" in str(info.value)


def test_a_template_that_does_not_parse_or_does_not_exist_is_named(tmp_path):
    bad = write(tmp_path / "system.txt", "Think.\n{% if %}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad} (prompts.system), line 2")):
        load_config(None, [f"prompts.system={bad}"])
    with pytest.raises(ConfigError, match="prompts.evaluator: cannot read .*nowhere.txt"):
        load_config(None, [f"prompts.evaluator={tmp_path / 'nowhere.txt'}"])
    with pytest.raises(TemplateError, match="unknown templates"):
        PromptSet.load({"sytem": "x"})


def test_rendering_refuses_a_value_the_role_does_not_have():
    with pytest.raises(TypeError, match="has no values"):
        DEFAULT_PROMPTS.turn.render(background="b", dialog="d", scenario="s")


def test_a_value_the_template_does_not_use_is_fine_but_a_missing_required_one_is_an_error():
    template = PromptTemplate.parse("reformat", "inline", "Fix: {{ text }}")
    assert template.render(text="x", schema="ignored") == "Fix: x"
    with pytest.raises(Exception, match="text"):
        template.render(schema="s")


# ---- a user's templates reach every place a prompt is built -------------------------------------------------------


def marked_templates(tmp_path: Path) -> list[str]:
    """Overrides pointing every template at a copy of the shipped one with a marker line on top."""
    overrides = []
    for name in SPECS:
        text = Path(getattr(DEFAULT_PROMPTS, name).source).read_text()
        overrides.append(f"prompts.{name}=" + write(tmp_path / f"my_{name}.txt", f"[[{name}]]\n{text}"))
    return overrides


class RecordingPolicy:
    """Answers in mode 2 and keeps every chat it was sent."""

    def __init__(self) -> None:
        self.chats: list[list[Message]] = []

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        self.chats += batch
        return [Generation(format_response(2, {"Intent": "i", "Style": "s", "Response": "ok"}, "Fine."), 5) for _ in batch]


@pytest.mark.integration
async def test_user_templates_reach_the_policy_the_judges_the_expert_and_the_data_files(tmp_path):
    prompts_seen: list[str] = []

    def answer(prompt: str) -> str:
        prompts_seen.append(prompt)
        if is_evaluation_prompt(prompt) and "[[reformat]]" not in prompt:
            return "not json"  # every first evaluation fails to parse, so the reformat round runs too
        if "[[demo]]" in prompt:
            return json.dumps({"Intent": "i", "Style": "s", "Response": "r", "answer": "Hello there."})
        return hashed_answer(prompt)

    with FaultServer(FaultConfig(answer=answer)) as server:
        config = pipeline_config(server.base_url, "eval.max_turns=2", *marked_templates(tmp_path))
        prompts = config.prompts.load()
        judge = Endpoint(server.base_url, "fault-judge")
        policy = RecordingPolicy()

        await build_states_async(config, judge=judge, out_path=tmp_path / "s.parquet", policy=policy, episodes=[0],
                                 progress=False)
        states = read_states(tmp_path / "s.parquet")
        assert all(s.system_prompt.startswith("[[system]]") and s.instruction.startswith("[[turn]]") for s in states)
        assert all("[[background]]" in s.instruction for s in states)
        assert policy.chats and all(chat[0]["content"].startswith("[[system]]") for chat in policy.chats)
        assert all(chat[1]["content"].startswith("[[turn]]") and "[[background]]" in chat[1]["content"]
                   for chat in policy.chats)
        goal_questions = [p for p in prompts_seen if "[[goal_judge]]" in p]
        assert len(goal_questions) == len(states)

        await make_demos_async(states[:1], expert=judge, out_path=tmp_path / "demos.json", modes=[2], progress=False,
                               expert_config=judge_config(server.base_url, max_tokens=64), prompts=prompts)
        demo_questions = [p for p in prompts_seen if "[[demo]]" in p]
        assert len(demo_questions) == 1 and "[[turn]]" in demo_questions[0]
        assert json.loads((tmp_path / "demos.json").read_text())[0]["system"].startswith("[[system]]")

        result = await evaluate_async(config, policy=RecordingPolicy(), judge=judge, out_path=tmp_path / "e.jsonl",
                                      max_episodes=1, progress=False)
        assert result.summary.all.episodes == 1  # scored after the reformat round
        evaluations = [p for p in prompts_seen if "[[evaluator]]" in p]
        assert len(evaluations) == 1 and "[[background]]" in evaluations[0]
        assert sum("[[reformat]]" in p for p in prompts_seen) == 1


def test_the_functions_take_the_templates_they_are_given(tmp_path):
    """The renderers of every role use the set they receive (the reward actors get theirs from the driver)."""
    prompts = load_config(None, marked_templates(tmp_path)).prompts.load()
    env, agent1, agent2 = DATA.episode(1)
    assert complete_intro(env, agent1, agent2, prompts).startswith("[[background]]")
    state = make_state(DATA, 1, [], (0.0, 0.0), prompts=prompts)
    assert goal_prompt(state.reward_context(), '"Hi."', prompts).startswith("[[goal_judge]]")
    assert evaluation_prompt("intro", ["line"], prompts).startswith("[[evaluator]]")
    assert reformat_prompt("x", {}, prompts).startswith("[[reformat]]")
    assert demo_prompt(state, 1, prompts).startswith("[[demo]]")


@pytest.mark.integration
async def test_the_reward_scorer_asks_the_judge_with_the_runs_template(tmp_path, tiny_model_dir):
    from judge_fixtures import make_group, reward_config, response

    from reward.pool import RewardScorer, load_tokenizer

    prompts = load_config(None, marked_templates(tmp_path)).prompts.load()
    seen: list[str] = []
    with FaultServer(FaultConfig(answer=lambda p: seen.append(p) or hashed_answer(p))) as server:
        scorer = RewardScorer(reward_config(server.base_url), load_tokenizer(tiny_model_dir), prompts=prompts)
        try:
            scored = await scorer.score(make_group([response('"Hi."')]))
        finally:
            await scorer.aclose()
    assert scored.samples[0].reward is not None and len(seen) == 1 and seen[0].startswith("[[goal_judge]]")


# ---- ampo data check compares data files with the templates -------------------------------------------------------


def test_data_check_renders_every_episode_with_the_templates_and_names_one_that_fails(tmp_path):
    from actors.sotopia import BUNDLED_SCENARIOS
    from cluster.data_check import check_data

    check = check_data(BUNDLED_SCENARIOS)
    assert check.ok and check.valid == len(DATA) and f"{len(DATA)} of {len(DATA)} episodes render" in check.describe()
    # A template that trips over one episode's values (here: scenarios that mention a "party") is found here.
    text = Path(DEFAULT_PROMPTS.background.source).read_text()
    fragile = "{% if 'party' in scenario %}{{ agent1_goal.missing_method() }}{% endif %}" + text
    prompts = PromptSet.load({"background": write(tmp_path / "bg.txt", fragile)})
    failing = [i for i in range(len(DATA)) if "party" in DATA.episode(i)[0].scenario]
    check = check_data(BUNDLED_SCENARIOS, prompts=prompts, max_errors=100)
    assert failing and not check.ok and check.valid == len(DATA) - len(failing)
    assert check.errors[0].startswith(f"episode {failing[0]} (")


def test_data_check_reports_the_first_prompt_difference_of_a_bc_file(tmp_path):
    from cluster.data_check import check_data

    state = make_state(DATA, 0, [], (0.0, 0.0))
    output = format_response(1, None, "Hello.")
    system = DEFAULT_PROMPTS.system.render()
    other = system.replace("Level 2 - Intentional Analysis", "Level 2 - Intent Analysis")
    path = tmp_path / "bc.json"
    rows = [{"system": system, "instruction": state.instruction, "input": "", "output": output}] * 2
    rows.append({"system": other, "instruction": state.instruction, "input": "", "output": output})
    path.write_text(json.dumps(rows))
    check = check_data(path)
    assert not check.ok and len(check.errors) == 1 and "2 of 3 system prompts are prompts.system" in check.describe()
    error = check.errors[0]
    assert error.startswith("row 2: the system prompt is not prompts.system") and "line 1:" in error
    assert "Level 2 - Intent Analysis" in error and "Level 2 - Intentional Analysis" in error
    # Checked against the templates the data was written with, the same file passes.
    mine = write(tmp_path / "system.txt", other)
    assert check_data(path, prompts=PromptSet.load({"system": mine})).errors[0].startswith("row 0:")


def test_data_check_reports_a_turn_prompt_written_with_other_templates(tmp_path):
    from actors.states import write_states
    from cluster.data_check import check_data, layout_difference, turn_layout

    turn = Path(DEFAULT_PROMPTS.turn.source).read_text().replace("Only you can see this goal", "Only you know this goal")
    theirs = PromptSet.load({"turn": write(tmp_path / "their_turn.txt", turn)})
    states = [make_state(DATA, e, utterances, (1.0, 2.0), prompts=theirs)
              for e in range(3) for utterances in ([], ['"Hi."'])]
    path = write_states(states, tmp_path / "states.parquet", DEFAULT_PROMPTS.system.render())
    check = check_data(path)
    assert not check.ok and "0 of 6 turn prompts follow prompts.turn" in check.describe()
    assert check.errors == [
        "row 0: the turn prompt does not follow prompts.turn ({}) and prompts.background ({}): line 3: the template "
        "gives 'Only you can see this goal; the other participant does not know it.', the file has 'Only you know "
        "this goal; the other participant does not know it.'".format(DEFAULT_PROMPTS.turn.source, DEFAULT_PROMPTS.background.source)
    ]
    assert check_data(path, prompts=theirs).ok
    # The layout holds whatever the values are: every shipped prompt of the bundled episodes follows it.
    layout = turn_layout(DEFAULT_PROMPTS)
    assert all(layout_difference(make_state(DATA, e, ['"a"', '"b"'], (0.0, 0.0)).instruction, layout) is None
               for e in range(len(DATA)))
    # A prompt cut short, or with text after the dialogue, departs at its end.
    prompt = make_state(DATA, 0, [], (0.0, 0.0)).instruction
    assert layout_difference(prompt.split("\nHere is the context")[0], layout) is not None
    assert layout_difference(prompt + "\nAnswer now.", layout) is None  # the dialogue is the last value: it may hold anything
