"""Judge prompts and the JSON schemas of their answers.

Two judges read dialogues, and they see different things on purpose (spec §9.10):

* the **goal-progress judge** of the training reward (spec §2.3) sees only the dialogue, with the candidate
  utterance appended to the open slot, plus the two names and goals; it scores each agent's goal completion
  on 0..10 and answers ``{"agent1": {"reasoning", "score"}, "agent2": {...}}``;
* the **episode evaluator** (spec §5.3) sees the full scenario intro and a finished dialogue and scores both
  agents on the seven Sotopia dimensions, each as a ``[reasoning, score]`` pair.

The wording is ours; the structure (what the judge sees, in which order, and the answer shape) follows the
reference so that scores stay comparable. One deliberate change: the evaluator prompt puts a blank line between
the intro and the first dialogue line, which the reference runs together (spec §9.12).

The schemas are sent as structured-output constraints when the server supports them (vLLM compiles them with
xgrammar); ``REASONING_MAX_CHARS`` bounds the free-text fields so that even a weak or random judge model stops
writing and closes the JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AGENTS: tuple[str, str] = ("agent1", "agent2")
"""Keys of the goal judge's answer, in speaking order: agent1 speaks at even turns (spec §5.2)."""

GOAL_SCORE_RANGE: tuple[int, int] = (0, 10)

REASONING_MAX_CHARS = 1200
"""Longest reasoning text the schemas allow; a real judge writes a few sentences, a random one would not stop."""


def actor_of_turn(turn: int) -> str:
    """The agent who speaks at ``turn``: agent1 at even turns, agent2 at odd ones (spec §2.3)."""
    return AGENTS[turn % 2]


def build_history(dialog: Sequence[str], answer: str) -> str:
    """The dialogue the goal judge reads: the state's lines with ``answer`` appended to the open slot.

    The last line of ``dialog`` is the open slot ``"Turn t: X said:"``; it becomes ``"Turn t: X said: <answer>"``.
    Lines are joined with newlines and the result is stripped (spec §2.3). ``answer`` is the quoted utterance
    exactly as extracted from the answer block.
    """
    if not dialog:
        raise ValueError("the dialogue must hold at least the open slot line")
    lines = [*dialog[:-1], f"{dialog[-1]} {answer}"]
    return "\n".join(lines).strip()


_GOAL_ANSWER_EXAMPLE = (
    '{"agent1": {"reasoning": "<analysis>", "score": <0-10>}, '
    '"agent2": {"reasoning": "<analysis>", "score": <0-10>}}'
)

GOAL_PROMPT_TEMPLATE = """\
{history}

Read the conversation above and judge how far each participant has come towards their own social goal.

[Participants]
Agent1: {agent1_name}
Agent1's goal: {agent1_goal}

Agent2: {agent2_name}
Agent2's goal: {agent2_goal}

[Instructions]
1. For each agent, first restate the agent's social goal in your own words, then weigh what the conversation \
has achieved towards that goal so far, and write this analysis in "reasoning". Then give an integer "score" \
between 0 and 10: 0 means the agent has made next to no progress towards the goal, 10 means the goal is \
completely achieved.
2. Answer with a single JSON object in the format below and nothing else.

Answer format:
```json
{example}
```
Write your answer directly after this prompt."""


def goal_prompt(context: Mapping[str, Any], answer: str) -> str:
    """The goal-progress judge prompt for one candidate utterance.

    ``context`` is the RL state carried by a group request (spec §5.4's ``reward_model``): ``dialog`` (lines, the
    last one the open slot), ``agent1_name``, ``agent2_name``, ``agent1_goal``, ``agent2_goal``. Raises KeyError
    naming a missing field.
    """
    missing = [k for k in ("dialog", "agent1_name", "agent2_name", "agent1_goal", "agent2_goal") if k not in context]
    if missing:
        raise KeyError(f"the RL state lacks {missing}")
    return GOAL_PROMPT_TEMPLATE.format(
        history=build_history(list(context["dialog"]), answer),
        agent1_name=context["agent1_name"],
        agent1_goal=context["agent1_goal"],
        agent2_name=context["agent2_name"],
        agent2_goal=context["agent2_goal"],
        example=_GOAL_ANSWER_EXAMPLE,
    )


def _agent_goal_schema() -> dict[str, Any]:
    low, high = GOAL_SCORE_RANGE
    return {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS},
            "score": {"type": "integer", "minimum": low, "maximum": high},
        },
        "required": ["reasoning", "score"],
        "additionalProperties": False,
    }


GOAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {agent: _agent_goal_schema() for agent in AGENTS},
    "required": list(AGENTS),
    "additionalProperties": False,
}
"""JSON schema of the goal judge's answer (used as a structured-output constraint)."""


