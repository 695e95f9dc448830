"""Sotopia scenario loading: the bundled set, the public benchmark's format, and errors naming file, record, field."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.prompts import complete_intro, dialog_line, open_slot, render_turn_prompt
from actors.sotopia import BUNDLED_SCENARIOS, Relationship, ScenarioDataError, SotopiaDataset

PUBLIC_SOTOPIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sotopia"


@pytest.fixture(scope="module")
def bundled() -> SotopiaDataset:
    return SotopiaDataset.load()


def test_bundled_set_covers_the_required_variety(bundled: SotopiaDataset) -> None:
    assert bundled.source == BUNDLED_SCENARIOS
    assert len(bundled.envs) >= 12
    assert len(bundled.agents) >= 10
    assert {agent.gender for agent in bundled.agents.values()} == {"Man", "Woman", "Nonbinary"}
    # Every environment is played, by two or three agent pairs.
    per_env = [sum(combo.env_id == pk for combo in bundled.combos) for pk in bundled.envs]
    assert min(per_env) >= 2 and max(per_env) <= 3
    # The hard subset is made of whole environments (all their combos), as in the benchmark.
    hard_envs = {bundled.combos[i].env_id for i in bundled.hard_ids}
    assert 3 <= len(hard_envs) <= 4
    assert set(bundled.hard_ids) == {i for i, c in enumerate(bundled.combos) if c.env_id in hard_envs}
    # The markup the renderer must handle occurs in the bundled goals and scenarios.
    text = json.dumps([env.model_dump() for env in bundled.envs.values()])
    for tag in ("<extra_info>", "<strategy_hint>", "<clarification_hint>", '<p viewer=\\"environment\\">'):
        assert tag in text
    assert {env.relation for env in bundled.envs.values()} == set(Relationship)


def test_episode_accessors(bundled: SotopiaDataset) -> None:
    env, agent1, agent2 = bundled.episode(0)
    assert (env.codename, agent1.name, agent2.name) == ("used_cargo_bike", "Noah Bergstrom", "Daniel Mensah")
    assert bundled.episodes() == list(range(len(bundled)))
    assert bundled.episodes(hard_only=True) == sorted(bundled.hard_ids)
    assert bundled.is_hard(0) and not bundled.is_hard(6)
    with pytest.raises(IndexError, match="episode id 36 is out of range: the dataset has 36 episodes"):
        bundled.episode(len(bundled))


def _copy_bundled(tmp_path: Path) -> Path:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    for name in ("agents.json", "envs.json", "env_agent_combos.json", "sotopia_hard.json"):
        shutil.copy(BUNDLED_SCENARIOS / name, folder / name)
    return folder


def _edit(folder: Path, name: str, change: Callable[[Any], Any]) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _drop_age(agents: dict) -> dict:
    del agents["ampo-agent-03"]["age"]
    return agents


def _age_as_text(agents: dict) -> dict:
    agents["ampo-agent-03"]["age"] = "27"
    return agents


def _misspelt_field(agents: dict) -> dict:
    agents["ampo-agent-03"]["secrets"] = agents["ampo-agent-03"].pop("secret")
    return agents


def _three_goals(envs: dict) -> dict:
    envs["ampo-env-05"]["agent_goals"].append("a third goal")
    return envs


def _bad_relationship(envs: dict) -> dict:
    envs["ampo-env-05"]["relationship"] = 9
    return envs


def _pk_mismatch(envs: dict) -> dict:
    envs["ampo-env-05"]["pk"] = "ampo-env-99"
    return envs


def _unknown_agent(combos: list) -> list:
    combos[4]["agent_ids"][1] = "nobody"
    return combos


def _unknown_env(combos: list) -> list:
    combos[7]["env_id"] = "ampo-env-99"
    return combos


def _same_agent_twice(combos: list) -> list:
    combos[2]["agent_ids"][1] = combos[2]["agent_ids"][0]
    return combos


def _hard_out_of_range(hard: list) -> list:
    return [*hard, 36]


def _hard_repeated(hard: list) -> list:
    return [*hard, hard[0]]


def _hard_not_int(hard: list) -> list:
    return [*hard, True]


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("agents.json", _drop_age, r"agents\.json: record 'ampo-agent-03': field 'age': Field required"),
        ("agents.json", _age_as_text,
         r"agents\.json: record 'ampo-agent-03': field 'age': Input should be a valid integer"),
        ("agents.json", _misspelt_field, r"agents\.json: record 'ampo-agent-03': field 'secret': Field required; "
                                         r"field 'secrets': Extra inputs are not permitted"),
        ("agents.json", lambda agents: list(agents.values()),
         r"agents\.json: expected a JSON object keyed by pk, found list"),
        ("envs.json", _three_goals,
         r"envs\.json: record 'ampo-env-05': field 'agent_goals': List should have at most 2"),
        ("envs.json", _bad_relationship,
         r"envs\.json: record 'ampo-env-05': field 'relationship': Input should be less"),
        ("envs.json", _pk_mismatch,
         r"envs\.json: record 'ampo-env-05': field 'pk': 'ampo-env-99' does not match its key"),
        ("env_agent_combos.json", _unknown_agent,
         r"env_agent_combos\.json: record 4 \(pk 'ampo-combo-004'\): field 'agent_ids\.1': unknown agent 'nobody'"),
        ("env_agent_combos.json", _unknown_env,
         r"env_agent_combos\.json: record 7 \(pk 'ampo-combo-007'\): field 'env_id': "
         r"unknown environment 'ampo-env-99'"),
        ("env_agent_combos.json", _same_agent_twice,
         r"env_agent_combos\.json: record 2 \(pk 'ampo-combo-002'\): field 'agent_ids': both agents are"),
        ("sotopia_hard.json", _hard_out_of_range,
         r"sotopia_hard\.json: record 12: episode id 36 is out of range \(env_agent_combos\.json has 36 episodes"),
        ("sotopia_hard.json", _hard_repeated, r"sotopia_hard\.json: record 12: episode id 0 is listed twice"),
        ("sotopia_hard.json", _hard_not_int,
         r"sotopia_hard\.json: record 12: expected an integer episode id, found True"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path: Path, name: str, change: Callable, message: str) -> None:
    folder = _copy_bundled(tmp_path)
    _edit(folder, name, change)
    with pytest.raises(ScenarioDataError, match=message) as raised:
        SotopiaDataset.load(folder)
    assert str(folder / name) in str(raised.value)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    folder = _copy_bundled(tmp_path)
    (folder / "envs.json").write_text('{"ampo-env-01": {"pk": "ampo-env-01",\n  "codename": }')
    with pytest.raises(ScenarioDataError, match=re.escape(f"{folder / 'envs.json'}: invalid JSON at line 2 column 15")):
        SotopiaDataset.load(folder)
    (folder / "envs.json").unlink()
    with pytest.raises(ScenarioDataError, match=re.escape(f"{folder / 'envs.json'}: file not found")):
        SotopiaDataset.load(folder)


@pytest.mark.skipif(not PUBLIC_SOTOPIA.is_dir(), reason="the public Sotopia files are not on this machine")
def test_public_benchmark_files_load_and_render() -> None:
    """The public benchmark (format reference only, never needed by the project) fits the loader and renderer."""
    data = SotopiaDataset.load(PUBLIC_SOTOPIA)
    assert (len(data.agents), len(data.envs), len(data), len(data.hard_ids)) == (40, 90, 450, 70)
    assert len({data.combos[i].env_id for i in data.hard_ids}) == 14
    for episode_id in (0, *data.hard_ids):
        env, agent1, agent2 = data.episode(episode_id)
        for turn, speaker in ((0, agent1), (1, agent2)):
            dialog = [dialog_line(0, agent1.name, '"Hi"')] if turn == 1 else []
            dialog.append(open_slot(turn, speaker.name))
            for hide in (False, True):
                prompt = render_turn_prompt(env, agent1, agent2, turn, dialog, hide_private_info=hide)
                assert "<" not in prompt.split("Here is the context of this interaction:")[1]
                assert prompt.endswith(f"\n\n{dialog[-1]}")
                assert f"{speaker.name}'s goal: Unknown" not in prompt
        intro = complete_intro(env, agent1, agent2)
        assert "Unknown" not in intro and "<" not in intro
