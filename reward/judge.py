"""The judge client: one robust path from a prompt to a validated JSON answer of an OpenAI-compatible LLM.

Judges are slow, rate-limited and flaky; the authors' code retries every HTTP call 5 times, 3 s apart, and turns
whatever still fails into a score of 0. This client keeps many calls in flight, backs off properly and never invents
a score: every question ends in a value or in a typed failure.

A **question** (``ask``) runs in up to ``parse_rounds`` rounds. Each round is one logical call (``chat``) whose
answer is parsed and validated; rounds ``1..greedy_rounds`` ask at temperature 0.0 and later rounds at 1.0, the
authors' schedule for answers that cannot be parsed. A **logical call** is one or more HTTP **attempts**:

* each attempt holds one slot of an ``asyncio.Semaphore(max_concurrency)``, first takes one request from the
  requests-per-minute budget and an estimated ``ceil(len(prompt) / 4) + max_tokens`` tokens from the
  tokens-per-minute budget (``aiolimiter`` leaky buckets), and is cut off after ``timeout_s`` (both the HTTP
  client's timeout and an ``asyncio`` deadline, so a server that trickles bytes cannot hold it longer);
* a transient failure (timeout, 429, 5xx, connection error, a 200 whose body is not a chat completion) is retried
  at least ``max_retries`` times, and for as long as ``retry_window_s`` has not passed since the call's first
  attempt (a judge down for minutes costs time, not samples), each time after
  ``min(backoff_max_s, max(b, retry_after))`` seconds, where
  ``b = min(backoff_max_s, backoff_base_s * 2**k) * U(0.5, 1)`` for the k-th retry (exponential backoff with
  jitter) and ``retry_after`` is the server's ``retry-after-ms`` / ``Retry-After`` header (seconds or HTTP date);
  the slot is released while waiting (the loop is tenacity's `AsyncRetrying` with this wait);
* any other 4xx fails the call at once (``auth`` for 401/403, else ``bad_request``).

When a logical call still fails, the question fails with that kind; it does not start a new parse round, unlike
the reference, whose later rounds would hammer an endpoint that just failed ``max_retries + 1`` times.

The openai client's own retries are disabled (``max_retries=0``) so that every attempt passes through the
counters and limits here. Requests go through the client's documented ``post`` for custom request bodies rather
than ``chat.completions.create``: ``create`` converts its arguments through the SDK's TypedDict transform and the
response into pydantic models, about 1 ms of CPU per call on this machine, a third of the client's cost, which
caps the calls one actor can keep in flight. The body is plain JSON either way; the schema goes into it as vLLM's
``structured_outputs`` field (what ``extra_body`` would add) or as the standard ``response_format``.

Worst case for one question: ``parse_rounds`` logical calls, each ending at the later of ``(max_retries + 1)``
attempts (``(max_retries + 1) * timeout_s + max_retries * backoff_max_s``) and the first attempt to start after
``retry_window_s`` (at most ``retry_window_s + backoff_max_s + timeout_s``), plus limiter waits.

Counters (``JudgeStats``), kept exactly so that tests can compare them with what a server saw:
``calls`` = HTTP attempts; ``questions`` = ``ask``/``chat`` invocations; ``retries`` = attempts beyond the first
of a question (transport retries and parse rounds alike), so ``calls == questions + retries``; ``errors[kind]``
= failed attempts by kind (answer kinds included), so ``calls == succeeded + sum(errors)`` when every question
ends; ``failures[kind]`` = questions that ended in that failure.

The API key comes from the environment variable ``api_key_env`` or else the file ``api_key_file``; it is never
logged and never part of ``repr``. Without a key the client sends a placeholder (a local vLLM server without
``--api-key`` accepts anything).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, Literal, Protocol, TypeVar

import openai
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, stop_after_delay

from reward.answers import AnswerError, GoalScores, parse_goal_scores
from reward.config import JudgeConfig
from reward.prompts import GOAL_SCHEMA

log = logging.getLogger(__name__)

ErrorKind = Literal[
    "timeout",
    "rate_limited",
    "server_error",
    "connection",
    "bad_response",
    "bad_request",
    "auth",
    "unparseable",
    "out_of_range",
    "truncated",
]
TRANSIENT_KINDS: frozenset[str] = frozenset({"timeout", "rate_limited", "server_error", "connection", "bad_response"})
"""Failures of an HTTP attempt that are retried with backoff."""
ANSWER_KINDS: frozenset[str] = frozenset({"unparseable", "out_of_range", "truncated"})
"""Failures of a received answer that start a new parse round. `truncated`: the answer hit `max_tokens` and was cut,
so it is never parsed (a larger budget is the fix)."""

NO_KEY_PLACEHOLDER = "EMPTY"
CHARS_PER_TOKEN = 4
"""Rough prompt-size estimate for the tokens-per-minute budget (English text with BPE tokenizers)."""

T = TypeVar("T")


class JudgeObserver(Protocol):
    """Receives the client's events, e.g. to update Prometheus metrics. Called from the event loop."""

    def in_flight(self, count: int) -> None:
        """The number of HTTP attempts now in flight changed to ``count``."""

    def latency(self, seconds: float) -> None:
        """One HTTP attempt ended (in any way) after ``seconds``."""

    def error(self, kind: str) -> None:
        """One attempt failed with ``kind``: a transport kind, or an answer kind once its text was rejected."""

    def retry(self, kind: str) -> None:
        """Another attempt follows one that failed with ``kind``."""