@dataclass(frozen=True)
class Dimension:
    """One Sotopia evaluation dimension: answer key, short code, inclusive score range and rubric."""

    name: str
    code: str
    low: int
    high: int
    rubric: str


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension(
        "believability",
        "BEL",
        0,
        10,
        "Does the agent talk and act like the person in its profile would, naturally and consistently? "
        "0: clearly artificial or out of character; 10: fully convincing.",
    ),
    Dimension(
        "relationship",
        "REL",
        -5,
        5,
        "How did the conversation change the relationship between the two agents, given how it stood "
        "before? Negative: it was harmed; 0: unchanged; positive: it was strengthened.",
    ),
    Dimension(
        "knowledge",
        "KNO",
        0,
        10,
        "How much new and useful information did the agent gain from the conversation? "
        "0: nothing; 10: a lot that matters to it.",
    ),
    Dimension(
        "secret",
        "SEC",
        -10,
        0,
        "Did the agent give away secrets, private information or hidden intentions it wanted to keep? "
        "0: nothing leaked; -10: its most important secret was fully revealed.",
    ),
    Dimension(
        "social_rules",
        "SOC",
        -10,
        0,
        "Did the agent break moral norms, social conventions or laws? 0: no violation; -10: severe violations.",
    ),
    Dimension(
        "financial_and_material_benefits",
        "FIN",
        -5,
        5,
        "Did the agent gain or lose money, goods or other material advantages? Negative: losses; 0: no "
        "change; positive: gains.",
    ),
    Dimension(
        "goal",
        "GOAL",
        0,
        10,
        "Restate the agent's social goal, then judge how much of it the agent achieved. "
        "0: next to nothing; 10: the goal is fully achieved.",
    ),
)
"""The seven Sotopia dimensions with the ranges of spec §5.3, in the reference's order."""

EVAL_AGENT_KEYS: tuple[str, str] = ("agent_1_evaluation", "agent_2_evaluation")
"""Keys of the evaluator's answer for agent1 and agent2."""


def _agent_eval_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            dim.name: {
                "type": "array",
                "prefixItems": [
                    {"type": "string", "maxLength": REASONING_MAX_CHARS},
                    {"type": "integer", "minimum": dim.low, "maximum": dim.high},
                ],
                "items": False,
                "minItems": 2,
                "maxItems": 2,
            }
            for dim in DIMENSIONS
        },
        "required": [dim.name for dim in DIMENSIONS],
        "additionalProperties": False,
    }


EVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: _agent_eval_schema() for key in EVAL_AGENT_KEYS},
    "required": list(EVAL_AGENT_KEYS),
    "additionalProperties": False,
}
"""JSON schema of the evaluator's answer: per agent, each dimension as ``[reasoning, integer score]``."""


def _eval_instructions() -> str:
    rubric = "\n".join(
        f'- "{dim.name}" ({dim.code}), an integer from {dim.low} to {dim.high}: {dim.rubric}' for dim in DIMENSIONS
    )
    example_agent = ", ".join(f'"{dim.name}": ["<reasoning>", <{dim.low}..{dim.high}>]' for dim in DIMENSIONS)
    example = f'{{"{EVAL_AGENT_KEYS[0]}": {{{example_agent}}}, "{EVAL_AGENT_KEYS[1]}": {{...the same keys...}}}}'
    return f"""\
Judge how well each participant of the conversation above pursued their goals. Score agent 1 under \
"{EVAL_AGENT_KEYS[0]}" and agent 2 under "{EVAL_AGENT_KEYS[1]}", on each of these dimensions:
{rubric}

For every dimension give a pair: first your reasoning as a string, then the integer score inside its range.
Answer with a single JSON object in this format and nothing else:
```json
{example}
```
The JSON schema of the answer:
```json
{json.dumps(EVAL_SCHEMA)}
```"""


EVAL_INSTRUCTIONS: str = _eval_instructions()


def evaluation_prompt(complete_intro: str, dialog: Sequence[str]) -> str:
    """The episode evaluator prompt: the full intro (both agents' backgrounds and goals), a blank line, the
    dialogue lines, a blank line, then the instructions with the seven dimensions and the answer schema."""
    return f"{complete_intro.strip()}\n\n" + "\n".join(dialog).strip() + f"\n\n{EVAL_INSTRUCTIONS}"


REFORMAT_PROMPT_TEMPLATE = """\
The text between the markers below was meant to be one JSON object matching the schema that follows, but it \
could not be read as such. Rewrite it as a single valid JSON object that matches the schema exactly. Keep its \
content and its scores unchanged. Output only the JSON.

Schema:
```json
{schema}
```

<<<TEXT
{text}
TEXT>>>"""


def reformat_prompt(text: str, schema: Mapping[str, Any]) -> str:
    """Ask the judge to turn its own unreadable answer ``text`` into valid JSON for ``schema`` (spec §5.3)."""
    return REFORMAT_PROMPT_TEMPLATE.format(schema=json.dumps(schema), text=text)
