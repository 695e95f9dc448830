"""The learner group: W FSDP2 ranks as Ray actors, driven from one place.

:class:`LearnerGroup` turns a batch of scored groups into one update:

The groups arrive as :class:`actors.records.StoredGroup`: a summary (rewards, modes, lengths) and the reference of
the scored group in Ray's object store. Steps 1 and 2 need the summaries only; each rank reads the groups of its own
samples in step 3, so no token passes through the process that drives the group.

1. **Advantages** over the whole batch with ``learner/ampo.py`` (AMPO or GRPO). A sample whose format is invalid has
   mode −1 and its reward (−2) counts, as in the reference. A sample **without a reward** (the judge failed after
   its retries; ``reward is None``) gets no gradient: it is excluded from its group's statistics (mean, std, mode
   means, and the mode term's "no invalid sample" rule) and its tokens are masked out of the loss. The reference
   scores such a sample 0 and lets it disable the mode term; we refuse to invent a reward (failures are explicit,
   never scored), and excluding it keeps the rest of the group's signal. A group may therefore train on
   fewer than n samples; with all samples unscored it contributes nothing.
2. **Split** the samples over the ranks balanced by tokens (longest first onto the least-loaded rank) and tell
   every rank the same micro-batch count and the global number of trainable tokens (see ``learner/worker.py``
   for why both matter).
3. **Step** on all ranks (each first reads its groups) and aggregate their metrics: token-weighted loss parts, clip
   fraction, KL, entropy, IS weights, grad norm, advantage mean/std per mode, tokens per second.

Weight pushes (:meth:`LearnerGroup.publish`) go through :class:`learner.publish.WeightPublisher`; checkpoints and
the HF export through ``learner/checkpoint.py``. The cluster layer decides placement: pass Ray actor options (e.g.
``num_gpus``) and/or a placement group whose bundle ``i`` hosts rank ``i``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import RolloutConfig
from actors.records import GroupSummary, ScoredGroup, StoredGroup, summarise
from learner.ampo import MODES, ampo_advantages, grpo_advantages, mode_term_groups, moving_groups
from learner.checkpoint import CheckpointState, finish_checkpoint, read_checkpoint, writing_checkpoint
from learner.config import AlgorithmConfig, LearnerConfig
from learner.publish import PushReport, WeightPublisher
from learner.batches import BCExample, RankShard, SamplePlan, TrainSample, micro_batch_count, train_sample
from learner.worker import TOKEN_MEAN_METRICS, LearnerWorker, Schedule, WorkerSetup, resolve_backend

__all__ = ["BatchInfo", "LearnerGroup", "build_train_samples", "plan_batch", "shard_batch", "split_by_tokens"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchInfo:
    """Per-batch statistics computed on the driver: advantage mean/std per mode, rewards, counts."""

    metrics: dict[str, float]


def plan_batch(
    groups: Sequence[GroupSummary], version: int, algorithm: AlgorithmConfig
) -> tuple[list[SamplePlan], BatchInfo]:
    """Advantages and flags of every sample of a batch, from the group summaries alone (see the module docstring
    for unscored samples).

    ``version`` is the learner's current policy version: samples made by an older one are marked ``stale`` (TIS).
    A sample is trainable when it has a reward and at least one response token.
    """
    flat = [(g, i, s) for g, group in enumerate(groups) for i, s in enumerate(group.samples)]
    ids = [groups[g].group_id for g, _, _ in flat]
    scored = np.array([s.reward is not None for _, _, s in flat], dtype=bool)
    advantages = np.zeros(len(flat))
    modes = np.array([s.mode if s.mode is not None else -1 for _, _, s in flat], dtype=np.float64)
    mode_term_ratio = moving = 0.0
    if scored.any():
        idx = np.flatnonzero(scored)
        rewards = [flat[i][2].reward for i in idx]
        scored_ids = [ids[i] for i in idx]
        # Logged for GRPO too: the share of groups AMPO would have given a mode term.
        mode_term_ratio = float(mode_term_groups(modes[idx], scored_ids).mean())
        if algorithm.estimator == "ampo":
            lengths = [flat[i][2].response_length for i in idx]
            advantages[idx] = ampo_advantages(
                rewards, lengths, modes[idx], scored_ids, eps=algorithm.adv_eps, tie_tolerance=algorithm.tie_tolerance
            )
        else:
            advantages[idx] = grpo_advantages(rewards, scored_ids, eps=algorithm.adv_eps)
        moving = float(moving_groups(advantages[idx], scored_ids).sum())  # a group with no scored sample never moves
    plans = [
        SamplePlan(
            group=g,
            sample=i,
            advantage=float(advantages[k]),
            stale=s.policy_version < version,
            trainable=bool(scored[k]) and s.response_length > 0,
            num_tokens=s.prompt_length + s.response_length,
        )
        for k, (g, i, s) in enumerate(flat)
    ]
    metrics: dict[str, float] = {
        "groups": float(len(groups)),
        "samples": float(len(flat)),
        "unscored_samples": float((~scored).sum()),
        "stale_samples": float(sum(p.stale for p in plans)),
        "reward_mean": float(np.mean([flat[i][2].reward for i in np.flatnonzero(scored)])) if scored.any() else 0.0,
        "mode_term_group_ratio": mode_term_ratio,
        "informative_group_ratio": moving / len(groups) if groups else 0.0,
    }
    adv = advantages[scored]
    metrics["adv_mean"] = float(adv.mean()) if adv.size else 0.0
    metrics["adv_std"] = float(adv.std()) if adv.size else 0.0
    for mode in (*MODES, -1):
        tag = str(mode) if mode > 0 else "invalid"
        chosen = advantages[scored & (modes == mode)]
        metrics[f"adv_count/{tag}"] = float(chosen.size)
        metrics[f"adv_mean/{tag}"] = float(chosen.mean()) if chosen.size else 0.0
        metrics[f"adv_std/{tag}"] = float(chosen.std()) if chosen.size else 0.0
    return plans, BatchInfo(metrics)


def build_train_samples(
    groups: Sequence[ScoredGroup], version: int, algorithm: AlgorithmConfig
) -> tuple[list[TrainSample], BatchInfo]:
    """:func:`plan_batch` applied to scored groups held in this process, with their train samples."""
    plans, info = plan_batch([summarise(g) for g in groups], version, algorithm)
    return [train_sample(groups[p.group].samples, p) for p in plans], info


def shard_batch(groups: Sequence[StoredGroup], plans: Sequence[SamplePlan], parts: Sequence[Sequence[int]]) -> list[RankShard]:
    """Each rank's :class:`RankShard`: the references of the groups its samples (``parts[rank]``, indices into
    ``plans``) come from, and those samples' plans re-indexed into them."""
    shards = []
    for part in parts:
        used = sorted({plans[i].group for i in part})
        position = {g: k for k, g in enumerate(used)}
        shards.append(RankShard(
            refs=tuple(groups[g].ref for g in used),
            plans=tuple(dataclasses.replace(plans[i], group=position[plans[i].group]) for i in part),
        ))
    return shards


