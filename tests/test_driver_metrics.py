"""The driver's Prometheus gauges get their values from the keys a real step record carries (no silent defaults)."""

from __future__ import annotations

import pytest
from learner_fixtures import make_group

from actors.records import summarise
from cluster.accounting import DriverMetrics, batch_statistics
from learner.config import AlgorithmConfig
from learner.group import build_train_samples


IDLE = {"idle/rollout": 0.25, "idle/learner": 0.5, "saturated/judge": 0.0}
"""The role shares the driver adds to each step record (from its `Occupancy` clocks)."""
COMPARED = {"logprob_mismatch": 3e-7, "logprob_mismatch_max": 2e-6, "logprob_mismatch_tokens": 120}
"""What `LearnerGroup.step` adds when some of the step's samples came from the learner's current weights."""


class Recorder:
    """Stands in for one gauge: keeps what was set, per tag set."""

    def __init__(self, name: str = "") -> None:
        self.info = {"name": name}
        self.values: dict[tuple, float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[tuple(sorted((tags or {}).items()))] = value


def test_every_step_gauge_is_set_from_a_real_step_record() -> None:
    every_mode = [1, 1, 2, 2, 3, 3, 4, 4]
    groups = [make_group("g0", [0.5, 0.6, 0.7, 0.5, 0.8, 0.6, 0.9, 0.7], modes=every_mode,
                         response_lens=[30, 40, 150, 170, 400, 420, 800, 760])]
    metrics, gauges = recorded_metrics()
    metrics.record_step({**step_record(groups), **COMPARED})
    # in_flight follows groups as they are issued and the eval_* gauges follow evaluations; every other gauge is per step.
    unset = sorted(name for name, recorder in gauges.items()
                   if not recorder.values and name != "in_flight" and not name.startswith("eval_"))
    assert unset == [], f"gauges a step never sets: {unset}"
    # The worked example of tests/test_ampo.py (n = 8): mode 4's two samples get advantages 2.927 and 1.507.
    assert gauges["advantage_mean"].values[(("mode", "4"),)] == pytest.approx((2.927 + 1.507) / 2, abs=1e-3)
    assert len(gauges["advantage_std"].values) == 4


def test_a_step_that_compared_no_token_leaves_the_logprob_mismatch_gauge_alone() -> None:
    base = step_record([make_group("g0", [0.5, 0.6, 0.7, 0.5])])
    metrics, gauges = recorded_metrics()
    metrics.record_step({**base, **COMPARED})
    metrics.record_step({**base, "step": 2, "logprob_mismatch": None, "logprob_mismatch_max": None, "logprob_mismatch_tokens": 0})
    assert gauges["logprob_mismatch"].values == {(): 3e-7}


def step_record(groups: list) -> dict:
    """The driver's record of step 1 on these groups, without the learner's part."""
    _, info = build_train_samples(groups, 1, AlgorithmConfig())
    return {"step": 1, "version": 1, "step_seconds": 0.5, **batch_statistics([summarise(g) for g in groups], 1), **info.metrics, **IDLE}


def recorded_metrics() -> tuple[DriverMetrics, dict[str, Recorder]]:
    """Driver metrics whose gauges are recorders."""
    metrics = DriverMetrics()
    gauges = {name: Recorder() for name, value in vars(metrics).items() if type(value).__name__ == "Gauge"}
    for name, recorder in gauges.items():
        setattr(metrics, name, recorder)
    return metrics, gauges


def test_evaluation_goal_series_name_their_subset_and_side() -> None:
    from cluster.accounting import eval_goal_series

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


def _summary(hard_episodes: int):
    from reward.evaluator import ResultsSummary, Stat, SubsetSummary

    def subset(episodes: int, goal: float) -> SubsetSummary:
        side = {"goal": Stat(goal, 1.0, episodes), "overall": Stat(goal / 3, 0.5, episodes)}
        return SubsetSummary(episodes=episodes, actor=side, opponent=dict(side), average=dict(side))

    return ResultsSummary(records=5, excluded=1, exclusion_reasons={"no scores": 1}, all=subset(4, 6.0),
                          hard=subset(hard_episodes, 4.5), modes=None, hard_modes=None)


@pytest.mark.parametrize("hard_only", [False, True])
def test_every_evaluation_figure_reaches_a_gauge(hard_only: bool) -> None:
    """What the driver appends to metrics.jsonl after an evaluation (full, or the periodic hard-only one) is exported."""
    from cluster.evaluation import eval_metrics

    results = eval_metrics(_summary(hard_episodes=2), hard_only=hard_only)
    assert any(key.startswith("eval/hard_") for key in results)
    metrics = DriverMetrics()
    recorders = [Recorder(gauge.info["name"]) for name, gauge in vars(metrics).items() if name.startswith("eval_")]
    for name, recorder in zip([n for n in vars(metrics) if n.startswith("eval_")], recorders, strict=True):
        setattr(metrics, name, recorder)
    metrics.record_eval(7, results)
    exported = {(r.info["name"], tags): value for r in recorders for tags, value in r.values.items()}
    expected = {}
    for key, value in results.items():
        subset = "hard" if key.startswith("eval/hard_") else "all"
        name = key.removeprefix("eval/").removeprefix("hard_")
        if name in ("episodes", "excluded"):
            series = {"episodes": "ampo_eval_episodes", "excluded": "ampo_eval_excluded_episodes"}[name]
            expected[(series, ())] = value
        else:
            figure, side = name.split("_")
            expected[(f"ampo_eval_{figure}", (("side", side), ("subset", subset)))] = value
    expected[("ampo_eval_step", ())] = 7
    assert exported == expected
    if hard_only:  # the periodic hard-only evaluation: hard figures only, none under subset "all"
        assert not any(dict(tags).get("subset") == "all" for _, tags in exported)


def test_occupancy_integrates_idle_and_saturated_time_per_window() -> None:
    from cluster.accounting import Occupancy

    now = [0.0]
    two = Occupancy(2, clock=lambda: now[0])
    now[0] = 1.0
    two.change(+1)  # 0-1 s: both idle
    now[0] = 3.0
    two.change(+1)  # 1-3 s: one of two idle
    now[0] = 4.0
    two.change(-2)  # 3-4 s: both busy (saturated)
    now[0] = 5.0  # 4-5 s: both idle
    idle, saturated = two.window()
    assert idle == pytest.approx((1 * 1 + 2 * 0.5 + 1 * 0 + 1 * 1) / 5)  # 0.6
    assert saturated == pytest.approx(1 / 5)
    now[0] = 7.0  # a new window: 2 s, both idle
    assert two.window() == (pytest.approx(1.0), pytest.approx(0.0))
    # More work than units still counts as saturated, and idle never goes below 0.
    one = Occupancy(1, clock=lambda: now[0])
    one.change(+3)
    now[0] = 9.0
    assert one.window() == (pytest.approx(0.0), pytest.approx(1.0))


def test_counts_go_to_the_stage_counter_once() -> None:
    from cluster.accounting import Counts

    class Series:
        def __init__(self) -> None:
            self.calls: list[tuple[int, dict]] = []

        def inc(self, value: int = 1, tags: dict | None = None) -> None:
            self.calls.append((value, tags))

    series = Series()
    counts = Counts(series=series)
    counts.add("issued")
    counts.add("consumed", 3)
    counts.add("dropped", 0)  # nothing to count
    counts.add("resubmitted_rollout")  # a count that is not a pipeline stage
    assert counts.as_dict()["issued"] == 1 and counts.consumed == 3 and counts.resubmitted_rollout == 1
    assert series.calls == [(1, {"stage": "issued"}), (3, {"stage": "consumed"})]
    assert "series" not in counts.as_dict()


def test_updated_token_ratio_counts_tokens_a_newer_version_made() -> None:
    import dataclasses

    group = make_group("g0", [0.5, 0.6], modes=[1, 2], response_lens=[4, 6], version=2)
    first, second = group.samples
    # Sample 0: its last two tokens came after an update to version 3; sample 1 was made by version 2 throughout.
    spanning = dataclasses.replace(first, sample=dataclasses.replace(first.sample, token_versions=(2, 2, 3, 3)))
    group = dataclasses.replace(group, samples=(spanning, second))
    assert batch_statistics([summarise(group)], 3)["updated_token_ratio"] == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="token versions must tag each of the 4 response tokens"):
        dataclasses.replace(first.sample, token_versions=(2, 3))
    with pytest.raises(ValueError, match="with a version of at least 2"):
        dataclasses.replace(first.sample, token_versions=(1, 2, 2, 2))