@dataclass
class JudgeStats:
    """Counts of one client (see the module docstring for their exact relations)."""

    questions: int = 0
    calls: int = 0
    retries: int = 0
    succeeded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0

    def merge(self, other: JudgeStats) -> JudgeStats:
        """The sum of two clients' counts (``in_flight`` added too)."""
        return JudgeStats(
            questions=self.questions + other.questions,
            calls=self.calls + other.calls,
            retries=self.retries + other.retries,
            succeeded=self.succeeded + other.succeeded,
            errors=self.errors + other.errors,
            failures=self.failures + other.failures,
            in_flight=self.in_flight + other.in_flight,
        )


@dataclass(frozen=True)
class ChatResult:
    """The text of one logical call, or the kind of its failure after all retries."""

    text: str | None
    failure: ErrorKind | None = None
    detail: str | None = None
    calls: int = 0


@dataclass(frozen=True)
class JudgeResult(Generic[T]):
    """The validated value of a question, or why there is none. ``text`` is the last raw answer received."""

    value: T | None
    failure: ErrorKind | None = None
    detail: str | None = None
    calls: int = 0
    rounds: int = 0
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def load_api_key(config: JudgeConfig) -> str | None:
    """The key from the environment variable ``config.api_key_env``, else from ``config.api_key_file``, else
    None. Raises ValueError (naming the file, never its content) when the key file is configured but unreadable."""
    from_env = os.environ.get(config.api_key_env, "").strip()
    if from_env:
        return from_env
    if config.api_key_file is not None:
        try:
            key = config.api_key_file.expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(f"judge API key file {config.api_key_file} cannot be read: {exc.strerror}") from None
        if not key:
            raise ValueError(f"judge API key file {config.api_key_file} is empty")
        return key
    return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a server asks for: ``retry-after-ms`` (milliseconds), else ``Retry-After`` as seconds or as an
    HTTP date. None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def classify_error(exc: BaseException) -> tuple[ErrorKind, float | None]:
    """Map an exception of one HTTP attempt to its failure kind and the server's Retry-After, if any."""
    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, openai.APIStatusError):
        retry_after = retry_after_seconds(exc.response.headers)
        status = exc.status_code
        if status == 429:
            return "rate_limited", retry_after
        if status == 408:
            return "timeout", retry_after
        if status >= 500:
            return "server_error", retry_after
        if status in (401, 403):
            return "auth", None
        return "bad_request", None
    # A 200 whose body is not a chat completion (invalid JSON, wrong shape).
    return "bad_response", None


def completion_text(data: object) -> tuple[str, bool]:
    """The first choice's message content of a chat-completion JSON body ("" when the content is null), and whether
    the answer was cut by the completion budget (``finish_reason == "length"``). Raises ValueError when the body
    does not have the shape of a chat completion."""
    try:
        choice = data["choices"][0]  # type: ignore[index]
        content = choice["message"]["content"]
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"the response is not a chat completion: {str(data)[:200]!r}") from None
    if content is not None and not isinstance(content, str):
        raise ValueError(f"the message content is not text: {type(content).__name__}")
    return content or "", choice.get("finish_reason") == "length"


