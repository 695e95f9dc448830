"""Joining or starting Ray, and placing the roles.

Local mode starts a private single-node Ray whose every listener (GCS, raylets, object manager, the
metrics agent) is on 127.0.0.1. Ray 2.60 enables token authentication by default: a locally started
instance generates its token in `~/.ray/auth_token` and the driver uses it, so nothing needs opening up.
On a cluster (`ray job submit`), `address: auto` joins the cluster the job runs in.

Roles are placed with one placement group each (GPU bundles for rollout and learner, CPU bundles for
the reward pool), so Ray can put them on different nodes of a multi-node cluster while every bundle of
one role is reserved at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import RolloutConfig
from cluster.config import Config
from cluster.stages import Interrupted

log = logging.getLogger(__name__)

MACHINE_CORES: list[int] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
"""The cores this process may use when it starts, before `connect` pins it (see `learner_core_sets`)."""

# Environment every Ray worker of a run inherits: in-process vLLM engines (2 s start, one process) and
# no tokenizer thread pools fighting the engine for the few cores of a CPU machine.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def connect(config: Config) -> dict[str, Any]:
    """Start or join Ray as `cluster.address` says; returns what `ray.init` reported."""
    if ray.is_initialized():
        return {}
    # ray.init replaces the SIGTERM handler with a bare sys.exit; the command's own (an interruption that stops the
    # servers it started and says what is kept) must stay in force.
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        return _init(config)
    except SystemExit as exc:  # SIGTERM while ray.init ran, under Ray's handler: stop what it started, as on Ctrl-C
        if exc.code != signal.SIGTERM:
            raise
        shutdown_local()
        raise Interrupted(signal.SIGTERM) from None
    except KeyboardInterrupt:
        shutdown_local()
        raise
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


RAY_PROCESS_MARKERS = ("ray::", "/ray/", "raylet", "gcs_server")
"""Command-line fragments of the processes a local Ray instance starts (GCS, raylet, agents, workers)."""


def shutdown_local(grace_s: float = 3.0) -> None:
    """`ray.shutdown()` of the instance this process started, then stop what it leaves behind: Ray's dashboard and
    runtime-env agents notice their raylet's end at once but first try to report it to the GCS, which is already
    gone, and can linger for a minute. Only this process's descendants that are Ray's own are touched (a local vLLM
    server or engine the command also started is not)."""
    import psutil

    def is_ray(process: psutil.Process) -> bool:
        try:
            return any(marker in " ".join(process.cmdline()) for marker in RAY_PROCESS_MARKERS)
        except psutil.Error:
            return False

    family = [p for p in psutil.Process().children(recursive=True) if is_ray(p)]
    ray.shutdown()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _init(config: Config) -> dict[str, Any]:
    env = dict(WORKER_ENV)
    env["VLLM_CPU_OMP_THREADS_BIND"] = config.rollout.cpu_omp_threads_bind
    runtime_env = {"env_vars": env}
    if config.cluster.address == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        needed = _logical_cpus_needed(config)
        num_cpus = max(config.cluster.num_cpus or os.cpu_count() or 1, needed)
        _check_port_free(config.logging.metrics_port)
        reserved = learner_core_sets(config)
        if config.cluster.pin_learner_cpus and reserved is None:
            log.warning(
                "cluster.pin_learner_cpus ignored: the learner ranks' cores would leave none of this machine's %d "
                "for the other roles", len(MACHINE_CORES),
            )
        if reserved is not None:
            from learner.worker import pin_process_to_cores

            taken = {core for cores in reserved for core in cores}
            others = [core for core in MACHINE_CORES if core not in taken]
            # Ray's processes and every actor inherit this process's affinity; the learner ranks re-pin themselves.
            pin_process_to_cores(others)
            log.info("CPU pinning: learner ranks on cores %s, this process, Ray and the other roles on %s", reserved, others)
        log.info("starting a local Ray instance on 127.0.0.1 with %d logical CPUs", num_cpus)
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=config.logging.metrics_port or None,
            runtime_env=runtime_env,
            log_to_driver=config.logging.level == "DEBUG",
            _system_config={"task_events_max_num_task_in_gcs": config.cluster.ray_task_history},
        )
    else:
        log.info("joining the Ray cluster at %s", config.cluster.address)
        context = ray.init(address=config.cluster.address, runtime_env=runtime_env)
    return dict(context.address_info) if context else {}


def learner_core_sets(config: Config) -> list[list[int]] | None:
    """Per learner rank, the cores `cluster.pin_learner_cpus` reserves for it (the machine's last ones); None when
    pinning is off, Ray is not local, or the reservation would leave no core for the other roles."""
    cluster = config.cluster
    if not (cluster.pin_learner_cpus and cluster.address == "local" and hasattr(os, "sched_setaffinity")):
        return None
    per_rank, ranks = cluster.learner_cpus_per_rank, config.learner.num_ranks
    if per_rank * ranks >= len(MACHINE_CORES):
        return None
    reserved = MACHINE_CORES[-per_rank * ranks :]
    return [reserved[rank * per_rank : (rank + 1) * per_rank] for rank in range(ranks)]


def _check_port_free(port: int) -> None:
    """Ray's metrics agent dies on a taken port and Ray then reports only that the node 'timed out during
    startup'; say what is wrong before starting it."""
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's HTTP server does: TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"the metrics port {port} on 127.0.0.1 is taken, most likely by the Ray of an earlier run that is "
                f"still alive: stop it (`ray stop --force`) or choose another port (logging.metrics_port=0 picks a "
                f"free one)"
            ) from None


