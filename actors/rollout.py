"""RolloutActor: a vLLM engine in a Ray actor that answers `GroupRequest`s with `Group`s and takes new
policy weights in place while it keeps serving.

Generation (what goes into the engine and what comes out of it: `actors/engine_io.py`)
    The actor wraps vLLM's v1 `AsyncLLM`, so many groups are in flight at once and the engine batches
    them. Chat messages are templated once, by the served model's own tokenizer, into token ids; the
    engine gets those ids and nothing is re-tokenised afterwards. Sampling uses
    `RequestOutputKind.DELTA`, merged per completion index (`VersionedOutput`; cumulative outputs can lose
    some of the n completions, deltas cannot, and each delta can be tagged with the policy version serving
    then), and `logprobs=0`, which returns exactly the log-probability of each sampled token: the behaviour
    log-probs the learner's importance weights need. Text is decoded once per finished sample rather
    than incrementally at every engine step (no stop strings need it, and on a small CPU the per-step
    detokenisation competes with the engine for cores). There are no per-request seeds (they crash the
    CPU engine with chunked prefill); the engine is seeded from the config.

Policy versions of a sample
    Each sample carries the version that was current when its request *started* (`policy_version`, the
    oldest of its tokens: staleness is measured from it) and the version of every response token
    (`token_versions`): an update may land while a request runs, and the tokens sampled after it come from
    the newer policy. Tokens are tagged as their deltas stream in (`VersionedOutput`), never with a version
    newer than the one that produced them. The behaviour log-probs are exact either way, because vLLM
    reports the distribution each token was drawn from.

Weight updates (see `actors/weights.py` for the transports)
    An update pauses the scheduler in "keep" mode (in-flight requests stay queued, none is dropped) and
    clears the prefix/KV cache, loads the weights through the worker extension, then resumes. Clearing
    the cache makes every token computed after the update — including the recomputed prefixes of
    requests that were in flight — use the new weights, and keeps a request tagged with the new version
    from reusing KV entries computed by the old one. Generation calls keep being accepted during an
    update; they wait for it to finish (on CPU a push of the tiny test model takes ~0.1 s). With
    `rollout.weight_update: drain` an update first stops admitting requests and waits until none is in
    flight, so no response spans two versions (the engine idles meanwhile: the cost `bench/inflight_update.py`
    measures).
    Versions are monotone: an update whose version is not above the current one is ignored (returns
    False), so re-sending a push after a timeout or to a restarted peer is harmless. Every update has a
    deadline (`weight_update_timeout_s`); on expiry the caller gets `WeightUpdateTimeout` while the load
    finishes or fails in the background — `version()` tells which.

Health, restarts and metrics
    `health()` is cheap (no engine call). `create_rollout_actors` sets `max_restarts` from the config and
    `max_task_retries=0`: Ray restarts a dead actor (it comes back serving the weights in `model_path`,
    version 0, so the driver must push the current weights again — `health()["version"]` shows it), but
    it does not replay the calls that were running on it. Those fail with `RayActorError`, and the
    driver re-sends the groups the dead actor held; groups are atomic, so nothing half-done survives.
    An actor whose engine died while the process lives on reports `alive: False`; `ray.kill(actor,
    no_restart=False)` then makes Ray restart it the same way.

    Metrics (`actors.run_metrics`, tags `actor` = actor index and `run`; Ray exports them with a `ray_` prefix):
      ampo_rollout_tokens_generated_total  Counter    response tokens generated
      ampo_rollout_tokens_per_second       Gauge      response tokens/s over the last 30 s
      ampo_rollout_requests_in_flight      Gauge      group requests being generated
      ampo_rollout_policy_version          Gauge      policy version being served
      ampo_rollout_weight_update_seconds   Histogram  wall time of applied weight updates
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from actors.config import RolloutConfig
from actors.engine_io import RolloutError, VersionedOutput, engine_kwargs, group_from_output, sampling_params
from actors.records import Group, GroupRequest
from actors.weights import WeightSpec, spill_weights

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 1024
"""Concurrent calls per actor: every in-flight group holds one, and health or update calls must still get in."""
_RATE_WINDOW_S = 30.0
_UPDATE_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class WeightUpdateError(RolloutError):
    """A weight update failed; the actor keeps serving its previous version."""


class WeightUpdateTimeout(WeightUpdateError):
    """A weight update did not finish within `weight_update_timeout_s`."""


class RolloutActor:
    """One vLLM engine serving the policy. Use it as a Ray actor (`create_rollout_actors`); the plain class
    also works in-process inside a running event loop."""

    def __init__(self, config: RolloutConfig, model_path: str | Path, actor_index: int = 0) -> None:
        # vLLM reads these when it is imported: an in-process engine core on CPU starts in seconds
        # instead of three processes, and the OMP binding keeps engines from fighting over cores.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_omp_threads_bind
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from actors.run_metrics import Counter, Gauge, Histogram  # every series also carries the `run` tag
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._config = config
        self._index = actor_index
        self._tags = {"actor": str(actor_index)}
        self._started = time.monotonic()
        self._version = 0
        self._in_flight = 0
        self._tokens_generated = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._update_lock = asyncio.Lock()
        self._admitting = asyncio.Event()
        """Cleared while a `drain` update waits for the requests in flight: new ones wait for it."""
        self._admitting.set()
        self._drained = asyncio.Event()
        """Set while no request is in flight."""
        self._drained.set()
        self._in_weight_group = False
        self._closed = False

        self._m_tokens = Counter(
            "ampo_rollout_tokens_generated_total", "Response tokens generated.", tag_keys=("actor",)
        )
        self._m_rate = Gauge(
            "ampo_rollout_tokens_per_second",
            f"Response tokens per second over the last {_RATE_WINDOW_S:.0f} s.",
            tag_keys=("actor",),
        )
        self._m_in_flight = Gauge(
            "ampo_rollout_requests_in_flight", "Group requests being generated.", tag_keys=("actor",)
        )
        self._m_version = Gauge("ampo_rollout_policy_version", "Policy version being served.", tag_keys=("actor",))
        self._m_update = Histogram(
            "ampo_rollout_weight_update_seconds",
            "Wall time of applied weight updates.",
            boundaries=_UPDATE_SECONDS_BOUNDARIES,
            tag_keys=("actor",),
        )
        self._m_version.set(0, tags=self._tags)
        self._m_in_flight.set(0, tags=self._tags)
        self._m_tokens.zero(actor=[self._tags["actor"]])

        log.info("rollout actor %d: starting a vLLM engine for %s", actor_index, model_path)
        kwargs = engine_kwargs(config, model_path)
        self._dtype: str = kwargs["dtype"]
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._tokenizer = self._engine.get_tokenizer()
        log.info("rollout actor %d: engine ready in %.1f s", actor_index, time.monotonic() - self._started)

    # ------------------------------------------------------------------------------------------------
    # Generation

    async def generate(self, request: GroupRequest) -> Group:
        """Sample `request.sampling.n` responses to one prompt. Raises `IncompleteGroupError` rather than
        return fewer than n samples."""
        self._check_open()
        prompt_ids = self._prompt_token_ids(request)
        await self._admitting.wait()
        version = self._version
        request_id = f"{request.group_id}:{uuid.uuid4().hex[:12]}"  # unique even when a group is re-sent
        self._set_in_flight(+1)
        try:
            merged = VersionedOutput(version)
            async for output in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, sampling_params(request.sampling), request_id
            ):
                merged.add(output, self._version)
        finally:
            self._set_in_flight(-1)
        group = group_from_output(request, prompt_ids, merged, version, self._decode)
        self._count_tokens(sum(len(s.response_token_ids) for s in group.samples))
        return group

    async def generate_by_reference(self, request: GroupRequest) -> tuple[int, Group]:
        """`generate` for a caller that hands the group on unread: called with `num_returns=2`, it returns the
        sample count and the group as two objects, so the caller awaits the count and passes the group's reference
        to a reward actor (the training driver never deserialises the samples)."""
        group = await self.generate(request)
        return len(group.samples), group

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _prompt_token_ids(self, request: GroupRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        ids = self._tokenizer.apply_chat_template(
            [dict(m) for m in request.messages or ()], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    # ------------------------------------------------------------------------------------------------
    # Weight updates

    def version(self) -> int:
        """The policy version being served (0: the weights loaded from `model_path`)."""
        return self._version

    async def update_weights(self, version: int, weights: bytes | np.ndarray) -> bool:
        """Object-store transport: load a safetensors blob (`serialize_weights` bytes, or the learner's uint8
        array; pass the ObjectRef as a top-level argument and Ray resolves it, an array without a copy).
        Returns False when `version` is not newer than the current one (nothing is loaded)."""
        self._check_open()
        if not isinstance(weights, bytes | bytearray | memoryview | np.ndarray):
            raise TypeError(f"update_weights expects safetensors bytes, got {type(weights).__name__}")
        if version <= self._version:
            log.info("rollout actor %d: ignoring weights version %d (serving %d)", self._index, version, self._version)
            return False
        # The engine core runs in its own process: sending it the blob would pickle and copy every byte
        # again. One copy into shared memory (tmpfs) instead, which the engine's workers map read-only.
        path = spill_weights(weights, f"actor{self._index}-v{version}")
        update = self._run_update(
            version, "object store", lambda: self._engine.collective_rpc("ampo_load_safetensors_file", args=(str(path),))
        )
        try:
            return await update
        finally:
            # Unlinking is safe even if a timed-out load still reads it: the mapping keeps the pages alive.
            path.unlink(missing_ok=True)

    async def join_weight_group(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float | None = None,
    ) -> int:
        """Join the learner's weight-broadcast group. The engine's workers take ranks `rank` to
        `rank + tensor_parallel_size - 1` (so `world_size` is 1 + all workers of all actors); the sender
        must build its `WeightBroadcaster` while this call waits. `timeout_s` (default: the update timeout)
        bounds the rendezvous and every later transfer; keep it close to `weight_update_timeout_s`, since
        a stuck transfer blocks the engine until it expires. Returns the first worker rank."""
        self._check_open()
        timeout_s = self._config.weight_update_timeout_s if timeout_s is None else timeout_s
        call = self._engine.collective_rpc(
            "ampo_join_weight_group", args=(master_addr, master_port, rank, world_size, backend, timeout_s)
        )
        try:
            ranks = await asyncio.wait_for(call, timeout_s)
        except TimeoutError:
            raise WeightUpdateTimeout(
                f"rollout actor {self._index}: joining the weight group at {master_addr}:{master_port} as rank {rank} "
                f"of {world_size} took longer than {timeout_s:.0f} s (is the sender's WeightBroadcaster being built?)"
            ) from None
        except Exception as exc:
            raise WeightUpdateError(
                f"rollout actor {self._index}: joining the weight group at {master_addr}:{master_port} as rank {rank} "
                f"of {world_size} failed: {exc}"
            ) from exc
        self._in_weight_group = True
        log.info(
            "rollout actor %d: joined the %s weight group as rank %d of %d", self._index, backend, ranks[0], world_size
        )
        return int(ranks[0])

    async def receive_weights(self, version: int, specs: list[WeightSpec], bucket_bytes: int) -> bool:
        """Broadcast transport: take part in one push from the `WeightBroadcaster` (call it while the sender
        runs `send` with the same tensors and `bucket_bytes`). A stale version is still received — a
        broadcast needs every rank — but not loaded; returns whether it was loaded."""
        self._check_open()
        if not self._in_weight_group:
            raise WeightUpdateError(f"rollout actor {self._index} is in no weight group: call join_weight_group first")
        specs = [(name, dtype, list(shape)) for name, dtype, shape in specs]

        def receive(load: bool) -> Callable[[], Awaitable[Any]]:
            return lambda: self._engine.collective_rpc("ampo_receive_broadcast", args=(specs, bucket_bytes, load))

        if version <= self._version:
            log.info(
                "rollout actor %d: receiving but not loading weights version %d (serving %d)",
                self._index,
                version,
                self._version,
            )
            await self._run_update(version, "broadcast", receive(False), load=False)
            return False
        return await self._run_update(version, "broadcast", receive(True))

    async def _run_update(
        self, version: int, transport: str, rpc: Callable[[], Awaitable[Any]], load: bool = True
    ) -> bool:
        """Apply one update under the lock and the deadline. The work runs as its own task so that a timed
        out caller does not leave it half-cancelled: it completes or fails on its own, and the version
        moves only when the weights really changed."""
        task = asyncio.ensure_future(self._locked_update(version, transport, rpc, load))
        timeout = self._config.weight_update_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.add_done_callback(self._report_late_update)
            raise WeightUpdateTimeout(
                f"rollout actor {self._index}: weight update to version {version} via {transport} did not finish "
                f"within {timeout:.1f} s; it goes on in the background, version() says whether it landed "
                f"(serving {self._version} now)"
            ) from None

    async def _locked_update(self, version: int, transport: str, rpc: Callable[[], Awaitable[Any]], load: bool) -> bool:
        async with self._update_lock:
            if load and version <= self._version:
                return False
            start, previous = time.monotonic(), self._version
            try:
                if load and self._config.weight_update == "drain":
                    self._admitting.clear()  # new requests wait; those in flight finish under the old weights
                    await self._drained.wait()
                await self._apply_update(version, transport, rpc, load)
            finally:
                self._admitting.set()
            if not load:
                return False
            seconds = time.monotonic() - start
            self._m_version.set(version, tags=self._tags)
            self._m_update.observe(seconds, tags=self._tags)
            log.info(
                "rollout actor %d: now serving version %d (was %d), loaded via %s in %.2f s",
                self._index,
                version,
                previous,
                transport,
                seconds,
            )
            return True

    async def _apply_update(self, version: int, transport: str, rpc: Callable[[], Awaitable[Any]], load: bool) -> None:
        if load:
            # "keep" freezes in-flight requests; clear_cache drops every KV block computed by the old
            # weights (in-flight requests are preempted and recomputed after the resume).
            await self._engine.pause_generation(mode="keep", clear_cache=True)
        try:
            await rpc()
            if load:
                # Before the resume: every token from now on is the new version's (see VersionedOutput).
                self._version = version
        except Exception as exc:
            if transport == "broadcast":
                self._in_weight_group = False  # the worker left the group: its collectives are out of step
            raise WeightUpdateError(
                f"rollout actor {self._index}: weight update to version {version} via {transport} failed "
                f"(still serving {self._version}): {exc}"
            ) from exc
        finally:
            if load:
                await self._engine.resume_generation()

    def _report_late_update(self, task: asyncio.Future[bool]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("rollout actor %d: a timed-out weight update then failed: %s", self._index, task.exception())
        elif task.result():
            log.warning(
                "rollout actor %d: a timed-out weight update landed late; serving version %d",
                self._index,
                self._version,
            )

    # ------------------------------------------------------------------------------------------------
    # Health and lifecycle

    async def health(self) -> dict[str, Any]:
        """Cheap liveness report; no engine round trip."""
        return {
            "actor": self._index,
            "pid": os.getpid(),
            "alive": not self._closed and not self._engine.errored,
            "version": self._version,
            "requests_in_flight": self._in_flight,
            "tokens_generated": self._tokens_generated,
            "tokens_per_second": self._rate(),
            "uptime_s": time.monotonic() - self._started,
            "in_weight_group": self._in_weight_group,
            "dtype": self._dtype,
        }

    async def shutdown(self) -> None:
        """Leave the weight group and stop the engine (its engine-core process included). Idempotent;
        later calls other than `health`/`version` raise."""
        if self._closed:
            return
        self._closed = True
        if self._in_weight_group:
            try:
                await asyncio.wait_for(self._engine.collective_rpc("ampo_leave_weight_group"), 10.0)
            except Exception as exc:
                log.warning("rollout actor %d: leaving the weight group failed: %s", self._index, exc)
            self._in_weight_group = False
        self._engine.shutdown()
        self._engine = None  # let vLLM's finalizer run now, not at interpreter exit when its modules are gone
        self._m_in_flight.set(0, tags=self._tags)
        log.info("rollout actor %d: shut down after generating %d tokens", self._index, self._tokens_generated)

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutError(f"rollout actor {self._index} is shut down")

    # ------------------------------------------------------------------------------------------------
    # Bookkeeping

    def _set_in_flight(self, delta: int) -> None:
        self._in_flight += delta
        self._m_in_flight.set(self._in_flight, tags=self._tags)
        if self._in_flight == 0:
            self._drained.set()
        else:
            self._drained.clear()

    def _count_tokens(self, tokens: int) -> None:
        now = time.monotonic()
        self._tokens_generated += tokens
        self._recent.append((now, tokens))
        self._m_tokens.inc(tokens, tags=self._tags)
        self._m_rate.set(self._rate(now), tags=self._tags)

    def _rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()
        span = min(_RATE_WINDOW_S, now - self._started)
        return sum(tokens for _, tokens in self._recent) / span if span > 0 else 0.0


def rollout_actor_options(config: RolloutConfig, **ray_options: Any) -> dict[str, Any]:
    """Ray options of a rollout actor: restarts from the config, no task retries (the driver re-sends the
    groups a dead actor held, so a replayed call would duplicate them), enough concurrency for every
    in-flight group plus control calls. `ray_options` (num_cpus, num_gpus, scheduling strategy, ...) win."""
    options: dict[str, Any] = {
        "max_restarts": config.max_restarts,
        "max_task_retries": 0,
        "max_concurrency": MAX_CONCURRENCY,
    }
    options.update(ray_options)
    return options


def create_rollout_actors(
    config: RolloutConfig, model_path: str | Path, num: int | None = None, **ray_options: Any
) -> list[Any]:
    """Start `num` (default `config.num_actors`) rollout actors with indices 0..num-1. Returns handles
    at once; the engines load in the background (await `health` to know they are up).

    On CPU, `num_cpus` is also the engine's thread count: with `VLLM_ENABLE_V1_MULTIPROCESSING=0` vLLM
    applies no OpenMP binding of its own (`VLLM_CPU_OMP_THREADS_BIND` is only read by its multiprocess
    executor), so the engine uses torch's default threads, which Ray sets to the actor's `num_cpus`
    through `OMP_NUM_THREADS`. An actor with `num_cpus=1` generates on one core."""
    import ray

    remote = ray.remote(RolloutActor).options(**rollout_actor_options(config, **ray_options))
    count = config.num_actors if num is None else num
    return [remote.remote(config, str(model_path), actor_index=index) for index in range(count)]