class JudgeClient:
    """Async judge client on ``openai.AsyncOpenAI`` (see the module docstring for limits, retries and counts).

    Create it inside the event loop that uses it (e.g. in an async actor method). ``base_url`` and ``model``
    override the config, which is how a started local server is plugged in (``base_url: local`` in the config
    cannot be used directly). ``rng`` seeds the backoff jitter.
    """

    def __init__(
        self,
        config: JudgeConfig,
        *,
        base_url: str | None = None,
        model: str | None = None,
        observer: JudgeObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        url = base_url or config.base_url
        name = model or config.model
        if url == "local" or name == "local":
            raise ValueError(
                "judge base_url/model `local` need a started local server: start reward.server.JudgeServer and "
                "pass its base_url and served model name"
            )
        self.config = config
        self.base_url = url
        self.model = name
        self._observer = observer
        self._rng = rng or random.Random()
        self._client = openai.AsyncOpenAI(
            api_key=load_api_key(config) or NO_KEY_PLACEHOLDER,
            base_url=url,
            timeout=config.timeout_s,
            max_retries=0,
        )
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._rpm = AsyncLimiter(config.requests_per_minute, 60.0) if config.requests_per_minute else None
        self._tpm = AsyncLimiter(config.tokens_per_minute, 60.0) if config.tokens_per_minute else None
        self._stats = JudgeStats()

    def __repr__(self) -> str:
        return f"JudgeClient(base_url={self.base_url!r}, model={self.model!r})"

    def stats(self) -> JudgeStats:
        """A snapshot of the counters."""
        s = self._stats
        return JudgeStats(
            questions=s.questions,
            calls=s.calls,
            retries=s.retries,
            succeeded=s.succeeded,
            errors=Counter(s.errors),
            failures=Counter(s.failures),
            in_flight=s.in_flight,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def __aenter__(self) -> JudgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _temperature(self, round_index: int) -> float:
        return 0.0 if round_index < self.config.greedy_rounds else 1.0

    async def ask(
        self, prompt: str, parse: Callable[[str], T], *, schema: Mapping[str, Any] | None = None
    ) -> JudgeResult[T]:
        """Ask ``prompt`` and return ``parse(answer)``, re-asking in new rounds while ``parse`` raises
        ``AnswerError`` (temperature 0.0 for the first ``greedy_rounds`` rounds, 1.0 after). ``schema`` is sent as
        a structured-output constraint when ``config.structured_output`` is on."""
        self._stats.questions += 1
        calls = 0
        text: str | None = None
        kind: ErrorKind = "unparseable"
        detail = ""
        for round_index in range(self.config.parse_rounds):
            if round_index > 0:
                self._note_retry(kind)
            result = await self._call(prompt, self._temperature(round_index), schema)
            calls += result.calls
            if result.failure == "truncated":
                kind, detail, text = "truncated", result.detail or "", result.text
                continue
            if result.failure is not None:
                return self._fail(result.failure, result.detail, calls, round_index + 1, text)
            text = result.text
            try:
                value = parse(text or "")
            except AnswerError as exc:
                kind, detail = exc.kind, str(exc)
                self._note_error(kind)
                continue
            self._stats.succeeded += 1
            return JudgeResult(value=value, calls=calls, rounds=round_index + 1, text=text)
        return self._fail(kind, detail, calls, self.config.parse_rounds, text)

    async def goal_scores(self, prompt: str) -> JudgeResult[GoalScores]:
        """Ask the goal-progress judge (docs/protocol.md, Rewards) and validate both agents' 0..10 scores."""
        return await self.ask(prompt, parse_goal_scores, schema=GOAL_SCHEMA)

    async def chat(
        self, prompt: str, *, temperature: float = 0.0, schema: Mapping[str, Any] | None = None
    ) -> ChatResult:
        """One logical call without answer validation: the raw text, or the failure after all retries. It counts
        as a question; the caller judges the text (the evaluator does, with its reformat retry)."""
        self._stats.questions += 1
        result = await self._call(prompt, temperature, schema)
        if result.failure is not None:
            self._stats.failures[result.failure] += 1
        else:
            self._stats.succeeded += 1
        return result

    def _fail(self, kind: ErrorKind, detail: str | None, calls: int, rounds: int, text: str | None) -> JudgeResult[Any]:
        self._stats.failures[kind] += 1
        return JudgeResult(value=None, failure=kind, detail=detail, calls=calls, rounds=rounds, text=text)

    def _note_retry(self, kind: str) -> None:
        self._stats.retries += 1
        if self._observer is not None:
            self._observer.retry(kind)

    def _note_error(self, kind: str) -> None:
        self._stats.errors[kind] += 1
        if self._observer is not None:
            self._observer.error(kind)

    def _request_body(self, prompt: str, temperature: float, schema: Mapping[str, Any] | None) -> dict[str, Any]:
        """The chat-completions JSON body: one user message (no system message, as the reference), the
        temperature, ``max_tokens`` and, when enabled, the schema as vLLM's ``structured_outputs.json`` or as an
        OpenAI ``response_format`` of type ``json_schema``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
            "max_tokens": self.config.max_tokens,
        }
        if schema is not None and self.config.structured_output:
            if self.config.structured_output_field == "structured_outputs":
                body["structured_outputs"] = {"json": dict(schema)}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "judge_answer", "schema": dict(schema)},
                }
        return body

    async def _call(self, prompt: str, temperature: float, schema: Mapping[str, Any] | None) -> ChatResult:
        """One logical call: attempts with backoff until an answer text, a permanent error or no retries left."""
        body = self._request_body(prompt, temperature, schema)
        tokens = math.ceil(len(prompt) / CHARS_PER_TOKEN) + self.config.max_tokens
        retrying = AsyncRetrying(
            # Both must hold to give up: the retries promised, and the window for a judge that is down a while.
            stop=stop_after_attempt(self.config.max_retries + 1) & stop_after_delay(self.config.retry_window_s),
            retry=retry_if_result(lambda outcome: outcome[1] in TRANSIENT_KINDS),
            wait=lambda state: self._backoff(state.attempt_number - 1, state.outcome.result()[3]),
            before_sleep=lambda state: self._note_retry(state.outcome.result()[1]),
            retry_error_callback=lambda state: state.outcome.result(),  # out of retries: the last failure stands
        )
        text, kind, detail, _ = await retrying(self._attempt, body, tokens)
        calls = retrying.statistics["attempt_number"]
        if kind is None:
            return ChatResult(text=text, calls=calls)
        if kind == "truncated":  # an answer arrived, but cut: the caller decides (a new round, or exclusion)
            return ChatResult(text=text, failure=kind, detail=detail, calls=calls)
        return ChatResult(text=None, failure=kind, detail=detail, calls=calls)

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        """``min(max, max(min(max, base * 2**k) * U(0.5, 1), retry_after))``: exponential backoff with jitter,
        never shorter than the server's Retry-After, never longer than ``backoff_max_s``."""
        cap = self.config.backoff_max_s
        jittered = min(cap, self.config.backoff_base_s * 2.0**retry_index) * self._rng.uniform(0.5, 1.0)
        return min(cap, max(jittered, retry_after or 0.0))

    async def _attempt(
        self, body: dict[str, Any], tokens: int
    ) -> tuple[str | None, ErrorKind | None, str | None, float | None]:
        """One HTTP attempt under the concurrency slot and the rate budgets: (text, error kind, detail, retry-after)."""
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None:
                await self._tpm.acquire(min(tokens, self._tpm.max_rate))
            self._stats.calls += 1
            self._set_in_flight(+1)
            started = time.monotonic()
            kind: ErrorKind | None = None
            detail: str | None = None
            retry_after: float | None = None
            text: str | None = None
            try:
                request = self._client.post(
                    "/chat/completions", cast_to=object, body=body, options={"timeout": self.config.timeout_s}
                )
                text, cut = completion_text(await asyncio.wait_for(request, timeout=self.config.timeout_s))
                if cut:
                    kind = "truncated"
                    detail = f"the answer reached max_tokens={self.config.max_tokens} and was cut"
            except (openai.OpenAIError, asyncio.TimeoutError, ValueError) as exc:
                kind, retry_after = classify_error(exc)
                detail = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                latency = time.monotonic() - started
                self._set_in_flight(-1)
            if self._observer is not None:
                self._observer.latency(latency)
            if kind is not None:
                self._note_error(kind)
                log.debug("judge attempt failed (%s) after %.2fs: %s", kind, latency, detail)
            return text, kind, detail, retry_after

    def _set_in_flight(self, delta: int) -> None:
        self._stats.in_flight += delta
        if self._observer is not None:
            self._observer.in_flight(self._stats.in_flight)
