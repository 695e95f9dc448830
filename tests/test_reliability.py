"""Reliability suite (issue 8, point 5; summary in docs/reliability.md): what a fault costs a run.

* a judge failing 30 % of its calls in several ways: the run finishes and no sample is silently scored;
* the judge down for a while: time is lost, no group and no sample;
* a matrix of bad inputs, each with the clear error it gets;
* the judge API key never written to a log, the config dump, a checkpoint or a metric.

Rollout actors, reward actors, learner ranks, the judge server and the driver killed under a random schedule, with
every group trained on exactly once: `tests/test_chaos.py` (`bench/chaos.py`).

The driver runs on the tiny model; where the judge must actually be asked, the policy is first behaviour-cloned
for a few seconds on short demonstrations (``tests/rule_rewards.py``) so that its samples are well-formed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from judge_fixtures import BROKEN_RESPONSE, make_group, reward_config, response
from rule_rewards import SYSTEM, bc_policy, short_prompt_states

from actors.states import StateDataError, read_states, training_rows
from cluster.config import Config, ConfigError, load_config
from cluster.driver import TrainingDriver
from cluster.sources import resolve_model
from learner.bc import BCDataError, load_bc_records
from learner.checkpoint import begin_checkpoint, finish_checkpoint, read_checkpoint
from testing.fault_server import OUTCOMES, FaultConfig, FaultServer
from reward.modes import format_response
from reward.metrics import FORMAT_ERROR_MODE
from reward.pool import RewardScorer, load_tokenizer
from reward.prompts import goal_prompt

JUDGE_FAULTS = tuple(kind for kind in OUTCOMES if kind != "ok")


# ---------------------------------------------------------------------------------------------------- helpers


class KeyRecordingServer(FaultServer):
    """The fault-injecting judge, also recording the ``Authorization`` header of every chat request (to prove
    the secret key was really sent, while the rest of the test proves it was never written anywhere)."""

    def __init__(self, config: FaultConfig) -> None:
        super().__init__(config)
        self.authorizations: list[str] = []

    async def _chat(self, request: Any) -> Any:
        self.authorizations.append(request.headers.get("Authorization", ""))
        return await super()._chat(request)


def driver_config(tiny_config_path: Path, model: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(tiny_config_path, [f"rollout.model={model}", f"cluster.run_dir={run_dir}", *overrides])


def read_rollouts(run_dir: Path, files: list[Path] | None = None) -> pa.Table:
    paths = files if files is not None else sorted((run_dir / "rollouts").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in paths])


def assert_accounted(summary: dict[str, Any]) -> None:
    """The driver's accounting identity (see cluster/driver.py)."""
    groups, depth = summary["groups"], summary["queue"]["depth"]
    assert groups["issued"] == groups["generated"] == groups["scored"], groups
    assert groups["scored"] == groups["consumed"] + groups["refused"] + groups["dropped"] + depth, (groups, depth)
    assert groups["queued"] == groups["consumed"] + groups["dropped"] + depth, (groups, depth)


# ---------------------------------------------------------------------------------------------------- (a) + (e)


