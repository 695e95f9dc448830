"""Stopping a command as a user does (Ctrl-C, or SIGTERM from a scheduler): it ends within seconds, leaves no process
of its own behind, keeps what was finished and says that the same command continues."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from judge_fixtures import response

from testing.fault_server import FaultConfig, FaultServer, hashed_answer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def session_processes(session: int) -> list[str]:
    """`pid command` of every live process in a session (the command's own, started with start_new_session)."""
    listing = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        pid, sid, stat, args = line.split(None, 3)
        if int(sid) == session and not stat.startswith("Z"):
            found.append(f"{pid} {args[:100]}")
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.timeout(600)
def test_eval_stops_within_seconds_keeps_what_was_judged_and_leaves_nothing(tiny_model_dir, tmp_path, signum):
    """Four episodes are played at once, then wait for a judge that answers evaluations only after ten minutes (the
    slow 7-dimension judge of a CPU dry run); the interruption comes while they wait."""
    run_dir = tmp_path / "run"
    with FaultServer(FaultConfig(evaluation_delay_s=600)) as judge:
        command = [
            sys.executable, "-m", "cluster.cli", "eval", "--config", "configs/tiny.yaml", f"rollout.model={tiny_model_dir}",
            f"cluster.run_dir={run_dir}", f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge",
            f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge", "eval.max_turns=2",
            "rollout.max_response_tokens=16", "--max-episodes", "4",
        ]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while judge.counts()["ok"] < 1 + 4:  # the preflight's question, then the four evaluations
                assert process.poll() is None and time.monotonic() < deadline, "the episodes never reached the judge"
                time.sleep(0.5)
            process.send_signal(signum)
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, output[-3000:]
    assert "interrupted: 4 played episode(s) are being judged" in output
    assert "ampo: interrupted; what was finished is kept, and the same command continues from it" in output
    time.sleep(2)
    assert session_processes(process.pid) == []


def processes_mentioning(marker: str) -> list[str]:
    """`pid command` of every live process whose command line names ``marker`` (servers in their own session)."""
    return [f"{pid} {args[:100]}" for pid, _, args in _mentioning(marker)]


def sessions_mentioning(marker: str) -> set[int]:
    """The sessions of the processes whose command line names ``marker``: a local vLLM server's session also holds
    its engine core and workers, whose command lines are renamed."""
    return {sid for _, sid, _ in _mentioning(marker)}


def _mentioning(marker: str) -> list[tuple[int, int, str]]:
    listing = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    rows = (line.split(None, 3) for line in listing.splitlines())
    return [(int(pid), int(sid), args) for pid, sid, stat, args in rows
            if marker in args and not stat.startswith("Z") and int(pid) != os.getpid()]


STAGES = (
    ("demonstrations", "[1/6] demonstrations"),
    ("behaviour cloning", "[2/6] behaviour cloning"),
    ("RL states", "[3/6] RL states"),
    ("AMPO training", "step 1/8"),  # a learner step done: the driver's own stop (finish the step, checkpoint)
    ("evaluation", "[5/6] evaluation"),
)


def expert_or_judge(prompt: str) -> str:
    """The expert's demonstration (every key its prompt asks for), else a goal or 7-dimension judgement."""
    keys = re.findall(r'^- "(\w+)":', prompt, flags=re.M)
    if not keys:
        return hashed_answer(prompt)
    values = {key: f"{key.lower()} for this turn" for key in keys}
    values["answer"] = "Lovely to see you, could we talk about the trip?"
    return json.dumps(values)


def interrupt(
    command: list[str], cue: str, signum: int, after_s: float, marker: str
) -> tuple[str, float, subprocess.Popen[str], set[int]]:
    """Start `command` in its own session, send `signum` `after_s` seconds after a line with `cue`; returns the
    output, how long it took to stop, the finished process, and the sessions it had started (its own, and those of
    the processes naming `marker` just before the signal)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while not any(cue in line for line in seen):
            line = process.stdout.readline()
            assert line or process.poll() is None, f"ended before {cue}:\n{''.join(seen)[-3000:]}"
            assert time.monotonic() < deadline, f"{cue} not reached in 600 s:\n{''.join(seen)[-3000:]}"
            seen.append(line)
        time.sleep(after_s)
        assert process.poll() is None, f"finished before the interruption:\n{''.join(seen)[-3000:]}"
        sessions = {process.pid} | sessions_mentioning(marker)
        sent = time.monotonic()
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=120)
        return "".join(seen) + rest, time.monotonic() - sent, process, sessions
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def assert_stopped_cleanly(
    output: str, process: subprocess.Popen[str], signum: int, marker: str, sessions: set[int]
) -> list[str]:
    """Exit status, the two messages, and no process left; returns the five lines of where the run stands."""
    assert process.returncode == 128 + signum, f"status {process.returncode}\n{output[-3000:]}"
    assert "ampo: interrupted; what was finished is kept, and the same command continues from it" in output
    assert "ampo: where the run stands:" in output, output[-3000:]
    deadline = time.monotonic() + 15  # Ray's agents leave a few seconds after their raylet
    while left := [p for sid in sorted(sessions) for p in session_processes(sid)] + processes_mentioning(marker):
        assert time.monotonic() < deadline, f"left running 15 s after the command ended: {left}"
        time.sleep(0.5)
    return [line.strip() for line in output.split("ampo: where the run stands:")[1].splitlines()[1:6]]


@pytest.mark.timeout(1500)
def test_run_stops_in_every_stage_leaves_nothing_and_the_same_command_continues(tiny_model_dir, tmp_path):
    """`ampo run` stopped once in each stage (Ctrl-C and SIGTERM in turn) shortly into it, each time run again with
    the same command; then finished. The expert and judge is the test server, answering after a second, so that every
    stage lasts long enough to be interrupted whatever the tiny model writes; the engines, Ray and the learner are
    the real ones. The model is copied under this test's folder, so that what the run starts can be found by it."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    run_dir = tmp_path / "run"
    with FaultServer(FaultConfig(answer=expert_or_judge, latency_s=1.0)) as judge:
        command = [
            sys.executable, "-m", "cluster.cli", "run", "--config", "configs/tiny.yaml", f"rollout.model={model}",
            f"cluster.run_dir={run_dir}", "data.demo_states=8", "data.build_episodes=3", "eval.max_turns=2",
            "algorithm.total_steps=8",  # steps of a few seconds: the stop lands well before the last
            f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge",
            f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge",
        ]
        for index, (stage, cue) in enumerate(STAGES):
            signum = (signal.SIGINT, signal.SIGTERM)[index % 2]
            output, stopped_in, process, sessions = interrupt(command, cue, signum, 1.5, str(tmp_path))
            stands = assert_stopped_cleanly(output, process, signum, str(tmp_path), sessions)
            assert [line.split(":")[0] for line in stands] == [name for name, _ in STAGES]
            for line in stands[:index]:
                assert ": complete (" in line, stands  # the stages before this one are done
            assert ": complete (" not in stands[index], stands  # this one was stopped
            if stage == "AMPO training":
                assert "checkpoint of step" in stands[index], stands
            print(f"\n{stage}: {signal.Signals(signum).name} stopped it in {stopped_in:.1f} s; " + "; ".join(stands))
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((run_dir / "local_summary.json").read_text())
    assert summary["training"]["steps"] == 8 and summary["evaluation"]
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(900)
def test_run_stopped_in_behaviour_cloning_stops_its_own_vllm_server(tiny_model_dir, tmp_path):
    """The case a user met: `ampo run` with its own local vLLM server (expert, judge and evaluator) stopped by SIGTERM
    during behaviour cloning, while Ray and the learner start. The demonstrations are given, so the run goes
    straight to behaviour cloning."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    demos = [{"system": "s", "instruction": "i", "input": "", "output": response("Hello there.", mode)}
             for mode in (1, 2, 3, 4) for _ in range(4)]
    (run_dir / "demos.json").write_text(json.dumps(demos))
    command = [sys.executable, "-m", "cluster.cli", "run", "--config", "configs/tiny.yaml", f"rollout.model={model}",
               f"cluster.run_dir={run_dir}"]
    output, stopped_in, process, sessions = interrupt(command, "[2/6] behaviour cloning", signal.SIGTERM, 4.0, str(tmp_path))
    assert len(sessions) == 2, sessions  # the command's, and its vLLM server's
    stands = assert_stopped_cleanly(output, process, signal.SIGTERM, str(tmp_path), sessions)
    assert stands[0].startswith("demonstrations: complete") and stands[1] == "behaviour cloning: not complete"
    print(f"\nbehaviour cloning with the local server: SIGTERM stopped it in {stopped_in:.1f} s")
