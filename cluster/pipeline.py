"""The data and evaluation pipeline behind `ampo data check`, `build-states`, `make-demos`, `bc`, `eval` and
`report`, usable from Python (local mode calls these functions in sequence).

**Endpoints.** Every LLM outside the policy (goal judge, demonstration expert, episode evaluator, partner) is an
OpenAI-compatible endpoint. A config section whose `base_url` is `local` gets a vLLM OpenAI server started on
127.0.0.1 for a model folder (the configured rollout model, i.e. the embedded model by default):
:func:`open_endpoint` returns an :class:`Endpoint` that owns the server and stops it on `close`. Sections that
name a URL are used as they are.

**Policy.** :class:`RolloutPolicy` implements `cluster.episodes.Policy` on rollout actors: Ray handles (what the
training driver holds) or plain in-process `actors.rollout.RolloutActor` objects. One-process commands use the
latter through :func:`local_policy`: one engine, no Ray to start, and the same generation code as training (chat
template, sampling, token counts). Its AsyncLLM engine runs its core in a child process, so scripts calling it need
the `if __name__ == "__main__":` guard (the `ampo` entry point has it).

**RL states** (:func:`build_states`, docs/protocol.md, RL states). Self-play episodes are played from the scenarios with the
policy (evaluation temperature), `rollouts_per_episode` times each. Every prefix of a played episode, from the
empty dialogue (turn 0) up to the last turn the policy spoke, becomes one state; its prior scores are the goal
judge's scores of that prefix, asked with the reward judge's own prompt over the dialogue *without* a new
utterance (the finished lines only; for turn 0 the history is empty). Judging overlaps with play (the runner's
evaluate hook scores an episode as soon as it ends). Work is kept next to the output, in `<out>.parts/`: one
results file per rollout (the runner resumes it) and `goal_scores.jsonl`, a cache of judged prefixes keyed by a
digest of the judge prompt, appended durably; a re-run replays nothing that was played and asks nothing that was
answered, and asks again the prefixes that failed. A prefix whose judge question still fails is skipped and
counted by failure kind, never given an invented score. Given a seed the engine samples deterministically, and
episodes are played in episode-id order, so a fresh run reproduces its states; a resumed run continues with a
freshly seeded engine, so its new episodes differ from what an uninterrupted run would have sampled.

**Demonstrations** (:func:`make_demos`, docs/protocol.md, BC data). For each state and each requested mode the expert
is asked, through the judge client (retries, parse rounds, structured output), for a JSON object with that mode's
section texts and the final `answer`. The schema bounds every field and keeps double quotes, backslashes and
newlines out of it (a character class with a bounded repetition, in chunks of 50 because xgrammar rejects
`pattern` combined with `maxLength` and fails on repetitions of a few hundred), so even a weak local expert writes
the exact format. The response is assembled with
`reward.modes.format_response` and kept only if `parse_response` accepts it as that mode; an answer that cannot be
assembled starts another parse round, and what still fails is a rejection with its reason. Results are appended to
`<out>.partial.jsonl` as they arrive (a re-run skips what is there) and the alpaca JSON is written at the end in
state × mode order.

**Evaluation** (:func:`evaluate`, docs/protocol.md, Evaluation): `EpisodeRunner` plays self-play or vs-partner episodes
with `reward.evaluator.EpisodeEvaluator` as its evaluate hook; the results file resumes. A judge answer that cannot
be read, or holds a non-integer score, excludes the episode with the reason in `evaluation_error`.

**Report** (:func:`report`): the authors' result tables (reward.evaluator's summariser) as Markdown and text for each
results file, plus the training plots (cluster.report) of a run directory's `metrics.jsonl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import RolloutConfig
from actors.precision import resolve_dtype
from actors.records import GroupRequest, SamplingSpec
from actors.sotopia import SotopiaDataset
from actors.states import (
    RLState,
    StateScores,
    chat_token_counter,
    make_state,
    text_token_counter,
    write_states,
)
from cluster.config import ChatModelConfig, Config, ConfigError
from cluster.episodes import EpisodeRecord, EpisodeRunner, Evaluator, Generation, Message, OpenAIChatModel, Policy
from cluster.stages import bc_model_path, demos_path, existing
from learner.bc import BCDataError, BCRecord, load_bc_records
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.config import JudgeConfig
from reward.evaluator import (
    NO_THINKING,
    EpisodeEvaluator,
    ResultsSummary,
    RunMode,
    load_results,
    render_summary,
    run_mode_of,
    summarise,
    table1_markdown,
)
from reward.judge import AnswerError, JudgeClient, JudgeResult, extract_json_object
from reward.modes import MODE_NAMES, MODE_SECTIONS, MODES, format_response, parse_response
from reward.prompts import goal_prompt
from reward.server import JudgeServer

log = logging.getLogger(__name__)

LOCAL = "local"
LOCAL_SERVED_NAME = "ampo-local"
"""The model name a started local server registers when the config says `model: local`."""
MAX_LOCAL_CONTEXT = 8192
"""Longest context a started local server accepts (capped by the model's own position limit)."""


# ---- endpoints ---------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint: base URL and model name, plus the local server behind it when we started
    one. `close` stops that server (idempotent); usable as a context manager."""

    base_url: str
    model: str
    server: JudgeServer | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _position_limit(model_path: Path) -> int:
    """The model's `max_position_embeddings` (from config.json), capped at MAX_LOCAL_CONTEXT."""
    try:
        limit = int(json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 0))
    except (OSError, ValueError):
        limit = 0
    return min(limit, MAX_LOCAL_CONTEXT) if limit > 0 else MAX_LOCAL_CONTEXT


