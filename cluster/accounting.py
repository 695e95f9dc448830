"""What the training driver counts and reports: the group accounting, how busy each role was, the statistics of
each learner step's batch, and the driver's Prometheus series (names and meanings: `cluster.metrics.CATALOGUE`,
docs/metrics.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.records import GroupSummary
from cluster.metrics import GROUP_STAGES, eval_series
from reward.modes import MODES

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Groups at each stage, counted in one place: `add` updates the count here and the Prometheus counter
    `ampo_driver_groups_total{stage}` together. The accounting identity is checked at the end of a run."""

    issued: int = 0
    generated: int = 0
    scored: int = 0
    queued: int = 0
    refused: int = 0
    """Refused by the queue at put (too stale or a duplicate)."""
    dropped: int = 0
    """Accepted, then dropped from the queue because a newer policy made them too stale."""
    consumed: int = 0
    filtered: int = 0
    """Scored, then left out without a gradient signal (`algorithm.filter_uninformative`); replaced."""
    resubmitted_rollout: int = 0
    resubmitted_reward: int = 0
    series: Any = field(default=None, repr=False, compare=False)
    """The `ampo_driver_groups_total` counter the pipeline stages also go to (None: counted here only)."""

    def add(self, stage: str, n: int = 1) -> None:
        """Count `n` groups at `stage`."""
        if n:
            setattr(self, stage, getattr(self, stage) + n)
            if self.series is not None and stage in GROUP_STAGES:
                self.series.inc(n, tags={"stage": stage})

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in self.__dict__.items() if name != "series"}


def saved_accounting(counts: dict[str, int], pending: dict[str, tuple[int, str]]) -> tuple[list[list[int]], dict[str, int]]:
    """What a checkpoint records of the groups in flight: ``([[group index, state index], ...], counts)``.

    ``pending`` maps each group id whose task has not finished to ``(state index, stage)``, the stage being the last
    one counted (``issued``, ``generated`` or ``scored``). A resume issues the pending groups again under their ids,
    so the saved counts leave them out: ``issued −= 1`` each, ``generated −= 1`` past generation, ``scored −= 1``
    once scored. The caller reads ``pending`` in the same turn of the event loop as the replay queue's snapshot, so
    no group is both waiting in the queue and in flight.
    """
    saved = dict(counts)
    in_flight = sorted(pending.items(), key=lambda kv: int(kv[0][1:]))
    for _, (_, stage) in in_flight:
        saved["issued"] -= 1
        saved["generated"] -= stage in ("generated", "scored")
        saved["scored"] -= stage == "scored"
    return [[int(gid[1:]), state] for gid, (state, _) in in_flight], saved


