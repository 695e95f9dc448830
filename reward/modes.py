"""The four thinking modes, the response format the policy must emit, and its checker.

Modes (the code calls them "Thinking Level" 1..4; docs/protocol.md, Thinking modes). Each mode fixes the ordered sections of the
thinking block:

* 1, Reactive Response: answer at once, no thinking block at all.
* 2, Intentional Analysis: shallow thinking, ``Intent`` -> ``Style`` -> ``Response``.
* 3, Strategic Adaptation: a strategy but no deduction, ``History`` -> ``Goal`` -> ``Intent`` -> ``Assess`` ->
  ``Strategy`` -> ``Style`` -> ``Response``.
* 4, Prospective Simulation: a strategy plus step-by-step deduction; level 3 with ``Deduction`` -> ``Integration``
  inserted after ``Strategy``.

The ``Response`` section is a draft; the final utterance is repeated in the answer block.

Output format (docs/protocol.md, Thinking modes and output format). The markers are plain text, not special tokens::

    Thinking Level: 3
    <|begin_of_thinking|>
    History:
    <text>

    Goal:
    <text>
    ...

    Response:
    <draft reply>
    <|end_of_thinking|>
    <|begin_of_answer|>
    "<final reply>"
    <|end_of_answer|>

Level 1 has the header followed directly by the answer block. Every section header is followed by a newline, every
section after the first is preceded by a blank line, and the answer is exactly one double-quoted utterance.

Besides the checker this module holds the utterance extraction used in evaluation episodes: one for the
trained model's raw output and one for an API partner's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

THINKING_HEADER = "Thinking Level: {level}\n"
BEGIN_THINKING = "<|begin_of_thinking|>"
END_THINKING = "<|end_of_thinking|>"
BEGIN_ANSWER = "<|begin_of_answer|>"
END_ANSWER = "<|end_of_answer|>"

MODES: tuple[int, ...] = (1, 2, 3, 4)

MODE_NAMES: dict[int, str] = {
    1: "Reactive Response",
    2: "Intentional Analysis",
    3: "Strategic Adaptation",
    4: "Prospective Simulation",
}

MODE_SECTIONS: dict[int, tuple[str, ...]] = {
    1: (),
    2: ("Intent", "Style", "Response"),
    3: ("History", "Goal", "Intent", "Assess", "Strategy", "Style", "Response"),
    4: ("History", "Goal", "Intent", "Assess", "Strategy", "Deduction", "Integration", "Style", "Response"),
}

# The exact substrings the checker looks for (docs/protocol.md, Format rules). They include the newlines around the tags.
_END_THINKING_MARK = "\n" + END_THINKING
_BEGIN_ANSWER_MARK = BEGIN_ANSWER + "\n"
_END_ANSWER_MARK = "\n" + END_ANSWER
_RESPONSE_MARK = "\n\nResponse:\n"

LEFT_CONVERSATION_MARKERS: tuple[str, ...] = ("left the conversation", "leave the conversation")


def mode_identifier(mode: int) -> str:
    """The substring that identifies a mode: its header line plus the tag that opens the next block."""
    opening = _BEGIN_ANSWER_MARK if mode == 1 else BEGIN_THINKING + "\n"
    return THINKING_HEADER.format(level=mode) + opening


def section_markers(mode: int) -> tuple[str, ...]:
    """The ordered section markers the checker requires: each header, and before every header but the first, the same
    header preceded by a blank line. Level 2 gives ``("Intent:\\n", "\\n\\nStyle:\\n", "Style:\\n", ...)``."""
    markers: list[str] = []
    for i, name in enumerate(MODE_SECTIONS[mode]):
        if i > 0:
            markers.append(f"\n\n{name}:\n")
        markers.append(f"{name}:\n")
    return tuple(markers)


def quote(text: str) -> str:
    """Normalise an utterance to one double-quoted string: ``'"' + text.strip('"') + '"'``."""
    return '"' + text.strip('"') + '"'


@dataclass(frozen=True)
class ParsedResponse:
    """Result of :func:`parse_response`.

    ``valid`` is True exactly when ``mode`` and ``answer`` are set and ``reason`` is None. ``answer`` is the answer
    block's content stripped of whitespace, quotes included. ``reason`` says briefly why an invalid
    response was rejected.
    """

    valid: bool
    mode: int | None
    answer: str | None
    reason: str | None

    @property
    def answer_text(self) -> str | None:
        """The answer without its surrounding double quotes, or None for an invalid response."""
        return None if self.answer is None else self.answer[1:-1]


def _invalid(reason: str) -> ParsedResponse:
    return ParsedResponse(valid=False, mode=None, answer=None, reason=reason)


def _tag_error(text: str, tags: tuple[str, ...]) -> str | None:
    """Rules 2 and 3: each tag exactly once, and first occurrences in strictly increasing order."""
    for tag in tags:
        found = text.count(tag)
        if found != 1:
            return f"{tag.strip()!r} must appear exactly once (found {found})"
    positions = [text.find(tag) for tag in tags]
    for i in range(1, len(tags)):
        if positions[i] <= positions[i - 1]:
            return f"{tags[i].strip()!r} is out of order"
    return None


def _answer_segment(text: str) -> str:
    """Rule 4's segment: after the last ``"<|begin_of_answer|>\\n"``, up to the next ``"\\n<|end_of_answer|>"``.

    When no end tag follows, the segment runs to the end of the text (the reading of a split on both markers)."""
    after = text.rsplit(_BEGIN_ANSWER_MARK, 1)[-1]
    return after.split(_END_ANSWER_MARK, 1)[0]


def _section_error(thinking: str, mode: int) -> str | None:
    """Rule 5 on the thinking slice: every marker exactly once, first occurrences non-decreasing in list order."""
    markers = section_markers(mode)
    for marker in markers:
        found = thinking.count(marker)
        if found == 1:
            continue
        header = marker.lstrip("\n")
        name = header.rstrip("\n")
        # Report the section's own problem first: a missing or repeated header also breaks its blank-line marker.
        headers = thinking.count(header)
        if headers == 0:
            return f"section {name!r} is missing"
        if headers > 1:
            return f"section {name!r} must appear exactly once (found {headers})"
        return f"section {name!r} must be preceded by a blank line"
    positions = [thinking.find(marker) for marker in markers]
    for i in range(1, len(markers)):
        if positions[i] < positions[i - 1]:
            return f"section {markers[i].strip()!r} out of order"
    return None


def parse_response(text: str) -> ParsedResponse:
    """Check a decoded response against the format rules (docs/protocol.md, Format rules), applied in this order.

    1. Mode identification: try levels 1, 2, 3, 4 and take the first whose identifier occurs anywhere in the text.
       The level-1 identifier is ``"Thinking Level: 1\\n<|begin_of_answer|>\\n"``, the level-k one (k >= 2)
       ``"Thinking Level: k\\n<|begin_of_thinking|>\\n"``. The text need not start with it: text before the header
       and after ``<|end_of_answer|>`` is tolerated.
    2. Tag counts: each tag occurs exactly once. Level 1: the identifier and ``"\\n<|end_of_answer|>"``
       (thinking tags elsewhere are not forbidden). Levels 2-4: the identifier, ``"\\n<|end_of_thinking|>"``,
       ``"<|begin_of_answer|>\\n"`` and ``"\\n<|end_of_answer|>"``.
    3. Tag order, by position: the tags of rule 2 appear in the order listed there. For level 1 the identifier,
       which ends with the begin-answer tag, stands for the answer start.
    4. Answer shape: the segment after the last ``"<|begin_of_answer|>\\n"`` up to the next
       ``"\\n<|end_of_answer|>"`` (or the end of the text if none follows), not stripped, holds exactly two ``"``
       and starts and ends with ``"``.
    5. Sections (levels 2-4): in the slice from the identifier to ``"\\n<|end_of_thinking|>"``, every marker of
       :func:`section_markers` occurs exactly once and the positions are non-decreasing in list order; that is,
       each section appears once, in canonical order, separated from the previous one by a blank line. Other text,
       including sections of a deeper level, is not forbidden: a level-2 header over a level-4 body passes.
    6. Otherwise the response is valid; the answer is the segment of rule 4 stripped of whitespace.
    """
    mode = next((m for m in MODES if mode_identifier(m) in text), None)
    if mode is None:
        return _invalid("no thinking-level header")
    identifier = mode_identifier(mode)
    if mode == 1:
        tags: tuple[str, ...] = (identifier, _END_ANSWER_MARK)
    else:
        tags = (identifier, _END_THINKING_MARK, _BEGIN_ANSWER_MARK, _END_ANSWER_MARK)
    error = _tag_error(text, tags)
    if error is not None:
        return _invalid(error)
    answer = _answer_segment(text)
    if answer.count('"') != 2 or not answer.startswith('"') or not answer.endswith('"'):
        return _invalid("answer must be one double-quoted utterance")
    if mode > 1:
        thinking = text[text.find(identifier) : text.find(_END_THINKING_MARK)]
        error = _section_error(thinking, mode)
        if error is not None:
            return _invalid(error)
    return ParsedResponse(valid=True, mode=mode, answer=answer.strip(), reason=None)


def format_response(mode: int, sections: Mapping[str, str] | None, answer: str) -> str:
    """Build the canonical response of a mode.

    ``sections`` maps each section name of ``MODE_SECTIONS[mode]`` (without the colon) to its text; it must be None
    or empty for level 1. Section texts and the answer are stripped of surrounding whitespace; the answer may come
    with or without its surrounding double quotes and is re-quoted. The result has no trailing newline.

    Raises ValueError for an unknown mode, section names that do not match the mode, an answer with an inner ``"``,
    or texts that would break the format (e.g. a section text that contains a section header).
    """
    if mode not in MODES:
        raise ValueError(f"unknown thinking mode {mode!r}; expected one of {MODES}")
    given = dict(sections or {})
    expected = MODE_SECTIONS[mode]
    if set(given) != set(expected):
        raise ValueError(f"level {mode} needs sections {list(expected)}, got {sorted(given)}")
    utterance = answer.strip().strip('"')
    if '"' in utterance:
        raise ValueError("the answer must not contain an inner double quote")
    parts = [THINKING_HEADER.format(level=mode)]
    if expected:
        body = "\n\n".join(f"{name}:\n{given[name].strip()}" for name in expected)
        parts.append(f"{BEGIN_THINKING}\n{body}\n{END_THINKING}\n")
    parts.append(f'{BEGIN_ANSWER}\n"{utterance}"\n{END_ANSWER}')
    response = "".join(parts)
    # Free text can still collide with the markers; refuse to hand out a response the checker would reject.
    parsed = parse_response(response)
    if not parsed.valid or parsed.mode != mode:
        raise ValueError(f"the texts break the level-{mode} format: {parsed.reason or 'mode changed'}")
    return response


def extract_utterance(text: str) -> str:
    """Extract the utterance from the trained model's raw output (the authors' evaluation with ``test_thinking=True``).

    1. Both ``<|begin_of_answer|>`` and ``<|end_of_answer|>`` present: the text after the last begin tag, up to the
       next end tag (or the end of the text), stripped of whitespace.
    2. Only the begin tag present: the text before the first begin tag, after the last ``"\\n\\nResponse:\\n"`` in it
       (all of it if there is none).
    3. Otherwise, ``"\\n\\nResponse:\\n"`` present: the text after its last occurrence.
    4. Otherwise: the last line (the text after the last ``"\\n"``; empty when the text ends with a newline).

    Whatever the branch, the text is stripped of whitespace and then normalised to ``'"' + text.strip('"') + '"'``,
    so a draft like ``\n"Sure."\n`` becomes ``"Sure."``, not ``"\n"Sure."\n"``. The authors' code strips only in
    branch 1 and lets the newlines of the other branches into the dialogue; we strip every branch on purpose
    (docs/protocol.md, Where this project differs). Anything after the draft, such as ``<|end_of_thinking|>``, stays
    inside the utterance.
    """
    if BEGIN_ANSWER in text and END_ANSWER in text:
        found = text.rsplit(BEGIN_ANSWER, 1)[-1].split(END_ANSWER, 1)[0]
    elif BEGIN_ANSWER in text:
        found = text.split(BEGIN_ANSWER, 1)[0].rsplit(_RESPONSE_MARK, 1)[-1]
    elif _RESPONSE_MARK in text:
        found = text.rsplit(_RESPONSE_MARK, 1)[-1]
    else:
        found = text.rsplit("\n", 1)[-1]
    return quote(found.strip())


def extract_partner_utterance(text: str) -> str:
    """Extract the utterance from an API partner's reply: the substring from the first ``"`` to the last
    ``"``, or the first line when there is no ``"``; then re-quoted like :func:`extract_utterance`."""
    first, last = text.find('"'), text.rfind('"')
    found = text[first : last + 1] if first != -1 else text.split("\n", 1)[0]
    return quote(found)


def is_leaving(line: str) -> bool:
    """True when a dialogue line ends the episode: it contains "left the conversation" or
    "leave the conversation", case-insensitively, anywhere, even inside a quote that only mentions leaving."""
    lowered = line.lower()
    return any(marker in lowered for marker in LEFT_CONVERSATION_MARKERS)