def _logical_cpus_needed(config: Config) -> int:
    """Logical CPUs the roles reserve (plus one for the driver's own tasks). They are logical: on a small
    machine the actors share the physical cores, which is fine since they take turns being busy."""
    bundles = role_bundles(config)
    return math.ceil(sum(b["CPU"] for role in bundles.values() for b in role)) + 1


@dataclass
class RolePlacement:
    """A role's placement group and the options that put actor i into bundle i."""

    name: str
    group: PlacementGroup

    def remove(self) -> None:
        remove_placement_group(self.group)

    def options(self, index: int) -> dict[str, Any]:
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index
            )
        }


def place_role(name: str, bundles: list[dict[str, float]], strategy: str = "PACK", timeout_s: float = 300.0) -> RolePlacement:
    """Reserve `bundles` for one role; a clear error names the role if the cluster cannot fit it."""
    # The suffix keeps two runs sharing a cluster (or a run and its resumption) from clashing on the name.
    group = placement_group(bundles, strategy=strategy, name=f"ampo-{name}-{uuid.uuid4().hex[:6]}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"the cluster cannot place the {name} role ({len(bundles)} bundles of {bundles[0]}) within "
            f"{timeout_s:.0f} s; available resources: {ray.available_resources()}"
        )
    return RolePlacement(name, group)


def role_bundles(config: Config) -> dict[str, list[dict[str, float]]]:
    """Resource bundles per role from the config. A role's custom resources (`cluster.rollout_resources`,
    `cluster.learner_resources`) are what the whole role asks for, shared out over its bundles: with
    `{"learner_node": 1}` four learner ranks ask for 0.25 each, so a node started with `--resources
    '{"learner_node": 1}'` takes all four."""

    def bundles(count: int, cpus: float, gpus: float, extra: dict[str, float]) -> list[dict[str, float]]:
        share = {name: amount / count for name, amount in extra.items()}
        return [{"CPU": cpus, **({"GPU": gpus} if gpus else {}), **share}] * count

    cluster = config.cluster
    return {
        "rollout": bundles(config.rollout.num_actors, 1, cluster.rollout_gpus_per_actor, cluster.rollout_resources),
        "learner": bundles(
            config.learner.num_ranks, cluster.learner_cpus_per_rank, cluster.learner_gpus_per_rank, cluster.learner_resources
        ),
        "reward": bundles(config.reward.num_actors, cluster.reward_cpus_per_actor, 0, {}),
    }


def start_rollout_role(
    config: Config, policy_path: str | Path, rollout: RolloutConfig | None = None
) -> tuple[list[Any], RolePlacement]:
    """The rollout role: its placement group and one `RolloutActor` per bundle serving `policy_path` (with
    `rollout`, default the config's). Handles return at once; the engines load in the background (await
    `health`)."""
    from actors.rollout import RolloutActor, rollout_actor_options

    rollout = rollout or config.rollout
    bundles = role_bundles(config)["rollout"]
    placement = place_role("rollout", bundles)
    remote = ray.remote(RolloutActor)
    actors = [
        remote.options(
            **rollout_actor_options(rollout, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), **placement.options(i))
        ).remote(rollout, str(policy_path), actor_index=i)
        for i, bundle in enumerate(bundles)
    ]
    return actors, placement


def bc_rank_options(config: Config) -> dict[str, Any]:
    """Ray options of each behaviour-cloning rank: the learner's GPUs and custom resources. Without GPUs the
    ranks split the largest node's cores between them: nothing else runs during BC, and Ray sets a CPU
    actor's torch thread count to its `num_cpus` (one core each would leave the rest of the machine idle)."""
    cluster = config.cluster
    options: dict[str, Any] = {"resources": dict(cluster.learner_resources)} if cluster.learner_resources else {}
    if cluster.learner_gpus_per_rank:
        options["num_gpus"] = cluster.learner_gpus_per_rank
        return options
    node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)
    if cluster.address == "local":  # a local instance may declare more logical CPUs than the machine has cores
        node_cpus = min(node_cpus, len(MACHINE_CORES))
    options["num_cpus"] = max(1, int(node_cpus // config.learner.num_ranks))
    return options
