"""Tests for reward.modes: the format checker (docs/protocol.md, Format rules), format_response and the utterance
extraction of evaluation episodes."""

from __future__ import annotations

import re

import pytest

from reward.modes import (
    BEGIN_ANSWER,
    BEGIN_THINKING,
    END_ANSWER,
    END_THINKING,
    MODE_NAMES,
    MODE_SECTIONS,
    MODES,
    ParsedResponse,
    extract_partner_utterance,
    extract_utterance,
    format_response,
    is_leaving,
    parse_response,
    section_markers,
)
from prompts import DEFAULT_PROMPTS

SYSTEM_PROMPT = DEFAULT_PROMPTS.system.render()

# Canonical responses, written out by hand rather than through format_response.
L1 = 'Thinking Level: 1\n<|begin_of_answer|>\n"Hi Hendrick, lovely tea."\n<|end_of_answer|>'

L2 = (
    "Thinking Level: 2\n<|begin_of_thinking|>\n"
    "Intent:\nHe wants to chat.\n\n"
    "Style:\nWarm.\n\n"
    "Response:\nSure, let's chat.\n"
    "<|end_of_thinking|>\n<|begin_of_answer|>\n"
    '"Sure, let\'s chat."\n<|end_of_answer|>'
)

L3 = (
    "Thinking Level: 3\n<|begin_of_thinking|>\n"
    "History:\nWe met at the party.\n\n"
    "Goal:\nBorrow $3000.\n\n"
    "Intent:\nHe is friendly.\n\n"
    "Assess:\nGood moment to ask.\n\n"
    "Strategy:\nBe honest about the need.\n\n"
    "Style:\nPolite.\n\n"
    "Response:\nCould you lend me some money?\n"
    "<|end_of_thinking|>\n<|begin_of_answer|>\n"
    '"Could you lend me some money?"\n<|end_of_answer|>'
)

L4 = (
    "Thinking Level: 4\n<|begin_of_thinking|>\n"
    "History:\nWe met at the party.\n\n"
    "Goal:\nBorrow $3000.\n\n"
    "Intent:\nHe is friendly.\n\n"
    "Assess:\nGood moment to ask.\n\n"
    "Strategy:\nBe honest about the need.\n\n"
    "Deduction:\nIf I am honest, he may agree.\nIf not, he may refuse.\n\n"
    "Integration:\nHonesty it is.\n\n"
    "Style:\nPolite.\n\n"
    "Response:\nCould you lend me $3000?\n"
    "<|end_of_thinking|>\n<|begin_of_answer|>\n"
    '"Could you lend me $3000?"\n<|end_of_answer|>'
)

CANONICAL = {1: L1, 2: L2, 3: L3, 4: L4}
ANSWERS = {
    1: '"Hi Hendrick, lovely tea."',
    2: '"Sure, let\'s chat."',
    3: '"Could you lend me some money?"',
    4: '"Could you lend me $3000?"',
}
THINKING_MODES = (2, 3, 4)


def assert_invalid(text: str, reason_part: str) -> None:
    parsed = parse_response(text)
    assert parsed == ParsedResponse(valid=False, mode=None, answer=None, reason=parsed.reason)
    assert parsed.reason and reason_part in parsed.reason, parsed.reason
    assert parsed.answer_text is None


# --- constants -------------------------------------------------------------------------------------------------


def test_mode_tables_cover_every_mode() -> None:
    assert MODES == (1, 2, 3, 4)
    assert set(MODE_NAMES) == set(MODE_SECTIONS) == set(MODES)
    assert MODE_NAMES[4] == "Prospective Simulation"
    assert MODE_SECTIONS[1] == ()
    assert MODE_SECTIONS[4][5:7] == ("Deduction", "Integration")


def test_section_markers_match_spec_lists() -> None:
    assert section_markers(2) == ("Intent:\n", "\n\nStyle:\n", "Style:\n", "\n\nResponse:\n", "Response:\n")
    assert section_markers(3)[:3] == ("History:\n", "\n\nGoal:\n", "Goal:\n")
    assert len(section_markers(3)) == 13
    assert section_markers(4)[9:13] == ("\n\nDeduction:\n", "Deduction:\n", "\n\nIntegration:\n", "Integration:\n")


def test_system_prompt_content() -> None:
    for name in MODE_NAMES.values():
        assert name in SYSTEM_PROMPT
    for marker in ("[Output Format]", "[Requirements]", "Thinking Level: 1\n", "Thinking Level: 2-4\n"):
        assert marker in SYSTEM_PROMPT
    assert f"{BEGIN_THINKING}\n**Thinking**\n{END_THINKING}" in SYSTEM_PROMPT
    assert f"{BEGIN_ANSWER}\n**Answer**\n{END_ANSWER}" in SYSTEM_PROMPT
    assert re.search(r"\bsimula\b", SYSTEM_PROMPT) is None
    assert "History:" not in SYSTEM_PROMPT