def test_the_share_of_groups_that_move_the_policy() -> None:
    """A group whose responses all earned −2 (every one broke the format) gets advantage 0 everywhere: no signal."""
    broken = make_group("broken", [-2.0] * 4, modes=[None] * 4)
    lone = make_group("lone", [0.5, None, None], modes=[1, 2, 3])  # one scored sample, advantage 0.5: it moves
    mixed = make_group("mixed", [-2.0, 0.5, 0.6, -2.0], modes=[None, 1, 2, None])
    ratio = lambda groups: build_train_samples(groups, 0, AlgorithmConfig())[1].metrics["informative_group_ratio"]  # noqa: E731
    assert ratio([broken]) == 0.0 and ratio([lone]) == 1.0
    assert ratio([broken, mixed]) == 0.5 and ratio([mixed]) == 1.0


def test_the_driver_warns_once_per_stretch_of_steps_without_signal(caplog, tmp_path) -> None:
    from cluster.config import load_config
    from cluster.driver import TrainingDriver

    driver = TrainingDriver(load_config("configs/tiny.yaml", [f"cluster.run_dir={tmp_path}"]), [], "unused")
    dead = {"skipped": 0.0, "informative_group_ratio": 0.0, "format_error_ratio": 1.0}
    alive = {"skipped": 0.0, "informative_group_ratio": 0.5, "format_error_ratio": 0.5}
    with caplog.at_level("WARNING", logger="cluster.driver"):
        for record in (alive, dead, dead, dead, alive, {**dead, "format_error_ratio": 0.0}, {**dead, "skipped": 1.0}):
            driver._watch_signal(record)
    warned = [r.getMessage() for r in caplog.records if "carries a learning signal" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "all broke the format" in warned[0] and "equal rewards, no mode term" in warned[1]
