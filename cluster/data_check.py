"""`ampo data check`: what a data file or folder holds, its first errors, and whether its prompts are the run's.

A file is told apart by its fields: a Sotopia scenario folder, RL states (JSON, JSON lines or Parquet, raw or in the
authors' training layout) or alpaca BC records. Beyond the format, the check compares the data with the configured
prompt templates, because a data set written with one set of prompts and trained or evaluated with another is the
most common silent mistake of a reproduction:

* a scenario folder: every episode's turn prompts (both speakers) and the evaluator's intro are rendered with the
  templates, so a template that fails on some episode fails here, naming the episode;
* RL states and BC records: each row's system prompt must equal `prompts.system`, and each turn prompt must have the
  layout of `prompts.turn` with `prompts.background` inside it (the fixed text between the values, in order). The
  first row that differs is reported with the first differing line, what the template gives and what the file has.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.jsonrows import read_json_rows
from actors.prompts import complete_intro, dialog_line, open_slot, remove_tags, render_turn_prompt
from actors.sotopia import ScenarioDataError, SotopiaDataset
from actors.states import StateDataError, check_states, read_states
from learner.bc import BCDataError, parse_bc_record
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.modes import parse_response


@dataclass
class DataCheck:
    """The outcome of checking one data file or folder: its kind, counts, facts worth printing, first errors."""

    path: Path
    kind: str
    rows: int = 0
    valid: int = 0
    facts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> str:
        lines = [f"{self.path}: {self.kind}", f"  rows: {self.rows}, valid: {self.valid}, invalid: {self.rows - self.valid}"]
        lines += [f"  {fact}" for fact in self.facts]
        if self.errors:
            lines.append("  first errors:")
            lines += [f"    {error}" for error in self.errors]
        lines.append("  OK" if self.ok else "  FAILED")
        return "\n".join(lines)


# ---- the turn prompt's layout ------------------------------------------------------------------------------------

_VALUE = re.compile(r"\x00(\w+)\x00")


def turn_layout(prompts: PromptSet) -> list[str]:
    """The fixed text of a turn prompt between its values, in order: the turn template rendered with a marker for
    each value and the background template (tags removed, stripped, as the renderer does) in its place."""

    def marker(name: str) -> str:
        return f"\x00{name}\x00"

    background = remove_tags(prompts.background.render(**{k: marker(k) for k in (
        "scenario", "agent1_name", "agent2_name", "agent1_background", "agent2_background", "agent1_goal", "agent2_goal"
    )})).strip()
    text = prompts.turn.render(name=marker("name"), turn=marker("turn"), background=background, dialog=marker("dialog"))
    return _VALUE.split(text)[::2]


def _line_at(text: str, index: int) -> tuple[int, str]:
    """The 1-based line number of ``text[index]`` and that whole line."""
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text.count("\n", 0, index) + 1, text[start : end if end >= 0 else len(text)]


def _first_difference(expected: str, found: str, offset: int = 0) -> str:
    """Where ``found`` (from ``offset``) stops following ``expected``: the line of each, quoted."""
    i = 0
    while i < len(expected) and offset + i < len(found) and expected[i] == found[offset + i]:
        i += 1
    line, found_line = _line_at(found, min(offset + i, max(len(found) - 1, 0)))
    _, expected_line = _line_at(expected, min(i, max(len(expected) - 1, 0)))
    return f"line {line}: the template gives {expected_line!r}, the file has {found_line!r}"


def layout_difference(prompt: str, layout: list[str]) -> str | None:
    """None when ``prompt`` has the layout (its fixed parts, in order, with anything between them); else where it
    departs from it."""
    if not prompt.startswith(layout[0]):
        return _first_difference(layout[0], prompt)
    position = len(layout[0])
    for part in layout[1:-1]:
        found = prompt.find(part, position)
        if found < 0:
            return _first_difference(part, prompt, _closest_start(prompt, part, position))
        position = found + len(part)
    last = layout[-1]  # a turn template has at least two values (background, dialog), so this is not layout[0]
    if not prompt.endswith(last) or len(prompt) - len(last) < position:
        return _first_difference(last, prompt, max(position, len(prompt) - len(last)))
    return None


def _closest_start(prompt: str, part: str, position: int) -> int:
    """Where the missing ``part`` most likely should have started: the place after ``position`` where the longest
    prefix of it appears (so the report shows the line that changed, not an arbitrary one)."""
    for size in range(min(len(part), 200), 0, -1):
        found = prompt.find(part[:size], position)
        if found >= 0:
            return found
    return position


def _compare_prompts(check: DataCheck, rows: list[tuple[str | None, str]], prompts: PromptSet, max_errors: int) -> None:
    """Compare each row's (system prompt, turn prompt) with the templates; count the rows that differ."""
    system = prompts.system.render()
    layout = turn_layout(prompts)
    other_system = other_layout = 0
    for index, (row_system, instruction) in enumerate(rows):
        if row_system is not None and row_system != system:
            other_system += 1
            if other_system == 1 and len(check.errors) < max_errors:
                check.errors.append(f"row {index}: the system prompt is not prompts.system ({prompts.system.source}): "
                                    + _first_difference(system, row_system))
        difference = layout_difference(instruction, layout)
        if difference is not None:
            other_layout += 1
            if other_layout == 1 and len(check.errors) < max_errors:
                check.errors.append(f"row {index}: the turn prompt does not follow prompts.turn ({prompts.turn.source}) "
                                    f"and prompts.background ({prompts.background.source}): {difference}")
    check.facts.append(
        f"prompts: {len(rows) - other_system} of {len(rows)} system prompts are prompts.system; "
        f"{len(rows) - other_layout} of {len(rows)} turn prompts follow prompts.turn"
    )


