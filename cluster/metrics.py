"""The catalogue of every Prometheus series the roles export: one fixed name per quantity.

Each role records its own series with `ray.util.metrics` (inside Ray actors and in the driver); Ray's
per-node metrics agent exports them with a `ray_` prefix (`ampo_kl` is scraped as `ray_ampo_kl`), on
127.0.0.1 in local mode. `docs/metrics.md` and the Grafana dashboard `configs/grafana/ampo.json` are
generated from this catalogue (`scripts/write_dashboard.py`), and a test checks that the code creates
exactly the series listed here.

Every series also carries the tag `run` (`actors.run_metrics`; `logging.run_name`, or the name of `cluster.run_dir`),
so concurrent runs on one cluster stay apart; the dashboard selects runs with its `run` variable. Every counter
starts at 0 for each of its documented tag values (`counter_start_values()`), so its panel reads 0, not "No data".
The driver's `eval/*` results also set the `ampo_eval_*` gauges (`eval_series`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

if TYPE_CHECKING:
    from cluster.config import Config

RUN_TAG = "run"
"""The tag every series carries besides its own (`actors.run_metrics.RUN_TAG`)."""
GROUP_STAGES: tuple[str, ...] = ("issued", "generated", "scored", "queued", "refused", "dropped", "filtered", "consumed")
"""The `stage` values of `ampo_driver_groups_total`."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    role: str
    description: str
    tags: tuple[str, ...] = ()
    unit: str = "short"

    @property
    def exported(self) -> str:
        """The series name as Prometheus scrapes it (Ray adds `ray_`; counters keep their `_total`)."""
        return f"ray_{self.name}"