def open_endpoint(
    section: JudgeConfig,
    rollout: RolloutConfig,
    *,
    model_path: str | Path | None = None,
    what: str = "judge",
    startup_timeout_s: float = 600.0,
) -> Endpoint:
    """The endpoint of a judge-like config section (judge, expert, evaluator, partner).

    With `base_url: local` a vLLM OpenAI server is started on 127.0.0.1 serving `model_path` (default: the
    configured rollout model, i.e. the embedded model unless the config names a folder) with the rollout engine's
    dtype, KV-cache size and eager mode; the served name is the section's `model`, or `ampo-local` when that is
    `local` too. The context length is the model's own limit (at most 8192) so long judge prompts fit. Otherwise
    the section's URL and model are returned as they are; `model: local` with a remote URL is a config error.
    """
    from cluster.models import resolve_model

    if section.base_url != LOCAL:
        if section.model == LOCAL:
            raise ConfigError(f"{what}: model `local` only works with base_url `local`; name the model served at {section.base_url}")
        return Endpoint(section.base_url, section.model)
    path = Path(model_path) if model_path is not None else resolve_model(rollout.model)
    name = LOCAL_SERVED_NAME if section.model == LOCAL else section.model
    server = JudgeServer(
        path,
        served_model_name=name,
        dtype=resolve_dtype(rollout.dtype, what=f"local {what} server"),
        max_model_len=_position_limit(path),
        kv_cache_memory_bytes=rollout.kv_cache_memory_bytes,
        enforce_eager=rollout.enforce_eager,
        startup_timeout_s=startup_timeout_s,
    )
    log.info("starting a local %s server for %s (about half a minute on a CPU)", what, path)
    server.start()
    return Endpoint(server.base_url, name, server)


@contextlib.contextmanager
def judge_endpoint(
    section: JudgeConfig, config: Config, *, model_path: str | Path | None = None, what: str = "judge"
) -> Iterator[tuple[str, str]]:
    """`(base_url, model)` of a judge-like section for the duration of a `with` block: `open_endpoint` with the
    config's rollout engine settings, the started local server (if any) stopped on exit. For callers that only
    need the address, e.g. the training driver's reward pool."""
    with open_endpoint(section, config.rollout, model_path=model_path, what=what) as endpoint:
        yield endpoint.base_url, endpoint.model


# ---- policy ------------------------------------------------------------------------------------------------------


class RolloutPolicy:
    """`cluster.episodes.Policy` on rollout actors: one request with n=1 per chat, sent to the actor with the
    fewest requests outstanding. `actors` are Ray handles of `RolloutActor` or in-process `RolloutActor`s."""

    def __init__(self, actors: Sequence[Any], *, temperature: float, max_tokens: int, top_p: float = 1.0) -> None:
        if not actors:
            raise ValueError("RolloutPolicy needs at least one rollout actor")
        self.actors = list(actors)
        self.sampling = SamplingSpec(n=1, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_tokens)
        self._load = [0] * len(self.actors)
        self._requests = 0

    @classmethod
    def from_config(cls, actors: Sequence[Any], rollout: RolloutConfig) -> RolloutPolicy:
        """Evaluation sampling: `eval_temperature`, `max_response_tokens`."""
        return cls(actors, temperature=rollout.eval_temperature, max_tokens=rollout.max_response_tokens)

    async def _one(self, messages: list[Message]) -> Generation:
        index = min(range(len(self.actors)), key=self._load.__getitem__)
        self._requests += 1
        request = GroupRequest(
            group_id=f"episode-turn-{self._requests}",
            state_id="episode",
            messages=tuple(messages),
            sampling=self.sampling,
        )
        actor = self.actors[index]
        self._load[index] += 1
        try:
            remote = getattr(actor.generate, "remote", None)
            group = await (remote(request) if remote is not None else actor.generate(request))
        finally:
            self._load[index] -= 1
        sample = group.samples[0]
        return Generation(sample.text, len(sample.response_token_ids))

    async def __call__(self, batch: list[list[Message]]) -> list[Generation]:
        return list(await asyncio.gather(*(self._one(messages) for messages in batch)))


