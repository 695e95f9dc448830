"""Monitoring: the `run` tag on every series, counters that start at 0, the local scrape config, and the optional
TensorBoard / W&B trackers of the driver's metrics.jsonl records (docs/metrics.md)."""

from __future__ import annotations

import ast
import asyncio
import json
import struct
import sys
import types
from pathlib import Path

import pytest
import yaml
from learner_fixtures import make_group

import actors.run_metrics as run_metrics
from cluster.config import ConfigError, LoggingConfig, load_config
from cluster.metrics import CATALOGUE, GROUP_STAGES, counter_start_table, counter_start_values, run_label
from cluster.trackers import TrackerError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _no_published_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts in a process that has published no run name (and leaves none behind)."""
    monkeypatch.setattr(run_metrics, "_process_run", None)


def _role_metric_owners(transport: str = "object_store") -> list[object]:
    """The objects that create the driver's, the reward actors' and the learner's series (the rollout actor needs
    vLLM; tests/test_metrics_catalogue.py checks its source)."""
    from cluster.accounting import DriverMetrics
    from learner.publish import WeightPublisher
    from learner.queue import ReplayQueue
    from reward.metrics import RayRewardMetrics

    return [DriverMetrics(), RayRewardMetrics(), ReplayQueue(4, 1, lambda: 0), WeightPublisher([object()], transport=transport)]


def _metrics_of(owner: object) -> list:
    from ray.util.metrics import Metric

    return [value for value in vars(owner).values() if isinstance(value, Metric)]


# ------------------------------------------------------------------------------------------------ the run tag


def test_the_run_is_named_after_its_directory_unless_named(tmp_path: Path) -> None:
    config = load_config(TINY, [f"cluster.run_dir={tmp_path / 'llama-grpo-seed1'}"])
    assert run_label(config) == "llama-grpo-seed1"
    named = load_config(TINY, [f"cluster.run_dir={tmp_path / 'x'}", "logging.run_name=ablation-3"])
    assert run_label(named) == "ablation-3"
    with pytest.raises(ConfigError, match="run_name"):
        load_config(TINY, ["logging.run_name="])


def test_every_role_tags_its_series_with_the_published_run() -> None:
    run_metrics.publish_run("exp-a")
    seen = set()
    for owner in _role_metric_owners():
        for metric in _metrics_of(owner):
            info = metric.info
            assert info["tag_keys"][-1] == "run" and info["default_tags"] == {"run": "exp-a"}, info
            seen.add(info["name"])
    roles = {spec.name for spec in CATALOGUE if spec.role in ("driver", "reward", "learner")}
    assert seen == roles
    # A second run's driver names its own series.
    from cluster.accounting import DriverMetrics

    assert {m.info["default_tags"]["run"] for m in _metrics_of(DriverMetrics("exp-b"))} == {"exp-b"}


def test_actors_of_concurrent_runs_read_their_own_job_s_run_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two drivers (two Ray jobs) on one cluster: an actor reads the name its own job's driver published."""
    import ray
    from ray.experimental import internal_kv

    store: dict[tuple[bytes, str], bytes] = {}
    job = {"id": "01000000"}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_job_id=lambda: job["id"]))
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: store.__setitem__((key, namespace), value))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get((key, namespace)))

    run_metrics.publish_run("run-a")  # driver of job 1
    job["id"] = "02000000"
    run_metrics.publish_run("run-b")  # driver of job 2
    monkeypatch.setattr(run_metrics, "_process_run", None)  # now in an actor's process
    assert run_metrics.current_run() == "run-b"
    assert run_metrics.Gauge("ampo_test_gauge", "t").info["default_tags"] == {"run": "run-b"}
    job["id"] = "01000000"
    assert run_metrics.current_run() == "run-a"
    job["id"] = "03000000"  # an actor of a job that published nothing
    assert run_metrics.current_run() == run_metrics.UNNAMED


# ------------------------------------------------------------------------------------------------ counters at 0


