"""The demonstrations stage (`ampo make-demos`; docs/protocol.md, BC data).

For each state and each requested mode the expert is asked, through the judge client (retries, parse rounds,
structured output), for a JSON object with that mode's section texts and the final `answer` (template
`prompts.demo`). The schema bounds every field and keeps double quotes, backslashes and newlines out of it (a
character class with a bounded repetition, in chunks of 50 because xgrammar rejects `pattern` combined with
`maxLength` and fails on repetitions of a few hundred), so even a weak local expert writes the exact format. The
response is assembled with `reward.modes.format_response` and kept only if `parse_response` accepts it as that mode;
an answer that cannot be assembled starts another parse round, and what still fails is a rejection with its reason.
Results are appended to `<out>.partial.jsonl` as they arrive (a re-run skips what is there) and the alpaca JSON is
written at the end in state × mode order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.sotopia import SotopiaDataset
from actors.states import RLState, make_state
from cluster.endpoints import Endpoint
from cluster.workfiles import append_json_line, digest, progress_bar, read_json_lines
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.config import JudgeConfig
from reward.answers import AnswerError, extract_json_object
from reward.judge import JudgeClient, JudgeResult
from reward.modes import MODE_NAMES, MODE_SECTIONS, MODES, format_response, parse_response


log = logging.getLogger(__name__)


_LINE_CHAR = '[^"\\\\\\n]'
"""A regex class: any character but a double quote, a backslash or a newline."""
_CHUNK = 50
"""xgrammar fails to compile a bounded repetition of a few hundred (it compiles up to about 128), so long fields
repeat chunks of this size instead."""


def _field_limit(max_chars: int) -> int:
    """The longest text `_text_field(max_chars)` admits: `max_chars` rounded up to a whole number of chunks."""
    return max_chars if max_chars <= _CHUNK else _CHUNK * -(-max_chars // _CHUNK)


def _text_field(max_chars: int) -> dict[str, Any]:
    """One bounded line of text without double quotes or backslashes (see the module docstring)."""
    if max_chars < 1:
        raise ValueError(f"a text field needs room for at least one character, got {max_chars}")
    if max_chars <= _CHUNK:
        return {"type": "string", "pattern": f"{_LINE_CHAR}{{1,{max_chars}}}"}
    return {"type": "string", "pattern": f"({_LINE_CHAR}{{1,{_CHUNK}}}){{1,{-(-max_chars // _CHUNK)}}}"}


def demo_schema(mode: int, *, section_max_chars: int = 400, answer_max_chars: int = 300) -> dict[str, Any]:
    """JSON schema of the expert's answer for `mode`: one string per section of the mode, in order, then `answer`."""
    names = [*MODE_SECTIONS[mode], "answer"]
    properties = {name: _text_field(answer_max_chars if name == "answer" else section_max_chars) for name in names}
    return {"type": "object", "properties": properties, "required": names, "additionalProperties": False}


def demo_prompt(state: RLState, mode: int, prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """The expert's prompt (template ``prompts.demo``): the shipped one is the speaker's own turn prompt, then what
    the thinking of `mode` consists of and the JSON object to answer with (the keys in order, each a single line
    without double quotes)."""
    keys = [*MODE_SECTIONS[mode], "answer"]
    return prompts.demo.render(
        turn_prompt=state.instruction.rstrip(), level=mode, mode_name=MODE_NAMES[mode], sections=list(MODE_SECTIONS[mode]),
        keys=keys, example="{" + ", ".join(f'"{name}": "..."' for name in keys) + "}",
    )


def assemble_demo(text: str, mode: int) -> str:
    """The mode-`mode` response built from the expert's JSON answer, checked by `parse_response`. Raises
    `AnswerError("unparseable", "<reason>: <detail>")`, which makes the judge client ask again."""
    try:
        data = extract_json_object(text)
    except AnswerError as exc:
        raise AnswerError("unparseable", f"not_json: {exc}") from None
    texts: dict[str, str] = {}
    for name in [*MODE_SECTIONS[mode], "answer"]:
        value = data.get(name)
        if not isinstance(value, str):
            raise AnswerError("unparseable", f"missing_field: {name!r} is missing or not text")
        if not value.strip().strip('"').strip():
            raise AnswerError("unparseable", f"empty_field: {name!r} is empty")
        texts[name] = value
    answer = texts.pop("answer")
    try:
        response = format_response(mode, texts or None, answer)
    except ValueError as exc:
        reason = "inner_quote" if "double quote" in str(exc) else "format"
        raise AnswerError("unparseable", f"{reason}: {exc}") from None
    parsed = parse_response(response)
    if not parsed.valid or parsed.mode != mode:  # format_response checks this too; keep the contract local
        raise AnswerError("unparseable", f"format: {parsed.reason or 'mode changed'}")
    return response


@dataclass
class DemoReport:
    """What `make_demos` produced: accepted demonstrations per mode, rejections per mode and per reason."""

    path: Path
    states: int
    asked: int
    accepted: Counter[int] = field(default_factory=Counter)
    rejected: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    from_earlier_run: int = 0

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted.values()) / self.asked if self.asked else 0.0

    def describe(self) -> str:
        accepted, rejected = sum(self.accepted.values()), sum(self.rejected.values())
        lines = [
            f"demonstrations: {accepted} of {self.asked} accepted ({self.acceptance_rate:.1%}), written to {self.path}",
            f"  states: {self.states}, answers reused from an earlier run: {self.from_earlier_run}",
            "  mode mix: " + ", ".join(f"mode {m}: {self.accepted[m]} accepted / {self.rejected[m]} rejected"
                                       for m in sorted(set(self.accepted) | set(self.rejected))),
        ]
        if rejected:
            lines.append(f"  rejection rate: {rejected / self.asked:.1%}; reasons: {dict(self.reasons.most_common())}")
        return "\n".join(lines)


