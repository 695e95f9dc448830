"""Versioned, asynchronous weight pushes from the learner ranks to the rollout actors.

:class:`WeightPublisher` lives in the driver next to :class:`learner.group.LearnerGroup`. ``publish(version)``
returns at once with a future; the learner ranks gather their weights in the background and the rollout actors
apply them while the learner already runs its next step. Ray runs an actor's calls in submission order, so the
next ``step`` on a learner rank always starts after that rank's part of the gather: the weights cannot change
under the gather.

Two transports (``rollout.weight_transport``), both against the rollout actor's contract in ``actors/``:

* ``object_store``: the ranks stream their weights tensor by tensor and rank 0 writes each one straight into a
  preallocated safetensors buffer (:class:`SafetensorsBlob`, the same format ``actors.weights.serialize_weights``
  makes, which would first collect every tensor and then copy them into the blob: 2× the weights on rank 0). The
  buffer is a numpy ``uint8`` array, kept by rank 0 from push to push: Ray copies it into the object store in
  one pass (out of band) and hands it to each actor as a read-only view of shared memory, with no copy (a
  ``bytearray`` is pickled in band and copied again into ``bytes`` on the receiving side: 3× slower for
  SmolLM2 here). Each actor gets ``update_weights(version, <that object>)`` and Ray resolves the reference on
  the actor's side, so the driver never holds or waits for the blob. Rank 0 peaks at the blob plus one tensor.
* ``broadcast``: rank 0 and every rollout engine worker form a weight group once (``connect``); per push each actor
  enters ``receive_weights(version, specs, bucket_bytes)`` and rank 0 sends bucket by bucket as the gather
  proceeds (:class:`BroadcastSender`), so rank 0 holds one bucket, never the whole model.

Every push has a deadline (``rollout.weight_update_timeout_s``) and its latency per actor — from ``publish`` to the
actor's acknowledgement — goes to the histogram ``ampo_weight_push_seconds``. A push that fails or misses its
deadline is logged as an error, counted in ``ampo_weight_push_failures_total`` and reported in its
:class:`PushReport`; :meth:`WeightPublisher.poll` hands finished reports to the caller and
:meth:`WeightPublisher.wait` raises :class:`WeightPushError` for failures, so nothing is dropped silently.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import ray
import torch

from actors.run_metrics import Counter, Histogram  # every series also carries the `run` tag

__all__ = ["BroadcastSender", "PushReport", "SafetensorsBlob", "WeightPublisher", "WeightPushError"]

log = logging.getLogger(__name__)

Transport = Literal["object_store", "broadcast"]
WeightSpec = tuple[str, str, list[int]]


class WeightPushError(RuntimeError):
    """One or more rollout actors did not apply a weight version in time; the message lists them and why."""


@dataclass
class PushReport:
    """Outcome of one versioned push: per-actor latency in seconds, or the reason it failed."""

    version: int
    transport: Transport
    seconds: dict[int, float] = field(default_factory=dict)
    """Rollout actor index → seconds from ``publish`` to that actor's acknowledgement."""
    failures: dict[int, str] = field(default_factory=dict)
    """Rollout actor index (−1: the learner side) → what went wrong."""
    gather_seconds: float | None = None
    """Seconds the learner ranks spent gathering (and, for broadcast, sending)."""

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        if self.ok:
            worst = max(self.seconds.values(), default=0.0)
            return f"weights v{self.version} reached {len(self.seconds)} actor(s) in at most {worst:.2f} s"
        problems = "; ".join(f"actor {i}: {why}" for i, why in sorted(self.failures.items()))
        return f"weight push v{self.version} failed: {problems}"


_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class SafetensorsBlob:
    """A safetensors file assembled in one preallocated buffer, tensor by tensor, in the order of ``specs``.

    The header is known from the specs alone (names, dtypes, shapes), so each tensor can be copied into its slot
    the moment it is gathered and dropped: no dict of tensors is ever held. ``safetensors.torch.load(bytes(blob))``
    reads the result like any safetensors file.
    """

    def __init__(self, specs: list[WeightSpec], buffer: np.ndarray | None = None) -> None:
        """``buffer``: a uint8 array to assemble the file in when it has exactly the file's size (a previous blob's
        buffer, whose pages are already mapped); otherwise a new one is allocated."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._slots: dict[str, tuple[int, int, str, list[int]]] = {}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {dtype!r} has no safetensors code")
            size = math.prod(shape) * getattr(torch, dtype).itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (offset, offset + size, dtype, list(shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        size = 8 + len(raw) + offset
        reusable = buffer is not None and buffer.dtype == np.uint8 and buffer.shape == (size,) and buffer.flags.writeable
        self._buffer = buffer if reusable else np.empty(size, dtype=np.uint8)
        struct.pack_into("<Q", self._buffer, 0, len(raw))
        self._buffer[8 : 8 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self._data = torch.from_numpy(self._buffer[8 + len(raw) :]) if offset else None
        self._missing = set(self._slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one tensor into its slot (dtype and shape must match its spec)."""
        if name not in self._missing:
            raise ValueError(f"{name!r} is not an unwritten tensor of this blob")
        start, end, dtype, shape = self._slots[name]
        if str(tensor.dtype).removeprefix("torch.") != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, the spec says {dtype} {shape}")
        if end > start and self._data is not None:
            self._data[start:end].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        self._missing.discard(name)

    def finish(self) -> np.ndarray:
        """The complete file; raises if a tensor of the specs was never written."""
        if self._missing:
            raise ValueError(f"{len(self._missing)} tensor(s) never written, e.g. {sorted(self._missing)[:3]}")
        return self._buffer