# --- valid responses and tolerances ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_canonical_is_valid(mode: int) -> None:
    parsed = parse_response(CANONICAL[mode])
    assert parsed == ParsedResponse(valid=True, mode=mode, answer=ANSWERS[mode], reason=None)
    assert parsed.answer_text == ANSWERS[mode][1:-1]


@pytest.mark.parametrize("mode", MODES)
def test_text_before_header_and_after_answer_is_tolerated(mode: int) -> None:
    parsed = parse_response("Sure! Here is my reply.\n" + CANONICAL[mode] + "\n<|im_end|> trailing junk")
    assert parsed.valid and parsed.mode == mode and parsed.answer == ANSWERS[mode]


def test_level1_tolerates_stray_thinking_tags() -> None:
    text = L1 + "\n<|begin_of_thinking|>\nnot checked\n<|end_of_thinking|>"
    assert parse_response(text).mode == 1


def test_empty_quoted_answer_is_valid() -> None:
    parsed = parse_response('Thinking Level: 1\n<|begin_of_answer|>\n""\n<|end_of_answer|>')
    assert parsed.valid and parsed.answer == '""' and parsed.answer_text == ""


def test_level1_identifier_wins_over_later_levels() -> None:
    # Levels are tried 1..4; the L1 identifier found anywhere decides, and the last begin-answer tag is checked.
    text = "Thinking Level: 1\n<|begin_of_answer|>\n" + L3
    assert parse_response(text) == ParsedResponse(True, 1, ANSWERS[3], None)


def test_lower_thinking_level_wins_when_both_identifiers_present() -> None:
    text = "Thinking Level: 4\n<|begin_of_thinking|>\n" + L2
    assert parse_response(text).mode == 2


def test_level1_answer_after_end_tag_runs_to_end_of_text() -> None:
    # The end tag is found before the last begin tag, so the checked segment is the rest of the text.
    text = L1 + '\n<|begin_of_answer|>\n"Second"'
    assert parse_response(text) == ParsedResponse(True, 1, '"Second"', None)


# --- invalid responses, one rule at a time -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        '"Just an answer"',
        L1.replace("Thinking Level: 1", "Thinking level: 1"),
        L1.replace("Thinking Level: 1", "Thinking Level: 5"),
        L1.replace("Thinking Level: 1\n", "Thinking Level: 1 "),
        L3.replace("Thinking Level: 3\n", "Thinking Level:3\n"),
        L2.replace("<|begin_of_thinking|>\n", "<|begin_of_thinking|> "),
    ],
)
def test_missing_header(text: str) -> None:
    assert_invalid(text, "no thinking-level header")


@pytest.mark.parametrize("mode", MODES)
def test_duplicate_end_answer_tag(mode: int) -> None:
    assert_invalid(CANONICAL[mode] + "\n<|end_of_answer|>", "'<|end_of_answer|>' must appear exactly once (found 2)")


@pytest.mark.parametrize("mode", MODES)
def test_missing_end_answer_tag(mode: int) -> None:
    assert_invalid(CANONICAL[mode].replace("\n<|end_of_answer|>", ""), "(found 0)")


@pytest.mark.parametrize("mode", MODES)
def test_duplicate_identifier(mode: int) -> None:
    assert_invalid(CANONICAL[mode] + "\n" + CANONICAL[mode], "must appear exactly once (found 2)")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_duplicate_thinking_and_answer_tags(mode: int) -> None:
    text = CANONICAL[mode]
    assert_invalid(text + "\n<|end_of_thinking|>", "'<|end_of_thinking|>' must appear exactly once (found 2)")
    assert_invalid(text + "<|begin_of_answer|>\n", "'<|begin_of_answer|>' must appear exactly once (found 2)")
    assert_invalid(text.replace("\n<|end_of_thinking|>", "<|end_of_thinking|>"), "(found 0)")