def _rejection_reason(result: JudgeResult[Any]) -> str:
    """A short reason: the category of an unusable answer (`not_json`, `inner_quote`, ...) or the transport
    failure kind (`timeout`, `rate_limited`, ...)."""
    if result.failure in ("unparseable", "out_of_range") and result.detail and ":" in result.detail:
        return result.detail.split(":", 1)[0]
    return str(result.failure)


async def make_demos_async(
    states: Sequence[RLState],
    *,
    expert: Endpoint,
    expert_config: JudgeConfig,
    out_path: str | Path,
    modes: Sequence[int] = MODES,
    section_max_chars: int = 400,
    answer_max_chars: int = 300,
    progress: bool = True,
    prompts: PromptSet,
) -> DemoReport:
    """`make_demos` inside a running event loop."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be some of {MODES}, got {list(modes)}")
    # A token holds at least one character, so this budget always lets the longest mode's JSON close.
    section_limit, answer_limit = _field_limit(section_max_chars), _field_limit(answer_max_chars)
    needed = max(len(MODE_SECTIONS[m]) * (section_limit + 8) + answer_limit + 24 for m in modes)
    if expert_config.max_tokens < needed:
        log.info("raising the expert's max_tokens from %d to %d so that the longest answer fits",
                 expert_config.max_tokens, needed)
        expert_config = expert_config.model_copy(update={"max_tokens": needed})
    # At temperature 0 a second greedy round only repeats a rejected answer: go to sampling after one.
    expert_config = expert_config.model_copy(update={"greedy_rounds": min(expert_config.greedy_rounds, 1)})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.parent / f"{out_path.name}.partial.jsonl"
    done = {row["key"]: row for row in read_json_lines(partial)}
    # Keyed by the whole question, so that an answer to another template's question is never reused.
    jobs = [(state, mode, digest(demo_prompt(state, mode, prompts))) for state in states for mode in modes]
    system = prompts.system.render()
    report = DemoReport(out_path, len(states), len(jobs))
    todo = [job for job in jobs if job[2] not in done]
    report.from_earlier_run = len(jobs) - len(todo)
    log.info("asking the expert %s for %d demonstrations (%d states x modes %s; %d already answered)",
             expert.model, len(todo), len(states), list(modes), report.from_earlier_run)
    bar = progress_bar(len(todo), "demonstrations", progress)

    async with JudgeClient(expert_config, base_url=expert.base_url, model=expert.model) as client:

        async def ask(state: RLState, mode: int, key: str) -> None:
            schema = demo_schema(mode, section_max_chars=section_max_chars, answer_max_chars=answer_max_chars)
            result = await client.ask(demo_prompt(state, mode, prompts), lambda text: assemble_demo(text, mode), schema=schema)
            row = {"key": key, "state_id": state.state_id, "mode": mode, "output": result.value,
                   "reason": None if result.ok else _rejection_reason(result), "raw": result.text}
            append_json_line(partial, row)
            done[key] = row
            bar.update(1)

        try:
            await asyncio.gather(*(ask(*job) for job in todo))
        finally:
            bar.close()
    records = []
    for state, mode, key in jobs:
        row = done[key]
        if row["output"] is None:
            report.rejected[mode] += 1
            report.reasons[row["reason"]] += 1
            continue
        report.accepted[mode] += 1
        records.append({"system": system, "instruction": state.instruction, "input": "", "output": row["output"]})
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    tmp.replace(out_path)
    log.info("%s", report.describe())
    return report


def make_demos(
    states: Sequence[RLState],
    *,
    expert: Endpoint,
    expert_config: JudgeConfig,
    out_path: str | Path,
    modes: Sequence[int] = MODES,
    section_max_chars: int = 400,
    answer_max_chars: int = 300,
    progress: bool = True,
    prompts: PromptSet,
) -> DemoReport:
    """Ask the expert for every state × mode demonstration (template `prompts.demo`) and write the accepted ones as
    alpaca JSON records `{system, instruction, input: "", output}`, the layout of the authors' BC data, with
    `prompts.system` as system; see the module docstring. `expert_config` supplies the client's limits, retries
    and parse rounds; its `max_tokens` is raised when needed so that the longest mode's bounded answer always fits
    (one character per token at worst)."""
    return asyncio.run(make_demos_async(
        states, expert=expert, expert_config=expert_config, out_path=out_path, modes=modes,
        section_max_chars=section_max_chars, answer_max_chars=answer_max_chars, progress=progress, prompts=prompts,
    ))


def opening_states(
    dataset: SotopiaDataset, episode_ids: Iterable[int], *, prompts: PromptSet, hide_private_info: bool = False
) -> list[RLState]:
    """Turn-0 states (empty dialogue, priors 0) of the given episodes: demonstration prompts when no RL states
    exist yet. States from `build_states` cover later turns as well."""
    return [make_state(dataset, e, [], (0.0, 0.0), hide_private_info=hide_private_info, prompts=prompts) for e in episode_ids]
