"""Full Sotopia episodes, played turn by turn between the trained policy and itself or a partner model
(docs/protocol.md, Evaluation).

Used by the evaluation (episodes judged on 7 dimensions) and by the RL state builder (prefixes of played
episodes). It is orchestration, so it lives in ``cluster/``: it needs the policy served by the rollout actors, an
OpenAI-compatible partner and the utterance extraction of ``reward.modes``.

**Mechanics.** Agent 1 speaks on even turns, agent 2 on odd turns. Every step batches *all* unfinished episodes: the
turns the trained model plays go to the :class:`Policy` in one call, the partner's turns to the :class:`Partner` in
another, and both calls run concurrently. The model gets the thinking system prompt (template ``prompts.system``) as
system message and the turn prompt (``actors.prompts``, templates ``prompts.turn`` and ``prompts.background``) as user
message; its utterance is ``extract_utterance(raw)``. The partner gets only the user message (no system prompt) and
its utterance is ``extract_partner_utterance(raw)``; so does the model in a no-thinking baseline (``thinking=False``:
an instruct model evaluated as it is, Table 1's base rows). An episode ends

* when the new dialogue line mentions leaving (``reward.modes.is_leaving``; ``end_reason="left"``);
* after ``max_turns`` utterances (``"max_turns"``);
* before a turn whose templated prompt is longer than ``max_prompt_tokens`` as measured by ``count_tokens``
  (``"prompt_too_long"``). As in the reference, the dialogue then ends with the speaker's empty open slot.

**Run modes.** Without a partner the model plays both agents (self-play, ``actor_role="agent1"``, one record per
episode). With a partner every episode is played twice, once with the model as agent 1 and once as agent 2, so a
run yields two records per episode id.

**Results and resume.** One :class:`EpisodeRecord` per finished episode (the authors' result fields plus the extracted
utterances, the modes and the response token counts) is appended to a JSONL file, flushed and fsynced, as soon as
the episode ends, instead of rewriting one JSON file after every step as the reference does: an append costs one
line however long the run is. Restarting a run on the same file skips every episode already in it. Episodes that
were still in play when the run stopped restart from turn 0: their sampled turns were never persisted, and replaying a
partial dialogue would mix two samplings of one episode. A torn last line (a crash during a write) is cut off on
resume. The optional ``evaluate`` hook (the 7-dimension judge) runs on each finished record before it is written, in
the background, so judging never stalls generation; it should record judge failures in the record
(``evaluation_error``) rather than raise, because an exception stops the run and the episode is replayed next time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from actors.prompts import (
    complete_intro,
    dialog_line,
    open_slot,
    remove_tags,
    render_background,
    render_turn_prompt,
    speaker_of,
)
from actors.sotopia import AgentProfile, EnvironmentProfile, SotopiaDataset
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.modes import END_THINKING, extract_partner_utterance, extract_utterance, is_leaving, parse_response
from reward.evaluator import RunMode

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""

ActorRole = Literal["agent1", "agent2"]
EndReason = Literal["left", "max_turns", "prompt_too_long"]


@dataclass(frozen=True)
class Generation:
    """One policy output: the raw text, and the number of response tokens when the backend reports it."""

    text: str
    num_tokens: int | None = None


class Policy(Protocol):
    """The trained model. Takes one chat (system + user message) per episode to advance and returns one
    :class:`Generation` per chat, in order. The cluster backs it with the rollout actors (n=1, eval temperature)."""

    async def __call__(self, batch: list[list[Message]]) -> Sequence[Generation]: ...


class Partner(Protocol):
    """The other side in vs-partner runs. Takes one chat (user message only) per episode and returns one raw reply
    text per chat, in order."""

    async def __call__(self, batch: list[list[Message]]) -> Sequence[str]: ...


TokenCounter = Callable[[list[Message]], int]
"""Length in tokens of a chat once templated (the serving tokenizer's ``apply_chat_template``)."""


class EpisodeRecord(BaseModel):
    """One finished episode (the authors' result fields and ours). The per-turn lists are aligned: entry k belongs to turn k.

    ``env_id`` is the real episode id (index into ``env_agent_combos.json``). ``modes`` holds the thinking mode of the
    model's turns (``None`` for an invalid format and for the partner's turns); ``response_tokens`` the token count of
    the model's turns when the policy reports it; ``thinking_tokens`` the tokens of a well-formed turn's thinking
    (header through the end-of-thinking tag; 0 in mode 1) when the runner can count them. ``agent1_intro``/``agent2_intro`` are the backgrounds each agent saw.
    ``thinking`` is False for a policy evaluated without thinking modes. ``agent1_scores``/``agent2_scores``
    (dimension -> [reasoning, score]) and ``evaluation_error`` are filled by the
    evaluator hook, which may also attach further fields of its own: they round-trip through the results file.
    """

    model_config = ConfigDict(extra="allow")

    env_id: int
    actor_role: ActorRole
    run_mode: RunMode
    hard: bool
    codename: str
    complete_intro: str
    agent1_name: str
    agent2_name: str
    agent1_goal: str
    agent2_goal: str
    agent1_intro: str
    agent2_intro: str
    dialog: list[str]
    fullout: list[str]
    utterances: list[str]
    modes: list[int | None]
    response_tokens: list[int | None]
    thinking_tokens: list[int | None] = []
    end_reason: EndReason
    max_turns: int
    hide_private_info: bool
    thinking: bool = True
    agent1_scores: dict[str, tuple[str, int]] | None = None
    agent2_scores: dict[str, tuple[str, int]] | None = None
    evaluation_error: str | None = None

    @property
    def key(self) -> tuple[int, ActorRole]:
        """What identifies an episode within a run: the episode id and the side the model played."""
        return (self.env_id, self.actor_role)


Evaluator = Callable[[EpisodeRecord], Awaitable[EpisodeRecord]]
"""Scores a finished record (the 7-dimension judge) and returns it, e.g. ``record.model_copy(update=...)``."""


def load_records(path: Path) -> list[EpisodeRecord]:
    """Read a results file, one record per line. A torn last line (no newline: the writer died mid-write) is
    ignored; any other unreadable line is an error naming the file and line."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines[-1]:
        log.warning("%s: ignoring a torn last line (%d characters)", path, len(lines[-1]))
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(EpisodeRecord.model_validate_json(line))
        except ValueError as error:
            raise ValueError(f"{path}: line {number} is not an episode record: {error}") from None
    return records


def _cut_torn_tail(path: Path) -> None:
    """Truncate a results file after its last newline, so the next append starts a fresh line."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: cutting a torn last line (%d bytes) before resuming", path, len(data) - keep)
        with path.open("r+b") as handle:
            handle.truncate(keep)


