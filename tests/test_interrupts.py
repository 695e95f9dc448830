"""Stopping a command as a user does (Ctrl-C, or SIGTERM from a scheduler): it ends within seconds, leaves no process
of its own behind, keeps what was finished and says that the same command continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.fault_server import FaultConfig, FaultServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def session_processes(session: int) -> list[str]:
    """`pid command` of every live process in a session (the command's own, started with start_new_session)."""
    listing = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
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