CATALOGUE: tuple[MetricSpec, ...] = (
    # driver / learner progress
    MetricSpec("ampo_policy_version", "gauge", "driver", "Policy version of the learner (steps whose weights were published)."),
    MetricSpec("ampo_learner_step", "gauge", "driver", "Learner steps completed."),
    MetricSpec("ampo_learner_step_seconds", "gauge", "driver", "Wall time of the last learner step.", unit="s"),
    MetricSpec("ampo_learner_tokens_per_second", "gauge", "driver", "Learner tokens per second in the last step."),
    MetricSpec("ampo_reward_mean", "gauge", "driver", "Mean reward of the scored samples consumed by the last step."),
    MetricSpec("ampo_format_error_ratio", "gauge", "driver", "Fraction of format errors (reward −2) in the last step.", unit="percentunit"),
    MetricSpec("ampo_mode_fraction", "gauge", "driver", "Fraction of the last step's samples in each thinking mode.", ("mode",), "percentunit"),
    MetricSpec("ampo_mode_tokens", "gauge", "driver", "Mean response tokens per thinking mode in the last step.", ("mode",)),
    MetricSpec("ampo_advantage_mean", "gauge", "driver", "Mean advantage per thinking mode in the last step.", ("mode",)),
    MetricSpec("ampo_advantage_std", "gauge", "driver", "Advantage standard deviation per thinking mode.", ("mode",)),
    MetricSpec("ampo_kl", "gauge", "driver", "Token-mean k3 KL of the policy to the frozen reference."),
    MetricSpec("ampo_entropy", "gauge", "driver", "Token-mean policy entropy."),
    MetricSpec("ampo_grad_norm", "gauge", "driver", "Gradient norm before clipping."),
    MetricSpec("ampo_staleness", "gauge", "driver", "Mean policy-version lag of the groups the last step consumed."),
    MetricSpec("ampo_mode_term_group_ratio", "gauge", "driver", "Share of the last step's groups that get AMPO's mode-level term (no invalid sample, every mode at least twice); the rest are trained as by GRPO.", unit="percentunit"),
    MetricSpec("ampo_groups_in_flight", "gauge", "driver", "Groups issued and not yet in the replay queue."),
    MetricSpec("ampo_driver_groups_total", "counter", "driver", "Groups per pipeline stage (issued, generated, scored, queued, refused, dropped, filtered, consumed).", ("stage",)),
    MetricSpec("ampo_logprob_mismatch", "gauge", "driver", "Mean absolute difference between the learner's and the rollout engine's log-prob of the tokens of current-version samples (same weights): numerics or a mismatched sampling distribution; it biases the importance weights.", ()),
    MetricSpec("ampo_updated_token_ratio", "gauge", "driver", "Share of the last step's response tokens that a newer policy version produced than the one their response started under: a weight update landed in flight (each token's version is in the rollout logs' `token_versions`).", unit="percentunit"),
    MetricSpec("ampo_rollout_idle_ratio", "gauge", "driver", "Share of the time since the previous learner step during which rollout engines had no group to generate (averaged over engines): waiting for work, or for weights when groups are held back until a push lands. High: generation is not the bottleneck.", unit="percentunit"),
    MetricSpec("ampo_learner_idle_ratio", "gauge", "driver", "Share of the time since the previous learner step during which the learner was not computing a step: waiting for a batch or a weight push. High: the learner starves.", unit="percentunit"),
    MetricSpec("ampo_judge_saturated_ratio", "gauge", "driver", "Share of the time since the previous learner step during which the samples being scored filled the reward pool's judge concurrency (reward.num_actors × reward.judge.max_concurrency), so judge calls queued. High: the judge is the bottleneck.", unit="percentunit"),
    MetricSpec("ampo_unscored_ratio", "gauge", "driver", "Share of the last step's samples that could not be scored (judge failures); a run stops when it stays above reward.max_unscored_ratio.", unit="percentunit"),
    MetricSpec("ampo_eval_goal", "gauge", "driver", "Evaluation GOAL (0–10): `subset` all or hard episodes, `side` actor, opponent or their average.", ("subset", "side")),
    MetricSpec("ampo_eval_overall", "gauge", "driver", "Evaluation overall score (mean of the seven Sotopia dimensions), by `subset` and `side` as for ampo_eval_goal.", ("subset", "side")),
    MetricSpec("ampo_eval_episodes", "gauge", "driver", "Episodes the last evaluation scored (`eval/episodes`)."),
    MetricSpec("ampo_eval_excluded_episodes", "gauge", "driver", "Episodes the last evaluation left out for lack of judge scores (`eval/excluded`)."),
    MetricSpec("ampo_eval_step", "gauge", "driver", "Learner step of the last evaluation (the step its `eval/*` record in metrics.jsonl carries)."),
    # rollout actors
    MetricSpec("ampo_rollout_tokens_generated_total", "counter", "rollout", "Response tokens generated.", ("actor",)),
    MetricSpec("ampo_rollout_tokens_per_second", "gauge", "rollout", "Response tokens per second over a recent window.", ("actor",)),
    MetricSpec("ampo_rollout_requests_in_flight", "gauge", "rollout", "Group requests being generated.", ("actor",)),
    MetricSpec("ampo_rollout_policy_version", "gauge", "rollout", "Policy version each engine serves.", ("actor",)),
    MetricSpec("ampo_rollout_weight_update_seconds", "histogram", "rollout", "Time to apply a weight update in an engine.", ("actor",), "s"),
    # reward service
    MetricSpec("ampo_judge_latency_seconds", "histogram", "reward", "Duration of judge HTTP attempts.", unit="s"),
    MetricSpec("ampo_judge_errors_total", "counter", "reward", "Failed judge attempts by kind.", ("kind",)),
    MetricSpec("ampo_judge_retries_total", "counter", "reward", "Judge retries by the kind of failure that caused them.", ("kind",)),
    MetricSpec("ampo_judge_calls_in_flight", "gauge", "reward", "Judge HTTP attempts in flight per reward actor."),
    MetricSpec("ampo_reward_format_error_ratio", "gauge", "reward", "Share of format errors among a reward actor's recent samples.", unit="percentunit"),
    MetricSpec("ampo_reward_samples_total", "counter", "reward", "Scored samples by thinking mode.", ("mode",)),
    MetricSpec("ampo_reward_invalid_samples_total", "counter", "reward", "Samples left without a reward, by reason.", ("reason",)),
    # driver: the replay queue; learner: the weight push
    MetricSpec("ampo_queue_depth", "gauge", "driver", "Scored groups waiting in the replay queue."),
    MetricSpec("ampo_queue_put_wait_seconds", "histogram", "driver", "Time producers waited for room in the queue (backpressure).", unit="s"),
    MetricSpec("ampo_queue_staleness", "histogram", "driver", "Version lag of the groups the learner consumed."),
    MetricSpec("ampo_weight_push_seconds", "histogram", "learner", "From publish to each rollout actor's acknowledgement.", ("transport",), "s"),
    MetricSpec("ampo_weight_push_failures_total", "counter", "learner", "Weight pushes that failed or missed their deadline.", ("transport",)),
)


def run_label(config: Config) -> str:
    """The run's `run` tag: `logging.run_name`, else the name of `cluster.run_dir` (resolved when it has none)."""
    if config.logging.run_name:
        return config.logging.run_name
    run_dir = Path(config.cluster.run_dir)
    return run_dir.name or run_dir.resolve().name or "default"


def counter_start_values() -> dict[str, dict[str, tuple[str, ...]]]:
    """Per counter, the tag values its role records 0 for at start-up (the two described values stand for the one
    value of an actor's index and of the run's transport)."""
    from reward.judge import ErrorKind
    from reward.modes import MODES
    from reward.metrics import FORMAT_ERROR_MODE, INVALID_REASONS

    kinds = tuple(get_args(ErrorKind))
    return {
        "ampo_driver_groups_total": {"stage": GROUP_STAGES},
        "ampo_rollout_tokens_generated_total": {"actor": ("the actor's own index",)},
        "ampo_judge_errors_total": {"kind": kinds},
        "ampo_judge_retries_total": {"kind": kinds},
        "ampo_reward_samples_total": {"mode": (*(str(m) for m in MODES), FORMAT_ERROR_MODE)},
        "ampo_reward_invalid_samples_total": {"reason": INVALID_REASONS},
        "ampo_weight_push_failures_total": {"transport": ("the run's rollout.weight_transport",)},
    }


