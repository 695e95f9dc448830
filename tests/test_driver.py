"""The training driver end to end on the tiny model: real rollout actors (vLLM), a real reward pool over
HTTP (the fault-injecting server as a deliberate judge double), the replay queue and an FSDP2 learner."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from actors.sotopia import SotopiaDataset
from actors.states import make_state
from cluster.config import load_config
from cluster.driver import TrainingDriver
from testing.fault_server import FaultConfig, FaultServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def states():
    dataset = SotopiaDataset.load()
    return [make_state(dataset, i, [], (5.0, 5.0)) for i in range(12)]


@pytest.fixture(scope="module")
def cloned(ray_local, tiny_model_dir, tmp_path_factory):
    """The tiny model behaviour-cloned on well-formed demonstrations and the short-prompt states it answers in
    format: samples reach the judge (the random model writes only format errors, which never do)."""
    from rule_rewards import bc_policy, short_prompt_states

    return bc_policy(tiny_model_dir, tmp_path_factory.mktemp("bc")), short_prompt_states(12)


def judge_requests(judge) -> int:
    return sum(judge.counts().values())


@pytest.fixture(scope="module")
def judge():
    with FaultServer(FaultConfig(fault_rate=0.0)) as server:
        yield server


def make_driver(tiny_config_path, tiny_model_dir, tmp_path, states, judge, *overrides, **kwargs):
    config = load_config(
        tiny_config_path,
        [f"rollout.model={tiny_model_dir}", f"cluster.run_dir={tmp_path / 'run'}", "learner.resume=auto", *overrides],
    )
    return TrainingDriver(config, states, tiny_model_dir, judge_url=judge.base_url, judge_model="judge", **kwargs)


def assert_accounted(summary):
    groups = summary["groups"]
    assert groups["issued"] == groups["generated"] == groups["scored"]
    depth = summary["queue"]["depth"]
    assert groups["scored"] == groups["consumed"] + groups["refused"] + groups["dropped"] + depth
    assert groups["queued"] == groups["consumed"] + groups["dropped"] + depth


@pytest.mark.parametrize("staleness", [0, 1], ids=["synchronous", "asynchronous"])
def test_run_finishes_with_every_group_accounted_for(ray_local, tiny_config_path, cloned, tmp_path, judge, staleness):
    versions = []
    policy, states = cloned
    asked = judge_requests(judge)
    driver = make_driver(
        tiny_config_path, policy, tmp_path, states, judge,
        f"algorithm.max_staleness={staleness}", "algorithm.total_steps=3",
        on_step=lambda record: versions.append(record["version"]),
    )
    summary = driver.run()
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert versions == [1, 2, 3]
    assert_accounted(summary)
    groups = summary["groups"]
    # No group is generated that no step will consume: exactly the steps' groups plus replacements.
    assert groups["issued"] == 3 * 2 + groups["refused"] + groups["dropped"]
    if staleness == 0:
        assert groups["refused"] == groups["dropped"] == 0  # never more than one batch ahead
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    # The samples were judged: well-formed ones got the judge's goal reward, not the format error's −2.
    assert judge_requests(judge) > asked
    assert min(l["format_error_ratio"] for l in lines) < 1.0 and max(l["reward_mean"] for l in lines) > -2.0
    assert all(l["unscored_ratio"] == 0.0 for l in lines)  # the test judge answers every call
    assert list((tmp_path / "run" / "rollouts").glob("*.parquet"))
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir()


def test_resume_continues_without_skipping_or_repeating(ray_local, tiny_config_path, tiny_model_dir, tmp_path, states, judge):
    first = make_driver(tiny_config_path, tiny_model_dir, tmp_path, states, judge, "algorithm.total_steps=2", "learner.checkpoint_every=1")
    summary1 = first.run()
    assert summary1["steps"] == 2
    second = make_driver(tiny_config_path, tiny_model_dir, tmp_path, states, judge, "algorithm.total_steps=4", "learner.checkpoint_every=1")
    summary2 = second.run()
    assert summary2["steps"] == 4
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((tmp_path / "run" / "rollouts").glob("*.parquet"))]
    group_ids = [g for t in tables for g in set(t.column("group_id").to_pylist())]
    assert len(group_ids) == len(set(group_ids)), "a group was generated twice"
    assert sorted(group_ids, key=lambda g: int(g[1:])) == [f"g{i}" for i in range(len(group_ids))]


def test_every_catalogued_series_carries_values_during_real_steps(ray_local, tiny_config_path, cloned, tmp_path, judge):
    """Two learner steps and three evaluations of a real run (every role, the judge reached), its metrics endpoint
    scraped every second as Prometheus would: any series of the catalogue that never carried a sample fails the
    test, by name."""
    from cluster.endpoints import Endpoint
    from cluster.evaluation import driver_evaluation
    from cluster.metrics import CATALOGUE

    policy, states = cloned
    config = load_config(tiny_config_path, [
        f"rollout.model={policy}", f"cluster.run_dir={tmp_path / 'run'}", "algorithm.total_steps=2", "algorithm.max_staleness=1",
        "eval.max_episodes=1", "eval.max_turns=2", "eval.every_steps=1", "eval.hard_only=true",
    ])
    evaluation = driver_evaluation(config, judge=Endpoint(judge.base_url, "judge"), out_dir=tmp_path / "run" / "eval")
    driver = TrainingDriver(config, states, policy, judge_url=judge.base_url, judge_model="judge", evaluate=evaluation)
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    wanted = {spec.exported for spec in CATALOGUE}
    seen: dict[str, float] = {}
    texts: list[str] = []
    running = threading.Event()

    def scrape() -> None:  # as Prometheus does, while the run is live (its roles' series end with them)
        while running.is_set():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            texts.append(text)
            for line in text.splitlines():
                if line.startswith("ray_ampo_"):
                    name = line.split("{")[0].split(" ")[0].removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                    seen[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(1.0)

    running.set()
    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        summary = driver.run()
        deadline = time.monotonic() + 30  # the last records reach the endpoint with Ray's next export
        while not wanted <= set(seen) and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        running.clear()
        scraper.join(timeout=30)
    assert summary["steps"] == 2
    missing = sorted(wanted - set(seen))
    assert not missing, f"catalogued series without a sample during two steps and evaluations: {missing}"
    assert seen["ray_ampo_policy_version"] >= 1 and seen["ray_ampo_rollout_tokens_generated_total"] > 0
    text = "".join(texts)
    # The per-mode advantage series are set from the learner's keys (they once never were).
    modes = {m.group(1) for m in re.finditer(r'ray_ampo_advantage_mean\{[^}]*mode="(\d)"', text)}
    assert modes == {"1", "2", "3", "4"}


def test_groups_without_a_gradient_are_filtered_and_replaced(ray_local, tiny_config_path, tiny_model_dir, tmp_path, judge):
    import pyarrow.parquet as pq
    from rule_rewards import bc_policy, short_prompt_states

    from learner.ampo import informative_groups

    states = short_prompt_states(8)
    assert len({len(s.agent1_name) % 2 for s in states}) == 2  # both kinds of state are there
    policy = bc_policy(tiny_model_dir, tmp_path / "bc")
    driver = make_driver(
        tiny_config_path, policy, tmp_path, states, judge, "reward.custom_reward=tests.rule_rewards:flat_on_half",
        # A format error earns 1 too: a group of a flat state is then always a tie (with −2, one broken sample would
        # give it a gradient, and whether any group is filtered would be left to chance).
        "reward.format_error_reward=1.0",
        "algorithm.estimator=grpo", "algorithm.filter_uninformative=true", "algorithm.total_steps=3",
        "algorithm.max_staleness=1", "rollout.n=8", "rollout.max_response_tokens=48",
    )
    records = []
    driver.on_step = records.append
    summary = driver.run()
    groups = summary["groups"]
    assert summary["steps"] == 3 and groups["consumed"] == 3 * 2 and groups["filtered"] > 0
    assert sum(r["filtered_groups"] for r in records) <= groups["filtered"]  # (later ones may wait for a step)
    # Accounting closes with the filtered groups: every scored group was trained, refused, dropped, filtered or waits.
    depth = summary["queue"]["depth"]
    assert groups["issued"] == groups["generated"] == groups["scored"]
    assert groups["scored"] == groups["consumed"] + groups["refused"] + groups["dropped"] + groups["filtered"] + depth
    # Every group that reached the queue has a gradient under GRPO.
    table = pq.read_table(sorted((tmp_path / "run" / "rollouts").glob("*.parquet"))).to_pylist()
    by_group = {}
    for row in table:
        by_group.setdefault(row["group_id"], []).append(row)
    for rows in by_group.values():
        assert informative_groups([r["reward"] for r in rows], [1] * len(rows), [r["mode"] or -1 for r in rows],
                                  [0] * len(rows), estimator="grpo").all()