class _Recorder:
    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, str]]] = []

    def record(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.points.append((value, dict(tags or {})))


def test_zero_records_0_for_every_combination_of_tag_values() -> None:
    counter = run_metrics.Counter("ampo_test_total", "t", tag_keys=("kind", "side"), run="r1")
    counter._metric = recorder = _Recorder()
    counter.zero(kind=["a", "b"], side=["x"])
    assert recorder.points == [(0.0, {"kind": "a", "side": "x", "run": "r1"}), (0.0, {"kind": "b", "side": "x", "run": "r1"})]
    with pytest.raises(ValueError, match="side"):
        counter.zero(kind=["a"])
    with pytest.raises(ValueError):  # Ray itself refuses inc(0): hence zero()
        counter.inc(0, tags={"kind": "a", "side": "x"})


def test_every_counter_starts_at_0_for_each_documented_tag_value(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, dict[str, tuple[str, ...]]] = {}
    zero = run_metrics.Counter.zero

    def spy(self: run_metrics.Counter, **values):
        started[self.info["name"]] = {key: tuple(v) for key, v in values.items()}
        zero(self, **values)

    monkeypatch.setattr(run_metrics.Counter, "zero", spy)
    _role_metric_owners(transport="broadcast")
    documented = counter_start_values()
    assert set(documented) == {spec.name for spec in CATALOGUE if spec.kind == "counter"}
    expected = {name: tags for name, tags in documented.items() if name != "ampo_rollout_tokens_generated_total"}
    expected["ampo_weight_push_failures_total"] = {"transport": ("broadcast",)}
    assert started == expected
    # The rollout actor (vLLM) starts its own index: checked in its source.
    calls = [node for node in ast.walk(ast.parse((ROOT / "actors" / "rollout.py").read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "zero"]
    assert [ast.unparse(c) for c in calls] == ["self._m_tokens.zero(actor=[self._tags['actor']])"]
    # docs/metrics.md lists exactly these values.
    assert counter_start_table() in (ROOT / "docs" / "metrics.md").read_text(), (
        "docs/metrics.md's counter-start table is out of date: paste cluster.metrics.counter_start_table()")


def _literal_args(path: Path, func: str) -> set[str]:
    """First-argument string literals of calls to `func` in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == func:
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def test_the_roles_count_only_tag_values_that_start_at_0() -> None:
    values = counter_start_values()
    # Counts.add sends pipeline stages to ampo_driver_groups_total{stage}; the resubmissions stay in the summary.
    counted = _literal_args(ROOT / "cluster" / "driver.py", "add") | _literal_args(ROOT / "cluster" / "router.py", "add")
    assert counted - set(GROUP_STAGES) == {"resubmitted_rollout", "resubmitted_reward"}
    assert set(GROUP_STAGES) <= counted, f"stages never counted: {sorted(set(GROUP_STAGES) - counted)}"
    reasons = _literal_args(ROOT / "reward" / "pool.py", "unscored")
    assert reasons and reasons <= set(values["ampo_reward_invalid_samples_total"]["reason"])


# ------------------------------------------------------------------------------------------------ local scraping


def test_local_ray_exports_on_the_scraped_port_and_bounds_its_task_history(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from cluster import ray_cluster

    scrape = yaml.safe_load((ROOT / "configs" / "prometheus-local.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]]
    port = LoggingConfig().metrics_port
    assert targets == [f"127.0.0.1:{port}"]
    config = load_config(ROOT / "configs" / "local.yaml", ["cluster.pin_learner_cpus=false"])
    assert config.logging.metrics_port == port
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_cluster, "_check_port_free", lambda port: None)
    ray_cluster.connect(config)
    # Local Ray runs without its dashboard (so no service-discovery file) and exports on logging.metrics_port.
    assert calls[0]["include_dashboard"] is False and calls[0]["_metrics_export_port"] == port
    # It also bounds the task history its GCS keeps (docs/reliability.md, Chaos and soak).
    assert calls[0]["_system_config"] == {"task_events_max_num_task_in_gcs": config.cluster.ray_task_history}


# ------------------------------------------------------------------------------------------------ trackers


def _read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars of TensorBoard event files: with tensorboard's reader when installed, else tensorboardX's protos."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        accumulator = EventAccumulator(str(log_dir))
        accumulator.Reload()
        return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    found: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):  # TFRecord: length, its CRC, the event, its CRC
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def _driver_with_a_step_and_an_evaluation(tmp_path: Path, *overrides: str):
    """A driver (no roles) that evaluates at step 0 and logs learner step 1, as a run does."""
    from cluster.accounting import batch_statistics
    from cluster.driver import TrainingDriver
    from cluster.evaluation import eval_metrics
    from learner.config import AlgorithmConfig
    from actors.records import summarise
    from learner.group import build_train_samples
    from reward.evaluator import ResultsSummary, Stat, SubsetSummary

    side = {"goal": Stat(6.5, 1.0, 3), "overall": Stat(2.25, 0.5, 3)}
    subset = SubsetSummary(episodes=3, actor=side, opponent=dict(side), average=dict(side))
    summary = ResultsSummary(records=4, excluded=1, exclusion_reasons={}, all=subset, hard=subset, modes=None, hard_modes=None)

    async def evaluate(driver, step):
        return eval_metrics(summary)

    config = load_config(TINY, [f"cluster.run_dir={tmp_path}", *overrides])
    driver = TrainingDriver(config, [], "unused", evaluate=evaluate)
    driver.evaluations_exported = []
    record_eval = driver.metrics.record_eval
    driver.metrics.record_eval = lambda step, results: (driver.evaluations_exported.append(step), record_eval(step, results))
    tmp_path.mkdir(parents=True, exist_ok=True)
    asyncio.run(driver._evaluate())
    groups = [make_group("g0", [0.5, 0.6, 0.7, 0.5], modes=[1, 2, 3, 4], response_lens=[30, 150, 400, 800])]
    _, info = build_train_samples(groups, 1, AlgorithmConfig())
    driver.step = 1  # policy version 1
    idle = {"idle/rollout": 0.25, "idle/learner": 0.5, "saturated/judge": 0.0}
    driver._log_step({"step": 1, "version": 1, "time": 1.7e9, "step_seconds": 0.5, **batch_statistics([summarise(g) for g in groups], 1), **info.metrics, **idle})
    driver.trackers.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return driver, records


def test_tensorboard_gets_every_metrics_jsonl_value(tmp_path: Path) -> None:
    _, records = _driver_with_a_step_and_an_evaluation(tmp_path, "logging.tensorboard=true")
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                expected.setdefault(key, {})[record["step"]] = value
    assert "eval/goal_actor" in expected and "eval/hard_goal_opponent" in expected and "reward_mean" in expected
    written = _read_scalars(tmp_path / "tensorboard")
    assert written.keys() == expected.keys()
    for key, by_step in expected.items():
        assert written[key] == pytest.approx(by_step, rel=1e-6, nan_ok=True), key


def test_no_tracker_writes_anything_unless_asked(tmp_path: Path) -> None:
    _driver_with_a_step_and_an_evaluation(tmp_path)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_a_driver_evaluation_reaches_the_eval_gauges(tmp_path: Path) -> None:
    """The driver hands each evaluation's results to the eval gauges (which take every figure: test_driver_metrics)."""
    driver, records = _driver_with_a_step_and_an_evaluation(tmp_path)
    assert driver.evaluations_exported == [0] and "eval/goal_actor" in records[0]


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: keeps what a run was given."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: dict = {}
        self.logged: list[tuple[int, dict]] = []
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished = True

        return Run()


def test_wandb_logs_every_record_offline_under_the_run_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")  # offline whatever the environment says
    run_dir = tmp_path / "ampo-seed2"
    _, records = _driver_with_a_step_and_an_evaluation(run_dir, "logging.wandb=true")
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert fake.init_kwargs["mode"] == "offline" and fake.init_kwargs["dir"] == str(run_dir)
    assert fake.init_kwargs["project"] == fake.init_kwargs["name"] == "ampo-seed2"
    assert fake.init_kwargs["config"]["logging"]["wandb"] is True
    assert [step for step, _ in fake.logged] == [record["step"] for record in records] == [0, 1]
    assert fake.logged[0][1]["eval/goal_actor"] == 6.5 and fake.logged[1][1]["reward_mean"] == records[1]["reward_mean"]
    assert "time" not in fake.logged[1][1] and fake.finished


def test_a_missing_tracker_package_stops_the_driver_at_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.driver import TrainingDriver

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    config = load_config(TINY, [f"cluster.run_dir={tmp_path}", "logging.wandb=true"])
    with pytest.raises(TrackerError, match=r"logging\.wandb=true needs the wandb package: pip install wandb"):
        TrainingDriver(config, [], "unused")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    config = load_config(TINY, [f"cluster.run_dir={tmp_path}", "logging.tensorboard=true"])
    with pytest.raises(TrackerError, match=r"logging\.tensorboard=true needs the tensorboard package: pip install tensorboard"):
        TrainingDriver(config, [], "unused")
