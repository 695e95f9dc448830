"""The evaluation stage (`ampo eval`; docs/protocol.md, Evaluation, and docs/fidelity.md for every mode of Table 1).

`EpisodeRunner` plays self-play or vs-partner episodes with `reward.evaluator.EpisodeEvaluator` as its evaluate
hook; the results file resumes. A judge answer that cannot be read, or holds a non-integer score, excludes the
episode with the reason in `evaluation_error`. The policy is a checkpoint on an in-process engine, the training
driver's rollout actors, or a model behind an OpenAI-compatible API (`eval.policy`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.sotopia import SotopiaDataset
from actors.states import chat_token_counter, text_token_counter
from cluster.stages import scenarios_path
from cluster.config import ChatModelConfig, Config
from cluster.endpoints import Endpoint, OpenAIChatModel, RolloutPolicy, policy_engines
from cluster.episodes import EpisodeRecord, EpisodeRunner, Evaluator, Policy, select_episodes
from cluster.workfiles import progress_bar
from reward.evaluator import NO_THINKING, EpisodeEvaluator, ResultsSummary, render_summary, summarise
from reward.judge import JudgeClient


log = logging.getLogger(__name__)


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
    dataset = SotopiaDataset.load(scenarios_path(config))
    episode_ids = select_episodes(dataset, episodes=episodes, hard_only=hard_only, max_episodes=max_episodes)
    if not episode_ids:
        raise ValueError("no episode to evaluate (the hard subset of these scenarios is empty?)")
    roles = 1 if partner is None else 2
    prompts = config.prompts.load()
    bar = progress_bar(len(episode_ids) * roles, "episodes evaluated", progress)
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
    from cluster.sources import resolve_model

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

    model_path = resolve_model(policy_path if policy_path is not None else config.rollout.model)

    async def main() -> EvalReport:
        async with policy_engines(config, model_path) as engine:
            return await evaluate_async(
                config, policy=engine, judge=judge, out_path=out_path, partner=partner,
                count_tokens=chat_token_counter(model_path), count_text=text_token_counter(model_path),
                hard_only=hard_only, max_episodes=max_episodes, episodes=episodes, progress=progress,
            )

    return asyncio.run(main())


def headline(summary: ResultsSummary) -> str:
    """The paper's two numbers (GOAL, overall) per subset and side, in one line."""
    parts = []
    for name, subset in (("all", summary.all), ("hard", summary.hard)):
        if subset.episodes:
            parts.append(
                f"{name}: GOAL actor {subset.actor['goal'].mean:.2f} / avg {subset.average['goal'].mean:.2f}, "
                f"overall actor {subset.actor['overall'].mean:.2f} / avg {subset.average['overall'].mean:.2f}"
            )
    return "; ".join(parts) or "no evaluated episode"


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
        log.info("evaluation at step %d (%s): %s", step, "hard subset" if hard_only else "all episodes", headline(result.summary))
        return result.metrics()

    return run
