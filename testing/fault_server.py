"""A fault-injecting OpenAI-compatible judge server: a deliberate **test double** for tests and benches.

It is a real HTTP server (an aiohttp app on 127.0.0.1) speaking enough of the OpenAI API for the judge client:
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and ``GET /stats`` (its counters as JSON). It
does not run a model: an "ok" answer is valid judge JSON whose scores are derived from a hash of the prompt, or
whatever a configured ``answer`` function returns.

Every chat request gets one **outcome**, named after the failure kind the judge client should report for it:

* ``ok``: a valid answer after ``latency_s``;
* ``timeout``: sleeps ``hang_s`` (longer than the client's timeout) before answering;
* ``rate_limited``: HTTP 429 with ``Retry-After`` / ``retry-after-ms`` of ``retry_after_s``;
* ``server_error``: HTTP 500;
* ``bad_request``: HTTP 400 (not worth retrying);
* ``connection``: the connection is dropped without a response;
* ``bad_response``: HTTP 200 whose JSON body is cut off;
* ``unparseable``: a chat completion whose content is prose or truncated JSON;
* ``out_of_range``: valid JSON whose scores lie outside their ranges;
* ``truncated``: the valid answer, but marked as cut by the completion budget (``finish_reason: "length"``), so a
  client must not score it even though it parses.

Outcomes are deterministic given ``seed``, whatever the arrival order of concurrent requests: the n-th request
carrying a given prompt is a fault when ``h(seed, prompt, n, "rate") < fault_rate``, and the fault kind is drawn
from ``mix`` (weights) with a second hash. A ``script`` replaces the draw: the n-th request with a prompt gets
``script[n]`` (``ok`` past its end). Every decision is logged (``log``) and counted (``counts``), so tests can check
a client's counters against what was injected. Non-fault latency, timeouts and Retry-After are real waits.

Run it in a background thread (``start``/``stop`` or ``with FaultServer(...) as server``), or from a shell:
``python -m testing.fault_server --latency 0.2 --port 8011``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from reward.prompts import AGENTS, DIMENSIONS, EVAL_AGENT_KEYS, GOAL_SCORE_RANGE

OUTCOMES: tuple[str, ...] = (
    "ok",
    "timeout",
    "rate_limited",
    "server_error",
    "bad_request",
    "connection",
    "bad_response",
    "unparseable",
    "out_of_range",
    "truncated",
)
DEFAULT_MIX: Mapping[str, float] = {
    "timeout": 1.0,
    "rate_limited": 1.0,
    "server_error": 1.0,
    "unparseable": 1.0,
    "out_of_range": 1.0,
}


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (SHA-256, so no dependence on PYTHONHASHSEED)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_evaluation_prompt(prompt: str) -> bool:
    """True for an episode-evaluator prompt (it names the evaluator's answer keys), False for a goal prompt."""
    return EVAL_AGENT_KEYS[0] in prompt


def hashed_answer(prompt: str) -> str:
    """A valid answer chosen by a hash of the prompt: goal scores in 0..10, or a 7-dimension evaluation."""
    if is_evaluation_prompt(prompt):
        evaluation = {
            key: {
                dim.name: [
                    f"{dim.name} of agent {i + 1}",
                    dim.low + int(_unit(prompt, key, dim.name) * (dim.high - dim.low + 1)),
                ]
                for dim in DIMENSIONS
            }
            for i, key in enumerate(EVAL_AGENT_KEYS)
        }
        return json.dumps(evaluation)
    low, high = GOAL_SCORE_RANGE
    goal = {
        agent: {"reasoning": f"progress of {agent}", "score": low + int(_unit(prompt, agent) * (high - low + 1))}
        for agent in AGENTS
    }
    return json.dumps(goal)


def out_of_range_answer(prompt: str) -> str:
    """Well-formed JSON whose scores break their ranges (goal 11 and -1; every evaluation dimension high + 3)."""
    if is_evaluation_prompt(prompt):
        return json.dumps(
            {key: {dim.name: ["too high", dim.high + 3] for dim in DIMENSIONS} for key in EVAL_AGENT_KEYS}
        )
    return json.dumps({"agent1": {"reasoning": "x", "score": 11}, "agent2": {"reasoning": "y", "score": -1}})


def unparseable_answer(prompt: str) -> str:
    """Prose, or JSON cut off in the middle, alternating by prompt hash."""
    if _unit(prompt, "garble") < 0.5:
        return "Both agents made some progress; I would give the first one about seven."
    return '{"agent1": {"reasoning": "good start", "score": 7}, "agent2": {"reasoning": "'


@dataclass
class FaultConfig:
    """What the server injects. ``mix`` weights the fault kinds; ``answer(prompt)`` makes the "ok" text."""

    latency_s: float = 0.0
    fault_rate: float = 0.0
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    hang_s: float = 30.0
    retry_after_s: float = 0.2
    seed: int = 0
    script: Sequence[str] | None = None
    answer: Callable[[str], str] = hashed_answer
    evaluation_delay_s: float = 0.0
    """Extra wait before answering an episode-evaluator prompt: a slow 7-dimension judge."""
    model: str = "fault-judge"
    api_key: str | None = None
    """When set, every /v1 request without ``Authorization: Bearer <api_key>`` gets HTTP 401, as a hosted API does."""

    def __post_init__(self) -> None:
        unknown = [k for k in [*self.mix, *(self.script or ())] if k not in OUTCOMES]
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}; expected some of {OUTCOMES}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must lie in [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not any(w > 0 for k, w in self.mix.items() if k != "ok"):
            raise ValueError("fault_rate > 0 needs a positive weight for some fault in mix")


@dataclass(frozen=True)
class Injection:
    """One handled request: the prompt's digest, which occurrence of that prompt it was, the outcome, when
    (monotonic seconds) it arrived, and the request's temperature, whether it asked for structured output, and its
    top_p."""

    prompt_key: str
    occurrence: int
    outcome: str
    arrived: float
    temperature: float | None
    structured: bool
    top_p: float | None = None


def prompt_key(prompt: str) -> str:
    """The digest under which the server files a prompt (tests use it to find a sample's requests)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


class FaultServer:
    """The fault-injecting judge server (see the module docstring). Binds ``host`` (loopback by default) on
    ``port`` (0: a free one); ``base_url`` is valid after ``start``."""

    def __init__(self, config: FaultConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or FaultConfig()
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._log: list[Injection] = []
        self._active = 0
        self._max_active = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 10.0) -> FaultServer:
        """Serve in a daemon thread with its own event loop; returns once the socket listens."""
        if self._thread is not None:
            raise RuntimeError("the fault server is already running")
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name="fault-judge-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the fault server did not start within {timeout_s} s")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"the fault server failed to start: {self._startup_error}") from self._startup_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving; hanging requests are released at once."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the fault server did not stop within {timeout_s} s")
        self._thread = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()
            self._ready.set()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=0.5)
            await site.start()
            sockets = runner.addresses
            self.port = int(sockets[0][1])
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            await runner.cleanup()
            return
        self._ready.set()
        await self._stopping.wait()
        await runner.cleanup()

    # ---- counters --------------------------------------------------------------------------------------------

    def reset(self, config: FaultConfig | None = None) -> None:
        """Forget all counts, the log and the per-prompt occurrences; optionally switch to a new ``config``
        (lets one running server serve several tests)."""
        with self._lock:
            if config is not None:
                self.config = config
            self._seen.clear()
            self._counts.clear()
            self._log.clear()
            self._max_active = self._active

    def counts(self) -> Counter[str]:
        """Requests handled so far by outcome (``ok`` included)."""
        with self._lock:
            return Counter(self._counts)

    @property
    def log(self) -> list[Injection]:
        """Every chat request handled so far, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def max_concurrent(self) -> int:
        """The most chat requests that were being handled at the same moment."""
        with self._lock:
            return self._max_active

    def outcomes_for(self, prompt: str) -> list[str]:
        """The outcomes of all requests that carried ``prompt``, in order."""
        key = prompt_key(prompt)
        return [entry.outcome for entry in self.log if entry.prompt_key == key]

    # ---- decisions -------------------------------------------------------------------------------------------

    def _decide(self, key: str) -> tuple[int, str]:
        with self._lock:
            occurrence = self._seen[key]
            self._seen[key] += 1
        cfg = self.config
        if cfg.script is not None:
            return occurrence, cfg.script[occurrence] if occurrence < len(cfg.script) else "ok"
        if _unit(cfg.seed, key, occurrence, "rate") >= cfg.fault_rate:
            return occurrence, "ok"
        faults = [(k, w) for k, w in cfg.mix.items() if k != "ok" and w > 0]
        pick = _unit(cfg.seed, key, occurrence, "kind") * sum(w for _, w in faults)
        for kind, weight in faults:
            pick -= weight
            if pick < 0:
                return occurrence, kind
        return occurrence, faults[-1][0]

    # ---- HTTP ------------------------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        wanted = self.config.api_key
        if wanted is not None and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {wanted}":
            error = {"error": {"message": "invalid API key (injected)", "type": "invalid_request_error", "code": "invalid_api_key"}}
            return web.json_response(error, status=401)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.config.model, "object": "model"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"counts": dict(self.counts()), "max_concurrent": self.max_concurrent})

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops (so a hanging request never delays shutdown)."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        messages = body.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        key = prompt_key(prompt)
        occurrence, outcome = self._decide(key)
        structured = "structured_outputs" in body or "response_format" in body
        with self._lock:
            self._counts[outcome] += 1
            self._log.append(Injection(key, occurrence, outcome, arrived, body.get("temperature"), structured, body.get("top_p")))
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        try:
            return await self._respond(request, outcome, prompt, body)
        finally:
            with self._lock:
                self._active -= 1

    async def _respond(
        self, request: web.Request, outcome: str, prompt: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        cfg = self.config
        if outcome == "timeout":
            await self._sleep(cfg.hang_s)
            return self._completion(cfg.answer(prompt), body)
        if outcome == "rate_limited":
            headers = {"Retry-After": f"{cfg.retry_after_s:g}", "retry-after-ms": f"{cfg.retry_after_s * 1000:g}"}
            error = {"error": {"message": "rate limited (injected)", "type": "rate_limit"}}
            return web.json_response(error, status=429, headers=headers)
        if outcome == "server_error":
            error = {"error": {"message": "internal error (injected)", "type": "server_error"}}
            return web.json_response(error, status=500)
        if outcome == "bad_request":
            error = {"error": {"message": "invalid request (injected)", "type": "invalid_request_error"}}
            return web.json_response(error, status=400)
        if outcome == "connection":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        await self._sleep(cfg.latency_s + (cfg.evaluation_delay_s if is_evaluation_prompt(prompt) else 0.0))
        if outcome == "bad_response":
            cut = '{"id": "cut", "choices": [{"message": {"content": "'
            return web.Response(text=cut, content_type="application/json")
        if outcome == "unparseable":
            return self._completion(unparseable_answer(prompt), body)
        if outcome == "out_of_range":
            return self._completion(out_of_range_answer(prompt), body)
        return self._completion(cfg.answer(prompt), body, cut=outcome == "truncated")

    def _completion(self, text: str, body: dict[str, Any], *, cut: bool = False) -> web.Response:
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []) // 4
        completion_tokens = len(text) // 4
        return web.json_response(
            {
                "id": f"chatcmpl-{prompt_key(text)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.config.model),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length" if cut else "stop"}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted (for manual experiments and benches run from a shell)."""
    parser = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible judge server (a test double).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests that get a fault")
    parser.add_argument("--retry-after", type=float, default=0.2, help="Retry-After of injected 429s, seconds")
    parser.add_argument("--hang", type=float, default=30.0, help="how long an injected timeout hangs, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = FaultConfig(
        latency_s=args.latency,
        fault_rate=args.fault_rate,
        retry_after_s=args.retry_after,
        hang_s=args.hang,
        seed=args.seed,
    )
    server = FaultServer(config, host=args.host, port=args.port).start()
    print(f"fault judge server on {server.base_url} (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