def counter_start_table() -> str:
    """The markdown table of `counter_start_values()` that docs/metrics.md shows (a test keeps the two equal)."""
    lines = ["| counter | starts at 0 for |", "| --- | --- |"]
    for name, tags in counter_start_values().items():
        cells = "; ".join(f"`{tag}`: {', '.join(values)}" for tag, values in tags.items())
        lines.append(f"| `ray_{name}` | {cells} |")
    return "\n".join(lines)


_EVAL_SCORE_KEY = re.compile(r"eval/(hard_)?(goal|overall)_(actor|opponent|avg)")
_EVAL_COUNT_KEYS = {"eval/episodes": "ampo_eval_episodes", "eval/excluded": "ampo_eval_excluded_episodes"}


def eval_series(results: dict[str, float]) -> tuple[list[tuple[str, float, dict[str, str]]], list[str]]:
    """The gauges an evaluation's `eval/*` results set, as (series name, value, tags), and the keys no gauge takes.
    `subset` is `all` or `hard` (`eval/hard_*`, the periodic hard-subset evaluations included), `side` is `actor`,
    `opponent` or `avg`."""
    series: list[tuple[str, float, dict[str, str]]] = []
    unexported = []
    for key, value in results.items():
        match = _EVAL_SCORE_KEY.fullmatch(key)
        if match:
            tags = {"subset": "hard" if match.group(1) else "all", "side": match.group(3)}
            series.append((f"ampo_eval_{match.group(2)}", float(value), tags))
        elif key in _EVAL_COUNT_KEYS:
            series.append((_EVAL_COUNT_KEYS[key], float(value), {}))
        elif key.startswith("eval/"):
            unexported.append(key)
    return series, unexported


def markdown_table() -> str:
    lines = [
        "| series (as scraped) | type | role | tags (besides `run`) | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in CATALOGUE:
        tags = ", ".join(spec.tags) or "–"
        lines.append(f"| `{spec.exported}` | {spec.kind} | {spec.role} | {tags} | {spec.description} |")
    return "\n".join(lines)


RUN_SELECTOR = '{run=~"$run"}'
"""Every panel's filter: the runs chosen in the dashboard's `run` variable."""


def _query(spec: MetricSpec) -> tuple[str, str]:
    """PromQL and legend of a panel: counters as rates, histograms as p95 from buckets; one line per run (and tag)."""
    tags = (RUN_TAG, *spec.tags)
    by = f" by ({', '.join(tags)})"
    legend = " ".join("{{" + tag + "}}" for tag in tags)
    if spec.kind == "counter":
        return f"sum{by} (rate({spec.exported}{RUN_SELECTOR}[1m]))", legend
    if spec.kind == "histogram":
        return f"histogram_quantile(0.95, sum by (le, {', '.join(tags)}) (rate({spec.exported}_bucket{RUN_SELECTOR}[5m])))", f"p95 {legend}"
    return f"max{by} ({spec.exported}{RUN_SELECTOR})", legend


def grafana_dashboard() -> dict:
    """A Grafana dashboard (JSON model) with one time-series panel per catalogued series, grouped by role."""
    panels, y = [], 0
    panel_id = 1
    for role in ("driver", "rollout", "reward", "learner"):
        panels.append({"type": "row", "title": role, "id": panel_id, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "collapsed": False})
        panel_id += 1
        y += 1
        for i, spec in enumerate(s for s in CATALOGUE if s.role == role):
            expr, legend = _query(spec)
            panels.append(
                {
                    "type": "timeseries",
                    "id": panel_id,
                    "title": spec.name.removeprefix("ampo_"),
                    "description": spec.description,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 7, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 7},
                    "fieldConfig": {"defaults": {"unit": spec.unit}, "overrides": []},
                    "targets": [{"expr": expr, "legendFormat": legend, "refId": "A"}],
                }
            )
            panel_id += 1
        count = sum(1 for s in CATALOGUE if s.role == role)
        y += ((count + 2) // 3) * 7
    return {
        "title": "AMPO training",
        "uid": "ampo-training",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    # Every run that has exported a series (the driver's counter exists from start-up on).
                    "name": RUN_TAG,
                    "type": "query",
                    "label": "Run",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "definition": "label_values(ray_ampo_driver_groups_total, run)",
                    "query": "label_values(ray_ampo_driver_groups_total, run)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                },
            ]
        },
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(grafana_dashboard(), indent=2) + "\n"