# ---- the checks --------------------------------------------------------------------------------------------------


def _check_scenarios(path: Path, prompts: PromptSet, hide_private_info: bool, max_errors: int) -> DataCheck:
    check = DataCheck(path, "Sotopia scenario folder")
    try:
        dataset = SotopiaDataset.load(path)
    except ScenarioDataError as exc:
        check.errors.append(str(exc))
        return check
    check.rows = len(dataset)
    for episode in range(len(dataset)):
        env, agent1, agent2 = dataset.episode(episode)
        try:
            render_turn_prompt(env, agent1, agent2, 0, [open_slot(0, agent1.name)], hide_private_info, prompts)
            second = [dialog_line(0, agent1.name, '"Hello."'), open_slot(1, agent2.name)]
            render_turn_prompt(env, agent1, agent2, 1, second, hide_private_info, prompts)
            complete_intro(env, agent1, agent2, prompts)
        except Exception as exc:  # a user's template may fail in any way on some episode's values
            if len(check.errors) < max_errors:
                check.errors.append(f"episode {episode} ({env.codename}): the prompt templates fail: {exc}")
            continue
        check.valid += 1
    check.facts += [
        f"episodes: {len(dataset)} (hard: {len(dataset.hard_ids)}), environments: {len(dataset.envs)}, agents: {len(dataset.agents)}",
        f"prompts: {check.valid} of {len(dataset)} episodes render with prompts.turn ({prompts.turn.source}) and "
        f"prompts.background ({prompts.background.source})",
    ]
    return check


def _check_states_file(path: Path, prompts: PromptSet, max_errors: int) -> DataCheck:
    check = DataCheck(path, "RL states")
    try:
        valid, errors = check_states(path, max_errors=10**9)
    except StateDataError as exc:
        check.errors.append(str(exc))
        return check
    check.rows, check.valid, check.errors = valid + len(errors), valid, errors[:max_errors]
    if not errors and valid:
        states = read_states(path)
        layout = "training rows (system prompt baked in)" if states[0].system_prompt is not None else "raw records"
        turns = [s.turn for s in states]
        check.facts += [
            f"layout: {layout}",
            f"episodes: {len({s.env_id for s in states})}, rollouts: {len({s.rollout for s in states})}, "
            f"turns {min(turns)}..{max(turns)}",
            "prior goal scores, mean: agent1 {:.2f}, agent2 {:.2f}".format(
                sum(s.prior.agent1 for s in states) / len(states), sum(s.prior.agent2 for s in states) / len(states)
            ),
        ]
        _compare_prompts(check, [(s.system_prompt, s.instruction) for s in states], prompts, max_errors)
    return check


def _check_bc_file(path: Path, prompts: PromptSet, max_errors: int) -> DataCheck:
    check = DataCheck(path, "behaviour-cloning records (alpaca)")
    try:
        rows = read_json_rows(path, error=BCDataError, what="alpaca records")
    except BCDataError as exc:
        check.errors.append(str(exc))
        return check
    modes: Counter[int] = Counter()
    prompt_rows: list[tuple[str | None, str]] = []
    for index, row in enumerate(rows):
        try:
            record = parse_bc_record(row, f"{path}: row {index}", check_format=True)
        except BCDataError as exc:
            if len(check.errors) < max_errors:
                check.errors.append(str(exc))
            continue
        check.valid += 1
        modes[parse_response(record.output).mode or 0] += 1
        prompt_rows.append((record.system, record.instruction))
    check.rows = len(rows)
    if modes:
        check.facts.append("modes: " + ", ".join(f"{m}: {modes[m]}" for m in sorted(modes)))
    if prompt_rows:
        _compare_prompts(check, prompt_rows, prompts, max_errors)
    return check


def _looks_like_bc(row: Any) -> bool:
    return isinstance(row, dict) and "output" in row and not ({"dialog", "reward_model", "state"} & set(row))


def check_data(
    path: str | Path, *, max_errors: int = 10, prompts: PromptSet = DEFAULT_PROMPTS, hide_private_info: bool = False
) -> DataCheck:
    """Check a data file or folder, say what it holds and compare its prompts with ``prompts`` (see the module
    docstring); ``hide_private_info`` is the run's `data.hide_private_info` for rendering a scenario folder."""
    path = Path(path)
    if path.is_dir():
        return _check_scenarios(path, prompts, hide_private_info, max_errors)
    if not path.exists():
        return DataCheck(path, "missing", errors=[f"{path}: no such file or folder"])
    if path.suffix == ".parquet":
        return _check_states_file(path, prompts, max_errors)
    if path.suffix not in (".json", ".jsonl"):
        return DataCheck(path, "unknown", errors=[f"{path}: expected a scenario folder, .json, .jsonl or .parquet"])
    try:
        rows = read_json_rows(path, error=BCDataError)
    except BCDataError as exc:
        return DataCheck(path, "unreadable", errors=[str(exc)])
    if not rows:
        return DataCheck(path, "empty", errors=[f"{path}: holds no records"])
    if _looks_like_bc(rows[0]):
        return _check_bc_file(path, prompts, max_errors)
    return _check_states_file(path, prompts, max_errors)
