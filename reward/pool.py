"""The reward service: score whole groups of sampled responses with the format check and the LLM judge.

Per sample (docs/protocol.md, Rewards), in :meth:`RewardScorer.score`:

1. format check (``reward.modes.parse_response``); a broken format earns ``reward.format_error_reward`` (-2) and the
   judge is not asked;
2. the answer (quoted utterance) and its length ``answer_tokens = len(policy_tokenizer.tokenize(answer))``;
3. the actor side from the turn's parity (even: agent1) and its prior goal score ``s0`` from the RL state's
   ``state_reward``;
4. the judge's goal score ``s1`` of the actor after the utterance is appended to the dialogue;
5. ``reward = goal_progress_score(s0, s1) * answer_length_score(answer_tokens)`` (``reward.scores``).

A judge that still fails after all retries leaves the sample with ``reward=None`` and the failure kind as its
reason (``judge_failure_as_zero`` reproduces the reference's 0 instead); a malformed RL state gives the reason
``bad_state``. ``custom_reward`` replaces steps 4-5 (``reward.custom``). A group always comes back whole, in
sample order. Identical answers within one group share one judge question: the judge is asked at temperature 0,
so asking twice would buy nothing but cost.

The pool (:class:`RewardPool`) runs ``num_actors`` async Ray actors; ``score(group)`` returns at once with two
``ObjectRef``s (awaitable in asyncio, usable with ``ray.get``/``ray.wait``): the scored group's summary, which the
driver reads, and the scored group itself, which stays in the object store for the learner. The driver keeps as many
groups in flight as it likes, and each actor keeps up to ``judge.max_concurrency`` judge calls in flight. Groups go
to the actor with the fewest samples outstanding.

Metrics: ``reward/metrics.py``. ``stats()`` returns the same counts as plain numbers; they are updated at the same
points as the metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import Counter, deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import ray

from actors.records import Group, GroupSummary, Sample, ScoredGroup, ScoredSample, summarise
from prompts import DEFAULT_PROMPTS, PromptSet
from reward.config import RewardConfig
from reward.custom import CustomReward, CustomRewardContext, load_custom_reward
from reward.answers import GoalScores
from reward.judge import JudgeClient, JudgeResult, JudgeStats
from reward.metrics import FORMAT_ERROR_MODE, FORMAT_WINDOW, RayRewardMetrics, RewardMetricsSink
from reward.modes import ParsedResponse, parse_response
from reward.prompts import actor_of_turn, goal_prompt
from reward.scores import JUDGE_SCORE_MAX, JUDGE_SCORE_MIN, answer_length_score, combine_reward

log = logging.getLogger(__name__)



_Questions = dict[str, "asyncio.Task[JudgeResult[GoalScores]]"]
"""The judge questions of one group, by prompt (identical answers share one)."""


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[Any]: ...


@dataclass
class RewardStats:
    """Plain counts of a scorer (or, merged, of a pool): groups, samples by mode tag, invalid samples by reason,
    and the judge client's counters."""

    groups: int = 0
    samples: int = 0
    by_mode: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    judge: JudgeStats = field(default_factory=JudgeStats)

    @property
    def format_errors(self) -> int:
        return self.by_mode[FORMAT_ERROR_MODE]

    def merge(self, other: RewardStats) -> RewardStats:
        return RewardStats(
            groups=self.groups + other.groups,
            samples=self.samples + other.samples,
            by_mode=self.by_mode + other.by_mode,
            invalid=self.invalid + other.invalid,
            judge=self.judge.merge(other.judge),
        )


@dataclass(frozen=True)
class _State:
    """The parts of the RL state the reward needs: the actor side and its prior goal score."""

    actor: str
    before: float


