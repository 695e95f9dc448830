"""The asynchronous AMPO training driver: the one place where the roles meet.

Data flow (ARCHITECTURE.md): RL states → group requests → rollout actors (vLLM) → reward pool (judge) →
replay queue → learner group (FSDP2) → weights pushed back to the rollout actors.

How the driver keeps every stage busy and every group accounted for:

* **Bounded staleness before generation** (AReaL's capacity rule). A group may be issued only while
  `issued < (step + max_staleness + 1) × groups_per_step + refused`, where `step` counts finished learner
  steps. Groups are never generated for a policy the learner would refuse, so no judge call is wasted;
  the few that still arrive too stale (a slow push) are refused by the queue and counted, and replaced.
  With `max_staleness: 0` the driver also waits for each weight push before issuing the next batch:
  exactly synchronous on-policy RL, the baseline the benchmarks compare against.
* **One task per group**: generate on the least-loaded rollout actor, score on the reward pool, put into
  the queue. A rollout or reward actor that dies is restarted by Ray (`max_restarts`); the driver re-sends
  the group it held (counted as resubmitted) and, for a rollout actor, first brings the restarted engine
  to the current weights. A group is therefore generated, scored and queued exactly once.
* **Accounting**: `generated = scored = consumed + refused + dropped + waiting in the queue` at the end of a
  run (refused: turned away at put; dropped: accepted, then too stale once the learner moved on); the summary
  and `ampo_driver_groups_total{stage}` report each count.
* **Resume**: a checkpoint stores the data cursor (epoch, position in the seeded order, the ids of groups
  issued but not yet in the queue) together with the queue's waiting groups. On resume the in-flight
  groups are issued again first, with their original group ids, so no prompt is skipped or repeated.
* **Ctrl-C** (or SIGTERM) stops issuing, lets the current learner step finish, writes a checkpoint and
  shuts the roles down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.records import GroupRequest, SamplingSpec, ScoredGroup, scored_groups_to_table
from actors.states import RLState
from cluster.config import Config, dump_config
from learner.checkpoint import resolve_resume
from learner.group import LearnerGroup
from learner.queue import create_replay_queue
from reward.modes import MODES, SYSTEM_PROMPT

log = logging.getLogger(__name__)

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass
class DataCursor:
    """Where the driver is in the stream of RL states (JSON in checkpoints)."""

    seed: int
    epoch: int = 0
    position: int = 0
    issued: int = 0
    """Groups issued since the start of training (group ids are `g<issued index>`)."""
    pending: list[list[Any]] = field(default_factory=list)
    """[group index, state index] of groups issued but not yet in the queue: re-issued first on resume."""

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "issued": self.issued, "pending": self.pending}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataCursor:
        return cls(**data)


class StateStream:
    """RL states in a seeded order, epoch after epoch (shuffled per epoch when `shuffle`)."""

    def __init__(self, states: Sequence[RLState], cursor: DataCursor, shuffle: bool) -> None:
        if not states:
            raise ValueError("no RL states to train on")
        self.states = states
        self.cursor = cursor
        self.shuffle = shuffle
        self._order = self._epoch_order(cursor.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.states))
        return np.random.default_rng([self.cursor.seed, epoch]).permutation(len(self.states))

    def next_index(self) -> int:
        if self.cursor.position >= len(self._order):
            self.cursor.epoch += 1
            self.cursor.position = 0
            self._order = self._epoch_order(self.cursor.epoch)
        index = int(self._order[self.cursor.position])
        self.cursor.position += 1
        return index


@dataclass
class Counts:
    """Groups at each stage; the accounting identity is checked at the end of a run."""

    issued: int = 0
    generated: int = 0
    scored: int = 0
    queued: int = 0
    refused: int = 0
    """Refused by the queue at put (too stale or a duplicate)."""
    dropped: int = 0
    """Accepted, then dropped from the queue because a newer policy made them too stale."""
    consumed: int = 0
    resubmitted_rollout: int = 0
    resubmitted_reward: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class DriverMetrics:
    """Driver-side Prometheus series (ray.util.metrics; exported by Ray's metrics agent with a `ray_` prefix).
    Names are fixed and documented in docs/metrics.md."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.version = Gauge("ampo_policy_version", "Policy version of the learner.")
        self.step = Gauge("ampo_learner_step", "Learner steps completed.")
        self.step_seconds = Gauge("ampo_learner_step_seconds", "Wall time of the last learner step.")
        self.reward_mean = Gauge("ampo_reward_mean", "Mean reward of the scored samples of the last step.")
        self.format_error_ratio = Gauge("ampo_format_error_ratio", "Fraction of format errors in the last step.")
        self.mode_fraction = Gauge("ampo_mode_fraction", "Fraction of valid samples per thinking mode.", tag_keys=("mode",))
        self.mode_tokens = Gauge("ampo_mode_tokens", "Mean response tokens per thinking mode.", tag_keys=("mode",))
        self.advantage_mean = Gauge("ampo_advantage_mean", "Mean advantage per mode.", tag_keys=("mode",))
        self.advantage_std = Gauge("ampo_advantage_std", "Advantage standard deviation per mode.", tag_keys=("mode",))
        self.kl = Gauge("ampo_kl", "k3 KL to the reference policy (token mean).")
        self.entropy = Gauge("ampo_entropy", "Policy entropy (token mean).")
        self.grad_norm = Gauge("ampo_grad_norm", "Gradient norm before clipping.")
        self.learner_tokens_per_s = Gauge("ampo_learner_tokens_per_second", "Learner throughput of the last step.")
        self.in_flight = Gauge("ampo_groups_in_flight", "Groups issued and not yet in the replay queue.")
        self.staleness = Gauge("ampo_staleness", "Mean policy-version lag of the groups of the last step.")
        self.groups = Counter("ampo_driver_groups_total", "Groups per pipeline stage.", tag_keys=("stage",))
        self.eval_goal = Gauge("ampo_eval_goal", "Evaluation GOAL (0-10) of the trained agent.", tag_keys=("subset",))

    def record_step(self, metrics: dict[str, float]) -> None:
        self.version.set(metrics["version"])
        self.step.set(metrics["step"])
        self.step_seconds.set(metrics["step_seconds"])
        self.reward_mean.set(metrics["reward_mean"])
        self.format_error_ratio.set(metrics["format_error_ratio"])
        self.kl.set(metrics.get("kl", 0.0))
        self.entropy.set(metrics.get("entropy", 0.0))
        self.grad_norm.set(metrics.get("grad_norm", 0.0))
        self.learner_tokens_per_s.set(metrics.get("tokens_per_s", 0.0))
        self.staleness.set(metrics["staleness"])
        for mode in MODES:
            tags = {"mode": str(mode)}
            self.mode_fraction.set(metrics[f"mode_fraction/{mode}"], tags=tags)
            self.mode_tokens.set(metrics.get(f"mode_tokens/{mode}") or 0.0, tags=tags)
            for stat, gauge in (("mean", self.advantage_mean), ("std", self.advantage_std)):
                value = metrics.get(f"adv_{stat}/{mode}")
                if value is not None:
                    gauge.set(value, tags=tags)


def batch_statistics(groups: Sequence[ScoredGroup], version: int) -> dict[str, float]:
    """Reward, format and mode statistics of the groups one learner step consumes (spec §2.5's logged metrics)."""
    samples = [s for g in groups for s in g.samples]
    rewards = [s.reward for s in samples if s.reward is not None]
    stats: dict[str, float] = {
        "samples": float(len(samples)),
        "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
        "format_error_ratio": sum(not s.format_valid for s in samples) / max(len(samples), 1),
        "unscored_ratio": sum(s.reward is None for s in samples) / max(len(samples), 1),
        "staleness": float(np.mean([version - g.policy_version for g in groups])) if groups else 0.0,
        "response_tokens_mean": float(np.mean([s.response_length for s in samples])) if samples else 0.0,
    }
    valid = [s for s in samples if s.mode is not None]
    for mode in MODES:
        of_mode = [s for s in valid if s.mode == mode]
        stats[f"mode_fraction/{mode}"] = len(of_mode) / max(len(samples), 1)
        stats[f"mode_count/{mode}"] = float(len(of_mode))
        stats[f"mode_tokens/{mode}"] = float(np.mean([s.response_length for s in of_mode])) if of_mode else None
    return stats


class RolloutRouter:
    """Sends group requests to the least-loaded rollout actor; re-sends the group when an actor dies and
    brings a restarted actor back to the current weights before it serves again."""

    def __init__(self, actors: Sequence[Any], resync: Callable[[], Awaitable[None]], counts: Counts) -> None:
        self.actors = list(actors)
        self.load = [0] * len(self.actors)
        self._resync = resync
        self._resyncing: asyncio.Lock = asyncio.Lock()
        self.counts = counts

    async def generate(self, request: GroupRequest) -> Any:
        while True:
            index = min(range(len(self.actors)), key=lambda i: self.load[i])
            self.load[index] += 1
            try:
                return await self.actors[index].generate.remote(request)
            except _ACTOR_LOST as exc:
                self.counts.resubmitted_rollout += 1
                log.warning(
                    "rollout actor %d was lost while generating group %s (%s); Ray restarts it and the group is sent again",
                    index, request.group_id, type(exc).__name__,
                )
                await self._after_loss(index)
            finally:
                self.load[index] -= 1

    async def _after_loss(self, index: int) -> None:
        async with self._resyncing:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    await self.actors[index].health.remote()
                    break
                except _ACTOR_LOST:
                    await asyncio.sleep(1.0)
            else:
                raise RuntimeError(f"rollout actor {index} did not come back within 600 s")
            await self._resync()


class TrainingDriver:
    """Creates the roles, runs `algorithm.total_steps` learner steps and shuts everything down.

    `states` are the RL states; `policy_path` is the HF folder of the initial policy (the BC model), which
    is also the frozen reference; `judge_url`/`judge_model` point the reward pool at a started judge when
    the config says `local`.
    """

    def __init__(
        self,
        config: Config,
        states: Sequence[RLState],
        policy_path: str | Path,
        *,
        judge_url: str | None = None,
        judge_model: str | None = None,
        evaluate: Callable[[TrainingDriver, int], Awaitable[dict[str, float]]] | None = None,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.config = config
        self.states = list(states)
        self.policy_path = Path(policy_path)
        self.judge_url = judge_url
        self.judge_model = judge_model
        self.evaluate = evaluate
        self.on_step = on_step
        self.run_dir = Path(config.cluster.run_dir)
        self.counts = Counts()
        self.step = 0
        self.version = 0
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        """A group that could not be produced stops the run; its error is raised once the run has wound down."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, int] = {}
        self._rollout_buffer: list[ScoredGroup] = []
        self.metrics = DriverMetrics()

    # ----------------------------------------------------------------------------------------------- roles

    def start_roles(self) -> None:
        from actors.rollout import rollout_actor_options
        from cluster.ray_cluster import place_role, role_bundles
        from reward.pool import RewardPool

        config = self.config
        bundles = role_bundles(config)
        rollout_place = place_role("rollout", bundles["rollout"])
        learner_place = place_role("learner", bundles["learner"])
        self.placements = [rollout_place, learner_place]
        from actors.rollout import RolloutActor

        remote = ray.remote(RolloutActor)
        self.rollout_actors = [
            remote.options(
                **rollout_actor_options(
                    config.rollout,
                    num_cpus=bundles["rollout"][i]["CPU"],
                    num_gpus=bundles["rollout"][i].get("GPU", 0),
                    **rollout_place.options(i),
                )
            ).remote(config.rollout, str(self.policy_path), actor_index=i)
            for i in range(config.rollout.num_actors)
        ]
        self.reward_pool = RewardPool(
            config.reward,
            self.policy_path,
            base_url=self.judge_url,
            model=self.judge_model,
            num_cpus=config.cluster.reward_cpus_per_actor,
        )
        capacity = (config.algorithm.max_staleness + 1) * config.algorithm.groups_per_step
        self.queue = create_replay_queue(capacity, config.algorithm.max_staleness)
        self.learner = LearnerGroup(
            config.learner,
            self.policy_path,
            algorithm=config.algorithm,
            temperature=config.rollout.temperature,
            seed=config.cluster.seed,
            ray_options={"num_gpus": config.cluster.learner_gpus_per_rank} if config.cluster.learner_gpus_per_rank else None,
            placement_group=learner_place.group,
        )
        ray.get([a.health.remote() for a in self.rollout_actors], timeout=600)
        self.reward_pool.wait_ready()
        self.learner.connect_rollout(self.rollout_actors, config.rollout)
        self.router = RolloutRouter(self.rollout_actors, self._resync_weights, self.counts)
        log.info(
            "roles ready: %d rollout actor(s), %d reward actor(s), %d learner rank(s), queue capacity %d groups",
            len(self.rollout_actors), config.reward.num_actors, config.learner.num_ranks, capacity,
        )

    async def _resync_weights(self) -> None:
        if self.version > 0:
            report = await asyncio.wrap_future(self.learner.publish(self.version))
            if not report.ok:
                raise RuntimeError(f"could not bring restarted rollout actors to version {self.version}: {report.describe()}")

    def shutdown_roles(self) -> None:
        """Stop every role that was started; one failing to stop does not keep the others running."""
        stops = [
            ("learner", lambda: self.learner.shutdown()),
            ("reward_pool", lambda: self.reward_pool.shutdown()),
            ("rollout_actors", lambda: [ray.kill(a) for a in self.rollout_actors]),
            ("queue", lambda: ray.kill(self.queue)),
            ("placements", lambda: [p.remove() for p in self.placements]),
        ]
        for attribute, stop in stops:
            if hasattr(self, attribute):
                try:
                    stop()
                except Exception as exc:  # keep stopping the rest
                    log.warning("stopping the %s failed: %s", attribute, exc)

    # ----------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Train to `algorithm.total_steps` (resuming if a checkpoint says so); returns the summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        self.start_roles()
        try:
            return asyncio.run(self._run())
        finally:
            self.shutdown_roles()

    async def _run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cursor = self._restore()
        self.stream = StateStream(self.states, cursor, self.config.data.shuffle)
        started = time.monotonic()
        for group_index, state_index in list(cursor.pending):
            self._issue(group_index, state_index)
        if self.evaluate is not None and self.step == 0:
            await self._evaluate()
        try:
            while self.step < self.config.algorithm.total_steps and not self._stop.is_set():
                self._top_up()
                await self._learn_one_step()
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._flush_rollouts()
        if self._failure is not None:
            raise self._failure
        if self.evaluate is not None and not self._stop.is_set():
            await self._evaluate()
        self._checkpoint(final=True)
        final_model = await asyncio.to_thread(self.learner.export_hf, self.run_dir / "final_model")
        summary = {
            "final_model": str(final_model),
            "steps": self.step,
            "policy_version": self.version,
            "wall_seconds": round(time.monotonic() - started, 1),
            "groups": self.counts.as_dict(),
            "queue": await self.queue.stats.remote(),
            "interrupted": self._stop.is_set(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.warning("stop requested: finishing the current step, then writing a checkpoint")
            self._stop.set()

    # ----------------------------------------------------------------------------------------------- producing

    def _allowance(self) -> int:
        algorithm = self.config.algorithm
        replaced = self.counts.refused + self.counts.dropped
        return (self.step + algorithm.max_staleness + 1) * algorithm.groups_per_step + replaced

    def _top_up(self) -> None:
        while not self._stop.is_set() and self.stream.cursor.issued < self._allowance():
            self._issue(self.stream.cursor.issued, self.stream.next_index())
            self.stream.cursor.issued += 1
        self.metrics.in_flight.set(len(self._tasks))

    def _issue(self, group_index: int, state_index: int) -> None:
        state = self.states[state_index]
        rollout = self.config.rollout
        request = GroupRequest(
            group_id=f"g{group_index}",
            state_id=state.state_id,
            messages=tuple(state.messages(state.system_prompt or SYSTEM_PROMPT)),
            sampling=SamplingSpec(
                n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                max_tokens=rollout.max_response_tokens,
            ),
            context=state.reward_context(),
        )
        self._pending[request.group_id] = [state_index, "issued"]
        self.counts.issued += 1
        self.metrics.groups.inc(tags={"stage": "issued"})
        task = asyncio.create_task(self._produce(request, group_index))
        self._tasks[request.group_id] = task
        task.add_done_callback(lambda t, gid=request.group_id: self._on_task_done(gid, t))

    def _on_task_done(self, group_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(group_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("group %s failed and stops the run: %s", group_id, task.exception())
            self._failure = task.exception()
            self._stop.set()

    async def _produce(self, request: GroupRequest, group_index: int) -> None:
        group = await self.router.generate(request)
        self._pending[request.group_id][1] = "generated"
        self.counts.generated += 1
        self.metrics.groups.inc(tags={"stage": "generated"})
        while True:
            try:
                scored = await self.reward_pool.score(group)
                break
            except _ACTOR_LOST as exc:
                self.counts.resubmitted_reward += 1
                log.warning("a reward actor was lost scoring group %s (%s); scoring it again", request.group_id, type(exc).__name__)
                await asyncio.sleep(1.0)
        self._pending[request.group_id][1] = "scored"
        self.counts.scored += 1
        self.metrics.groups.inc(tags={"stage": "scored"})
        result = await self.queue.put.remote(scored)
        self._pending.pop(request.group_id, None)
        if result == "accepted":
            self.counts.queued += 1
            self.metrics.groups.inc(tags={"stage": "queued"})
            if self.config.logging.save_rollouts:
                self._rollout_buffer.append(scored)
        else:
            self.counts.refused += 1
            self.metrics.groups.inc(tags={"stage": "refused"})
            log.info("the replay queue refused group %s (%s); a replacement is issued", request.group_id, result)

    # ----------------------------------------------------------------------------------------------- learning

    async def _learn_one_step(self) -> None:
        algorithm = self.config.algorithm
        get = self.queue.get.remote(algorithm.groups_per_step, self.version)
        while True:
            done, _ = await asyncio.wait([asyncio.ensure_future(_await_ref(get))], timeout=1.0)
            if done:
                groups = done.pop().result()
                break
            if self._stop.is_set():
                ray.cancel(get)
                return
            self._top_up()
        stats = batch_statistics(groups, self.version)
        step_metrics = await asyncio.to_thread(self.learner.step, groups, self.version)
        self.counts.consumed += len(groups)
        self.metrics.groups.inc(len(groups), tags={"stage": "consumed"})
        self.step += 1
        self.version += 1
        dropped = await self.queue.set_version.remote(self.version)
        if dropped:
            self.counts.dropped += dropped
            self.metrics.groups.inc(dropped, tags={"stage": "dropped"})
            log.info("%d waiting group(s) became too stale for policy version %d; replacements are issued", dropped, self.version)
        push = self.learner.publish(self.version)
        if algorithm.max_staleness == 0:
            report = await asyncio.wrap_future(push)
            if not report.ok:
                raise RuntimeError(f"weight push of version {self.version} failed: {report.describe()}")
        record = {"step": self.step, "version": self.version, "time": time.time(), **stats, **step_metrics}
        self._log_step(record)
        if self.evaluate is not None and self.config.eval.every_steps and self.step % self.config.eval.every_steps == 0:
            await self._evaluate()
        every = self.config.learner.checkpoint_every
        if every and self.step % every == 0:
            self._checkpoint()

    def _log_step(self, record: dict[str, Any]) -> None:
        self.metrics.record_step(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        modes = " ".join(f"m{m}={record[f'mode_fraction/{m}']:.2f}" for m in MODES)
        log.info(
            "step %d/%d  reward %.3f  format errors %.0f%%  %s  kl %.4f  entropy %.3f  %.1f s  in flight %d",
            self.step, self.config.algorithm.total_steps, record["reward_mean"], 100 * record["format_error_ratio"],
            modes, record.get("kl", 0.0), record.get("entropy", 0.0), record.get("step_seconds", 0.0), len(self._tasks),
        )
        self._flush_rollouts()
        if self.on_step is not None:
            self.on_step(record)

    async def _evaluate(self) -> None:
        results = await self.evaluate(self, self.step)
        for key, value in results.items():
            if key.startswith("eval/goal"):
                self.metrics.eval_goal.set(value, tags={"subset": key.removeprefix("eval/goal_")})
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "version": self.version, **results}) + "\n")

    def _flush_rollouts(self) -> None:
        if not self._rollout_buffer:
            return
        import pyarrow.parquet as pq

        out = self.run_dir / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(scored_groups_to_table(self._rollout_buffer), out / f"step_{self.step:06d}_{time.time_ns()}.parquet")
        self._rollout_buffer = []

    # ----------------------------------------------------------------------------------------------- checkpoints

    def _checkpoint(self, final: bool = False) -> None:
        cursor = self.stream.cursor
        ordered = sorted(self._pending.items(), key=lambda kv: int(kv[0][1:]))
        cursor.pending = [[int(gid[1:]), state] for gid, (state, _) in ordered]
        # Groups still in flight are issued again on resume, so the saved counts leave them out.
        counts = self.counts.as_dict()
        for _, (_, stage) in ordered:
            counts["issued"] -= 1
            counts["generated"] -= stage in ("generated", "scored")
            counts["scored"] -= stage == "scored"
        snapshot = ray.get(self.queue.snapshot.remote())
        path = self.learner.checkpoint(
            self.run_dir,
            step=self.step,
            version=self.version,
            data_cursor={"cursor": cursor.to_json(), "counts": counts},
            queue_snapshot=snapshot,
            config_yaml=dump_config(self.config),
        )
        log.info("%scheckpoint written: %s", "final " if final else "", path)

    def _restore(self) -> DataCursor:
        path = resolve_resume(self.config.learner.resume, self.run_dir)
        if path is None:
            return DataCursor(seed=self.config.data.seed)
        state = self.learner.resume(path)
        self.step, self.version = state.step, state.version
        if state.queue_snapshot is not None:
            ray.get(self.queue.restore.remote(state.queue_snapshot))
        ray.get(self.queue.set_version.remote(self.version))
        for stage, count in state.data_cursor["counts"].items():  # in place: the router shares this object
            setattr(self.counts, stage, count)
        report = self.learner.publish(self.version).result()
        if not report.ok:
            raise RuntimeError(f"could not load the resumed weights into the rollout actors: {report.describe()}")
        log.info("resumed at step %d (policy version %d) from %s", self.step, self.version, path)
        return DataCursor.from_json(state.data_cursor["cursor"])


async def _await_ref(ref: ray.ObjectRef) -> Any:
    return await ref

