"""Checkpoints that lose nothing on restart, and the Hugging Face export of the policy.

A checkpoint is the folder ``<run_dir>/checkpoints/step_<N>/``:

* ``state/`` — the sharded model and optimiser tensors, written by every learner rank with
  ``torch.distributed.checkpoint`` (each rank writes its own shards; a resume may use another world size);
* ``optimizer_groups.json``, ``scheduler.json`` — the optimiser's hyper-parameters per group and the LR schedule;
* ``rng/rank<r>.json`` — each rank's torch / numpy / python RNG state;
* ``queue.arrow`` + ``queue.json`` — the groups waiting in the replay queue (Arrow IPC + JSON, lossless);
* ``meta.json`` — step, policy version, world size and the caller's data cursor (an opaque JSON dict);
* ``config.yaml`` — the resolved configuration text the caller gives.

**Atomic.** Everything is written into ``step_<N>.tmp/`` and the folder is renamed into place last; a crash
mid-save leaves a ``.tmp`` folder that :func:`latest_checkpoint` ignores (and the next save removes), so the
previous checkpoint stays the latest. Only the newest ``keep`` checkpoints are kept.

**No unpickling of untrusted data.** Tensors come back through DCP's reader, which loads them with
``torch.load(weights_only=True)``; DCP's metadata file is a pickle, so it is read by a restricted unpickler that
admits only DCP's metadata classes, ``torch.Size``, dtypes and layouts (:class:`SafeFileSystemReader`); anything
else, including non-tensor ("bytes") entries whose loading would use ``torch.load(weights_only=False)``, is refused.
Everything else is JSON, Arrow or safetensors.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = [
    "CheckpointState",
    "CheckpointWriteError",
    "SafeFileSystemReader",
    "begin_checkpoint",
    "finish_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rank_state",
    "read_checkpoint",
    "resolve_resume",
    "save_rank_state",
    "write_hf_folder",
    "writing_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
_FORMAT = 1
_MAX_SHARD_BYTES = 5 << 30  # the Hugging Face default shard size


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds besides the rank states: enough for the driver to continue exactly."""

    path: Path
    step: int
    version: int
    world_size: int
    data_cursor: dict[str, Any]
    queue_snapshot: dict[str, Any] | None
    """``{"arrow": bytes, "meta": str}`` as :meth:`learner.queue.ReplayQueue.restore` takes it, or None."""
    config_yaml: str | None