def split_by_tokens(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices per rank, balanced by size: longest first onto the rank with the fewest tokens (then samples).

    Deterministic; the indices of each rank come back in ascending order.
    """
    loads = [(0, 0, rank) for rank in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        tokens, count, rank = min(loads)
        parts[rank].append(i)
        loads[rank] = (tokens + sizes[i], count + 1, rank)
    return [sorted(p) for p in parts]


class LearnerGroup:
    """W learner ranks (Ray actors) holding one FSDP2-sharded policy (see the module docstring).

    Args:
        learner: ranks, backend, optimiser and memory settings.
        model_path: HF folder of the initial policy (also the frozen reference).
        algorithm: the RL algorithm; None sets the ranks up for behaviour cloning (no reference model).
        schedule: learning-rate schedule; default: constant ``learner.lr`` after ``learner.warmup_steps``.
        temperature: rollout temperature (logits are divided by it).
        seed: torch seed of every rank.
        ray_options: extra options for every rank's actor (e.g. ``{"num_gpus": 1}``); default ``num_cpus=1``.
        placement_group: rank ``i`` goes to bundle ``i`` of it.
        setup_timeout_s: limit on forming the process group and loading the model.
        cpu_cores: per rank, the CPU cores to pin its process to (CPU-only single-node runs; None: no pinning).
    """

    def __init__(
        self,
        learner: LearnerConfig,
        model_path: str | Path,
        *,
        algorithm: AlgorithmConfig | None = None,
        schedule: Schedule | None = None,
        temperature: float = 1.0,
        seed: int = 1,
        ray_options: dict[str, Any] | None = None,
        placement_group: Any = None,
        setup_timeout_s: float = 600.0,
        cpu_cores: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.learner = learner
        self.algorithm = algorithm
        self.model_path = Path(model_path)
        self.world_size = learner.num_ranks
        self.setup_timeout_s = setup_timeout_s
        self.publisher: WeightPublisher | None = None
        schedule = schedule or Schedule(lr=learner.lr, kind="constant", warmup_steps=learner.warmup_steps)
        setup = WorkerSetup(
            model_path=str(self.model_path),
            learner=learner,
            schedule=schedule,
            algorithm=algorithm,
            temperature=temperature,
            seed=seed,
            cpu_cores=None if cpu_cores is None else tuple(tuple(c) for c in cpu_cores),
        )
        remote_cls = ray.remote(LearnerWorker)
        self.workers = []
        for rank in range(self.world_size):
            options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0, **(ray_options or {})}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank
                )
            self.workers.append(remote_cls.options(**options).remote(rank, self.world_size, setup))
        started = time.monotonic()
        addr, port = ray.get(self.workers[0].address.remote(), timeout=setup_timeout_s)
        info = ray.get([w.setup.remote(addr, port) for w in self.workers], timeout=setup_timeout_s)
        log.info(
            "learner group ready: %d rank(s), %s, %s compute, %d parameters, %.1f s",
            self.world_size,
            info[0]["backend"],
            info[0]["compute_dtype"],
            info[0]["parameters"],
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------------------------------------ training

    def step(self, groups: Sequence[StoredGroup], version: int) -> dict[str, float]:
        """One AMPO/GRPO update on ``groups`` by a learner at policy ``version``; returns aggregated metrics.

        Advantages and the split over ranks come from the groups' summaries; each rank reads the groups of its own
        samples from the object store. A batch without a single trainable token (every sample unscored) is skipped
        with a warning: the result then has ``skipped = 1`` and no update was made.
        """
        if self.algorithm is None:
            raise RuntimeError("this learner group was set up for behaviour cloning")
        plans, info = plan_batch([g.summary for g in groups], version, self.algorithm)
        global_tokens = sum(groups[p.group].summary.samples[p.sample].response_length for p in plans if p.trainable)
        if global_tokens == 0:
            log.warning("skipping a learner step: none of the %d samples has a reward", len(plans))
            return {**info.metrics, "skipped": 1.0}
        started = time.perf_counter()
        parts = split_by_tokens([p.num_tokens for p in plans], self.world_size)
        count = max(micro_batch_count(len(p), self.learner.micro_batch_size) for p in parts)
        shards = shard_batch(groups, plans, parts)
        results = ray.get([w.train_on.remote(shard, count, global_tokens) for w, shard in zip(self.workers, shards)])
        seconds = time.perf_counter() - started
        metrics = {name: sum(r[f"{name}_tok_sum"] for r in results) / global_tokens for name in TOKEN_MEAN_METRICS}
        metrics.update(info.metrics)
        tokens = sum(r["tokens"] for r in results)
        # |learner − engine| log-prob over the tokens of current-version samples only (the same weights on both
        # sides). A step that trains only on older samples (most steps of an asynchronous run) compares nothing, and
        # its record says so with None rather than a 0 that reads as a perfect match.
        compared = sum(r["logprob_mismatch_tokens"] for r in results)
        metrics.update(
            {
                "skipped": 0.0,
                "is_weight_max": max(r["is_weight_max"] for r in results),
                "logprob_mismatch": sum(r["logprob_mismatch_sum"] for r in results) / compared if compared else None,
                "logprob_mismatch_max": max(r["logprob_mismatch_max"] for r in results) if compared else None,
                "logprob_mismatch_tokens": compared,
                "grad_norm": results[0]["grad_norm"],
                "lr": results[0]["lr"],
                "loss_tokens": float(global_tokens),
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "step_seconds": seconds,
            }
        )
        return metrics

    def bc_step(self, examples: Sequence[BCExample]) -> dict[str, float]:
        """One behaviour-cloning update on ``examples``; returns the response-token mean NLL and step metrics."""
        global_tokens = sum(e.loss_tokens for e in examples)
        if global_tokens == 0:
            raise ValueError("a BC batch needs at least one response token")
        started = time.perf_counter()
        results = self._run_sharded("bc_step", examples, global_tokens)
        seconds = time.perf_counter() - started
        tokens = sum(r["tokens"] for r in results)
        return {
            "loss": sum(r["nll_sum"] for r in results) / global_tokens,
            "grad_norm": results[0]["grad_norm"],
            "lr": results[0]["lr"],
            "loss_tokens": float(global_tokens),
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "step_seconds": seconds,
        }

    def logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """Per-token log-probs of each sample's response under the current policy, in input order."""
        parts = split_by_tokens([s.num_tokens for s in samples], self.world_size)
        count = max(micro_batch_count(len(p), self.learner.micro_batch_size) for p in parts)
        refs = [w.logprobs.remote([samples[i] for i in p], count) for w, p in zip(self.workers, parts)]
        result: list[list[float]] = [[] for _ in samples]
        for part, values in zip(parts, ray.get(refs)):
            for i, v in zip(part, values):
                result[i] = v
        return result

    def _run_sharded(self, method: str, items: Sequence[Any], global_tokens: int) -> list[dict[str, float]]:
        parts = split_by_tokens([item.num_tokens for item in items], self.world_size)
        count = max(micro_batch_count(len(p), self.learner.micro_batch_size) for p in parts)
        refs = [
            getattr(w, method).remote([items[i] for i in p], count, global_tokens) for w, p in zip(self.workers, parts)
        ]
        return ray.get(refs)

    # ------------------------------------------------------------------------------------------------ weights

    def connect_rollout(self, actors: Sequence[Any], rollout: RolloutConfig) -> None:
        """Push future weight versions to these rollout actors, with the transport and limits of ``rollout``."""
        if self.publisher is not None:
            self.publisher.close()
        # The weights travel in the dtype the engines load (each resolved `auto` on its own node).
        engine_dtypes = {health["dtype"] for health in ray.get([a.health.remote() for a in actors], timeout=self.setup_timeout_s)}
        if len(engine_dtypes) != 1:
            raise RuntimeError(f"rollout engines run in different dtypes {sorted(engine_dtypes)}; set rollout.dtype explicitly")
        self.publisher = WeightPublisher(
            actors,
            transport=rollout.weight_transport,
            timeout_s=rollout.weight_update_timeout_s,
            bucket_bytes=rollout.weight_bucket_bytes,
            dtype=engine_dtypes.pop(),
            backend=resolve_backend(self.learner.backend),
            ranks_per_actor=rollout.tensor_parallel_size,
        )
        self.publisher.connect(self.workers)

    def publish(self, version: int) -> concurrent.futures.Future[PushReport]:
        """Push the current weights as ``version`` to the connected rollout actors; returns at once.

        The next :meth:`step` may be called immediately: each rank finishes its part of the gather first.
        Collect finished reports with ``self.publisher.poll()``, or wait with ``self.publisher.wait()``.
        """
        if self.publisher is None:
            raise RuntimeError("no rollout actors: call connect_rollout() first")
        return self.publisher.publish(version, self.workers)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def checkpoint(
        self,
        run_dir: str | Path,
        *,
        step: int,
        version: int,
        data_cursor: dict[str, Any],
        queue_snapshot: Any = None,
        config_yaml: str | None = None,
    ) -> Path:
        """Save an atomic checkpoint (see ``learner/checkpoint.py``) and keep the newest ``learner.keep_checkpoints``.

        ``data_cursor`` (JSON) and ``queue_snapshot`` must describe the same moment: take them while no group is
        being put, so every prompt is either before the cursor and in the queue/consumed, or after it.
        """
        json.dumps(data_cursor)  # fail before writing anything if the cursor is not JSON
        with writing_checkpoint(Path(run_dir), step) as tmp:
            ray.get([w.save_state.remote(str(tmp)) for w in self.workers], timeout=self.setup_timeout_s)
            return finish_checkpoint(
                tmp,
                step=step,
                version=version,
                world_size=self.world_size,
                data_cursor=data_cursor,
                queue_snapshot=queue_snapshot,
                config_yaml=config_yaml,
                keep=self.learner.keep_checkpoints,
            )

    def resume(self, path: str | Path) -> CheckpointState:
        """Load a checkpoint into the ranks; returns the driver's part (step, version, cursor, queue, config)."""
        state = read_checkpoint(Path(path))
        ray.get([w.load_state.remote(str(state.path)) for w in self.workers], timeout=self.setup_timeout_s)
        log.info("resumed from %s (step %d, policy version %d)", state.path, state.step, state.version)
        return state

    def export_hf(self, out_dir: str | Path, dtype: str | None = None) -> Path:
        """Write the policy as a HF folder vLLM and transformers load; ``dtype`` defaults to the source model's."""
        dtype = dtype or _config_dtype(self.model_path)
        results = ray.get([w.export_hf.remote(str(out_dir), dtype) for w in self.workers], timeout=self.setup_timeout_s)
        return Path(results[0])

    # ------------------------------------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Leave the process group and stop the rank actors (pending weight pushes are reported first)."""
        if self.publisher is not None:
            for report in self.publisher.poll():
                if not report.ok:
                    log.error(report.describe())
            self.publisher.close()
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        except Exception as exc:  # dead or hung ranks are killed below anyway
            log.warning("learner ranks did not shut down cleanly: %s", exc)
        for w in self.workers:
            ray.kill(w)


def _config_dtype(model_path: Path) -> str:
    """The dtype a HF folder declares (``dtype``, or the older ``torch_dtype``), float32 if none."""
    config = json.loads((model_path / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")