def _append_line(path: Path, text: str) -> None:
    """Append one line durably: after this returns, a crash cannot lose it."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class _Play:
    """An episode in progress."""

    episode_id: int
    actor_role: ActorRole
    env: EnvironmentProfile
    agent1: AgentProfile
    agent2: AgentProfile
    dialog: list[str] = field(default_factory=list)
    fullout: list[str] = field(default_factory=list)
    utterances: list[str] = field(default_factory=list)
    modes: list[int | None] = field(default_factory=list)
    response_tokens: list[int | None] = field(default_factory=list)
    thinking_tokens: list[int | None] = field(default_factory=list)
    end_reason: EndReason | None = None

    @property
    def turn(self) -> int:
        return len(self.utterances)

    @property
    def model_agent(self) -> int:
        return 1 if self.actor_role == "agent1" else 2

    def add_turn(
        self, raw: str, utterance: str, mode: int | None, num_tokens: int | None, thinking_tokens: int | None = None
    ) -> None:
        name = (self.agent1, self.agent2)[speaker_of(self.turn) - 1].name
        self.dialog.append(dialog_line(self.turn, name, utterance))
        self.fullout.append(raw)
        self.utterances.append(utterance)
        self.modes.append(mode)
        self.response_tokens.append(num_tokens)
        self.thinking_tokens.append(thinking_tokens)


@dataclass
class _Turn:
    """One prompt of a step: whose episode, and the chat to send."""

    play: _Play
    messages: list[Message]


@dataclass
class EpisodeRunner:
    """Plays batches of episodes and writes their records incrementally (see the module docstring).

    ``partner=None`` is self-play. ``count_tokens=None`` disables the prompt-length cut-off; when given, it measures
    every speaker's chat, the partner's included. ``max_active`` bounds the episodes in play at once (``None``: all
    of them); finished ones are replaced from the queue, so each step still batches every episode in play.
    ``prompts`` are the run's templates. ``thinking=False`` evaluates the policy without thinking modes: no system
    prompt, and its reply is read as the partner's is. ``count_text`` (the policy tokenizer's token count of a text)
    measures each well-formed turn's thinking; None records no thinking counts.
    """

    policy: Policy
    partner: Partner | None = None
    max_turns: int = 20
    count_tokens: TokenCounter | None = None
    max_prompt_tokens: int = 6144
    hide_private_info: bool = False
    max_active: int | None = None
    evaluate: Evaluator | None = None
    prompts: PromptSet = DEFAULT_PROMPTS
    thinking: bool = True
    count_text: Callable[[str], int] | None = None
    interrupt_grace_s: float = 10.0
    """On an interruption (Ctrl-C, SIGTERM), played episodes whose judging ends within this many seconds are still
    written; the judging of the others is abandoned and they are played again by the next run."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_active is not None and self.max_active < 1:
            raise ValueError(f"max_active must be >= 1 or None, got {self.max_active}")

    @property
    def run_mode(self) -> RunMode:
        return "self_play" if self.partner is None else "vs_partner"

    async def run(self, dataset: SotopiaDataset, episode_ids: Sequence[int], out_path: Path) -> list[EpisodeRecord]:
        """Play every episode id (twice against a partner: model as agent 1, then as agent 2) and return all their
        records in that order, including those a previous run on ``out_path`` already finished."""
        out_path = Path(out_path)
        if len(set(episode_ids)) != len(episode_ids):
            raise ValueError("episode_ids lists an episode more than once")
        roles: tuple[ActorRole, ...] = ("agent1",) if self.partner is None else ("agent1", "agent2")
        plan = [(episode_id, role) for role in roles for episode_id in episode_ids]
        finished = self._resume(out_path)
        queue: deque[_Play] = deque()
        for episode_id, role in plan:
            if (episode_id, role) not in finished:
                env, agent1, agent2 = dataset.episode(episode_id)
                queue.append(_Play(episode_id, role, env, agent1, agent2))
        log.info("%s: %d episodes to play, %d already finished (%s)", out_path, len(queue),
                 len(plan) - len(queue), self.run_mode)
        out_path.parent.mkdir(parents=True, exist_ok=True)

        active: list[_Play] = []
        writing: set[asyncio.Task[EpisodeRecord]] = set()
        try:
            while queue or active:
                while queue and (self.max_active is None or len(active) < self.max_active):
                    active.append(queue.popleft())
                await self._step(active)
                for play in [play for play in active if play.end_reason is not None]:
                    active.remove(play)
                    writing.add(asyncio.create_task(self._complete(play, dataset, out_path)))
                for task in [task for task in writing if task.done()]:
                    writing.discard(task)
                    finished[task.result().key] = task.result()  # raises the hook's error at once
            if writing:  # asyncio.wait, not gather: an interruption must not cancel the judging it may still keep
                await asyncio.wait(writing)
            for task in writing:
                finished[task.result().key] = task.result()
        except (asyncio.CancelledError, KeyboardInterrupt):
            await self._keep_what_is_judged_soon(writing)
            raise
        except BaseException:
            # Whatever has already been played and is only waiting for its judge is still worth keeping.
            await asyncio.gather(*writing, return_exceptions=True)
            raise
        return [finished[key] for key in plan]

    async def _keep_what_is_judged_soon(self, writing: set[asyncio.Task[EpisodeRecord]]) -> None:
        """The run was interrupted: wait `interrupt_grace_s` for the episodes being judged, then abandon the rest (a
        full evaluation can have hundreds waiting for a slow judge; stopping must not take that long)."""
        if not writing:
            return
        log.warning("interrupted: %d played episode(s) are being judged; those done within %.0f s are kept, the "
                    "others are played again by the next run", len(writing), self.interrupt_grace_s)
        done, pending = await asyncio.wait(writing, timeout=self.interrupt_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        kept = sum(not task.cancelled() and task.exception() is None for task in done)
        log.warning("kept %d of them; %d abandoned", kept, len(writing) - kept)

    def _resume(self, out_path: Path) -> dict[tuple[int, ActorRole], EpisodeRecord]:
        """The records a previous run on this file finished. They must come from the same kind of run: mixing
        self-play with vs-partner records, or different turn limits, in one file would corrupt its statistics."""
        if not out_path.exists():
            return {}
        _cut_torn_tail(out_path)
        finished: dict[tuple[int, ActorRole], EpisodeRecord] = {}
        for record in load_records(out_path):
            settings = (record.run_mode, record.max_turns, record.hide_private_info)
            if settings != (self.run_mode, self.max_turns, self.hide_private_info):
                raise ValueError(
                    f"{out_path} holds episode {record.env_id} ({record.actor_role}) from a run with run_mode, "
                    f"max_turns, hide_private_info = {settings}, but this run uses "
                    f"{(self.run_mode, self.max_turns, self.hide_private_info)}; write to another file"
                )
            if record.key in finished:
                raise ValueError(f"{out_path} holds episode {record.env_id} ({record.actor_role}) twice")
            finished[record.key] = record
        return finished

    async def _step(self, active: list[_Play]) -> None:
        """Advance every episode in play by one turn, or end it."""
        by_model: list[_Turn] = []
        by_partner: list[_Turn] = []
        system = self.prompts.system.render()
        for play in active:
            speaker = speaker_of(play.turn)
            name = (play.agent1, play.agent2)[speaker - 1].name
            slot = open_slot(play.turn, name)
            user = render_turn_prompt(play.env, play.agent1, play.agent2, play.turn, [*play.dialog, slot],
                                      hide_private_info=self.hide_private_info, prompts=self.prompts)
            model_speaks = self.partner is None or speaker == play.model_agent
            messages = [{"role": "user", "content": user}]
            if model_speaks and self.thinking:
                messages.insert(0, {"role": "system", "content": system})
            if self.count_tokens is not None and self.count_tokens(messages) > self.max_prompt_tokens:
                play.dialog.append(slot)
                play.end_reason = "prompt_too_long"
                continue
            (by_model if model_speaks else by_partner).append(_Turn(play, messages))

        generations, replies = await asyncio.gather(self._ask_policy(by_model), self._ask_partner(by_partner))
        for turn, generation in zip(by_model, generations, strict=True):
            raw = generation.text
            if self.thinking:
                mode = parse_response(raw).mode
                turn.play.add_turn(raw, extract_utterance(raw), mode, generation.num_tokens, self._thinking_tokens(raw, mode))
            else:
                turn.play.add_turn(raw, extract_partner_utterance(raw), None, generation.num_tokens)
        for turn, raw in zip(by_partner, replies, strict=True):
            turn.play.add_turn(raw, extract_partner_utterance(raw), None, None)

        for turn in (*by_model, *by_partner):
            if is_leaving(turn.play.dialog[-1]):
                turn.play.end_reason = "left"
            elif turn.play.turn >= self.max_turns:
                turn.play.end_reason = "max_turns"

    def _thinking_tokens(self, raw: str, mode: int | None) -> int | None:
        if mode is None or self.count_text is None:
            return None
        return 0 if mode == 1 else self.count_text(raw[: raw.index(END_THINKING) + len(END_THINKING)])

    async def _ask_policy(self, turns: list[_Turn]) -> Sequence[Generation]:
        if not turns:
            return []
        generations = await self.policy([turn.messages for turn in turns])
        if len(generations) != len(turns):
            raise RuntimeError(f"the policy returned {len(generations)} outputs for {len(turns)} prompts")
        return generations

    async def _ask_partner(self, turns: list[_Turn]) -> Sequence[str]:
        if not turns:
            return []
        assert self.partner is not None  # only self-play has no partner, and then every turn is the model's
        replies = await self.partner([turn.messages for turn in turns])
        if len(replies) != len(turns):
            raise RuntimeError(f"the partner returned {len(replies)} replies for {len(turns)} prompts")
        return replies

    async def _complete(self, play: _Play, dataset: SotopiaDataset, out_path: Path) -> EpisodeRecord:
        """Build the record of a finished episode, let the evaluator score it, and append it to the file."""
        assert play.end_reason is not None
        env, agent1, agent2 = play.env, play.agent1, play.agent2
        record = EpisodeRecord(
            env_id=play.episode_id,
            actor_role=play.actor_role,
            run_mode=self.run_mode,
            hard=dataset.is_hard(play.episode_id),
            codename=env.codename,
            complete_intro=complete_intro(env, agent1, agent2, self.prompts),
            agent1_name=agent1.name,
            agent2_name=agent2.name,
            agent1_goal=remove_tags(env.agent_goals[0]),
            agent2_goal=remove_tags(env.agent_goals[1]),
            agent1_intro=render_background(env, agent1, agent2, 1, self.hide_private_info, self.prompts),
            agent2_intro=render_background(env, agent1, agent2, 2, self.hide_private_info, self.prompts),
            dialog=play.dialog,
            fullout=play.fullout,
            utterances=play.utterances,
            modes=play.modes,
            response_tokens=play.response_tokens,
            thinking_tokens=play.thinking_tokens,
            end_reason=play.end_reason,
            max_turns=self.max_turns,
            hide_private_info=self.hide_private_info,
            thinking=self.thinking,
        )
        if self.evaluate is not None:
            record = await self.evaluate(record)
            if not isinstance(record, EpisodeRecord):
                raise TypeError(f"the evaluate hook must return an EpisodeRecord, got {type(record).__name__}")
        _append_line(out_path, record.model_dump_json())
        return record


def select_episodes(
    dataset: SotopiaDataset, *, episodes: Sequence[int] | None = None, hard_only: bool = False, max_episodes: int | None = None
) -> list[int]:
    """Episode ids to play: the given ones (checked), else all or the hard subset in id order; at most
    `max_episodes` of them (the first ones)."""
    if episodes is not None:
        for episode_id in episodes:
            if not 0 <= episode_id < len(dataset):
                raise ValueError(f"episode id {episode_id} is out of range: the scenarios hold {len(dataset)} episodes")
        chosen = list(episodes)
    else:
        chosen = dataset.episodes(hard_only=hard_only)
    return chosen[:max_episodes] if max_episodes is not None else chosen
