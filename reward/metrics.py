"""The reward service's Prometheus series, with their fixed names and tag values.

Series (``actors.run_metrics``: each series also carries the ``run`` tag, and every counter starts at 0 for each of
its tag values; exported by each actor's node with Ray's usual ``ray_`` prefix):
``ampo_judge_latency_seconds`` (histogram of HTTP attempts), ``ampo_judge_errors_total{kind}``,
``ampo_judge_retries_total{kind}``, ``ampo_judge_calls_in_flight``, ``ampo_reward_format_error_ratio`` (over the
last ``FORMAT_WINDOW`` samples of an actor), ``ampo_reward_samples_total{mode}`` (mode "1".."4" or
"invalid_format") and ``ampo_reward_invalid_samples_total{reason}`` (samples whose reward could not be computed,
counted even when ``judge_failure_as_zero`` turns them into 0).
"""

from __future__ import annotations

from typing import Protocol, get_args

from reward.judge import ErrorKind, JudgeObserver
from reward.modes import MODES

FORMAT_ERROR_MODE = "invalid_format"
"""The ``mode`` tag of samples that broke the output format."""
INVALID_REASONS: tuple[str, ...] = ("bad_state", "custom_reward_error", *get_args(ErrorKind))
"""Every ``reason`` of ``ampo_reward_invalid_samples_total``: a malformed RL state, a failing custom reward, or the
judge's failure kind."""
FORMAT_WINDOW = 256
"""Samples over which an actor's format-error ratio gauge is computed."""
LATENCY_BUCKETS_S: list[float] = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160]


class RewardMetricsSink(JudgeObserver, Protocol):
    """Receives judge events and per-sample events (see :class:`RayRewardMetrics`)."""

    def sample(self, mode: str) -> None: ...

    def invalid_sample(self, reason: str) -> None: ...

    def format_error_ratio(self, ratio: float) -> None: ...


class RayRewardMetrics:
    """The reward service's Prometheus series with their fixed names, through ``ray.util.metrics``."""

    def __init__(self) -> None:
        import actors.run_metrics as metrics  # every series also carries the `run` tag

        self._latency = metrics.Histogram(
            "ampo_judge_latency_seconds", "Duration of judge HTTP attempts.", boundaries=LATENCY_BUCKETS_S
        )
        self._errors = metrics.Counter("ampo_judge_errors_total", "Failed judge attempts by kind.", tag_keys=("kind",))
        self._retries = metrics.Counter(
            "ampo_judge_retries_total",
            "Judge attempts repeated after a failure, by that failure's kind.",
            tag_keys=("kind",),
        )
        self._in_flight = metrics.Gauge("ampo_judge_calls_in_flight", "Judge HTTP attempts in flight in this actor.")
        self._format_ratio = metrics.Gauge(
            "ampo_reward_format_error_ratio", f"Share of format errors among this actor's last {FORMAT_WINDOW} samples."
        )
        self._samples = metrics.Counter(
            "ampo_reward_samples_total", "Scored samples by thinking mode.", tag_keys=("mode",)
        )
        self._invalid = metrics.Counter(
            "ampo_reward_invalid_samples_total",
            "Samples whose reward could not be computed, by reason.",
            tag_keys=("reason",),
        )
        # Every documented tag value starts at 0, so a panel reads 0 rather than "No data" until the first event.
        self._errors.zero(kind=get_args(ErrorKind))
        self._retries.zero(kind=get_args(ErrorKind))
        self._samples.zero(mode=[*(str(m) for m in MODES), FORMAT_ERROR_MODE])
        self._invalid.zero(reason=INVALID_REASONS)

    def in_flight(self, count: int) -> None:
        self._in_flight.set(count)

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def error(self, kind: str) -> None:
        self._errors.inc(1, tags={"kind": kind})

    def retry(self, kind: str) -> None:
        self._retries.inc(1, tags={"kind": kind})

    def sample(self, mode: str) -> None:
        self._samples.inc(1, tags={"mode": mode})

    def invalid_sample(self, reason: str) -> None:
        self._invalid.inc(1, tags={"reason": reason})

    def format_error_ratio(self, ratio: float) -> None:
        self._format_ratio.set(ratio)