class BroadcastSender:
    """Rank 0's end of the broadcast transport: an ``actors.weights.WeightBroadcaster`` fed bucket by bucket.

    The bucket plan is ``actors.weights.plan_buckets`` over the full spec list, exactly as the receivers compute
    it; each bucket is handed to ``WeightBroadcaster.send`` as soon as its tensors are gathered, which broadcasts
    it as one buffer (a subset that forms one planned bucket is planned as that same single bucket).
    """

    def __init__(self, broadcaster: Any, address: tuple[str, int, int]) -> None:
        self._broadcaster = broadcaster
        self.address = address

    @classmethod
    def open(cls, master_addr: str, master_port: int, world_size: int, backend: str, timeout_s: float) -> BroadcastSender:
        """Form the weight group as its rank 0; blocks until every receiver has joined (or ``timeout_s``)."""
        from actors.weights import WeightBroadcaster

        broadcaster = WeightBroadcaster(master_addr, master_port, world_size, backend, timeout_s)
        return cls(broadcaster, (master_addr, master_port, world_size))

    def send(
        self, specs: list[WeightSpec], weights: Iterable[tuple[str, torch.Tensor | None]], bucket_bytes: int
    ) -> int:
        """Send ``weights`` (yielded in ``specs`` order) in the planned buckets; returns the bytes sent."""
        from actors.weights import plan_buckets

        buckets = plan_buckets(specs, bucket_bytes)
        bucket_of = {index: b for b, members in enumerate(buckets) for index, _ in members}
        pending: list[tuple[str, torch.Tensor]] = []
        sent = 0
        for index, (name, tensor) in enumerate(weights):
            if tensor is None or name != specs[index][0]:
                raise ValueError(f"weights out of step with their specs at {name!r}")
            pending.append((name, tensor))
            if index == buckets[bucket_of[index]][-1][0]:  # last tensor of its bucket
                self._broadcaster.send(pending, bucket_bytes)
                sent += sum(t.numel() * t.element_size() for _, t in pending)
                pending = []
        return sent

    def close(self) -> None:
        self._broadcaster.close()