@contextlib.asynccontextmanager
async def local_policy(rollout: RolloutConfig, model_path: str | Path, *, seed: int | None = None) -> AsyncIterator[RolloutPolicy]:
    """One in-process rollout actor serving `model_path` (seeded with `seed`, default the config's), wrapped as a
    `RolloutPolicy` with evaluation sampling; the engine is shut down on exit."""
    from actors.rollout import RolloutActor

    config = rollout if seed is None else rollout.model_copy(update={"seed": seed})
    actor = RolloutActor(config, model_path)
    try:
        yield RolloutPolicy.from_config([actor], config)
    finally:
        await actor.shutdown()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _append_json_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (flushed and fsynced), so a crash loses at most the line being written."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an append-only JSONL file; a torn last line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring an unreadable line (a write cut short)", path)
    return rows


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


# ---- RL states ---------------------------------------------------------------------------------------------------


def prefix_goal_prompt(state: RLState, prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """The goal judge's prompt for a state's prefix: the reward judge's own template over the finished dialogue
    lines, with no new utterance (the state's prior scores, the s0 of the goal-progress reward). `goal_prompt`
    appends an answer to the last line; giving it an empty last line and an empty answer leaves exactly the finished
    lines (the empty history at turn 0)."""
    context = {**state.reward_context(), "dialog": [*state.dialog[:-1], ""]}
    return goal_prompt(context, "", prompts)


@dataclass
class StatesReport:
    """What `build_states` did. `failed` counts skipped prefixes by judge failure kind; `failed_prefixes` names the
    first of them as `(rollout, episode id, turn, kind)`."""

    path: Path
    episodes: int
    rollouts: int
    prefixes: int
    states: int
    judged_now: int
    from_cache: int
    failed: Counter[str] = field(default_factory=Counter)
    failed_prefixes: list[tuple[int, int, int, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"RL states: {self.states} written to {self.path}",
            f"  episodes: {self.episodes} x {self.rollouts} rollout(s), prefixes: {self.prefixes}",
            f"  judge: {self.judged_now} new questions (identical prefixes share one); "
            f"{self.from_cache} prefixes scored from earlier runs' answers",
        ]
        if self.failed:
            lines.append(f"  skipped (judge failed): {sum(self.failed.values())} {dict(self.failed)}")
            lines += [f"    rollout {r} episode {e} turn {t}: {kind}" for r, e, t, kind in self.failed_prefixes]
        return "\n".join(lines)


class _PrefixScorer:
    """Judges prefixes through a cache file keyed by the judge prompt's digest (see the module docstring)."""

    def __init__(self, client: JudgeClient, cache_path: Path, prompts: PromptSet) -> None:
        self.client = client
        self.cache_path = cache_path
        self.prompts = prompts
        self.scores: dict[str, tuple[float, float]] = {
            row["key"]: (float(row["agent1"]), float(row["agent2"])) for row in _read_json_lines(cache_path)
        }
        self.from_cache_keys = set(self.scores)
        self.failures: dict[str, str] = {}
        self.judged_now = 0
        self._asking: dict[str, asyncio.Task[tuple[float, float] | None]] = {}

    async def score(self, state: RLState) -> tuple[float, float] | None:
        """The prefix's scores: cached, or asked once (identical prefixes, e.g. every rollout's turn 0 of an
        episode, share one question); None when the judge failed in this run."""
        prompt = prefix_goal_prompt(state, self.prompts)
        key = _digest(prompt)
        if key in self.scores:
            return self.scores[key]
        if key in self.failures:
            return None
        if key not in self._asking:
            self._asking[key] = asyncio.ensure_future(self._ask(state, prompt, key))
        return await self._asking[key]

    async def _ask(self, state: RLState, prompt: str, key: str) -> tuple[float, float] | None:
        result: JudgeResult[Any] = await self.client.goal_scores(prompt)
        if not result.ok or result.value is None:
            self.failures[key] = str(result.failure)
            log.debug("goal judge failed on episode %d turn %d: %s", state.env_id, state.turn, result.detail)
            return None
        self.failures.pop(key, None)
        scores = (result.value.agent1, result.value.agent2)
        self.scores[key] = scores
        self.judged_now += 1
        _append_json_line(
            self.cache_path,
            {"key": key, "env_id": state.env_id, "rollout": state.rollout, "turn": state.turn,
             "agent1": scores[0], "agent2": scores[1]},
        )
        return scores

    def failure_of(self, state: RLState) -> str | None:
        return self.failures.get(_digest(prefix_goal_prompt(state, self.prompts)))


def _prefix_states(dataset: SotopiaDataset, record: EpisodeRecord, rollout: int, prompts: PromptSet) -> list[RLState]:
    """The states of a played episode, turn 0 up to its last utterance, with placeholder priors (0, 0)."""
    return [
        make_state(dataset, record.env_id, record.utterances[:turn], (0.0, 0.0), rollout=rollout,
                   hide_private_info=record.hide_private_info, prompts=prompts)
        for turn in range(len(record.utterances))
    ]


async def build_states_async(
    config: Config,
    *,
    judge: Endpoint,
    out_path: str | Path,
    policy: Policy,
    count_tokens: Any = None,
    episodes: Sequence[int] | None = None,
    max_episodes: int | None = None,
    rollouts_per_episode: int = 1,
    progress: bool = True,
) -> StatesReport:
    """`build_states` with a policy the caller serves (e.g. the driver's rollout actors)."""
    if rollouts_per_episode < 1:
        raise ValueError(f"rollouts_per_episode must be >= 1, got {rollouts_per_episode}")
    out_path = Path(out_path)
    parts = out_path.parent / f"{out_path.name}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    dataset = SotopiaDataset.load(config.data.scenarios)
    prompts = config.prompts.load()
    episode_ids = select_episodes(dataset, episodes=episodes, max_episodes=max_episodes)
    total = len(episode_ids) * rollouts_per_episode
    log.info("building RL states from %d episode(s) x %d rollout(s); work files in %s", len(episode_ids),
             rollouts_per_episode, parts)
    async with JudgeClient(config.reward.judge, base_url=judge.base_url, model=judge.model) as client:
        scorer = _PrefixScorer(client, parts / "goal_scores.jsonl", prompts)
        bar = _progress(total, "episodes played", progress)

        def hook_for(rollout: int) -> Evaluator:
            async def judge_prefixes(record: EpisodeRecord) -> EpisodeRecord:
                states = _prefix_states(dataset, record, rollout, prompts)
                await asyncio.gather(*(scorer.score(state) for state in states))
                bar.update(1)
                return record

            return judge_prefixes

        async def play(rollout: int) -> list[EpisodeRecord]:
            runner = EpisodeRunner(
                policy,
                max_turns=config.eval.max_turns,
                count_tokens=count_tokens,
                max_prompt_tokens=config.rollout.max_prompt_tokens,
                hide_private_info=config.data.hide_private_info,
                evaluate=hook_for(rollout),
                prompts=prompts,
            )
            return await runner.run(dataset, episode_ids, parts / f"rollout_{rollout}.jsonl")

        try:
            played = await asyncio.gather(*(play(r) for r in range(rollouts_per_episode)))
        finally:
            bar.close()
        # Prefixes of episodes an earlier run finished, whose judging was cut short, are judged here; a prefix that
        # failed in this run is not asked again until the next run.
        all_states = [(state, rollout) for rollout, records in enumerate(played) for record in records
                      for state in _prefix_states(dataset, record, rollout, prompts)]
        scores = await asyncio.gather(*(scorer.score(state) for state, _ in all_states))
    report = StatesReport(out_path, len(episode_ids), rollouts_per_episode, len(all_states), 0,
                          scorer.judged_now, 0)
    kept: list[RLState] = []
    for (state, rollout), prior in zip(all_states, scores):
        if prior is None:
            kind = scorer.failure_of(state) or "unknown"
            report.failed[kind] += 1
            if len(report.failed_prefixes) < 10:
                report.failed_prefixes.append((rollout, state.env_id, state.turn, kind))
            continue
        if _digest(prefix_goal_prompt(state, prompts)) in scorer.from_cache_keys:
            report.from_cache += 1
        kept.append(state.model_copy(update={"prior": StateScores(agent1=prior[0], agent2=prior[1])}))
    if not kept:
        raise RuntimeError(f"no RL state could be built: every judge question failed {dict(report.failed)}")
    write_states(kept, out_path, prompts.system.render())
    report.states = len(kept)
    log.info("%s", report.describe())
    return report


def build_states(
    config: Config,
    *,
    judge: Endpoint,
    out_path: str | Path,
    policy_path: str | Path | None = None,
    episodes: Sequence[int] | None = None,
    max_episodes: int | None = None,
    rollouts_per_episode: int = 1,
    seed: int | None = None,
    progress: bool = True,
) -> StatesReport:
    """Play self-play episodes with the policy at `policy_path` (default: the configured rollout model) on an
    in-process engine seeded with `seed` (default `rollout.seed`), judge every prefix and write the RL states as
    the authors' training Parquet at `out_path` (see the module docstring). Episodes: the given ids, else all
    scenarios' episodes, at most `max_episodes` of them; `eval.max_turns` utterances at most, prompts within `rollout.max_prompt_tokens`."""
    from cluster.models import resolve_model

    model_path = Path(policy_path) if policy_path is not None else resolve_model(config.rollout.model)

    async def main() -> StatesReport:
        async with local_policy(config.rollout, model_path, seed=seed) as policy:
            return await build_states_async(
                config, judge=judge, out_path=out_path, policy=policy, count_tokens=chat_token_counter(model_path),
                episodes=episodes, max_episodes=max_episodes, rollouts_per_episode=rollouts_per_episode,
                progress=progress,
            )

    return asyncio.run(main())


# ---- demonstrations ----------------------------------------------------------------------------------------------

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
    prompts: PromptSet = DEFAULT_PROMPTS,
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
    done = {row["key"]: row for row in _read_json_lines(partial)}
    # Keyed by the whole question, so that an answer to another template's question is never reused.
    jobs = [(state, mode, _digest(demo_prompt(state, mode, prompts))) for state in states for mode in modes]
    system = prompts.system.render()
    report = DemoReport(out_path, len(states), len(jobs))
    todo = [job for job in jobs if job[2] not in done]
    report.from_earlier_run = len(jobs) - len(todo)
    log.info("asking the expert %s for %d demonstrations (%d states x modes %s; %d already answered)",
             expert.model, len(todo), len(states), list(modes), report.from_earlier_run)
    bar = _progress(len(todo), "demonstrations", progress)

    async with JudgeClient(expert_config, base_url=expert.base_url, model=expert.model) as client:

        async def ask(state: RLState, mode: int, key: str) -> None:
            schema = demo_schema(mode, section_max_chars=section_max_chars, answer_max_chars=answer_max_chars)
            result = await client.ask(demo_prompt(state, mode, prompts), lambda text: assemble_demo(text, mode), schema=schema)
            row = {"key": key, "state_id": state.state_id, "mode": mode, "output": result.value,
                   "reason": None if result.ok else _rejection_reason(result), "raw": result.text}
            _append_json_line(partial, row)
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
    prompts: PromptSet = DEFAULT_PROMPTS,
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
    dataset: SotopiaDataset, episode_ids: Iterable[int], *, hide_private_info: bool = False, prompts: PromptSet = DEFAULT_PROMPTS
) -> list[RLState]:
    """Turn-0 states (empty dialogue, priors 0) of the given episodes: demonstration prompts when no RL states
    exist yet. States from `build_states` cover later turns as well."""
    return [make_state(dataset, e, [], (0.0, 0.0), hide_private_info=hide_private_info, prompts=prompts) for e in episode_ids]


# ---- behaviour-cloning records -----------------------------------------------------------------------------------


# The records are checked by learner.bc (the role that trains on them); this name stays for the callers that catch it.
BCRecordError = BCDataError


def read_bc_records(path: str | Path, *, check_format: bool = True) -> list[BCRecord]:
    """Read alpaca BC records (JSON list or JSON lines). `check_format` also requires every output to pass the
    mode format checker, which demonstrations for AMPO's BC phase must. Raises `BCRecordError` listing every bad
    row, naming the file, the row and the field."""
    return load_bc_records(Path(path), check_format=check_format)


def load_hub_bc_records(dataset: str, filename: str, revision: str | None = None) -> list[BCRecord]:
    """Download one BC file of a Hugging Face dataset (e.g. the authors' `iiiiwis/AMPO`) and read it. Needs the
    Hub; offline machines give a local file to `read_bc_records`."""
    from huggingface_hub import hf_hub_download

    return read_bc_records(hf_hub_download(repo_id=dataset, filename=filename, repo_type="dataset", revision=revision))


def fetch_hub_file(spec: str) -> Path:
    """`hf://<owner>/<dataset>/<path in the repo>` → the downloaded local file (needs the Hub)."""
    from huggingface_hub import hf_hub_download

    parts = spec.removeprefix("hf://").split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{spec!r}: expected hf://<owner>/<dataset>/<file path>")
    return Path(hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2], repo_type="dataset"))


