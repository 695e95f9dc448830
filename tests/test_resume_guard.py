"""A run resumes only a checkpoint of the same experiment: a changed estimator, seed or learning rate is refused
before any engine starts, naming the fields; the same config resumes; a deliberate change is allowed by a flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, dump_config, experiment_differences, load_config
from cluster.driver import TrainingDriver
from learner.checkpoint import begin_checkpoint, finish_checkpoint

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def checkpointed_run(tmp_path: Path, *overrides: str) -> Path:
    """A run folder holding one checkpoint (its driver part) written by the tiny config with ``overrides``."""
    run_dir = tmp_path / "run"
    config = load_config(TINY, [f"cluster.run_dir={run_dir}", *overrides])
    tmp = begin_checkpoint(run_dir, step=3)
    finish_checkpoint(tmp, step=3, version=3, world_size=1, data_cursor={}, config_yaml=dump_config(config))
    return run_dir


def driver(run_dir: Path, *overrides: str) -> TrainingDriver:
    return TrainingDriver(load_config(TINY, [f"cluster.run_dir={run_dir}", *overrides]), [], "unused")


def test_the_same_experiment_resumes_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    run_dir = checkpointed_run(tmp_path, "algorithm.estimator=ampo", "learner.lr=0.001")
    # Operational changes (more steps, another pool size) are not a different experiment.
    same = driver(run_dir, "algorithm.estimator=ampo", "algorithm.total_steps=9", "reward.num_actors=2")
    assert same._checked_resume() == run_dir / "checkpoints" / "step_3"
    with pytest.raises(ConfigError) as info:
        driver(run_dir, "algorithm.estimator=grpo", "cluster.seed=2")._checked_resume()
    message = str(info.value)
    assert "algorithm.estimator: 'ampo' -> 'grpo'" in message and "cluster.seed: 1 -> 2" in message
    assert "learner.lr" not in message and "learner.resume_changed_config=true" in message
    allowed = driver(run_dir, "algorithm.estimator=grpo", "learner.resume_changed_config=true")
    assert allowed._checked_resume() == run_dir / "checkpoints" / "step_3"
    assert driver(run_dir, "algorithm.estimator=grpo", "learner.resume=never")._checked_resume() is None


def test_differences_count_a_missing_field_as_its_default() -> None:
    current = load_config(None, ["algorithm.kl_coef=0.5"])
    assert experiment_differences({}, current) == ["algorithm.kl_coef: 0.001 -> 0.5"]
    assert experiment_differences({"algorithm": {"kl_coef": 0.5}}, current) == []


def test_run_folders_can_name_the_estimator_and_seed() -> None:
    config = load_config(None, ["cluster.run_dir=runs/x-{algorithm.estimator}-seed{cluster.seed}", "algorithm.estimator=grpo", "cluster.seed=4"])
    assert str(config.cluster.run_dir) == "runs/x-grpo-seed4"
    with pytest.raises(ConfigError, match=r"unknown field \{algorithm.estimater\}"):
        load_config(None, ["cluster.run_dir=runs/{algorithm.estimater}"])
