"""The Sotopia turn prompt (docs/protocol.md, Prompts), checked against hand-written text for both agents of one bundled episode."""

from __future__ import annotations

import pytest

from actors.prompts import (
    bio,
    complete_intro,
    dialog_line,
    open_slot,
    remove_tags,
    render_background,
    render_turn_prompt,
    speaker_of,
)
from actors.sotopia import SotopiaDataset

DATA = SotopiaDataset.load()

# Episode 0: `used_cargo_bike`, strangers, agent 1 Noah Bergstrom (seller), agent 2 Daniel Mensah (buyer).
NOAH_BIO = (
    "Noah Bergstrom is a 45-year-old male carpenter. He/him pronouns. Noah builds custom furniture from reclaimed "
    "wood and coaches his daughter's football team. Personality and values description: Noah Bergstrom is "
    "practical, direct and dependable. He values a fair deal and good craftsmanship. Noah's secrets: He has been "
    "hiding a gambling debt from his wife"
)
DANIEL_BIO = (
    "Daniel Mensah is a 29-year-old male bicycle courier. He/him pronouns. Daniel knows every shortcut in the city "
    "and is saving up to open his own repair shop. Personality and values description: Daniel Mensah is "
    "spontaneous, charming and restless. He values independence and hates feeling boxed in. Daniel's secrets: He "
    "has been riding without insurance for a year to save money"
)
NOAH_GOAL = (
    "Sell the cargo bike for a good price (Extra information: the listing price is $900 and you would not accept "
    "less than $700. Hint: point out the new brakes and the child seat that comes with it.)"
)
DANIEL_GOAL = (
    "Buy the cargo bike as cheaply as possible (Extra information: your budget is at most $650 and you noticed the "
    "chain is rusty. Hint: mention the repairs it will need to justify a lower offer.)"
)
SCENARIO = (
    "One person is selling a used cargo bike through an online listing; the other has come to look at it in a "
    "garage and is interested in buying it."
)

OPENING = 'Turn 0: Noah Bergstrom said: "Hello! The bike is right here, brakes replaced last month."\n'


def expected_turn_prompt(speaker: str, turn: int, noah_goal: str, daniel_goal: str, dialogue: str) -> str:
    """The hand-written turn prompt of episode 0 for `speaker` at `turn`: the goal the speaker may not see reads
    'Unknown', and `dialogue` is the text after the instructions, ending with the speaker's open slot."""
    return f"""\
Put yourself in the shoes of {speaker} and speak and act exactly as {speaker} would, with {speaker}'s social goal always in mind.
{speaker}'s goal is written in the 'Here is the context of this interaction' part below.
Only you can see this goal; the other participant does not know it.
Work towards the goal in a way that fits {speaker}'s character and traits.
Keep the conversation natural and believable, and do not simply repeat what the others have already said.

Here is the context of this interaction:
Scenario: {SCENARIO}
Participants: Noah Bergstrom and Daniel Mensah
Noah Bergstrom's background: {NOAH_BIO}
Daniel Mensah's background: {DANIEL_BIO}
Noah Bergstrom's goal: {noah_goal}
Daniel Mensah's goal: {daniel_goal}
You are at Turn {turn}. Say something to continue the interaction, or just say 'left the conversation' to end it.
Leave only when your goal is achieved, when you feel uncomfortable, when the conversation has become uninteresting or you have run out of patience, or for some other good reason.
Put your reply inside quotation marks, like this: "your response content"

{dialogue}"""  # noqa: E501


@pytest.mark.parametrize(
    "turn, dialog, expected",
    [
        pytest.param(
            0,
            ["Turn 0: Noah Bergstrom said:"],
            expected_turn_prompt("Noah Bergstrom", 0, NOAH_GOAL, "Unknown", "Turn 0: Noah Bergstrom said:"),
            id="agent1-turn0",
        ),
        pytest.param(
            1,
            [OPENING, "Turn 1: Daniel Mensah said:"],
            expected_turn_prompt("Daniel Mensah", 1, "Unknown", DANIEL_GOAL, OPENING + "\nTurn 1: Daniel Mensah said:"),
            id="agent2-turn1",
        ),
    ],
)
def test_turn_prompt_of_each_agent(turn: int, dialog: list[str], expected: str) -> None:
    env, noah, daniel = DATA.episode(0)
    assert render_turn_prompt(env, noah, daniel, turn, dialog) == expected


def test_dialogue_line_helpers_and_parity() -> None:
    assert open_slot(3, "Daniel Mensah") == "Turn 3: Daniel Mensah said:"
    assert dialog_line(3, "Daniel Mensah", '"Deal."') == 'Turn 3: Daniel Mensah said: "Deal."\n'
    assert [speaker_of(turn) for turn in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="turn must be >= 0"):
        speaker_of(-1)