class Occupancy:
    """How busy a role's `units` were between two reads, integrated over time: `window()` returns the share of
    the time since the previous read during which units sat idle (averaged over units), and the share during
    which all of them were busy (saturated). Callers report each unit's changes with `change(+1 / -1)`."""

    def __init__(self, units: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.units = max(units, 1)
        self.busy = 0
        self._clock = clock
        self._last = self._start = clock()
        self._idle = self._full = 0.0

    def _advance(self) -> float:
        now = self._clock()
        span = now - self._last
        busy = min(self.busy, self.units)
        self._idle += span * (self.units - busy) / self.units
        self._full += span if busy == self.units else 0.0
        self._last = now
        return now

    def change(self, delta: int) -> None:
        self._advance()
        self.busy += delta

    def window(self) -> tuple[float, float]:
        """(idle share, saturated share) since the previous call (or creation); starts a new window."""
        now = self._advance()
        span = now - self._start
        shares = (self._idle / span, self._full / span) if span > 0 else (0.0, 0.0)
        self._start, self._idle, self._full = now, 0.0, 0.0
        return shares


class DriverMetrics:
    """Driver-side Prometheus series (ray.util.metrics; exported by Ray's metrics agent with a `ray_` prefix).
    Names are fixed and documented in docs/metrics.md. `run` names the run: the `run` tag of these series and of
    every series the actors of this run create (`actors.run_metrics`)."""

    def __init__(self, run: str | None = None) -> None:
        from actors.run_metrics import Counter, Gauge, publish_run

        if run is not None:
            publish_run(run)

        self.version = Gauge("ampo_policy_version", "Policy version of the learner.")
        self.step = Gauge("ampo_learner_step", "Learner steps completed.")
        self.step_seconds = Gauge("ampo_learner_step_seconds", "Wall time of the last learner step.")
        self.reward_mean = Gauge("ampo_reward_mean", "Mean reward of the scored samples of the last step.")
        self.format_error_ratio = Gauge("ampo_format_error_ratio", "Fraction of format errors in the last step.")
        self.mode_fraction = Gauge("ampo_mode_fraction", "Fraction of valid samples per thinking mode.", tag_keys=("mode",))
        self.mode_tokens = Gauge("ampo_mode_tokens", "Mean response tokens per thinking mode.", tag_keys=("mode",))
        self.advantage_mean = Gauge("ampo_advantage_mean", "Mean advantage per mode.", tag_keys=("mode",))
        self.advantage_std = Gauge("ampo_advantage_std", "Advantage standard deviation per mode.", tag_keys=("mode",))
        self.kl = Gauge("ampo_kl", "k3 KL to the reference policy (token mean).")
        self.entropy = Gauge("ampo_entropy", "Policy entropy (token mean).")
        self.grad_norm = Gauge("ampo_grad_norm", "Gradient norm before clipping.")
        self.learner_tokens_per_s = Gauge("ampo_learner_tokens_per_second", "Learner throughput of the last step.")
        self.in_flight = Gauge("ampo_groups_in_flight", "Groups issued and not yet in the replay queue.")
        self.staleness = Gauge("ampo_staleness", "Mean policy-version lag of the groups of the last step.")
        self.mode_term_group_ratio = Gauge(
            "ampo_mode_term_group_ratio", "Share of the last step's groups that get AMPO's mode-level term."
        )
        self.logprob_mismatch = Gauge(
            "ampo_logprob_mismatch", "Mean |learner - engine| log-prob of the last step's current-version tokens."
        )
        self.unscored_ratio = Gauge("ampo_unscored_ratio", "Share of the last step's samples the judge could not score.")
        self.rollout_idle = Gauge("ampo_rollout_idle_ratio", "Share of the last step's time rollout engines had no group.")
        self.learner_idle = Gauge("ampo_learner_idle_ratio", "Share of the last step's time the learner was not training.")
        self.judge_saturated = Gauge("ampo_judge_saturated_ratio", "Share of the last step's time the judge pool was full.")
        self.updated_tokens = Gauge("ampo_updated_token_ratio", "Share of the last step's tokens made after an update.")
        self.groups = Counter("ampo_driver_groups_total", "Groups per pipeline stage.", tag_keys=("stage",))
        self.groups.zero(stage=GROUP_STAGES)
        self.eval_goal = Gauge(
            "ampo_eval_goal", "Evaluation GOAL (0-10) by episode subset and side.", tag_keys=("subset", "side")
        )
        self.eval_overall = Gauge(
            "ampo_eval_overall", "Evaluation overall score by episode subset and side.", tag_keys=("subset", "side")
        )
        self.eval_episodes = Gauge("ampo_eval_episodes", "Episodes the last evaluation scored.")
        self.eval_excluded = Gauge("ampo_eval_excluded_episodes", "Episodes the last evaluation left out.")
        self.eval_step = Gauge("ampo_eval_step", "Learner step of the last evaluation.")

    def record_eval(self, step: int, results: dict[str, float]) -> None:
        """Set the evaluation gauges from the `eval/*` results that go to metrics.jsonl."""
        gauges = {g.info["name"]: g for g in (self.eval_goal, self.eval_overall, self.eval_episodes, self.eval_excluded)}
        series, unexported = eval_series(results)
        for name, value, tags in series:
            gauges[name].set(value, tags=tags or None)
        self.eval_step.set(step)
        if unexported:
            log.warning("evaluation results without a Prometheus gauge (metrics.jsonl only): %s", ", ".join(unexported))

    def record_step(self, metrics: dict[str, float]) -> None:
        self.version.set(metrics["version"])
        self.step.set(metrics["step"])
        self.step_seconds.set(metrics["step_seconds"])
        self.reward_mean.set(metrics["reward_mean"])
        self.format_error_ratio.set(metrics["format_error_ratio"])
        self.kl.set(metrics.get("kl", 0.0))
        self.entropy.set(metrics.get("entropy", 0.0))
        self.grad_norm.set(metrics.get("grad_norm", 0.0))
        self.learner_tokens_per_s.set(metrics.get("tokens_per_s", 0.0))
        self.staleness.set(metrics["staleness"])
        self.mode_term_group_ratio.set(metrics.get("mode_term_group_ratio", 0.0))
        self.unscored_ratio.set(metrics["unscored_ratio"])
        if metrics.get("logprob_mismatch") is not None:  # None: no current-version token to compare this step
            self.logprob_mismatch.set(metrics["logprob_mismatch"])
        self.rollout_idle.set(metrics["idle/rollout"])
        self.learner_idle.set(metrics["idle/learner"])
        self.judge_saturated.set(metrics["saturated/judge"])
        self.updated_tokens.set(metrics["updated_token_ratio"])
        for mode in MODES:
            tags = {"mode": str(mode)}
            self.mode_fraction.set(metrics[f"mode_fraction/{mode}"], tags=tags)
            self.mode_tokens.set(metrics.get(f"mode_tokens/{mode}") or 0.0, tags=tags)
            self.advantage_mean.set(metrics[f"adv_mean/{mode}"], tags=tags)
            self.advantage_std.set(metrics[f"adv_std/{mode}"], tags=tags)


def eval_goal_series(results: dict[str, float]) -> list[tuple[float, dict[str, str]]]:
    """The GOAL figures of an evaluation's results as gauge values: `subset` is `all` or `hard` (the periodic
    hard-subset evaluations included), `side` is `actor`, `opponent` or `avg`."""
    return [(value, tags) for name, value, tags in eval_series(results)[0] if name == "ampo_eval_goal"]


def batch_statistics(groups: Sequence[GroupSummary], version: int) -> dict[str, float]:
    """Reward, format and mode statistics of the groups one learner step consumes (those the authors' code logs),
    from their summaries."""
    samples = [s for g in groups for s in g.samples]
    rewards = [s.reward for s in samples if s.reward is not None]
    stats: dict[str, float] = {
        "samples": float(len(samples)),
        "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
        "format_error_ratio": sum(not s.format_valid for s in samples) / max(len(samples), 1),
        "unscored_ratio": sum(s.reward is None for s in samples) / max(len(samples), 1),
        "staleness": float(np.mean([version - g.policy_version for g in groups])) if groups else 0.0,
        "response_tokens_mean": float(np.mean([s.response_length for s in samples])) if samples else 0.0,
        # Tokens a newer policy produced than the one their response started under (in-flight weight updates).
        "updated_token_ratio": sum(s.updated_tokens for s in samples) / max(sum(s.response_length for s in samples), 1),
    }
    valid = [s for s in samples if s.mode is not None]
    for mode in MODES:
        of_mode = [s for s in valid if s.mode == mode]
        stats[f"mode_fraction/{mode}"] = len(of_mode) / max(len(samples), 1)
        stats[f"mode_count/{mode}"] = float(len(of_mode))
        stats[f"mode_tokens/{mode}"] = float(np.mean([s.response_length for s in of_mode])) if of_mode else None
    return stats
