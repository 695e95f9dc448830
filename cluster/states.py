"""The RL-states stage (`ampo build-states`; docs/protocol.md, RL states).

Self-play episodes are played from the scenarios with the policy (evaluation temperature), `rollouts_per_episode`
times each. Every prefix of a played episode, from the empty dialogue (turn 0) up to the last turn the policy spoke,
becomes one state; its prior scores are the goal judge's scores of that prefix, asked with the reward judge's own
prompt over the dialogue *without* a new utterance (the finished lines only; for turn 0 the history is empty).
Judging overlaps with play (the runner's evaluate hook scores an episode as soon as it ends). Work is kept next to
the output, in `<out>.parts/`: one results file per rollout (the runner resumes it) and `goal_scores.jsonl`, a cache
of judged prefixes keyed by a digest of the judge prompt, appended durably; a re-run replays nothing that was played
and asks nothing that was answered, and asks again the prefixes that failed. A prefix whose judge question still
fails is skipped and counted by failure kind, never given an invented score. Given a seed the engine samples
deterministically, and episodes are played in episode-id order, so a fresh run reproduces its states; a resumed run
continues with a freshly seeded engine, so its new episodes differ from what an uninterrupted run would have sampled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.sotopia import SotopiaDataset
from actors.states import RLState, StateScores, chat_token_counter, make_state, write_states
from cluster.stages import scenarios_path
from cluster.config import Config
from cluster.endpoints import Endpoint, policy_engines
from cluster.episodes import EpisodeRecord, EpisodeRunner, Evaluator, Policy, select_episodes
from cluster.workfiles import append_json_line, digest, progress_bar, read_json_lines
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.judge import JudgeClient, JudgeResult
from reward.prompts import goal_prompt


log = logging.getLogger(__name__)


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
            row["key"]: (float(row["agent1"]), float(row["agent2"])) for row in read_json_lines(cache_path)
        }
        self.from_cache_keys = set(self.scores)
        self.failures: dict[str, str] = {}
        self.judged_now = 0
        self._asking: dict[str, asyncio.Task[tuple[float, float] | None]] = {}

    async def score(self, state: RLState) -> tuple[float, float] | None:
        """The prefix's scores: cached, or asked once (identical prefixes, e.g. every rollout's turn 0 of an
        episode, share one question); None when the judge failed in this run."""
        prompt = prefix_goal_prompt(state, self.prompts)
        key = digest(prompt)
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
        append_json_line(
            self.cache_path,
            {"key": key, "env_id": state.env_id, "rollout": state.rollout, "turn": state.turn,
             "agent1": scores[0], "agent2": scores[1]},
        )
        return scores

    def failure_of(self, state: RLState) -> str | None:
        return self.failures.get(digest(prefix_goal_prompt(state, self.prompts)))


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
    dataset = SotopiaDataset.load(scenarios_path(config))
    prompts = config.prompts.load()
    episode_ids = select_episodes(dataset, episodes=episodes, max_episodes=max_episodes)
    total = len(episode_ids) * rollouts_per_episode
    log.info("building RL states from %d episode(s) x %d rollout(s); work files in %s", len(episode_ids),
             rollouts_per_episode, parts)
    async with JudgeClient(config.reward.judge, base_url=judge.base_url, model=judge.model) as client:
        scorer = _PrefixScorer(client, parts / "goal_scores.jsonl", prompts)
        bar = progress_bar(total, "episodes played", progress)

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
        if digest(prefix_goal_prompt(state, prompts)) in scorer.from_cache_keys:
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
    from cluster.sources import resolve_model

    model_path = resolve_model(policy_path if policy_path is not None else config.rollout.model)

    async def main() -> StatesReport:
        async with policy_engines(config, model_path, seed=seed) as policy:
            return await build_states_async(
                config, judge=judge, out_path=out_path, policy=policy, count_tokens=chat_token_counter(model_path),
                episodes=episodes, max_episodes=max_episodes, rollouts_per_episode=rollouts_per_episode,
                progress=progress,
            )

    return asyncio.run(main())