def test_level1_end_tag_before_identifier() -> None:
    text = '"Hi"\n<|end_of_answer|>\nThinking Level: 1\n<|begin_of_answer|>\n"Hi"'
    assert_invalid(text, "out of order")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_answer_block_before_thinking_end(mode: int) -> None:
    # Swap the thinking-end and answer blocks: every tag still appears once, in the wrong order.
    head, rest = CANONICAL[mode].split("\n<|end_of_thinking|>\n")
    text = head + "\n" + rest + "\n<|end_of_thinking|>"
    assert_invalid(text, "'<|begin_of_answer|>' is out of order")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_thinking_end_before_identifier(mode: int) -> None:
    text = "draft\n<|end_of_thinking|>\n" + CANONICAL[mode].replace("\n<|end_of_thinking|>", "")
    assert_invalid(text, "'<|end_of_thinking|>' is out of order")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "bad_answer",
    [
        "Unquoted reply",
        '"Half quoted',
        'Trailing quote"',
        '"She said "hi" to me"',
        ' "Leading space"',
        '"Trailing space" ',
        '"Two" "utterances"',
        "",
    ],
)
def test_answer_shape(mode: int, bad_answer: str) -> None:
    text = CANONICAL[mode].replace(ANSWERS[mode], bad_answer)
    assert_invalid(text, "answer must be one double-quoted utterance")


@pytest.mark.parametrize(("mode", "name"), [(m, name) for m in THINKING_MODES for name in MODE_SECTIONS[m]])
def test_missing_section(mode: int, name: str) -> None:
    text = CANONICAL[mode].replace(f"{name}:\n", "")
    assert_invalid(text, f"section '{name}:' is missing")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_duplicated_section(mode: int) -> None:
    text = CANONICAL[mode].replace("Style:\n", "Style:\nWarm.\n\nStyle:\n")
    assert_invalid(text, "section 'Style:' must appear exactly once (found 2)")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_section_header_repeated_inside_text(mode: int) -> None:
    text = CANONICAL[mode].replace("Response:\n", "Response:\nMy Response:\n")
    assert_invalid(text, "section 'Response:' must appear exactly once (found 2)")


@pytest.mark.parametrize("mode", THINKING_MODES)
def test_missing_blank_line_before_section(mode: int) -> None:
    text = CANONICAL[mode].replace("\n\nResponse:\n", "\nResponse:\n")
    assert_invalid(text, "section 'Response:' must be preceded by a blank line")


@pytest.mark.parametrize(
    ("mode", "first", "second"), [(2, "Intent", "Style"), (3, "Intent", "Assess"), (4, "Deduction", "Integration")]
)
def test_out_of_order_sections(mode: int, first: str, second: str) -> None:
    text = CANONICAL[mode]
    a, b = f"\n\n{first}:\n", f"\n\n{second}:\n"
    if mode == 2:
        # Intent is the first section and has no blank line before it; give both one so only the order is wrong.
        text = text.replace("<|begin_of_thinking|>\nIntent:\n", "<|begin_of_thinking|>\n\n\nIntent:\n")
    text = text.replace(a, "\0").replace(b, a).replace("\0", b)
    assert_invalid(text, f"section '{second}:' out of order")


def test_section_outside_thinking_slice_does_not_count() -> None:
    # Sections are only looked for between the identifier and the thinking-end tag.
    text = "Response:\n" + L2.replace("\n\nResponse:\nSure, let's chat.", "")
    assert_invalid(text, "section 'Response:' is missing")


@pytest.mark.parametrize(("header", "body"), [(h, b) for h in THINKING_MODES for b in THINKING_MODES if b > h])
def test_lower_header_over_richer_body_is_valid(header: int, body: int) -> None:
    # Rule 5 only asks for the header's own markers, so extra sections from a deeper level slip through.
    text = CANONICAL[body].replace(f"Thinking Level: {body}", f"Thinking Level: {header}")
    assert parse_response(text) == ParsedResponse(True, header, ANSWERS[body], None)


@pytest.mark.parametrize(
    ("header", "body", "missing"), [(3, 2, "History"), (4, 2, "History"), (4, 3, "Deduction")]
)
def test_higher_header_over_poorer_body_is_invalid(header: int, body: int, missing: str) -> None:
    text = CANONICAL[body].replace(f"Thinking Level: {body}", f"Thinking Level: {header}")
    assert_invalid(text, f"section '{missing}:' is missing")


def test_level1_header_followed_by_thinking_is_unknown_mode() -> None:
    assert_invalid(L2.replace("Thinking Level: 2", "Thinking Level: 1"), "no thinking-level header")


# --- format_response -----------------------------------------------------------------------------------------------


