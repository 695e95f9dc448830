"""Moving new policy weights from the learner into running vLLM engines, in place.

Two transports, both versioned by the caller (`actors/rollout.py`) and both ending in the same load:

* **Object store** — the learner turns its state dict into one safetensors blob
  (`serialize_weights`), puts it in the Ray object store once and hands the reference to every rollout
  actor. Works everywhere, across nodes, with no extra setup. The blob crosses into the engine as bytes
  because tensors passed as `collective_rpc` arguments arrive as nested lists.
* **Broadcast group** — the learner (rank 0) and the engines' workers form a torch.distributed group of
  their own; `WeightBroadcaster.send` packs the tensors into flat byte buckets of at most `bucket_bytes`
  and broadcasts them. Both sides derive the same bucket plan from the same `WeightSpec` list, so only
  raw bytes travel. On CPU this is gloo between the learner process and the engine-core process (what
  the tests exercise). On GPU the same code runs with `backend="nccl"`: each vLLM worker joins with
  rank `actor_rank + tp_rank` and receives straight into GPU buffers, so weights go learner GPU → engine
  GPU without touching host memory or the object store.

The group is *stateless*: a private `TCPStore` plus a backend object built directly
(`ProcessGroupGloo(store, rank, size, timeout)`), never `init_process_group` or `new_group`. The
learner's FSDP ranks already own the default process group and vLLM's worker owns one too; a group built
this way neither needs nor disturbs either of them, and its collectives use group-local ranks.

The load itself goes through the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`:
the layer-wise reload path re-runs every layer's `process_weights_after_loading`, which is required on CPU
where linear weights are repacked for oneDNN (a plain `model.load_weights` fails there). One gap remains:
with tied embeddings the checkpoint has no `lm_head.weight`, so the reload never touches the lm_head
layer and its packed copy of the *old* embedding keeps producing the logits (logprobs off by ~1 on the
tiny test model). `WeightUpdateExtension` re-ties the lm_head to the embedding and re-runs its
`process_weights_after_loading` after every load.

A broadcast is received into staging buckets completely before the load starts: a sender that dies or
times out mid-transfer leaves the served weights untouched, at the cost of one transient copy of the
weights on the receiving side.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

log = logging.getLogger(__name__)

WeightSpec = tuple[str, str, list[int]]
"""(name, dtype name as in `torch.float32` → "float32", shape) of one tensor of a broadcast push."""

_ALIGN = 64
"""Byte alignment of each tensor inside a bucket, so that any dtype view of a slice is legal."""

_STORE_PREFIX = "ampo-weights"


def unique_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Drop aliases: with tied embeddings `lm_head.weight` is the embedding tensor itself. safetensors
    refuses shared storage, and vLLM skips the tied lm_head anyway, so the first name of a tensor wins."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    unique: list[tuple[str, torch.Tensor]] = []
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key in seen:
            continue
        seen.add(key)
        unique.append((name, tensor))
    return unique


def serialize_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors blob of the given tensors (on CPU, contiguous, tied aliases dropped), for
    `RolloutActor.update_weights`. Names are the Hugging Face checkpoint names the engine loads."""
    tensors = {name: tensor.to("cpu").contiguous() for name, tensor in unique_named_tensors(named_tensors)}
    if not tensors:
        raise ValueError("serialize_weights got no tensors")
    return safetensors.torch.save(tensors)


def weight_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[WeightSpec]:
    """The specs a broadcast receiver needs (tied aliases dropped, in sending order)."""
    return _specs_of(unique_named_tensors(named_tensors))


def _specs_of(tensors: list[tuple[str, torch.Tensor]]) -> list[WeightSpec]:
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in tensors]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight spec")
    return dtype


def _nbytes(spec: WeightSpec) -> int:
    _, dtype, shape = spec
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * _dtype(dtype).itemsize