@pytest.fixture(scope="module")
def faulty_judge_run(ray_local, tiny_model_dir: Path, tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One driver run of a behaviour-cloned tiny policy against a judge that fails 30 % of its calls (every fault
    kind), with a recognisable secret as the judge API key (environment variable in the driver, key file for the
    reward actors, whose environment Ray fixed when it started). No retries and one parse round, so each injected
    fault becomes a failed sample whose reason the test can check against the server's log."""
    tmp = tmp_path_factory.mktemp("faulty-judge")
    policy = bc_policy(tiny_model_dir, tmp / "bc")
    secret = f"sk-ampo-secret-{uuid.uuid4().hex}"
    key_file = tmp / "judge.key"
    key_file.write_text(secret)
    states = short_prompt_states(12)  # one epoch: each group its own state, so a question is asked once
    fault = FaultConfig(fault_rate=0.3, mix={kind: 1.0 for kind in JUDGE_FAULTS}, hang_s=6.0, retry_after_s=0.05, seed=3)
    run_dir = tmp / "run"
    config = driver_config(
        tiny_config_path, policy, run_dir,
        "rollout.max_response_tokens=48", "rollout.n=4", "algorithm.groups_per_step=4", "algorithm.total_steps=3",
        "algorithm.max_staleness=0", "learner.checkpoint_every=1", "learner.resume=never",
        "reward.judge.timeout_s=4.0", "reward.judge.max_retries=0", "reward.judge.retry_window_s=0", "reward.judge.parse_rounds=1",
        f"reward.judge.api_key_file={key_file}",
    )
    captured: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    pool_stats: list[Any] = []
    try:
        with pytest.MonkeyPatch.context() as patch, KeyRecordingServer(fault) as server:
            patch.setenv("AMPO_JUDGE_API_KEY", secret)
            driver = TrainingDriver(
                config, states, policy, judge_url=server.base_url, judge_model="judge",
                # With max_staleness 0 nothing is in flight when a step is logged: the pool has scored exactly the
                # groups consumed so far. The pool is gone after run(), so its counts are read here.
                on_step=lambda record: pool_stats.append(driver.reward_pool.stats()),
            )
            summary = driver.run()
            counts, judge_log = server.counts(), server.log
            authorizations = list(server.authorizations)
            port = ray_local._private.worker.global_worker.node.metrics_export_port
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    yield {
        "summary": summary, "run_dir": run_dir, "states": states, "pool": pool_stats[-1], "counts": counts,
        "judge_log": judge_log, "server": server, "secret": secret, "authorizations": authorizations,
        "logs": captured, "scrape": scrape, "session_dir": Path(ray_local._private.worker._global_node.get_session_dir_path()),
    }


@pytest.mark.slow
def test_30_percent_judge_faults_nothing_silently_scored(faulty_judge_run: dict[str, Any]) -> None:
    run = faulty_judge_run
    summary, pool, counts, server = run["summary"], run["pool"], run["counts"], run["server"]
    assert summary["steps"] == 3 and not summary["interrupted"]
    assert_accounted(summary)
    table = read_rollouts(run["run_dir"])
    rows = table.to_pylist()
    contexts = {s.state_id: s.reward_context() for s in run["states"]}
    assert len(rows) == 3 * 4 * 4 == summary["groups"]["consumed"] * 4

    failures: Counter[str] = Counter()
    judged = format_errors = 0
    for row in rows:
        assert row["reward"] is not None or row["failure"] is not None, row  # never neither
        if not row["format_valid"]:
            assert row["reward"] == -2.0 and row["failure"].startswith(FORMAT_ERROR_MODE)
            format_errors += 1
            continue
        outcomes = server.outcomes_for(goal_prompt(contexts[row["state_id"]], row["answer"]))
        assert len(outcomes) == 1, outcomes  # one round, no retries: one call per question
        if row["reward"] is None:
            assert row["failure"] == outcomes[0] and row["judge_after"] is None  # the reason is what the server did
            failures[row["failure"]] += 1
        else:
            assert outcomes[0] == "ok" and row["failure"] is None and row["judge_after"] is not None
            judged += 1
    injected = {kind: n for kind, n in counts.items() if kind != "ok"}
    # Samples with the same answer in a group share one question, so samples ≥ calls per outcome.
    assert set(failures) == set(injected) and all(failures[k] >= injected[k] for k in injected), (failures, injected)
    assert len(injected) >= 3, injected  # several fault kinds really happened
    assert judged > 0 and format_errors + judged + sum(failures.values()) == len(rows)

    # The pool's own counts agree with the table, and its judge client with the server.
    assert pool.samples == len(rows) and pool.groups == summary["groups"]["scored"]
    assert pool.format_errors == format_errors
    assert dict(pool.invalid) == dict(failures)
    assert pool.judge.calls == sum(counts.values()) == len(run["judge_log"])
    assert dict(pool.judge.failures) == injected and pool.judge.succeeded == counts["ok"]
    # … and so do the per-step metrics.
    lines = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert round(sum(l["samples"] for l in lines)) == len(rows)
    assert round(sum(l["unscored_ratio"] * l["samples"] for l in lines)) == sum(failures.values())
    assert round(sum(l["format_error_ratio"] * l["samples"] for l in lines)) == format_errors
    print(f"\n30% judge faults: {len(rows)} samples: {judged} judged, {format_errors} format errors, "
          f"unscored {dict(failures)}; server outcomes {dict(counts)}")


@pytest.mark.slow
def test_judge_api_key_is_never_written(faulty_judge_run: dict[str, Any]) -> None:
    run = faulty_judge_run
    secret = run["secret"]
    assert run["authorizations"] and set(run["authorizations"]) == {f"Bearer {secret}"}  # it was really used
    assert run["logs"], "the driver's logging was captured"
    assert not [line for line in run["logs"] if secret in line]
    written = [p for p in run["run_dir"].rglob("*") if p.is_file()]
    assert run["run_dir"] / "config.yaml" in written and run["run_dir"] / "metrics.jsonl" in written
    assert any("checkpoints" in p.parts for p in written) and any("rollouts" in p.parts for p in written)
    assert [p for p in written if secret.encode() in p.read_bytes()] == []
    assert secret not in run["scrape"]
    ray_logs = [p for p in (run["session_dir"] / "logs").rglob("*") if p.is_file()]
    assert ray_logs, "Ray's worker logs were found"
    assert [p for p in ray_logs if secret.encode() in p.read_bytes()] == []


# ---------------------------------------------------------------------------------------------------- (b)


@pytest.mark.slow
def test_judge_down_for_a_while_costs_time_not_groups(
    ray_local, tiny_model_dir: Path, tiny_config_path: Path, tmp_path: Path
) -> None:
    """The judge stops answering (connection refused) right after step 1 and comes back 25 s later. The pool keeps
    retrying with backoff inside `retry_window_s`, generation waits at the in-flight cap instead of piling up groups,
    and training goes on once the judge is back: no group lost, no sample left unscored by the outage, and every
    failed attempt counted."""
    import threading

    policy = bc_policy(tiny_model_dir, tmp_path / "bc")
    run_dir = tmp_path / "run"
    config = driver_config(
        tiny_config_path, policy, run_dir,
        "rollout.max_response_tokens=48", "rollout.n=4", "algorithm.groups_per_step=2", "algorithm.total_steps=4",
        "algorithm.max_staleness=1", "learner.checkpoint_every=0", "learner.resume=never",
        "reward.judge.timeout_s=10", "reward.judge.max_retries=2", "reward.judge.retry_window_s=120",
        "reward.judge.backoff_base_s=0.5", "reward.judge.backoff_max_s=4",
    )
    cap = (config.algorithm.max_staleness + 1) * config.algorithm.groups_per_step
    outage = {"in_flight": [], "refused_during": 0}
    pool_stats: list[Any] = []
    with FaultServer(FaultConfig(fault_rate=0.0)) as server:

        def take_the_judge_down() -> None:
            server.stop()
            end = time.monotonic() + 25.0
            while time.monotonic() < end:
                outage["in_flight"].append(len(driver._tasks))
                time.sleep(0.5)
            server.start()

        def on_step(record: dict[str, Any]) -> None:
            pool_stats.append(driver.reward_pool.stats())
            if record["step"] == 1:
                threading.Thread(target=take_the_judge_down, daemon=True).start()

        started = time.monotonic()
        driver = TrainingDriver(config, short_prompt_states(12), policy, judge_url=server.base_url, judge_model="judge",
                                on_step=on_step)
        summary = driver.run()
        seconds = time.monotonic() - started
        judged_calls = server.counts()["ok"]
    assert summary["steps"] == 4 and not summary["interrupted"]
    assert_accounted(summary)
    assert summary["groups"]["consumed"] == 4 * 2 and summary["groups"]["issued"] <= 4 * 2 + summary["groups"]["refused"] + summary["groups"]["dropped"]
    assert outage["in_flight"] and max(outage["in_flight"]) <= cap, outage["in_flight"]  # generation waited
    rows = read_rollouts(run_dir).to_pylist()
    unscored = Counter(row["failure"] for row in rows if row["reward"] is None)
    assert not unscored, f"samples left unscored by the outage: {unscored}"
    judged = [row for row in rows if row["format_valid"]]
    assert judged, "no sample reached the judge: the test would hold whatever the outage did"
    pool = pool_stats[-1]
    assert pool.judge.errors["connection"] > 0 and pool.judge.retries >= pool.judge.errors["connection"], pool.judge
    print(f"\njudge down 25 s: run {seconds:.0f} s; {len(rows)} samples, {len(judged)} judged, none unscored; "
          f"{pool.judge.errors['connection']} refused attempts retried, {judged_calls} answered; "
          f"in flight during the outage at most {max(outage['in_flight'])} groups (cap {cap}); groups {summary['groups']}")


# ---------------------------------------------------------------------------------------------------- (d)


def test_config_typo_and_wrong_type_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'learner\.lrr'; did you mean 'learner\.lr'"):
        load_config(None, ["learner.lrr=1e-6"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'rollout\.temprature'; did you mean 'rollout\.temperature'"):
        load_config(typo)
    with pytest.raises(ConfigError, match=r"field 'algorithm\.total_steps' expects int, got 'lots'"):
        load_config(None, ["algorithm.total_steps=lots"])


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_model(str(missing))


def test_bad_data_rows_name_file_row_and_field(tmp_path: Path) -> None:
    rows = training_rows(short_prompt_states(2), SYSTEM)
    rows[1]["reward_model"]["state_reward"]["agent2"] = {"score": 12.0}
    states_file = tmp_path / "states.jsonl"
    states_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(StateDataError, match=rf"{states_file}: row 1: field 'state\.agent2\.score'.*less than or equal to 10") as error:
        read_states(states_file)
    print(f"\nRL states: {error.value}")
    record = {"system": "s", "instruction": "i", "input": "", "output": format_response(1, None, "Hi.")}
    bc_file = tmp_path / "bc.json"
    bc_file.write_text(json.dumps([record, {**record, "output": "no thinking header"}]))
    with pytest.raises(BCDataError, match=rf"{bc_file}: row 1: field 'output' is not a thinking-mode response") as error:
        load_bc_records(bc_file, check_format=True)
    print(f"BC records: {error.value}")


@pytest.mark.integration
@pytest.mark.parametrize("garbage", ["unparseable", "out_of_range"])
def test_judge_returning_garbage_marks_samples_invalid(tiny_model_dir: Path, garbage: str) -> None:
    texts = [response('"Fine, let us go."'), response('"No."', mode=2), BROKEN_RESPONSE]

    async def score() -> tuple[Any, Any]:
        with FaultServer(FaultConfig(script=[garbage] * 20)) as server:
            scorer = RewardScorer(reward_config(server.base_url), load_tokenizer(tiny_model_dir))
            try:
                return await scorer.score(make_group(texts)), scorer.stats()
            finally:
                await scorer.aclose()

    scored, stats = asyncio.run(score())
    valid = scored.samples[:2]
    assert [(s.reward, s.failure, s.judge_after) for s in valid] == [(None, garbage, None)] * 2
    assert scored.samples[2].reward == -2.0  # the format error is still a reward, never asked
    assert stats.invalid == {garbage: 2}


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("meta.json", b'{"format": "\xff', "not UTF-8 text"),
        ("meta.json", b'{"format": ', "not valid JSON: Expecting value at line 1 column 12"),
        ("meta.json", b"[]", "expected a JSON object, got list"),
        ("queue.json", b'{"order": [', "not valid JSON"),
    ],
)
def test_damaged_checkpoint_json_names_the_file(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    """The driver's part of a checkpoint: a damaged JSON file is named with what is wrong with it."""
    queue = {"arrow": b"", "meta": "{}"}
    path = finish_checkpoint(begin_checkpoint(tmp_path, 1), step=1, version=1, world_size=1, data_cursor={}, queue_snapshot=queue)
    (path / name).write_bytes(content)
    with pytest.raises(RuntimeError, match=re.escape(f"cannot read the checkpoint file {path / name}: {problem}")):
        read_checkpoint(path)


@pytest.mark.parametrize("damage", ["meta.json", "shard", "dcp-metadata", "optimizer_groups.json"])
@pytest.mark.slow
def test_corrupt_checkpoint_fails_resume_clearly(ray_local, tiny_model_dir: Path, tmp_path: Path, damage: str) -> None:
    """A damaged checkpoint file makes the resume raise an error naming the checkpoint, promptly (no hang, and
    never an unpickling of the garbage)."""
    from learner.config import AlgorithmConfig, LearnerConfig
    from learner.group import LearnerGroup

    learner = LearnerConfig(num_ranks=1, micro_batch_size=4, lr=1e-3, backend="gloo")
    group = LearnerGroup(learner, tiny_model_dir, algorithm=AlgorithmConfig(), setup_timeout_s=120)
    try:
        path = group.checkpoint(tmp_path, step=1, version=1, data_cursor={"cursor": {}})
        targets = {
            "meta.json": path / "meta.json",
            "shard": next((path / "state").glob("*.distcp")),
            "dcp-metadata": path / "state" / ".metadata",
            "optimizer_groups.json": path / "optimizer_groups.json",
        }
        target = targets[damage]
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2] + b"\x80garbage")  # truncated, then garbled
        with pytest.raises(Exception) as error:
            group.resume(path)
        message = str(error.value)
        print(f"\n{damage}: {type(error.value).__name__}: {message[:300]}")
        assert str(path) in message, message
    finally:
        group.shutdown()