def sections_for(mode: int) -> dict[str, str]:
    return {name: f"Some {name.lower()} text." for name in MODE_SECTIONS[mode]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", ["Hello there.", '"Hello there."', '  "Hello there."\n'])
def test_format_response_round_trips(mode: int, answer: str) -> None:
    text = format_response(mode, sections_for(mode) or None, answer)
    assert text.startswith(f"Thinking Level: {mode}\n")
    assert parse_response(text) == ParsedResponse(True, mode, '"Hello there."', None)


@pytest.mark.parametrize("mode", MODES)
def test_format_response_reproduces_canonical_text(mode: int) -> None:
    canonical = CANONICAL[mode]
    sections: dict[str, str] = {}
    if mode > 1:
        body = canonical.split(f"{BEGIN_THINKING}\n")[1].split(f"\n{END_THINKING}")[0]
        for chunk in body.split("\n\n"):
            name, text = chunk.split(":\n", 1)
            sections[name] = text
    assert format_response(mode, sections, ANSWERS[mode]) == canonical


def test_format_response_level1_layout() -> None:
    assert format_response(1, {}, "Hi") == 'Thinking Level: 1\n<|begin_of_answer|>\n"Hi"\n<|end_of_answer|>'


@pytest.mark.parametrize(
    ("mode", "sections", "answer", "message"),
    [
        (0, None, "Hi", "unknown thinking mode"),
        (5, None, "Hi", "unknown thinking mode"),
        (1, {"Intent": "x"}, "Hi", "needs sections"),
        (2, None, "Hi", "needs sections"),
        (2, {"Intent": "x", "Style": "y"}, "Hi", "needs sections"),
        (3, {**sections_for(3), "Deduction": "z"}, "Hi", "needs sections"),
        (2, sections_for(2), 'She said "hi"', "inner double quote"),
        (2, {**sections_for(2), "Style": "Warm.\n\nIntent:\nagain"}, "Hi", "break the level-2 format"),
        (3, {**sections_for(3), "Goal": "x\n<|end_of_thinking|>"}, "Hi", "break the level-3 format"),
        (1, None, "Hi\n<|end_of_answer|>", "break the level-1 format"),
    ],
)
def test_format_response_errors(mode: int, sections: dict[str, str] | None, answer: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        format_response(mode, sections, answer)


# --- utterance extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # 1. both answer tags: last begin to next end, stripped, re-quoted
        (L4, '"Could you lend me $3000?"'),
        ("<|begin_of_answer|>\n  Hello  \n<|end_of_answer|>", '"Hello"'),
        ('<|begin_of_answer|>"a"<|end_of_answer|> <|begin_of_answer|> "b" <|end_of_answer|> x', '"b"'),
        # 2. only the begin tag: text before it, after the last "\n\nResponse:\n"
        ("Intent:\nx\n\nResponse:\nold\n\nResponse:\nDraft reply<|begin_of_answer|>\n\"Final", '"Draft reply"'),
        ("Just thinking<|begin_of_answer|>\n", '"Just thinking"'),
        ("\n\nResponse:\nDraft\n<|end_of_thinking|>\n<|begin_of_answer|>\n", '"Draft\n<|end_of_thinking|>"'),
        ('Intent:\nx\n\nResponse:\n  "Sure."  \n<|begin_of_answer|>', '"Sure."'),
        # 3. no answer tags but a response section: text after its last occurrence
        ("Intent:\nx\n\nResponse:\n\"Draft reply\"", '"Draft reply"'),
        ('Intent:\nx\n\nResponse:\n"Draft reply"\n\n', '"Draft reply"'),
        ("Intent:\nx\n\nResponse:\nA\n\nResponse:\nB", '"B"'),
        ("x\n\nResponse:\nHi<|end_of_answer|>", '"Hi<|end_of_answer|>"'),
        # 4. otherwise the last line
        ("first line\nsecond line", '"second line"'),
        ('"Only line"', '"Only line"'),
        ("ends with newline\n", '""'),
        # every branch strips whitespace first, so quotes shielded by spaces are removed too
        ('line\n "spaced" ', '"spaced"'),
    ],
)
def test_extract_utterance(text: str, expected: str) -> None:
    assert extract_utterance(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Alice: "Hello, Bob." she said.', '"Hello, Bob."'),
        ('"One" and "two"', '"One" and "two"'),
        ("No quotes here\nsecond line", '"No quotes here"'),
        ('A lone " quote', '""'),
        ('""Double""', '"Double"'),
        ("", '""'),
    ],
)
def test_extract_partner_utterance(text: str, expected: str) -> None:
    assert extract_partner_utterance(text) == expected


@pytest.mark.parametrize(
    ("line", "leaving"),
    [
        ('Turn 5: Leo Williams said: "left the conversation"\n', True),
        ("Turn 5: Leo said: Left The Conversation", True),
        ('Turn 6: Ann said: "Please do not leave the conversation yet."', True),
        ('Turn 6: Ann said: "I am leaving now."', False),
        ('Turn 6: Ann said: "We left the party."', False),
        ("", False),
    ],
)
def test_is_leaving(line: str, leaving: bool) -> None:
    assert is_leaving(line) is leaving
