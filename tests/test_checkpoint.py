"""Checkpoints: atomic folders, pickle-free loading, HF export, and kill → resume without skipping or repeating."""

from __future__ import annotations

import asyncio
import errno
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from learner_fixtures import make_groups, stored

from learner.checkpoint import (
    SafeFileSystemReader,
    _rng_state,
    _set_rng_state,
    begin_checkpoint,
    finish_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
    write_hf_folder,
    writing_checkpoint,
)
from learner.config import AlgorithmConfig, LearnerConfig

TINY_LEARNER = dict(mixed_precision="fp32", gradient_checkpointing=False, dist_timeout_s=60.0)


def _save(run_dir: Path, step: int, keep: int = 2) -> Path:
    tmp = begin_checkpoint(run_dir, step)
    return finish_checkpoint(tmp, step=step, version=step, world_size=1, data_cursor={"next": step}, keep=keep)


def test_interrupted_save_leaves_previous_checkpoint_latest(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None and resolve_resume("auto", tmp_path) is None
    first = _save(tmp_path, 1)
    crashed = begin_checkpoint(tmp_path, 2)  # a save that died before finishing
    (crashed / "half-written").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path) == first
    assert read_checkpoint(first).data_cursor == {"next": 1}
    second = _save(tmp_path, 2)  # the next save clears the leftover
    assert latest_checkpoint(tmp_path) == second and not crashed.exists()
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(first, tmp_path) == first
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path / "nope", tmp_path)


def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import learner.checkpoint as checkpoint

    first = _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_bytes", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as caught:
        with writing_checkpoint(tmp_path, 2) as tmp:
            finish_checkpoint(tmp, step=2, version=2, world_size=1, data_cursor={"next": 2})
    message = str(caught.value)
    assert f"cannot write the checkpoint of step 2 into {tmp_path / 'checkpoints'}: No space left on device" in message
    assert f"the newest complete checkpoint is {first}" in message and caught.value.errno == errno.ENOSPC
    assert latest_checkpoint(tmp_path) == first and read_checkpoint(first).step == 1
    assert {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before  # nothing written was touched


def test_keeps_only_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_10"]  # numeric, not lexical, order


def test_dcp_metadata_is_read_without_arbitrary_unpickling(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optim": {"step": torch.tensor(3.0)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    target = {"model": {"w": torch.zeros(2, 3)}, "optim": {"step": torch.tensor(0.0)}}
    dcp.load(target, storage_reader=SafeFileSystemReader(str(tmp_path / "ok")), no_dist=True)
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["optim"]["step"].item() == 3.0

    # Non-tensor entries would be loaded with torch.load(weights_only=False): refused at the metadata.
    dcp.save({"note": "hello"}, checkpoint_id=str(tmp_path / "bytes"), no_dist=True)
    with pytest.raises(BaseException, match="not allowed"):  # DCP's CheckpointException is a BaseException
        dcp.load({"note": ""}, storage_reader=SafeFileSystemReader(str(tmp_path / "bytes")), no_dist=True)

    # A planted pickle that would run code is refused before anything runs.
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(BaseException, match="not allowed"):
        dcp.load({"w": torch.zeros(1)}, storage_reader=SafeFileSystemReader(str(evil)), no_dist=True)


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_rng_state_round_trip() -> None:
    state = _rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    _set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_hf_export_shards_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = load_file(str(tiny_model_dir / "model.safetensors"))
    specs = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in source.items()]
    out = write_hf_folder(tmp_path / "export", specs, iter(source.items()), source_model=tiny_model_dir, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in source.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(out).chat_template


@pytest.mark.slow
def test_kill_and_resume_neither_skips_nor_repeats(ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Step 1, checkpoint (2 sharded ranks + queue + cursor), step 2; kill every learner actor and lose the queue;
    resume from the latest checkpoint: step 2 again gives the same groups and the same loss, and the run then
    consumes every group of the data exactly once."""
    from learner.group import LearnerGroup
    from learner.queue import ReplayQueue

    ray = ray_local
    loop = asyncio.new_event_loop()  # the driver's: the queue lives on one event loop
    algorithm = AlgorithmConfig(max_staleness=2, kl_coef=0.01)
    learner = LearnerConfig(**TINY_LEARNER, num_ranks=2, micro_batch_size=2, lr=1e-3)
    data = stored(make_groups(8))  # the data set, walked by the producer with a cursor

    def produce(queue, start: int, stop: int) -> int:
        for group in data[start:stop]:
            assert loop.run_until_complete(queue.put(group, 30.0)) == "accepted"
        return stop

    def take(queue, k: int) -> list:
        return loop.run_until_complete(queue.get(k, 30.0))

    queue = ReplayQueue(capacity=4, max_staleness=2, version=lambda: 0)
    group = LearnerGroup(learner, tiny_model_dir, algorithm=algorithm)
    cursor = produce(queue, 0, 4)
    first = take(queue, 2)
    loss1 = group.step(first, version=0)["loss"]
    cursor = produce(queue, cursor, 6)
    saved = group.checkpoint(
        tmp_path,
        step=1,
        version=1,
        data_cursor={"next": cursor},
        queue_snapshot=queue.snapshot(),
        config_yaml="learner:\n  lr: 0.001\n",
    )
    second = take(queue, 2)
    expected = group.step(second, version=1)

    for worker in group.workers:  # crash: no clean shutdown
        ray.kill(worker)
    del queue  # lost with the driver process

    path = latest_checkpoint(tmp_path)
    assert path == saved
    resumed = LearnerGroup(learner, tiny_model_dir, algorithm=algorithm)
    try:
        state = resumed.resume(path)
        assert (state.step, state.version, state.data_cursor) == (1, 1, {"next": 6})
        assert state.config_yaml.startswith("learner:")
        queue = ReplayQueue(capacity=4, max_staleness=2, version=lambda: 0)
        assert loop.run_until_complete(queue.restore(state.queue_snapshot)) == 4
        again = take(queue, 2)
        replayed = resumed.step(again, version=state.version)
        print(
            f"resume evidence: step-2 groups {[g.group_id for g in second]} -> {[g.group_id for g in again]}, "
            f"loss {expected['loss']!r} -> {replayed['loss']!r}, grad norm {expected['grad_norm']!r} -> "
            f"{replayed['grad_norm']!r} (step-1 loss {loss1!r})"
        )
        assert [g.group_id for g in again] == [g.group_id for g in second] == ["g2", "g3"]
        assert replayed["loss"] != pytest.approx(loss1)  # the weights did move between the steps
        assert replayed["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-9)
        assert replayed["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-6)

        produce(queue, state.data_cursor["next"], len(data))
        rest = take(queue, 4)
        consumed = [g.group_id for g in first + again + rest]
        assert consumed == [g.group_id for g in data]  # every group once, in order: nothing skipped or repeated
        assert loop.run_until_complete(queue.put(data[0])) == "duplicate"
    finally:
        resumed.shutdown()
        loop.close()