class WeightPublisher:
    """Pushes weight versions to rollout actors without making the learner wait (see the module docstring).

    Args:
        actors: the rollout actor handles (``update_weights`` / ``join_weight_group`` / ``receive_weights``).
        transport: ``object_store`` or ``broadcast``.
        timeout_s: deadline of one push, from ``publish`` to the last actor's acknowledgement.
        bucket_bytes: broadcast bucket size.
        dtype: dtype the weights travel in (e.g. the engine's ``bfloat16``); None keeps the learner's fp32.
        backend: broadcast group backend (gloo on CPU, nccl on GPU).
        ranks_per_actor: engine workers per rollout actor (its tensor-parallel size), each a broadcast receiver.
    """

    def __init__(
        self,
        actors: Sequence[Any],
        *,
        transport: Transport = "object_store",
        timeout_s: float = 300.0,
        bucket_bytes: int = 256 << 20,
        dtype: str | None = None,
        backend: str = "gloo",
        ranks_per_actor: int = 1,
    ) -> None:
        if not actors:
            raise ValueError("WeightPublisher needs at least one rollout actor")
        self.actors = list(actors)
        self.transport = transport
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self.backend = backend
        self.ranks_per_actor = ranks_per_actor
        self._group: tuple[str, int, int] | None = None  # (address, port, size) of the broadcast weight group
        self._specs: list[WeightSpec] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-push")
        self._pending: list[concurrent.futures.Future[PushReport]] = []
        self._lock = threading.Lock()
        self._latency = Histogram(
            "ampo_weight_push_seconds",
            "Seconds from publishing a weight version to a rollout actor's acknowledgement.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            tag_keys=("transport",),
        )
        self._failures = Counter(
            "ampo_weight_push_failures_total",
            "Weight pushes that failed or timed out, per rollout actor.",
            tag_keys=("transport",),
        )
        self._failures.zero(transport=[transport])

    # ----------------------------------------------------------------------------------------------- setup

    def connect(self, workers: Sequence[Any]) -> None:
        """Broadcast transport only: form the weight group (rank 0 of the learner + every engine worker).

        Blocks until every member joined or ``timeout_s`` passed. Safe to call again after a failure: a new
        group on a new port replaces the old one.
        """
        if self.transport != "broadcast":
            return
        addr, port = ray.get(workers[0].address.remote(), timeout=self.timeout_s)
        world = 1 + len(self.actors) * self.ranks_per_actor
        joins = [
            actor.join_weight_group.remote(
                addr, port, 1 + i * self.ranks_per_actor, world, backend=self.backend, timeout_s=self.timeout_s
            )
            for i, actor in enumerate(self.actors)
        ]
        opened = workers[0].open_weight_sender.remote(addr, port, world, self.timeout_s)
        ray.get([opened, *joins], timeout=self.timeout_s)
        self._group = (addr, port, world)
        # On every rank: reading the state dict reshards FSDP's root, and the ranks must stay in the same state.
        self._specs = ray.get([w.weight_specs.remote(self.dtype) for w in workers], timeout=self.timeout_s)[0]
        log.info("weight group formed at %s:%d with %d members", addr, port, world)

    # ----------------------------------------------------------------------------------------------- pushes

    def publish(self, version: int, workers: Sequence[Any]) -> concurrent.futures.Future[PushReport]:
        """Start pushing the learner's current weights as ``version``; returns at once.

        The gather is queued on every learner rank now (before any later step), the rest happens in the
        background. The future resolves to a :class:`PushReport` (it does not raise).
        """
        started = time.monotonic()
        if self.transport == "object_store":
            gather = [w.weights_blob.remote(self.dtype) for w in workers]
            acks = [actor.update_weights.remote(version, gather[0]) for actor in self.actors]
        else:
            if self._group is None or self._specs is None:
                raise RuntimeError("broadcast transport: call connect() before publish()")
            acks = [
                actor.receive_weights.remote(version, self._specs, self.bucket_bytes) for actor in self.actors
            ]
            gather = [w.broadcast_weights.remote(self.bucket_bytes, self.dtype) for w in workers]
        blob = gather[0] if self.transport == "object_store" else None
        future = self._pool.submit(self._track, version, started, gather, acks, blob)
        with self._lock:
            self._pending.append(future)
        return future

    def poll(self) -> list[PushReport]:
        """Reports of the pushes that finished since the last call (failures were already logged as errors)."""
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        return [f.result() for f in done]

    def wait(self, timeout_s: float | None = None) -> list[PushReport]:
        """Wait for every pending push; raises :class:`WeightPushError` if any failed."""
        with self._lock:
            pending, self._pending = self._pending, []
        reports = [f.result(timeout=timeout_s) for f in pending]
        failed = [r.describe() for r in reports if not r.ok]
        if failed:
            raise WeightPushError("; ".join(failed))
        return reports

    def close(self) -> None:
        """Stop tracking (pending pushes finish or time out on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=False)

    # ----------------------------------------------------------------------------------------------- internals

    def _track(self, version: int, started: float, gather: list[Any], acks: list[Any], blob: Any) -> PushReport:
        """Background: wait for the acknowledgements one by one until the deadline; time and report each.

        Nothing is fetched into the driver (``fetch_local=False``); the blob itself is never read here: if rank 0
        failed to make it, the actors' calls that take it as their argument fail with that error.
        """
        report = PushReport(version=version, transport=self.transport)
        deadline = started + self.timeout_s
        index_of = {ref: i for i, ref in enumerate(acks)}
        remaining = list(acks)
        gather_left = list(gather)
        while remaining or gather_left:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(remaining + gather_left, num_returns=1, timeout=left, fetch_local=False)
            for ref in ready:
                if ref in index_of:
                    remaining.remove(ref)
                    self._settle(report, index_of[ref], ref, started)
                else:
                    gather_left.remove(ref)
                    if not gather_left:
                        report.gather_seconds = time.monotonic() - started
                    if ref == blob:
                        continue
                    try:
                        ray.get(ref)
                    except Exception as exc:  # surfaced in the report; the actors' calls then fail too
                        report.failures[-1] = f"learner gather failed: {_short(exc)}"
        for ref in remaining:
            report.failures[index_of[ref]] = f"no acknowledgement within {self.timeout_s:.0f} s"
            self._failures.inc(1, tags={"transport": self.transport})
        if gather_left:
            report.failures[-1] = f"learner gather not finished within {self.timeout_s:.0f} s"
        if report.ok:
            log.info(report.describe())
        else:
            log.error(report.describe())
        return report

    def _settle(self, report: PushReport, index: int, ref: Any, started: float) -> None:
        try:
            ray.get(ref)
        except Exception as exc:
            report.failures[index] = _short(exc)
            self._failures.inc(1, tags={"transport": self.transport})
            return
        seconds = time.monotonic() - started
        report.seconds[index] = seconds
        self._latency.observe(seconds, tags={"transport": self.transport})


def _short(exc: BaseException) -> str:
    """First line of an exception (Ray wraps remote tracebacks around the real message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
