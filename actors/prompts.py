"""The Sotopia turn prompt: what a speaker sees at each turn of an episode.

The wording lives in template files (``prompts/turn.txt`` and ``prompts/background.txt`` by default; the config's
``prompts`` section can point elsewhere). The shipped turn template is the concatenation of

1. a five-line persona prefix naming the speaker, then a blank line;
2. the background block (scenario, participants, both bios, the speaker's goal and ``Unknown`` for the other's);
3. a newline and a three-line turn instruction (say something or ``'left the conversation'``; the acceptable reasons
   to leave; the reply goes inside quotation marks), ending with a newline;
4. ``"\\n"`` and ``"\\n".join(dialog)``, where every finished line is ``Turn k: <name> said: "<utterance>"\\n`` and the
   last entry is the open slot ``Turn t: <name> said:`` of the speaker.

Agent 1 speaks on even turns, agent 2 on odd turns. The persona lines and the turn instruction say what the
authors' prompt says in our own words; the structural parts (background lines, bio, dialogue lines) follow the
authors' layout exactly, because the judge, the RL states and the trained model all depend on it. The bio sentence
and the dialogue lines are built here, not in a template: they are data layout, not prompt wording.

Sotopia marks up its data with tags: goals carry ``<extra_info>``, ``<strategy_hint>`` and
``<clarification_hint>``, a scenario may carry ``<p viewer="environment">`` (facts only the environment knows), and
original Sotopia wraps the private parts of a bio in ``<p viewer='agent_i'>``. AMPO removes every tag with a regex and
keeps the content, so each agent also reads the other's personality and secret and the environment-only facts
(as in the authors' code). That is the default here (``hide_private_info=False``). With ``hide_private_info=True`` the renderer
does what original Sotopia shows each agent:

* the other agent's bio is cut by relationship: strangers see nothing of it, agents who know each other by name see
  only the name, acquaintances see everything up to the personality, friends/partners/family everything but the
  secret;
* a ``<p viewer="X">`` element is kept only when X is this agent in Sotopia's 0-based naming (``agent_0`` for
  agent 1, ``agent_1`` for agent 2); ``environment`` elements are dropped.

Goal hints stay visible to their owner in both cases; the other agent's goal is always ``Unknown``.

This module returns the user message only; whoever builds the chat prepends the system prompt (``prompts.system``).
"""

from __future__ import annotations

import re

from actors.sotopia import AgentProfile, EnvironmentProfile, Relationship
from prompts import DEFAULT_PROMPTS, PromptSet

_TAG = re.compile(r"<[^<>]*>")
_VIEWER_ELEMENT = re.compile(r"<p\s+viewer\s*=\s*(['\"])(.*?)\1\s*>(.*?)</p>", re.DOTALL)

_GENDER_ADJECTIVE = {"Man": "male", "Woman": "female", "Nonbinary": "nonbinary"}

# How many of a bio's four parts (name, description, personality, secret) original Sotopia shows the other agent.
_VISIBLE_BIO_PARTS = {
    Relationship.STRANGER: 0,
    Relationship.KNOW_BY_NAME: 1,
    Relationship.ACQUAINTANCE: 2,
    Relationship.FRIEND: 3,
    Relationship.ROMANTIC: 3,
    Relationship.FAMILY: 3,
}

def speaker_of(turn: int) -> int:
    """Which agent speaks at a turn: 1 on even turns (agent 1 opens the episode), 2 on odd turns."""
    if turn < 0:
        raise ValueError(f"turn must be >= 0, got {turn}")
    return 1 if turn % 2 == 0 else 2


def remove_tags(text: str) -> str:
    """Drop every ``<...>`` tag and keep what it encloses, as AMPO does with its background text."""
    return _TAG.sub("", text)


def _bio_parts(agent: AgentProfile) -> tuple[str, str, str, str]:
    """The bio in the four pieces original Sotopia reveals one by one (name, description, personality, secret)."""
    return (
        agent.name,
        f"is a {agent.age}-year-old {_GENDER_ADJECTIVE[agent.gender]} {agent.occupation.lower()}. "
        f"{agent.gender_pronoun} pronouns. {agent.public_info}",
        f"Personality and values description: {agent.personality_and_values}",
        f"{agent.first_name}'s secrets: {agent.secret}",
    )


def bio(agent: AgentProfile) -> str:
    """The full bio: ``<First> <Last> is a <age>-year-old <male|female|nonbinary> <occupation>. <pronoun> pronouns.
    <public_info> Personality and values description: <...> <First>'s secrets: <secret>``."""
    return " ".join(_bio_parts(agent))


