"""The training driver killed (the process `ray job submit` runs), once in the middle of a checkpoint write and once
between checkpoints, and the same command submitted again: it continues from the last complete checkpoint, says which,
and over the run that finally finishes every group is trained on exactly once and the group accounting closes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.sotopia import SotopiaDataset
from actors.states import make_state, write_states
from cluster.config import load_config
from cluster.workfiles import read_json_lines
from testing.fault_server import FaultConfig, FaultServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def launch(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, process: subprocess.Popen[bytes], log: Path, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the driver ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.005)


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def writing(run_dir: Path) -> list[str]:
    """Checkpoints being written (`step_<N>.tmp`), once a complete one exists to fall back on."""
    return [p.name for p in (run_dir / "checkpoints").glob("step_*.tmp") if int(p.name[5:-4]) >= 2]


def complete_checkpoints(run_dir: Path) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")),
                  key=lambda name: int(name.split("_")[1]))


@pytest.mark.timeout(900)
def test_killed_driver_resumes_from_the_last_complete_checkpoint_and_trains_each_group_once(
    ray_local, tiny_model_dir: Path, tiny_config_path: Path, tmp_path: Path
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    states_file = write_states(
        [make_state(SotopiaDataset.load(), i, [], (5.0, 5.0)) for i in range(12)], tmp_path / "states.parquet",
        load_config(tiny_config_path).prompts.load().system.render(),
    )
    with FaultServer(FaultConfig(fault_rate=0.0)) as judge:
        command = [
            sys.executable, "-m", "cluster.cli", "train", "--config", str(tiny_config_path),
            f"rollout.model={tiny_model_dir}", f"cluster.run_dir={run_dir}", f"data.train_states={states_file}",
            f"cluster.address={ray_local.get_runtime_context().gcs_address}",  # a cluster that outlives the driver
            f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge",
            f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge", "eval.max_episodes=1", "eval.max_turns=2",
            f"algorithm.total_steps={STEPS}", "algorithm.max_staleness=1", "learner.checkpoint_every=1",
            "learner.keep_checkpoints=10", "learner.resume=auto", "rollout.max_response_tokens=32",
        ]

        # 1. Killed while a checkpoint is being written: the driver is frozen the moment a `.tmp` folder appears
        #    (it renames the folder into place itself, so the save cannot complete), then killed.
        first = launch(command, log)
        caught = None
        while caught is None:
            wait_for(lambda: writing(run_dir), first, log, "a checkpoint write after the first checkpoint")
            os.killpg(first.pid, signal.SIGSTOP)
            if writing(run_dir):
                caught = writing(run_dir)[0]
            else:  # renamed between the look and the stop: wait for the next one
                os.killpg(first.pid, signal.SIGCONT)
        kill(first)
        taken = complete_checkpoints(run_dir)[-1]
        assert int(taken[5:]) == int(caught[5:-4]) - 1, (caught, taken)

        # 2. Resubmitted: it says which checkpoint it took; killed again once it has logged a step past the next one.
        second = launch(command, log)
        resumed = int(taken[5:])
        says = f"resumed at step {resumed} (policy version {resumed}) from {run_dir / 'checkpoints' / taken}"
        wait_for(lambda: says in log.read_text(), second, log, "the resume")
        past = resumed + 2
        wait_for(lambda: any(r.get("step", 0) >= past and "reward_mean" in r for r in read_json_lines(run_dir / "metrics.jsonl")),
                 second, log, f"step {past}")
        kill(second)
        last = complete_checkpoints(run_dir)[-1]

        # 3. Resubmitted once more: it finishes.
        third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    output = third.stderr
    assert f"resumed at step {last[5:]} (policy version {last[5:]}) from {run_dir / 'checkpoints' / last}" in output

    summary = json.loads((run_dir / "summary.json").read_text())
    groups, waiting = summary["groups"], summary["queue"]["depth"]
    per_step = load_config(tiny_config_path).algorithm.groups_per_step
    assert summary["steps"] == STEPS and groups["consumed"] == STEPS * per_step
    assert groups["issued"] == groups["generated"] == groups["scored"], groups
    assert groups["scored"] == groups["consumed"] + groups["refused"] + groups["dropped"] + groups["filtered"] + waiting, groups

    # Over the lineage that finished, each step is recorded once and each group is trained on once.
    ledger = read_json_lines(run_dir / "consumed.jsonl")
    assert [r["step"] for r in ledger] == list(range(1, STEPS + 1))
    consumed = [g for r in ledger for g in r["groups"]]
    assert len(consumed) == len(set(consumed)) == STEPS * per_step, "a group was trained on twice"
    assert all(int(g[1:]) < groups["issued"] for g in consumed)
    steps = [r["step"] for r in read_json_lines(run_dir / "metrics.jsonl") if "reward_mean" in r]
    assert steps == list(range(1, STEPS + 1)), "the steps of a discarded lineage stayed in metrics.jsonl"
    discarded = read_json_lines(run_dir / "consumed.discarded.jsonl")
    assert discarded and all(r["step"] > resumed for r in discarded)  # the second run's steps past its checkpoint
    print(f"\ndriver kills: caught writing {caught}, resumed from {taken}, then from {last}; "
          f"{len(discarded)} discarded step record(s); groups {groups}")