def test_open_slot_must_match_the_turn() -> None:
    env, noah, daniel = DATA.episode(0)
    with pytest.raises(ValueError, match="must end with the open slot 'Turn 1: Daniel Mensah said:' of turn 1"):
        render_turn_prompt(env, noah, daniel, 1, ["Turn 1: Noah Bergstrom said:"])
    with pytest.raises(ValueError, match="found an empty dialogue"):
        render_turn_prompt(env, noah, daniel, 0, [])


def test_remove_tags_keeps_their_content() -> None:
    raw = 'A (<extra_info>info <strategy_hint>hint</strategy_hint></extra_info>) <p viewer="environment">fact</p>'
    assert remove_tags(raw) == "A (info hint) fact"


def test_complete_intro_has_both_goals_and_everything_else() -> None:
    env, noah, daniel = DATA.episode(0)
    assert complete_intro(env, noah, daniel) == (
        "Here is the context of this interaction:\n"
        f"Scenario: {SCENARIO}\n"
        "Participants: Noah Bergstrom and Daniel Mensah\n"
        f"Noah Bergstrom's background: {NOAH_BIO}\n"
        f"Daniel Mensah's background: {DANIEL_BIO}\n"
        f"Noah Bergstrom's goal: {NOAH_GOAL}\n"
        f"Daniel Mensah's goal: {DANIEL_GOAL}"
    )
    # Episode 21 (`conference_mutual_friend`) has a fact only the environment knows; the evaluator sees it.
    env, lucia, daniel = DATA.episode(21)
    fact = "They both know Ines Duarte, who used to work with each of them."
    assert f"Scenario: Two strangers are chatting during the coffee break of a conference. {fact}\n" in (
        complete_intro(env, lucia, daniel)
    )


def test_default_leaks_private_parts_like_ampo() -> None:
    """AMPO keeps the content of every tag: each agent reads the other's secret and the environment-only fact."""
    env, lucia, daniel = DATA.episode(21)
    seen_by_lucia = render_background(env, lucia, daniel, viewer=1)
    assert f"Daniel Mensah's background: {bio(daniel)}\n" in seen_by_lucia
    assert "They both know Ines Duarte" in seen_by_lucia


def test_hide_private_info_follows_the_relationship() -> None:
    # Strangers (episode 21): nothing of the other's bio, and no environment-only fact.
    env, lucia, daniel = DATA.episode(21)
    seen_by_lucia = render_background(env, lucia, daniel, viewer=1, hide_private_info=True)
    assert seen_by_lucia.splitlines()[1:5] == [
        "Scenario: Two strangers are chatting during the coffee break of a conference.",
        "Participants: Lucia Fernandez and Daniel Mensah",
        f"Lucia Fernandez's background: {bio(lucia)}",
        "Daniel Mensah's background: ",
    ]
    assert "Ines Duarte, Marco Bellini" in seen_by_lucia  # her own goal's hints stay visible
    # Known by name (episode 6, `lease_renewal`): only the name.
    env, daniel, priya = DATA.episode(6)
    assert "\nPriya Raman's background: Priya Raman\n" in render_background(env, daniel, priya, 1, True)
    # Acquaintances (episode 3, `split_garden_harvest`): up to the public information, no personality, no secret.
    env, jordan, lucia = DATA.episode(3)
    assert "\nJordan Reyes's background: Jordan Reyes is a 38-year-old nonbinary community organizer. They/them " \
           "pronouns. Jordan runs the neighbourhood food co-op and knows someone in every building on the block.\n" \
           in render_background(env, jordan, lucia, 2, True)
    # Friends (episode 9, `charity_run_pledge`): everything but the secret; the viewer's own secret stays.
    env, amara, noah = DATA.episode(9)
    seen_by_amara = render_background(env, amara, noah, 1, True)
    assert ("\nNoah Bergstrom's background: Noah Bergstrom is a 45-year-old male carpenter. He/him pronouns. Noah "
            "builds custom furniture from reclaimed wood and coaches his daughter's football team. Personality and "
            "values description: Noah Bergstrom is practical, direct and dependable. He values a fair deal and good "
            "craftsmanship.\n") in seen_by_amara
    assert "Amara's secrets: She failed her first nursing licence exam twice" in seen_by_amara
    assert "gambling" not in seen_by_amara
    assert "Noah Bergstrom's goal: Unknown" in seen_by_amara


def test_hide_private_info_in_the_turn_prompt() -> None:
    env, amara, noah = DATA.episode(9)
    dialog = [dialog_line(0, amara.name, '"Hi!"'), open_slot(1, noah.name)]
    leaky = render_turn_prompt(env, amara, noah, 1, dialog)
    hidden = render_turn_prompt(env, amara, noah, 1, dialog, hide_private_info=True)
    assert "Amara's secrets:" in leaky and "Amara's secrets:" not in hidden
    assert leaky.replace(" Amara's secrets: " + amara.secret, "") == hidden


def test_viewer_must_be_an_agent_or_none() -> None:
    env, noah, daniel = DATA.episode(0)
    with pytest.raises(ValueError, match="viewer must be 1, 2 or None"):
        render_background(env, noah, daniel, viewer=3)