# ---------------------------------------------------------------------------------------------------- driver side


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under ``run_dir``, oldest first (``.tmp`` folders of interrupted saves are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | Path, run_dir: Path) -> Path | None:
    """``learner.resume`` → the checkpoint to load: ``auto`` the latest (None if there is none), ``never`` None, or
    the given folder (which must be a complete checkpoint)."""
    if str(resume) == "auto":
        return latest_checkpoint(run_dir)
    if str(resume) == "never":
        return None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full or read-only disk); the previous one is untouched."""


@contextlib.contextmanager
def writing_checkpoint(run_dir: Path, step: int) -> Iterator[Path]:
    """``begin_checkpoint`` for a ``with`` block that writes the checkpoint (the ranks' states, then
    ``finish_checkpoint``). A failed write (``OSError``, also a rank's, which Ray raises as one) becomes a
    :class:`CheckpointWriteError` that names the folder, the reason and the checkpoint a resume would take."""
    root = checkpoint_root(run_dir)
    try:
        yield begin_checkpoint(run_dir, step)
    except OSError as exc:
        kept = latest_checkpoint(run_dir)
        reason = exc.strerror or str(exc)
        raise CheckpointWriteError(
            exc.errno,
            f"cannot write the checkpoint of step {step} into {root}: {reason}. Nothing already written was changed; "
            f"the newest complete checkpoint is {kept or 'none yet'}, and the same command resumes from it once the "
            "run directory has room",
        ) from exc


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create the empty ``step_<N>.tmp`` folder the ranks write into (removing a leftover from a crashed save)."""
    tmp = checkpoint_root(run_dir) / f"step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "rng").mkdir(parents=True)
    return tmp


def finish_checkpoint(
    tmp: Path,
    *,
    step: int,
    version: int,
    world_size: int,
    data_cursor: dict[str, Any],
    queue_snapshot: Any = None,
    config_yaml: str | None = None,
    keep: int = 2,
) -> Path:
    """Write the driver's part into ``tmp``, rename it to ``step_<N>`` and keep only the newest ``keep``.

    ``queue_snapshot`` is a :class:`learner.queue.QueueSnapshot` (or its dict form) or None; ``data_cursor`` must be
    JSON-serialisable. Returns the final folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    meta = {
        "format": _FORMAT,
        "step": step,
        "version": version,
        "world_size": world_size,
        "data_cursor": data_cursor,
        "has_queue": queue_snapshot is not None,
        "saved_at": time.time(),
    }
    if queue_snapshot is not None:
        snap = queue_snapshot if isinstance(queue_snapshot, dict) else dataclasses.asdict(queue_snapshot)
        _write_bytes(tmp / "queue.arrow", snap["arrow"])
        _write_bytes(tmp / "queue.json", snap["meta"].encode())
    if config_yaml is not None:
        _write_bytes(tmp / "config.yaml", config_yaml.encode())
    _write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode())  # written last: marks the content complete
    final = tmp.with_name(f"step_{step}")
    old = None
    if final.exists():  # a run resumed from an older checkpoint reached this step again: replace it
        old = final.with_name(f"step_{step}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)
    for stale in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(stale)
    log.info("checkpoint step %d saved to %s", step, final)
    return final


def read_checkpoint(path: Path) -> CheckpointState:
    """The driver's part of a checkpoint (JSON, Arrow bytes and YAML text only)."""
    path = Path(path)
    meta = _read_json(path / "meta.json", dict)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    snapshot = None
    if meta["has_queue"]:
        # Parsed here and handed on as text: the queue's own parse would report damage without naming the file.
        queue_meta = json.dumps(_read_json(path / "queue.json", dict))
        snapshot = {"arrow": (path / "queue.arrow").read_bytes(), "meta": queue_meta}
    config = path / "config.yaml"
    return CheckpointState(
        path=path,
        step=int(meta["step"]),
        version=int(meta["version"]),
        world_size=int(meta["world_size"]),
        data_cursor=meta["data_cursor"],
        queue_snapshot=snapshot,
        config_yaml=config.read_text() if config.is_file() else None,
    )


# ---------------------------------------------------------------------------------------------------- rank side


def save_rank_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rank: int,
) -> None:
    """Every rank: its model and optimiser shards (DCP, a collective) and its RNG state; rank 0 also the
    optimiser's hyper-parameters and the scheduler (identical on all ranks)."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=str(directory / "state"))
    _write_bytes(directory / "rng" / f"rank{rank}.json", json.dumps(_rng_state()).encode())
    if rank == 0:
        _write_bytes(directory / "optimizer_groups.json", json.dumps(osd["param_groups"]).encode())
        if scheduler is not None:
            _write_bytes(directory / "scheduler.json", json.dumps(_scheduler_state(scheduler)).encode())


def load_rank_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rank: int,
) -> None:
    """Every rank: load what :func:`save_rank_state` wrote, resharding to the current world size if it changed."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)  # initialises the optimiser state to be filled in place
    try:
        dcp.load({"model": msd, "optim": osd["state"]}, storage_reader=SafeFileSystemReader(str(directory / "state")))
    except CheckpointException as exc:  # a BaseException in DCP: turn it into an ordinary, readable error
        raise RuntimeError(f"cannot load the learner state from {directory}: {exc}") from None
    groups = _read_json(directory / "optimizer_groups.json", list)
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, optimizer, {"state": osd["state"], "param_groups": groups})
    sched_file = directory / "scheduler.json"
    if scheduler is not None and sched_file.is_file():
        scheduler.load_state_dict(_read_json(sched_file, dict))
    rng_file = directory / "rng" / f"rank{rank}.json"
    if rng_file.is_file():
        _set_rng_state(_read_json(rng_file, dict))
    else:
        log.warning("no RNG state for rank %d in %s (the world size changed); keeping the current one", rank, directory)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for the ``.metadata`` file (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's metadata of a tensors-only checkpoint is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


# ---------------------------------------------------------------------------------------------------- HF export


def write_hf_folder(
    out_dir: Path,
    specs: list[tuple[str, str, list[int]]],
    weights: Iterable[tuple[str, torch.Tensor | None]],
    *,
    source_model: Path,
    max_shard_bytes: int = _MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face model folder that transformers and vLLM load: safetensors weights (one file, or shards
    with an index beyond ``max_shard_bytes``), the source model's config (dtype set to the weights' dtype) and
    generation config, and its tokenizer with the chat template.

    ``weights`` yields tensors in the order of ``specs`` (e.g. :meth:`LearnerWorker.full_weights` on rank 0); each
    shard is written as soon as it is complete, so at most one shard is held in memory. The folder appears
    atomically (written as ``<out_dir>.tmp`` and renamed).
    """
    import safetensors.torch
    from transformers import AutoConfig, AutoTokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = _plan_shards(specs, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    shard_of = {specs[i][0]: s for s, members in enumerate(shards) for i in members}
    pending: dict[str, torch.Tensor] = {}
    shard_index = 0
    for name, tensor in _check_order(weights, specs):
        if shard_of[name] != shard_index:
            safetensors.torch.save_file(pending, str(tmp / names[shard_index]), metadata={"format": "pt"})
            pending, shard_index = {}, shard_of[name]
        pending[name] = tensor.contiguous()
    safetensors.torch.save_file(pending, str(tmp / names[shard_index]), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_spec_bytes(s) for s in specs)},
            "weight_map": {spec[0]: names[shard_of[spec[0]]] for spec in specs},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = AutoConfig.from_pretrained(source_model)
    config.dtype = getattr(torch, specs[0][1]) if specs else torch.float32
    config.use_cache = True
    config.save_pretrained(tmp)
    generation = Path(source_model) / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, tmp / "generation_config.json")
    AutoTokenizer.from_pretrained(source_model).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("exported the policy (%d tensors, %d file(s)) to %s", len(specs), len(shards), out_dir)
    return out_dir


def _check_order(
    weights: Iterable[tuple[str, torch.Tensor | None]], specs: list[tuple[str, str, list[int]]]
) -> Iterator[tuple[str, torch.Tensor]]:
    expected = iter(specs)
    for name, tensor in weights:
        spec = next(expected, None)
        if spec is None or spec[0] != name or tensor is None:
            raise ValueError(f"weights out of step with their specs at {name!r} (expected {spec and spec[0]!r})")
        yield name, tensor
    if next(expected, None) is not None:
        raise ValueError("weights ended before their specs")


def _spec_bytes(spec: tuple[str, str, list[int]]) -> int:
    return int(np.prod(spec[2], dtype=np.int64)) * getattr(torch, spec[1]).itemsize


def _plan_shards(specs: list[tuple[str, str, list[int]]], max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, spec in enumerate(specs):
        nbytes = _spec_bytes(spec)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


# ---------------------------------------------------------------------------------------------------- small pieces


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync, so the rename that publishes a checkpoint never exposes a half-written file."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _read_json(path: Path, kind: type[dict] | type[list]) -> Any:
    """A checkpoint's JSON file, parsed; its top level must be a ``kind`` (object or list). A missing, undecodable
    or damaged file raises the RuntimeError that a damaged tensor file gets, naming the file and what is wrong."""
    problem = f"cannot read the checkpoint file {path}"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RuntimeError(f"{problem}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RuntimeError(f"{problem}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{problem}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, kind):
        expected = "object" if kind is dict else "list"
        raise RuntimeError(f"{problem}: expected a JSON {expected}, got {type(data).__name__}")
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """A scheduler's state as JSON data. transformers' schedules are ``LambdaLR`` over ``functools.partial``
    objects, whose state is their (empty) ``__dict__``: the lambdas themselves are rebuilt from the config."""
    return scheduler.state_dict()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