def _bio_seen_by_other(agent: AgentProfile, relationship: Relationship) -> str:
    return " ".join(_bio_parts(agent)[: _VISIBLE_BIO_PARTS[relationship]]).strip()


def _visible_to(text: str, viewer: int) -> str:
    """Keep the ``<p viewer=...>`` elements meant for this agent (Sotopia's ``agent_{viewer - 1}``), drop the rest."""
    own = f"agent_{viewer - 1}"
    return _VIEWER_ELEMENT.sub(lambda m: m.group(3) if m.group(2) == own else "", text).strip()


def render_background(
    env: EnvironmentProfile,
    agent1: AgentProfile,
    agent2: AgentProfile,
    viewer: int | None,
    hide_private_info: bool = False,
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> str:
    """The background block (template ``prompts.background``), tags removed and stripped.

    ``viewer`` 1 or 2 renders what that agent sees: its own goal and ``Unknown`` for the other's. ``None`` renders the
    omniscient view with both goals (the evaluator's ``complete_intro``); nothing is hidden from it, so
    ``hide_private_info`` only applies to an agent viewer.
    """
    if viewer not in (None, 1, 2):
        raise ValueError(f"viewer must be 1, 2 or None, got {viewer!r}")
    agents = (agent1, agent2)
    scenario = env.scenario
    bios = [bio(agent1), bio(agent2)]
    goals = list(env.agent_goals)
    if viewer is not None:
        other = 2 - viewer  # index of the other agent: viewer 1 -> 1, viewer 2 -> 0
        goals[other] = "Unknown"
        if hide_private_info:
            scenario = _visible_to(scenario, viewer)
            goals[viewer - 1] = _visible_to(goals[viewer - 1], viewer)
            bios[other] = _bio_seen_by_other(agents[other], env.relation)
    block = prompts.background.render(
        scenario=scenario, agent1_name=agent1.name, agent2_name=agent2.name, agent1_background=bios[0],
        agent2_background=bios[1], agent1_goal=goals[0], agent2_goal=goals[1],
    )
    return remove_tags(block).strip()


def complete_intro(
    env: EnvironmentProfile, agent1: AgentProfile, agent2: AgentProfile, prompts: PromptSet = DEFAULT_PROMPTS
) -> str:
    """The full background with both goals, tags removed and no persona prefix: the evaluator's view."""
    return render_background(env, agent1, agent2, viewer=None, prompts=prompts)


def open_slot(turn: int, name: str) -> str:
    """The line the speaker completes: ``Turn t: <name> said:``."""
    return f"Turn {turn}: {name} said:"


def dialog_line(turn: int, name: str, utterance: str) -> str:
    """A finished dialogue line: the open slot, a space, the utterance and a newline.

    ``utterance`` is already in its quoted form (``"..."``), as ``reward.modes.extract_utterance`` and
    ``extract_partner_utterance`` return it. The trailing newline is part of the line, so joining lines with
    ``"\\n"`` leaves a blank line between turns, as in the authors' prompts."""
    return f"{open_slot(turn, name)} {utterance}\n"


def render_turn_prompt(
    env: EnvironmentProfile,
    agent1: AgentProfile,
    agent2: AgentProfile,
    turn: int,
    dialog: list[str],
    hide_private_info: bool = False,
    prompts: PromptSet = DEFAULT_PROMPTS,
) -> str:
    """The user message of the agent speaking at ``turn`` (template ``prompts.turn``, with the speaker's background
    from ``prompts.background`` and the dialogue lines joined by newlines).

    ``dialog`` is the finished lines followed by the speaker's open slot (``open_slot(turn, name)``); a mismatch means
    the caller lost track of whose turn it is, so it is an error rather than a silently wrong prompt.
    """
    speaker = speaker_of(turn)
    name = (agent1, agent2)[speaker - 1].name
    expected_slot = open_slot(turn, name)
    if not dialog or dialog[-1] != expected_slot:
        found = repr(dialog[-1]) if dialog else "an empty dialogue"
        raise ValueError(f"the dialogue must end with the open slot {expected_slot!r} of turn {turn}, found {found}")
    background = render_background(env, agent1, agent2, viewer=speaker, hide_private_info=hide_private_info, prompts=prompts)
    return prompts.turn.render(name=name, turn=turn, background=background, dialog="\n".join(dialog))
