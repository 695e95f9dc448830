"""The managed local judge server: lifecycle with stand-in commands (fast), and the real vLLM OpenAI server
serving the tiny model, judged through the reward pool with structured output (slow)."""

from __future__ import annotations

import os
import sys
import time

import pytest
from judge_fixtures import BROKEN_RESPONSE, make_context, make_group, response, reward_config

from reward.pool import RewardPool
from reward.server import JudgeServer, JudgeServerError


class StandInServer(JudgeServer):
    """A JudgeServer whose process is a short Python script instead of vLLM (the lifecycle is the same)."""

    def __init__(self, script: str, **kwargs) -> None:
        super().__init__("unused-model", **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_command_line():
    server = JudgeServer(
        "/models/m",
        served_model_name="j",
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 26,
        port=8123,
        api_key="sk-secret",
    )
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    expected = {
        "--model": "/models/m",
        "--served-model-name": "j",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--kv-cache-memory-bytes": str(1 << 26),
    }
    for flag, value in expected.items():
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and "--structured-outputs-config" in cmd
    assert "sk-secret" not in " ".join(cmd) and "sk-secret" not in repr(server)
    assert server.base_url == "http://127.0.0.1:8123/v1"


@pytest.mark.timeout(60)
def test_early_exit_raises_with_the_log_tail(tmp_path):
    script = "import sys; print('cannot load the model: no such folder'); sys.exit(3)"
    server = StandInServer(script, log_path=tmp_path / "server.log")
    with pytest.raises(JudgeServerError, match="exited with code 3") as info:
        server.start()
    assert "cannot load the model: no such folder" in str(info.value)
    assert not server.running and (tmp_path / "server.log").exists()  # a given log is kept


def pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(60)
def test_startup_timeout_kills_the_whole_group(tmp_path):
    # The stand-in never answers /health and leaves a child in its group, like vLLM's engine core.
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, time\n"
        "child = subprocess.Popen(['sleep', '120'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('loading', flush=True)\n"
        "time.sleep(120)\n"
    )
    server = StandInServer(script, startup_timeout_s=1.5, stop_timeout_s=2, log_path=tmp_path / "server.log")
    started = time.monotonic()
    with pytest.raises(JudgeServerError, match="not healthy after 1.5 s") as info:
        server.start()
    assert "loading" in str(info.value) and not server.running
    main_pid, child_pid = (int(p) for p in pids.read_text().split())
    assert group_is_gone(main_pid) and pid_is_gone(child_pid)
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_stop_ends_children_that_ignore_sigterm():
    script = (
        "import http.server, signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '120'])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )

    class Healthy(StandInServer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", self.script, str(self.port)]

    with Healthy(script, stop_timeout_s=1) as server:
        assert server.running
        pgid = server.pid
        log_path = server.log_path
    assert group_is_gone(pgid) and not server.running
    assert not log_path.exists()  # the log it created is removed after a clean stop


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pool_against_the_real_vllm_judge(tiny_model_dir, ray_local):
    """vLLM's server with the tiny random model: structured output makes its answers parse, so every well-formed
    sample gets a reward from a real judge round trip."""
    server = JudgeServer(
        tiny_model_dir,
        served_model_name="tiny-judge",
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        startup_timeout_s=180,
    )
    started = time.monotonic()
    with server:
        ready_s = time.monotonic() - started
        pgid = server.pid
        config = reward_config(server.base_url, timeout_s=60, max_tokens=512, max_concurrency=4)
        pool = RewardPool(config, tiny_model_dir, base_url=server.base_url, model="tiny-judge")
        try:
            days = ["Sunday", "Monday", "noon"]
            texts = [response(f'"Could I borrow it until {day}?"', mode=1 + i) for i, day in enumerate(days)]
            group = make_group([*texts, BROKEN_RESPONSE], make_context(turn=2))
            scored = ray_local.get(pool.score(group).group, timeout=120)
            stats = pool.stats()
        finally:
            pool.shutdown()
    assert group_is_gone(pgid)
    judged = scored.samples[:3]
    assert all(s.valid and s.failure is None and 0.0 <= s.reward <= 1.0 for s in judged), [s.failure for s in judged]
    assert all(0.0 <= s.judge_after <= 10.0 for s in judged)
    assert scored.samples[3].reward == -2.0
    assert stats.judge.failures == {} and stats.judge.questions == 3
    after = [s.judge_after for s in judged]
    print(f"\nreal judge: ready in {ready_s:.1f} s; judge scores {after}; calls {stats.judge.calls}")