# ---- behaviour cloning -------------------------------------------------------------------------------------------


def run_bc_command(
    config: Config,
    *,
    data: str | Path | None = None,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """Behaviour-clone the configured rollout model (or `model_path`) on `data` (default `data.bc_data`) with the
    `bc` and `learner` settings and write the HF folder to `out_dir` (default `bc.output`, else
    `<run_dir>/bc_model`). Records are checked first (file, row, field); Ray is started or joined as
    `cluster.address` says and shut down again when this call started it."""
    import ray

    from cluster.models import resolve_model
    from cluster.ray_cluster import MACHINE_CORES, bc_rank_options, connect, learner_core_sets
    from learner.bc import run_bc

    source = data if data is not None else existing(demos_path(config), "demonstrations", "make-demos", "data.bc_data")
    records = [record.model_dump() for record in read_bc_records(source)]
    model = Path(model_path) if model_path is not None else resolve_model(config.rollout.model)
    out = Path(out_dir) if out_dir is not None else bc_model_path(config)
    started_ray = not ray.is_initialized()
    connect(config)
    try:
        # BC runs alone: with learner pinning on, its ranks get every core back (this process was pinned off some).
        cores = None if learner_core_sets(config) is None else [MACHINE_CORES] * config.learner.num_ranks
        return run_bc(
            config.bc, records, model, out, learner=config.learner, seed=config.cluster.seed,
            ray_options=bc_rank_options(config), cpu_cores=cores,
        )
    finally:
        if started_ray:
            ray.shutdown()


# ---- evaluation --------------------------------------------------------------------------------------------------


def _integer_scores(scores: Mapping[str, tuple[str, float]] | None) -> dict[str, tuple[str, int]] | None:
    """Scores as the record stores them (integers, as the rubric asks); None when one is not a whole number."""
    if scores is None:
        return None
    out = {}
    for name, (reason, value) in scores.items():
        if value != int(value):
            return None
        out[name] = (reason, int(value))
    return out


def evaluation_hook(evaluator: EpisodeEvaluator, on_done: Any = None) -> Evaluator:
    """The runner's evaluate hook: judge a finished episode on the 7 dimensions and store both agents' scores,
    or the exclusion reason in `evaluation_error` (never a made-up score). `on_done()` is called after each."""

    async def evaluate_record(record: EpisodeRecord) -> EpisodeRecord:
        result = await evaluator.evaluate(record.model_dump())
        agent1, agent2 = _integer_scores(result.agent1), _integer_scores(result.agent2)
        error = result.reason if result.excluded else None
        if not result.excluded and (agent1 is None or agent2 is None):
            error = "non_integer_score"
        update: dict[str, Any] = {"evaluation_error": error, "reformatted": result.reformatted}
        if error is None:
            update |= {"agent1_scores": agent1, "agent2_scores": agent2}
        if on_done is not None:
            on_done()
        return record.model_copy(update=update)

    return evaluate_record


def summary_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """A results record as the summariser reads it. For our episode records: only the evaluated model's turns
    count in the mode usage (a partner's turns have no mode; a policy evaluated without thinking modes counts as
    "no thinking"), `tokens` and `thinking_tokens` are their counts, and the exclusion reason is `evaluation_error`. Other records (e.g. the authors' results) pass unchanged."""
    if "run_mode" not in record or "modes" not in record:
        return dict(record)
    view = dict(record)
    model_agent = 0 if record.get("actor_role") == "agent1" else 1
    turns = [t for t in range(len(record["modes"])) if record["run_mode"] == "self_play" or t % 2 == model_agent]
    thinking = record.get("thinking", True)
    view["modes"] = [record["modes"][t] if thinking else NO_THINKING for t in turns]
    tokens = [record.get("response_tokens", [None] * len(record["modes"]))[t] for t in turns]
    if all(n is not None for n in tokens):
        view["tokens"] = tokens
    thought = record.get("thinking_tokens") or [None] * len(record["modes"])
    view["thinking_tokens"] = [thought[t] for t in turns]
    if record.get("evaluation_error"):
        view["exclusion_reason"] = record["evaluation_error"]
    return view


def summarise_results(records: Iterable[Mapping[str, Any]]) -> ResultsSummary:
    """The summary of results records (hard = the record's own `hard` flag, set from real episode ids)."""
    return summarise([summary_view(record) for record in records])


def eval_metrics(summary: ResultsSummary, *, hard_only: bool = False) -> dict[str, float]:
    """Flat numbers for metrics.jsonl and plots: `eval/goal_actor`, `eval/goal_opponent`, `eval/goal_avg`, the same
    for `overall`, and `eval/hard_*` when hard episodes were evaluated; plus episode counts. A hard-only
    evaluation reports only the `eval/hard_*` figures, so a curve never mixes the two subsets."""
    metrics: dict[str, float] = {"eval/episodes": float(summary.all.episodes), "eval/excluded": float(summary.excluded)}
    for prefix, subset in (("", summary.all), ("hard_", summary.hard)):
        if subset.episodes == 0 or (hard_only and not prefix):
            continue
        for side, stats in (("actor", subset.actor), ("opponent", subset.opponent), ("avg", subset.average)):
            metrics[f"eval/{prefix}goal_{side}"] = stats["goal"].mean
            metrics[f"eval/{prefix}overall_{side}"] = stats["overall"].mean
    return metrics


@dataclass
class EvalReport:
    """An evaluation's results file, its summary and the rendered tables."""

    path: Path
    summary: ResultsSummary
    markdown: str
    text: str
    hard_only: bool = False

    def metrics(self) -> dict[str, float]:
        return eval_metrics(self.summary, hard_only=self.hard_only)


def _chat_model_from(section: ChatModelConfig, endpoint: Endpoint) -> OpenAIChatModel:
    return OpenAIChatModel(
        base_url=endpoint.base_url,
        model=endpoint.model,
        api_key_env=section.api_key_env,
        api_key_file=section.api_key_file,
        temperature=section.temperature,
        top_p=section.top_p,
        max_tokens=section.max_tokens,
        max_concurrency=section.max_concurrency,
        timeout_s=section.timeout_s,
        max_retries=section.max_retries,
    )


async def evaluate_async(
    config: Config,
    *,
    policy: Policy,
    judge: Endpoint,
    out_path: str | Path,
    partner: Endpoint | None = None,
    count_tokens: Any = None,
    count_text: Any = None,
    hard_only: bool = False,
    max_episodes: int | None = None,
    episodes: Sequence[int] | None = None,
    progress: bool = True,
) -> EvalReport:
    """`evaluate` with a policy the caller serves (e.g. the training driver's rollout actors). `count_tokens` (chat
    length) enables the prompt-length cut-off, `count_text` (text length) the thinking-token counts."""
    out_path = Path(out_path)
    dataset = SotopiaDataset.load(config.data.scenarios)
    episode_ids = select_episodes(dataset, episodes=episodes, hard_only=hard_only, max_episodes=max_episodes)
    if not episode_ids:
        raise ValueError("no episode to evaluate (the hard subset of these scenarios is empty?)")
    roles = 1 if partner is None else 2
    prompts = config.prompts.load()
    bar = _progress(len(episode_ids) * roles, "episodes evaluated", progress)
    # The partner's client limits come from `eval.partner` (or the evaluator's section when it is only a URL given).
    # A partner endpoint given without a partner section (tests, `--partner-url`) takes the evaluator's limits and
    # the paper's sampling defaults.
    section = config.eval.partner or ChatModelConfig.model_validate(config.eval.judge.model_dump())
    partner_client = _chat_model_from(section, partner) if partner is not None else None
    try:
        async with JudgeClient(config.eval.judge, base_url=judge.base_url, model=judge.model) as client:
            runner = EpisodeRunner(
                policy,
                partner=partner_client,
                max_turns=config.eval.max_turns,
                count_tokens=count_tokens,
                max_prompt_tokens=config.rollout.max_prompt_tokens,
                hide_private_info=config.data.hide_private_info,
                evaluate=evaluation_hook(EpisodeEvaluator(client, prompts), lambda: bar.update(1)),
                prompts=prompts,
                thinking=config.eval.thinking,
                count_text=count_text,
            )
            records = await runner.run(dataset, episode_ids, out_path)
    finally:
        bar.close()
        if partner_client is not None:
            await partner_client.close()
    summary = summarise_results(record.model_dump() for record in records)
    report = EvalReport(out_path, summary, render_summary(summary, "markdown"), render_summary(summary, "text"), hard_only)
    out_path.with_name(out_path.stem + ".summary.md").write_text(report.markdown)
    return report


def evaluate(
    config: Config,
    *,
    judge: Endpoint,
    out_path: str | Path,
    policy_path: str | Path | None = None,
    policy: Endpoint | None = None,
    partner: Endpoint | None = None,
    hard_only: bool = False,
    max_episodes: int | None = None,
    episodes: Sequence[int] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Sotopia evaluation: self-play, or against `partner` (each episode played with the model as agent 1 and as
    agent 2), `eval.max_turns` utterances, every finished episode judged on the 7 dimensions by `judge` with the
    `eval.judge` limits. The policy is `policy`, a model behind an OpenAI-compatible API with the `eval.policy`
    settings, or else the checkpoint at `policy_path` (default: the configured rollout model) on an in-process
    engine. Resumes `out_path`; writes `<out>.summary.md` next to it."""
    from cluster.models import resolve_model

    if policy is not None:
        section = config.eval.policy or ChatModelConfig.model_validate(config.eval.judge.model_dump())

        async def api() -> EvalReport:
            client = _chat_model_from(section, policy)
            try:
                return await evaluate_async(
                    config, policy=client.generate, judge=judge, out_path=out_path, partner=partner, hard_only=hard_only,
                    max_episodes=max_episodes, episodes=episodes, progress=progress,
                )
            finally:
                await client.close()

        return asyncio.run(api())

    model_path = Path(policy_path) if policy_path is not None else resolve_model(config.rollout.model)

    async def main() -> EvalReport:
        async with local_policy(config.rollout, model_path) as engine:
            return await evaluate_async(
                config, policy=engine, judge=judge, out_path=out_path, partner=partner,
                count_tokens=chat_token_counter(model_path), count_text=text_token_counter(model_path),
                hard_only=hard_only, max_episodes=max_episodes, episodes=episodes, progress=progress,
            )

    return asyncio.run(main())


def driver_evaluation(
    config: Config, *, judge: Endpoint, out_dir: str | Path, tokenizer_path: str | Path | None = None
) -> Any:
    """The training driver's `evaluate(driver, step)` hook: a self-play evaluation through the driver's own rollout
    actors, on the authors' validation schedule (all episodes at step 0, at multiples of `eval.full_every_steps` and at
    the last step; the hard subset otherwise when `eval.hard_only`), results in `<out_dir>/step_<step>.jsonl`.
    Returns the `eval/*` metrics the driver appends to metrics.jsonl. Training goes on meanwhile, so a late
    episode may be played by a newer policy version than its first turns. `tokenizer_path` (the policy's folder)
    enables the thinking-token counts."""
    out_dir = Path(out_dir)
    count_text = text_token_counter(tokenizer_path) if tokenizer_path is not None else None

    async def run(driver: Any, step: int) -> dict[str, float]:
        full_every = config.eval.full_every_steps
        full = step == 0 or step >= config.algorithm.total_steps or bool(full_every and step % full_every == 0)
        hard_only = config.eval.hard_only and not full
        policy = RolloutPolicy.from_config(driver.rollout_actors, config.rollout)
        result = await evaluate_async(
            config, policy=policy, judge=judge, out_path=out_dir / f"step_{step:06d}.jsonl", hard_only=hard_only,
            max_episodes=config.eval.max_episodes, progress=False, count_text=count_text,
        )
        log.info("evaluation at step %d (%s): %s", step, "hard subset" if hard_only else "all episodes", _headline(result.summary))
        return result.metrics()

    return run


# ---- report ------------------------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    """Files `report` wrote and the summary of each results file."""

    out_dir: Path
    markdown: Path
    text: Path
    plots: list[Path]
    summaries: dict[str, ResultsSummary]


def _headline(summary: ResultsSummary) -> str:
    """The paper's two numbers (GOAL, overall) per subset and side, in one line."""
    parts = []
    for name, subset in (("all", summary.all), ("hard", summary.hard)):
        if subset.episodes:
            parts.append(
                f"{name}: GOAL actor {subset.actor['goal'].mean:.2f} / avg {subset.average['goal'].mean:.2f}, "
                f"overall actor {subset.actor['overall'].mean:.2f} / avg {subset.average['overall'].mean:.2f}"
            )
    return "; ".join(parts) or "no evaluated episode"


SOTOPIA_EPISODES, SOTOPIA_HARD = 450, 70


def _coverage(records: Sequence[Mapping[str, Any]]) -> str:
    """Which share of the Sotopia benchmark a results file covers, so that a partial one is never read as Table 1."""
    episodes = {r.get("env_id") for r in records}
    hard = {r.get("env_id") for r in records if r.get("hard")}
    if len(episodes) == SOTOPIA_EPISODES and len(hard) == SOTOPIA_HARD:
        return f"Episodes: the full Sotopia benchmark ({SOTOPIA_EPISODES} episodes, {SOTOPIA_HARD} hard)."
    return (f"Episodes: {len(episodes)} ({len(hard)} hard), not the full Sotopia benchmark of {SOTOPIA_EPISODES} "
            f"({SOTOPIA_HARD} hard): these figures are not comparable with the paper's Table 1.")


def report(
    results: Sequence[str | Path] = (),
    *,
    run_dir: str | Path | None = None,
    out_dir: str | Path,
) -> ReportResult:
    """Write `report.md` and `report.txt` to `out_dir`: for each results file (our JSONL or the authors' JSON list)
    the result tables (actor / opponent / average per dimension and overall, all and hard, plus mode usage);
    and, when `run_dir` holds a `metrics.jsonl`, PNG plots of the run (reward, format errors, mode mix, tokens per
    mode, KL, entropy, evaluation GOAL over steps) listed in the report."""
    from cluster.report import compare_first_last, plot_training, read_step_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, ResultsSummary] = {}
    markdown: list[str] = ["# AMPO report", ""]
    text: list[str] = ["AMPO report", ""]
    runs: list[tuple[RunMode, ResultsSummary]] = []
    for path in map(Path, results):
        records = load_results(path)
        summary = summarise_results(records)
        summaries[str(path)] = summary
        runs.append((run_mode_of(records), summary))
        coverage = _coverage(records)
        markdown += [f"## {path.name}", "", f"`{path}`", "", _headline(summary), "", coverage, "", render_summary(summary, "markdown")]
        text += [f"== {path} ==", _headline(summary), coverage, "", render_summary(summary, "text")]
    if runs:
        layout = table1_markdown(runs)
        note = ("The paper's Table 1 layout over these results files (several files of one protocol: mean ± std "
                "between them; self-play reads the two agents' average, vs partner the model's side).")
        markdown += ["## Table 1 layout", "", note, "", layout, ""]
        text += ["== Table 1 layout ==", note, layout, ""]
    plots: list[Path] = []
    metrics_file = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if metrics_file is not None and metrics_file.is_file():
        plots = plot_training(read_step_metrics(metrics_file), out)
        markdown += ["## Training run", "", f"`{metrics_file}`", ""]
        text += [f"== training run {metrics_file} =="]
        learning = compare_first_last(Path(run_dir) / "rollouts")
        if learning is not None:
            markdown += ["### Did the policy improve?", "", learning.markdown(), ""]
            text += [learning.markdown(), ""]
        markdown += [f"![{p.stem}]({p.name})" for p in plots] + [""]
        text += [*(f"plot: {p}" for p in plots), ""]
    if not summaries and not plots:
        raise ValueError("nothing to report: give results files, or a run directory with metrics.jsonl")
    md_path, text_path = out / "report.md", out / "report.txt"
    md_path.write_text("\n".join(markdown))
    text_path.write_text("\n".join(text))
    return ReportResult(out, md_path, text_path, plots, summaries)
