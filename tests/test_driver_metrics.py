"""The driver's Prometheus gauges get their values from the keys a real step record carries (no silent defaults)."""

from __future__ import annotations

import pytest
from learner_fixtures import make_group

from cluster.driver import DriverMetrics, batch_statistics
from learner.config import AlgorithmConfig
from learner.group import build_train_samples


class Recorder:
    """Stands in for one gauge: keeps what was set, per tag set."""

    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[tuple(sorted((tags or {}).items()))] = value


def test_every_step_gauge_is_set_from_a_real_step_record() -> None:
    every_mode = [1, 1, 2, 2, 3, 3, 4, 4]
    groups = [make_group("g0", [0.5, 0.6, 0.7, 0.5, 0.8, 0.6, 0.9, 0.7], modes=every_mode,
                         response_lens=[30, 40, 150, 170, 400, 420, 800, 760])]
    _, info = build_train_samples(groups, 1, AlgorithmConfig())
    record = {"step": 1, "version": 1, "step_seconds": 0.5, **batch_statistics(groups, 1), **info.metrics}
    metrics = DriverMetrics()
    gauges = {name: Recorder() for name, value in vars(metrics).items() if type(value).__name__ == "Gauge"}
    for name, recorder in gauges.items():
        setattr(metrics, name, recorder)
    metrics.record_step(record)
    # in_flight follows groups as they are issued and eval_goal follows evaluations; every other gauge is per step.
    unset = sorted(name for name, recorder in gauges.items() if not recorder.values and name not in ("in_flight", "eval_goal"))
    assert unset == [], f"gauges a step never sets: {unset}"
    # The worked example of tests/test_ampo.py (n = 8): mode 4's two samples get advantages 2.927 and 1.507.
    assert gauges["advantage_mean"].values[(("mode", "4"),)] == pytest.approx((2.927 + 1.507) / 2, abs=1e-3)
    assert len(gauges["advantage_std"].values) == 4


def test_evaluation_goal_series_name_their_subset_and_side() -> None:
    from cluster.driver import eval_goal_series

    # A periodic hard-only evaluation reports eval/hard_* alone; it must reach the gauge too.
    results = {"eval/episodes": 2.0, "eval/goal_actor": 7.0, "eval/goal_avg": 6.5, "eval/hard_goal_opponent": 5.0,
               "eval/overall_actor": 3.0}
    assert sorted(eval_goal_series(results), key=lambda s: s[0]) == [
        (5.0, {"subset": "hard", "side": "opponent"}), (6.5, {"subset": "all", "side": "avg"}),
        (7.0, {"subset": "all", "side": "actor"}),
    ]


def test_a_run_stops_once_most_samples_stay_unscored(tmp_path) -> None:
    from pathlib import Path

    from cluster.config import load_config
    from cluster.driver import TrainingDriver

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    config = load_config(tiny, [f"cluster.run_dir={tmp_path}", "reward.max_unscored_ratio=0.5", "reward.unscored_patience=2"])
    driver = TrainingDriver(config, [], "unused")
    for ratio in (0.9, 0.2, 0.6):  # a blip, recovery, another bad step: still running
        driver._watch_unscored(ratio)
    assert driver._failure is None and not driver._stop.is_set()
    driver._watch_unscored(0.75)  # second bad step in a row
    assert driver._stop.is_set() and "75% of step 0's samples could not be scored" in str(driver._failure)
    assert "reward.max_unscored_ratio=0.5 for 2 steps" in str(driver._failure)
