"""Judge prompts and the JSON schemas of their answers.

Two judges read dialogues, and they see different things on purpose, as in the authors' code:

* the **goal-progress judge** of the training reward (the paper's answer reward) sees only the dialogue, with the
  candidate utterance appended to the open slot, plus the two names and goals; it scores each agent's goal
  completion on 0..10 and answers ``{"agent1": {"reasoning", "score"}, "agent2": {...}}``;
* the **episode evaluator** (Sotopia's) sees the full scenario intro and a finished dialogue and scores both
  agents on the seven Sotopia dimensions, each as a ``[reasoning, score]`` pair.

The wording is in template files (``prompts/goal_judge.txt``, ``prompts/evaluator.txt``, ``prompts/reformat.txt``;
the config's ``prompts`` section can point elsewhere, see ``docs/fidelity.md``). The shipped wording is ours; the
structure (what the judge sees, in which order, and the answer shape) follows the authors' so that scores stay
comparable. One deliberate change: the evaluator prompt puts a blank line between the intro and the first dialogue
line, which the authors' runs together.

The schemas are sent as structured-output constraints when the server supports them (vLLM compiles them with
xgrammar); ``REASONING_MAX_CHARS`` bounds the free-text fields so that even a weak or random judge model stops
writing and closes the JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prompts import DEFAULT_PROMPTS, PromptSet

AGENTS: tuple[str, str] = ("agent1", "agent2")
"""Keys of the goal judge's answer, in speaking order: agent1 speaks at even turns."""

GOAL_SCORE_RANGE: tuple[int, int] = (0, 10)

REASONING_MAX_CHARS = 1200
"""Longest reasoning text the schemas allow; a real judge writes a few sentences, a random one would not stop."""


def actor_of_turn(turn: int) -> str:
    """The agent who speaks at ``turn``: agent1 at even turns, agent2 at odd ones."""
    return AGENTS[turn % 2]


def build_history(dialog: Sequence[str], answer: str) -> str:
    """The dialogue the goal judge reads: the state's lines with ``answer`` appended to the open slot.

    The last line of ``dialog`` is the open slot ``"Turn t: X said:"``; it becomes ``"Turn t: X said: <answer>"``.
    Lines are joined with newlines and the result is stripped. ``answer`` is the quoted utterance
    exactly as extracted from the answer block.
    """
    if not dialog:
        raise ValueError("the dialogue must hold at least the open slot line")
    lines = [*dialog[:-1], f"{dialog[-1]} {answer}"]
    return "\n".join(lines).strip()


def goal_prompt(context: Mapping[str, Any], answer: str, prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """The goal-progress judge prompt for one candidate utterance (template ``prompts.goal_judge``).

    ``context`` is the RL state carried by a group request (the ``reward_model`` column of the RL data): ``dialog`` (lines, the
    last one the open slot), ``agent1_name``, ``agent2_name``, ``agent1_goal``, ``agent2_goal``. Raises KeyError
    naming a missing field.
    """
    missing = [k for k in ("dialog", "agent1_name", "agent2_name", "agent1_goal", "agent2_goal") if k not in context]
    if missing:
        raise KeyError(f"the RL state lacks {missing}")
    return prompts.goal_judge.render(
        history=build_history(list(context["dialog"]), answer),
        agent1_name=context["agent1_name"],
        agent1_goal=context["agent1_goal"],
        agent2_name=context["agent2_name"],
        agent2_goal=context["agent2_goal"],
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
    """One Sotopia evaluation dimension: answer key, short code and inclusive score range (the rubric the evaluator
    reads is in its template, ``prompts/evaluator.txt``)."""

    name: str
    code: str
    low: int
    high: int


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("believability", "BEL", 0, 10),
    Dimension("relationship", "REL", -5, 5),
    Dimension("knowledge", "KNO", 0, 10),
    Dimension("secret", "SEC", -10, 0),
    Dimension("social_rules", "SOC", -10, 0),
    Dimension("financial_and_material_benefits", "FIN", -5, 5),
    Dimension("goal", "GOAL", 0, 10),
)
"""The seven Sotopia dimensions with their score ranges, in Sotopia's order."""

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


def evaluation_prompt(complete_intro: str, dialog: Sequence[str], prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """The episode evaluator prompt (template ``prompts.evaluator``): the shipped one is the full intro (both agents'
    backgrounds and goals), a blank line, the dialogue lines, a blank line, then the instructions with the seven
    dimensions and the answer schema."""
    return prompts.evaluator.render(
        intro=complete_intro.strip(), dialog="\n".join(dialog).strip(), schema=json.dumps(EVAL_SCHEMA)
    )


def reformat_prompt(text: str, schema: Mapping[str, Any], prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """Ask the judge to turn its own unreadable answer ``text`` into valid JSON for ``schema`` (template
    ``prompts.reformat``; the evaluator's one reformat round, as in Sotopia)."""
    return prompts.reformat.render(text=text, schema=json.dumps(schema))