def _read_state(context: Mapping[str, Any]) -> _State:
    """Actor side (turn parity) and prior score ``state_reward[actor].score`` in [0, 10]; ValueError otherwise."""
    try:
        actor = actor_of_turn(int(context["turn"]))
        before = float(context["state_reward"][actor]["score"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the RL state lacks a usable turn or state_reward: {exc!r}") from None
    if not JUDGE_SCORE_MIN <= before <= JUDGE_SCORE_MAX:
        raise ValueError(f"the RL state's prior score {before!r} is outside [0, 10]")
    return _State(actor=actor, before=before)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The policy tokenizer from a HF model folder (or hub name)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class RewardScorer:
    """Scores groups in the current event loop; the body of a reward actor, usable without Ray in tests.

    ``tokenizer`` is the policy tokenizer or a path to its model folder. ``base_url``/``model`` override the judge
    config (e.g. a started local server). ``metrics`` receives every event (None: counts only). ``prompts`` holds the
    goal judge's template (the run's ``prompts`` section).
    """

    def __init__(
        self,
        config: RewardConfig,
        tokenizer: str | Path | Tokenizer,
        *,
        base_url: str | None = None,
        model: str | None = None,
        metrics: RewardMetricsSink | None = None,
        prompts: PromptSet = DEFAULT_PROMPTS,
    ) -> None:
        self.config = config
        self._prompts = prompts
        self._tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self._metrics = metrics
        self._custom: CustomReward | None = load_custom_reward(config.custom_reward) if config.custom_reward else None
        self._judge: JudgeClient | None = None
        if self._custom is None:
            self._judge = JudgeClient(config.judge, base_url=base_url, model=model, observer=metrics)
        self._stats = RewardStats()
        self._recent_format: deque[bool] = deque(maxlen=FORMAT_WINDOW)

    def stats(self) -> RewardStats:
        """A snapshot of the counts."""
        s = self._stats
        judge = self._judge.stats() if self._judge is not None else JudgeStats()
        return RewardStats(
            groups=s.groups, samples=s.samples, by_mode=Counter(s.by_mode), invalid=Counter(s.invalid), judge=judge
        )

    async def aclose(self) -> None:
        if self._judge is not None:
            await self._judge.aclose()

    async def score(self, group: Group) -> ScoredGroup:
        """Score every sample of ``group`` concurrently; the result holds all of them, in order."""
        context = group.request.context
        try:
            state: _State | None = _read_state(context)
        except ValueError as exc:
            log.warning("group %s: %s", group.group_id, exc)
            state = None
        questions: _Questions = {}
        scored = await asyncio.gather(*(self._score_sample(s, context, state, questions) for s in group.samples))
        self._stats.groups += 1
        return ScoredGroup(request=group.request, samples=tuple(scored))

    def _ask_judge(self, prompt: str, questions: _Questions) -> Awaitable[JudgeResult[GoalScores]]:
        assert self._judge is not None
        if prompt not in questions:
            questions[prompt] = asyncio.ensure_future(self._judge.goal_scores(prompt))
        return questions[prompt]

    async def _score_sample(
        self,
        sample: Sample,
        context: Mapping[str, Any],
        state: _State | None,
        questions: _Questions,
    ) -> ScoredSample:
        parsed = parse_response(sample.text)
        if not parsed.valid:
            result = ScoredSample(
                sample=sample,
                mode=None,
                answer=None,
                format_valid=False,
                judge_before=state.before if state else None,
                judge_after=None,
                goal_progress=None,
                answer_tokens=None,
                length_score=None,
                reward=self.config.format_error_reward,
                failure=f"{FORMAT_ERROR_MODE}: {parsed.reason}",
            )
        else:
            result = await self._score_valid(sample, parsed, context, state, questions)
        self._record(result)
        return result

    async def _score_valid(
        self,
        sample: Sample,
        parsed: ParsedResponse,
        context: Mapping[str, Any],
        state: _State | None,
        questions: _Questions,
    ) -> ScoredSample:
        assert parsed.answer is not None and parsed.mode is not None
        answer_tokens = len(self._tokenizer.tokenize(parsed.answer))
        length = answer_length_score(answer_tokens, target=self.config.length_target, scale=self.config.length_scale)

        def unscored(reason: str, before: float | None, reward: float | None = None) -> ScoredSample:
            return ScoredSample(
                sample=sample,
                mode=parsed.mode,
                answer=parsed.answer,
                format_valid=True,
                judge_before=before,
                judge_after=None,
                goal_progress=None,
                answer_tokens=answer_tokens,
                length_score=length,
                reward=reward,
                failure=reason,
            )

        if state is None:
            return unscored("bad_state", None)
        if self._custom is not None:
            context_obj = CustomRewardContext(
                sample=sample,
                parsed=parsed,
                state=context,
                actor=state.actor,
                answer_tokens=answer_tokens,
                length_score=length,
            )
            try:
                value = self._custom(context_obj)
                if inspect.isawaitable(value):
                    value = await value
                reward = float(value)
                if not math.isfinite(reward):
                    raise ValueError(f"not finite: {reward!r}")
            except Exception as exc:  # noqa: BLE001 - any failure of user code marks the sample, never the group
                log.warning("custom reward %s failed: %r", self.config.custom_reward, exc)
                return unscored("custom_reward_error", state.before)
            return ScoredSample(
                sample=sample,
                mode=parsed.mode,
                answer=parsed.answer,
                format_valid=True,
                judge_before=state.before,
                judge_after=None,
                goal_progress=None,
                answer_tokens=answer_tokens,
                length_score=length,
                reward=reward,
            )

        try:
            prompt = goal_prompt(context, parsed.answer, self._prompts)
        except (KeyError, ValueError) as exc:
            log.warning("cannot build the judge prompt: %r", exc)
            return unscored("bad_state", state.before)
        judged = await self._ask_judge(prompt, questions)
        after = judged.value.of(state.actor) if judged.value is not None else None
        breakdown = combine_reward(
            format_valid=True,
            judge_before=state.before,
            judge_after=after,
            answer_tokens=answer_tokens,
            judge_failure=judged.failure,
            judge_failure_as_zero=self.config.judge_failure_as_zero,
            length_target=self.config.length_target,
            length_scale=self.config.length_scale,
        )
        if judged.failure is not None:
            return unscored(judged.failure, state.before, breakdown.reward)
        return ScoredSample(
            sample=sample,
            mode=parsed.mode,
            answer=parsed.answer,
            format_valid=True,
            judge_before=state.before,
            judge_after=after,
            goal_progress=breakdown.goal_progress,
            answer_tokens=answer_tokens,
            length_score=breakdown.length_score,
            reward=breakdown.reward,
        )

    def _record(self, scored: ScoredSample) -> None:
        mode = FORMAT_ERROR_MODE if not scored.format_valid else str(scored.mode)
        self._stats.samples += 1
        self._stats.by_mode[mode] += 1
        self._recent_format.append(not scored.format_valid)
        invalid_reason = scored.failure if scored.format_valid and scored.failure is not None else None
        if invalid_reason is not None:
            self._stats.invalid[invalid_reason] += 1
        if self._metrics is not None:
            self._metrics.sample(mode)
            self._metrics.format_error_ratio(sum(self._recent_format) / len(self._recent_format))
            if invalid_reason is not None:
                self._metrics.invalid_sample(invalid_reason)


@ray.remote
class RewardActor:
    """A Ray actor around :class:`RewardScorer`, with the Prometheus metrics on. Async: many groups at once."""

    def __init__(
        self,
        config: RewardConfig,
        tokenizer_path: str,
        base_url: str | None = None,
        model: str | None = None,
        prompts: PromptSet = DEFAULT_PROMPTS,
    ) -> None:
        self._scorer = RewardScorer(
            config, tokenizer_path, base_url=base_url, model=model, metrics=RayRewardMetrics(), prompts=prompts
        )

    async def ready(self) -> bool:
        return True

    @ray.method(num_returns=2)
    async def score(self, group: Group) -> tuple[GroupSummary, ScoredGroup]:
        """The scored group and its summary, as two objects: the caller reads the small one and passes the other on."""
        scored = await self._scorer.score(group)
        return summarise(scored), scored

    async def stats(self) -> RewardStats:
        return self._scorer.stats()


class PendingScore(NamedTuple):
    """The two references a scoring call returns; both are ready when the group is scored."""

    summary: ray.ObjectRef
    """Of the :class:`GroupSummary` (a few hundred bytes)."""
    group: ray.ObjectRef
    """Of the :class:`ScoredGroup`."""


class RewardPool:
    """``config.num_actors`` reward actors behind one ``score(group) -> PendingScore``.

    ``tokenizer_path`` is the policy's model folder (answer lengths are counted with its tokenizer);
    ``base_url``/``model`` override the judge endpoint (required when the config says ``local``). Each actor
    reserves ``num_cpus`` logical CPUs and accepts up to ``max_concurrency`` concurrent groups.
    """

    def __init__(
        self,
        config: RewardConfig,
        tokenizer_path: str | Path,
        *,
        base_url: str | None = None,
        model: str | None = None,
        num_cpus: float = 0.5,
        max_concurrency: int = 1000,
        prompts: PromptSet = DEFAULT_PROMPTS,
    ) -> None:
        if config.custom_reward is None and "local" in (base_url or config.judge.base_url, model or config.judge.model):
            raise ValueError(
                "reward.judge.base_url/model `local` need a started local server: pass base_url and model of a "
                "reward.server.JudgeServer to RewardPool"
            )
        self.config = config
        options = {"num_cpus": num_cpus, "max_concurrency": max_concurrency, "max_restarts": config.max_restarts}
        self._actors = [
            RewardActor.options(**options).remote(config, str(tokenizer_path), base_url, model, prompts)
            for _ in range(config.num_actors)
        ]
        self._pending: list[dict[ray.ObjectRef, int]] = [{} for _ in self._actors]
        self._next = 0

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        """The reward actors (e.g. for health checks); route work through :meth:`score`."""
        return list(self._actors)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every actor has loaded its tokenizer and judge client."""
        ray.get([actor.ready.remote() for actor in self._actors], timeout=timeout_s)

    def _prune(self) -> None:
        refs = [ref for pending in self._pending for ref in pending]
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        finished = set(done)
        for pending in self._pending:
            for ref in [r for r in pending if r in finished]:
                del pending[ref]

    def load(self) -> list[int]:
        """Samples outstanding per actor."""
        self._prune()
        return [sum(pending.values()) for pending in self._pending]

    def score(self, group: Group | ray.ObjectRef, samples: int | None = None) -> PendingScore:
        """Send ``group`` to the least-loaded actor (ties: round robin); returns the references of the scored group
        and of its summary. ``group`` may be the reference a rollout actor returned (the actor reads it; ``samples``
        then gives its size)."""
        if samples is None:
            samples = len(group.samples)
        loads = self.load()
        order = [(self._next + i) % len(self._actors) for i in range(len(self._actors))]
        index = min(order, key=lambda i: loads[i])
        self._next = (index + 1) % len(self._actors)
        summary, scored = self._actors[index].score.remote(group)
        self._pending[index][summary] = samples
        return PendingScore(summary, scored)

    def stats(self, timeout_s: float = 60.0) -> RewardStats:
        """The actors' counts summed."""
        total = RewardStats()
        for stats in ray.get([actor.stats.remote() for actor in self._actors], timeout=timeout_s):
            total = total.merge(stats)
        return total

    def shutdown(self) -> None:
        """Kill the actors (groups still in flight fail with ``RayActorError``)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._pending = []