def plan_buckets(specs: list[WeightSpec], bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Split the specs, in order, into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of
    its own). Each bucket lists (spec index, byte offset). Sender and receivers call this with the same
    arguments, so the bucket layout never travels."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    offset = 0
    for index, spec in enumerate(specs):
        size = _nbytes(spec)
        if current and offset + size > bucket_bytes:
            buckets.append(current)
            current, offset = [], 0
        current.append((index, offset))
        offset += -(-size // _ALIGN) * _ALIGN
    if current:
        buckets.append(current)
    return buckets


def _bucket_size(specs: list[WeightSpec], bucket: list[tuple[int, int]]) -> int:
    index, offset = bucket[-1]
    return offset + _nbytes(specs[index])


def _tensor_view(buffer: torch.Tensor, spec: WeightSpec, offset: int) -> torch.Tensor:
    _, dtype, shape = spec
    return buffer[offset : offset + _nbytes(spec)].view(_dtype(dtype)).view(shape)


class WeightGroup:
    """One member of a weight group: a TCPStore (hosted by rank 0) and a backend built directly on it, so
    it coexists with any default process group of the learner or of vLLM. Collectives use group ranks;
    every one of them fails after `timeout_s` instead of hanging."""

    def __init__(
        self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a weight group of {world_size}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")
        timeout = timedelta(seconds=timeout_s)
        self.store = torch.distributed.TCPStore(
            master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
        prefixed = torch.distributed.PrefixStore(_STORE_PREFIX, self.store)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self.pg: Any = torch.distributed.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            # GPU path (not exercised on the CPU test machine): NCCL between learner rank 0 and the workers.
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, world_size, options)

    def broadcast(self, buffer: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([buffer], opts).wait()

    def close(self) -> None:
        self.pg.shutdown()


class WeightBroadcaster:
    """Sender side of the broadcast transport, rank 0 of a weight group of `world_size` (1 + every
    receiving worker). Construction blocks until every receiver has joined: start the actors'
    `join_weight_group` calls first, then build this, then wait for the joins."""

    def __init__(
        self, master_addr: str, master_port: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0
    ) -> None:
        if world_size < 2:
            raise ValueError(f"a weight group needs the sender and at least one receiver, got world_size={world_size}")
        self._group = WeightGroup(master_addr, master_port, 0, world_size, backend, timeout_s)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[WeightSpec]:
        """Broadcast the tensors in buckets. Receivers must be inside `receive_weights` with the specs
        returned by `weight_specs` on the same tensors and the same `bucket_bytes`. Returns those specs.
        Raises after `timeout_s` if a receiver does not take part; the group is then out of step: close it
        and form a new one."""
        tensors = unique_named_tensors(named_tensors)
        specs = _specs_of(tensors)
        start = time.monotonic()
        sent = 0
        for bucket in plan_buckets(specs, bucket_bytes):
            buffer = torch.empty(_bucket_size(specs, bucket), dtype=torch.uint8, device=self._group.device)
            for index, offset in bucket:
                _tensor_view(buffer, specs[index], offset).copy_(tensors[index][1])
            self._group.broadcast(buffer)
            sent += buffer.numel()
        log.info("broadcast %d tensors (%.1f MB) in %.2f s", len(specs), sent / 1e6, time.monotonic() - start)
        return specs

    def close(self) -> None:
        self._group.close()


def receive_broadcast(group: WeightGroup, specs: list[WeightSpec], bucket_bytes: int) -> list[tuple[str, torch.Tensor]]:
    """Receiver side: take part in every bucket broadcast and return views of the received tensors."""
    received: list[tuple[str, torch.Tensor]] = []
    for bucket in plan_buckets(specs, bucket_bytes):
        buffer = torch.empty(_bucket_size(specs, bucket), dtype=torch.uint8, device=group.device)
        group.broadcast(buffer)
        received.extend((specs[index][0], _tensor_view(buffer, specs[index], offset)) for index, offset in bucket)
    return received


def spill_weights(blob: bytes | bytearray | memoryview | np.ndarray, name: str) -> Path:
    """Write a weight blob to shared memory (`/dev/shm` when present, else the temp dir) so that engine
    processes on this node can map it instead of receiving a pickled copy. The caller unlinks it."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    fd, path = tempfile.mkstemp(prefix=f"ampo-weights-{name}-", suffix=".safetensors", dir=root)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return Path(path)


class WeightUpdateExtension:
    """vLLM worker extension (`worker_extension_cls="actors.weights.WeightUpdateExtension"`), mixed into
    the engine's worker and called through `collective_rpc`. Method names carry an `ampo_` prefix
    because vLLM refuses extension attributes that clash with the worker's own (it has `update_weights`
    and `reload_weights`)."""

    _ampo_group: WeightGroup | None = None

    def ampo_load_safetensors_file(self, path: str) -> int:
        """Load a `serialize_weights` blob spilled to `path` (see `spill_weights`) in place; the file is
        memory-mapped, not read into a copy. Returns the number of tensors loaded."""
        tensors = safetensors.torch.load_file(path)
        self._ampo_load(list(tensors.items()))
        return len(tensors)

    def ampo_join_weight_group(
        self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join a weight group as rank `rank + tp_rank` (one rank per worker of a tensor-parallel engine);
        returns the rank taken."""
        self.ampo_leave_weight_group()
        worker_rank = rank + int(getattr(self, "rank", 0))
        self._ampo_group = WeightGroup(master_addr, master_port, worker_rank, world_size, backend, timeout_s)
        return worker_rank

    def ampo_receive_broadcast(self, specs: list[WeightSpec], bucket_bytes: int, load: bool) -> int:
        """Receive one push. With `load=False` the buckets are only consumed: a broadcast is collective,
        so a receiver that skips a stale version must still take part or the sender would hang. A failed
        transfer (timeout, dead sender) leaves the group out of step, so it is dropped and must be joined
        again."""
        if self._ampo_group is None:
            raise RuntimeError("this engine is in no weight group: call join_weight_group first")
        specs = [(name, dtype, list(shape)) for name, dtype, shape in specs]
        try:
            received = receive_broadcast(self._ampo_group, specs, bucket_bytes)
        except Exception:
            self.ampo_leave_weight_group()
            raise
        if load:
            self._ampo_load(received)
        return len(received)

    def ampo_leave_weight_group(self) -> None:
        if self._ampo_group is not None:
            group, self._ampo_group = self._ampo_group, None
            try:
                group.close()
            except Exception as exc:  # a group broken by a timeout may refuse a clean shutdown
                log.warning("closing the weight group failed: %s", exc)

    def _ampo_load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        self._ampo_retie_lm_head()

    def _ampo_retie_lm_head(self) -> None:
        """Point the lm_head at the reloaded embedding again and redo its kernel preparation (on CPU the
        oneDNN-packed copy of the old embedding would otherwise keep producing the logits)."""
        hf_config = self.vllm_config.model_config.hf_text_config  # type: ignore[attr-defined]
        if not getattr(hf_config, "tie_word_embeddings", False):
            return
        model = self.get_model()  # type: ignore[attr-defined]
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None:
            raise RuntimeError(
                f"{type(model).__name__} has tied embeddings but no model.embed_tokens/lm_head pair; "
                "the tied lm_head cannot be refreshed after a weight update"
            )
        lm_head.weight = embed.weight
        lm_head.quant_method.process_weights_after_loading(lm_head)
