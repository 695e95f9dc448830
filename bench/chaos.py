"""Chaos and soak: AMPO training under a seeded random schedule of faults in every role, with nothing lost.

What runs: ``ampo train`` (the process ``ray job submit`` runs on a cluster) as a subprocess against a Ray cluster this
script owns, so that the cluster outlives each driver as it does under ``ray job submit``. The judge is the
fault-injecting OpenAI-compatible server (``testing.fault_server``, no injected faults) in a process of its own, so it
can be killed like a real endpoint. The policy is the tiny Llama of ``bench/pipeline.py``, cloned on a fixed level-1
response so that its samples reach the judge; two learner ranks (gloo), one rollout actor, two reward actors,
``max_staleness: 1``, a checkpoint every step.

**Faults**, one at a time. Once the previous fault has recovered (below), the script waits a seeded gap and injects
the next one. Kinds come in seeded rounds (each kind once per round, in random order), so that one
round (``--quick``, the size CI runs) already hits every role:

* ``rollout``: SIGKILL of a rollout actor's process. Ray restarts it; the driver re-sends the groups it held and loads
  the current weights into the new engine.
* ``reward``: SIGKILL of a reward actor's process. Ray restarts it; its groups are scored again.
* ``learner``: SIGKILL of one learner rank. An FSDP process group cannot be rejoined, so the driver fails; the same
  command is submitted again (what an operator, or a job retry policy, does) and resumes from the last checkpoint.
* ``judge``: SIGKILL of the judge server, started again on the same port after a seeded downtime (5-30 s; 3-8 s with
  ``--quick``). The reward pool retries inside ``reward.judge.retry_window_s``; generation waits at the in-flight
  cap meanwhile.
* ``driver``: SIGKILL of the driver's process group (the driver is gone without any cleanup), then the same command
  submitted again. Every other driver kill (the first included) lands in the middle of a checkpoint write: the driver
  is frozen the moment a ``step_<N>.tmp`` folder appears and then killed, and the resume must say that it took
  ``step_<N-1>``.

A fault is **recovered** when the run logs three learner steps after it (more than the groups queued or in flight at
the fault can feed, so the role that was hit has worked again), within ``--recovery-timeout``. After ``--minutes`` (or
``--faults`` faults) the driver gets SIGTERM (the step finishes, a checkpoint is written, it stops); but for
``--quick``, the command is then submitted once more with ``algorithm.total_steps`` two past that checkpoint, and
finishes. The checks read what the run keeps, its last checkpoint (counts, groups in flight that a resume issues
again, groups waiting in the queue) and ``consumed.jsonl`` (the records of steps a resume discarded are in
``*.discarded.jsonl``):

* **trained twice** = consumed group ids minus distinct ones in ``consumed.jsonl``, which must list steps 1..S once;
* **lost** = issued − distinct consumed − refused − dropped − filtered − waiting in the queue (refused, dropped and
  filtered groups are counted and replaced; groups still in flight are not counted as issued in a checkpoint);
  ``issued = generated = scored``;
* every resume after a kill in a checkpoint write took the checkpoint before it;
* every group generated, before and after each resume, carries the state that the seeded data order gives its id
  (``rollouts/*.parquet``), so a resume neither skips nor repeats a prompt;
* no process of the run's actors (nor a vLLM engine of theirs) is left once the last driver has exited.

**Soak.** Every ``--sample-every`` seconds the script records the resident memory (RSS) of each role's processes:
driver (with the replay queue), rollout, reward, learner ranks, judge server, and Ray's own GCS and raylet (these
live through every restart). A process is counted from 30 s after its start (loading a model is not growth), and
each role's figure at a sample is its largest process. **Bound**, set before the 30-minute run: for every role the
median RSS over the last third of the run is at most 1.25 × the median over the first third (**growth**) and at most
1.05 × the median over the middle third (**still growing**: a cache that fills up once passes it, a leak does not),
and the learner's median step time over the last third is at most 1.5 × the first third's. The bound is judged for
runs of at least 10 minutes (the thirds of a shorter run are mostly start-up) and printed for every run. Ray's GCS
keeps the last ``--ray-task-history`` task attempts (about 3.8 KiB each, ``bench/ray_task_history.py``); a soak run
with a small history shows whether anything else in Ray's control plane grows.

Run from the repository root: ``.venv/bin/python bench/chaos.py [--minutes 10] [--seed 0] [--quick]`` (the soak of
``docs/reliability.md``: ``--minutes 30``). It prints the fault table, the accounting, the memory and step-time table
(every memory sample goes to ``memory.csv`` in its folder), then ``RESULT chaos_groups_lost=<n>``,
``RESULT chaos_groups_trained_twice=<n>``, ``RESULT chaos_unrecovered_faults=<n>`` and, for runs that judge the bound,
``RESULT chaos_memory_growth=<largest ratio>``. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.pipeline import SHORT_SYSTEM_PROMPT, cloned_policy  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FAULT_KINDS = ("rollout", "reward", "learner", "judge", "driver")
ACTOR_ROLES = {"RolloutActor": "rollout", "RewardActor": "reward", "LearnerWorker": "learner"}
"""Ray names an actor's worker process ``ray::<Class>`` (``ray::<Class>.<method>`` while it runs a call)."""
ROLES = ("driver", "rollout", "reward", "learner", "judge", "ray")
SETTLE_S = 30.0
MEMORY_BOUND = 1.25
PLATEAU_BOUND = 1.05
STEP_TIME_BOUND = 1.5
JUDGED_FROM_MINUTES = 10.0
FINAL_STEPS = 2
RECOVERY_STEPS = 3
"""Learner steps after a fault that make it recovered: more than the groups queued or in flight at the fault
(``(max_staleness + 1) × groups_per_step``, two steps' worth here) can feed, so the hit role has worked again."""


@dataclass
class Fault:
    kind: str
    at: float
    """Seconds since the chaos window opened."""
    target: str
    recovered_after: float | None = None
    resume_ok: bool | None = None
    """For a driver killed in a checkpoint write: whether the resume said it took the checkpoint before."""


@dataclass
class Schedule:
    """The seeded fault schedule: kinds in shuffled rounds, gaps and judge downtimes drawn uniformly."""

    seed: int
    gap_s: tuple[float, float]
    downtime_s: tuple[float, float] = (5.0, 30.0)
    _rng: random.Random = field(init=False)
    _round: list[str] = field(init=False, default_factory=list)
    _driver_kills: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next_kind(self) -> str:
        if not self._round:
            self._round = self._rng.sample(FAULT_KINDS, len(FAULT_KINDS))
        return self._round.pop()

    def gap(self) -> float:
        return self._rng.uniform(*self.gap_s)

    def downtime(self) -> float:
        return self._rng.uniform(*self.downtime_s)

    def in_checkpoint_write(self) -> bool:
        """Driver kills alternate between the middle of a checkpoint write (first) and wherever the run is."""
        self._driver_kills += 1
        return self._driver_kills % 2 == 1

    def pick(self, processes: list[Any]) -> Any:
        """One of a role's processes (the learner has two ranks), in a stable order."""
        return self._rng.choice(sorted(processes, key=lambda p: p.pid))


class Judge:
    """The judge server as a process of its own on a fixed port, so it can be killed and started again."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "testing.fault_server", "--port", str(self.port), "--latency", "0.05"],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the judge server did not start on port {self.port}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


class Driver:
    """``ampo train`` submitted again and again with the same command (``total_steps`` aside)."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.command, self.log = command, log
        self.process: subprocess.Popen[bytes] | None = None
        self.submissions = 0

    def submit(self, *extra: str) -> None:
        self.submissions += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== submission {self.submissions} {' '.join(extra)}\n".encode())
            self.process = subprocess.Popen([*self.command, *extra], cwd=REPO_ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


def role_processes(driver: Driver, judge: Judge) -> dict[str, list[Any]]:
    """The processes of each role, found under this process (Ray's GCS, raylet and workers) and the two subprocesses."""
    import psutil

    found: dict[str, list[Any]] = defaultdict(list)
    special = {getattr(driver.process, "pid", None): "driver", getattr(judge.process, "pid", None): "judge"}
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid in special:
                found[special[process.pid]].append(process)
            elif process.name() in ("gcs_server", "raylet"):
                found["ray"].append(process)
            else:
                title = process.cmdline()[0] if process.cmdline() else ""
                if title.startswith("ray::"):
                    role = ACTOR_ROLES.get(title[5:].split(".", 1)[0].split(" ", 1)[0])
                    if role is not None:  # with its own children: a rollout actor's vLLM engine core
                        found[role] += [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
    return found


class MemorySampler(threading.Thread):
    """Samples every role's largest settled RSS (MiB) every ``every`` seconds into ``samples[role]`` as (t, MiB)."""

    def __init__(self, driver: Driver, judge: Judge, every: float, origin: float) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.driver, self.judge, self.every, self.origin = driver, judge, every, origin
        self.samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop_event.wait(self.every):
            now = time.time()
            for role, processes in role_processes(self.driver, self.judge).items():
                sizes = []
                for process in processes:
                    with contextlib.suppress(psutil.Error):
                        if now - process.create_time() >= SETTLE_S:
                            sizes.append(process.memory_info().rss / 2**20)
                if sizes:
                    self.samples[role].append((time.monotonic() - self.origin, max(sizes)))


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every learner-step record the run wrote, kept or discarded by a resume (each was a real step)."""
    from cluster.workfiles import read_json_lines

    return [r for name in ("metrics.jsonl", "metrics.discarded.jsonl")
            for r in read_json_lines(run_dir / name) if "reward_mean" in r]


def carries_the_seeded_order(run_dir: Path, states_file: Path) -> bool:
    """Whether every group in ``rollouts/`` (each generation of it, before and after any resume) was generated for the
    state the driver's seeded data order gives its id: a resume issues the groups in flight again under their ids,
    and must give them the same prompts, and go on with the order where the checkpoint left it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.states import read_states
    from cluster.config import load_config
    from cluster.data_order import DataCursor, StateStream

    table = pa.concat_tables([pq.read_table(p, columns=["group_id", "state_id"]) for p in (run_dir / "rollouts").glob("*.parquet")])
    pairs = set(zip(table.column("group_id").to_pylist(), table.column("state_id").to_pylist()))
    data = load_config(REPO_ROOT / "configs" / "tiny.yaml").data
    states = read_states(states_file)
    stream = StateStream(states, DataCursor(seed=data.seed), data.shuffle)
    order = [states[stream.next_index()].state_id for _ in range(1 + max(int(g[1:]) for g, _ in pairs))]
    return len({g for g, _ in pairs}) == len(pairs) and all(order[int(g[1:])] == state for g, state in pairs)


def is_actor(process: Any) -> bool:
    """Whether ``process`` is a Ray actor's worker (not a child of one, such as a vLLM engine core)."""
    import psutil

    try:
        return process.cmdline()[0].startswith("ray::")
    except (psutil.Error, IndexError):
        return False


def checkpoints_being_written(run_dir: Path) -> list[Path]:
    """``step_<N>.tmp`` folders of checkpoints being written while a complete one exists to fall back on."""
    return [p for p in (run_dir / "checkpoints").glob("step_*.tmp") if int(p.name[5:-4]) >= 2]


def kill_driver(driver: Driver, run_dir: Path, in_checkpoint_write: bool) -> tuple[str, int | None]:
    """SIGKILL the driver's process group and submit the command again. ``in_checkpoint_write``: first freeze the
    driver (SIGSTOP) the moment a checkpoint is being written, so that the kill cuts the write (the driver renames
    the folder into place itself, so a frozen one cannot finish it); returns the step the resume must then take."""
    resume_at = None
    if in_checkpoint_write:
        while resume_at is None:
            if not wait_until(lambda: checkpoints_being_written(run_dir) or not driver.running(), 120, every=0.005):
                break
            driver.signal_group(signal.SIGSTOP)
            writing = checkpoints_being_written(run_dir)
            if writing:
                resume_at = int(writing[0].name[5:-4]) - 1
            else:  # renamed between the look and the stop, or the driver ended: look again
                driver.signal_group(signal.SIGCONT)
                if not driver.running():
                    break
    target = f"driver pid {driver.process.pid}" + (f", writing step_{resume_at + 1}" if resume_at is not None else "")
    driver.signal_group(signal.SIGKILL)
    driver.process.wait(timeout=60)
    driver.submit()
    return target, resume_at


def inject(kind: str, driver: Driver, judge: Judge, schedule: Schedule, run_dir: Path) -> tuple[str, int | None]:
    """Inject one fault of ``kind``; returns what was hit and, for a driver killed in a checkpoint write, the
    checkpoint step its resume must take."""
    if kind == "driver":
        return kill_driver(driver, run_dir, in_checkpoint_write=schedule.in_checkpoint_write())
    if kind == "judge":
        downtime = schedule.downtime()
        target = f"judge pid {judge.process.pid}, down {downtime:.0f} s"
        judge.kill()
        threading.Timer(downtime, judge.start).start()
        return target, None
    actors = [p for p in role_processes(driver, judge).get(kind, []) if is_actor(p)]
    if not actors:
        return "", None
    victim = schedule.pick(actors)
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim.pid, signal.SIGKILL)
    return f"{kind} pid {victim.pid}", None


def wait_until(condition, timeout_s: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def thirds(samples: list[tuple[float, float]], start: float, end: float) -> tuple[float | None, ...]:
    """Medians of the values sampled in the first, the middle and the last third of [start, end]."""
    third = (end - start) / 3
    parts = ([v for t, v in samples if start + k * third <= t < start + (k + 1) * third] for k in range(2))
    last = [v for t, v in samples if end - third <= t <= end]
    return tuple(statistics.median(part) if part else None for part in (*parts, last))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the chaos window (the soak: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--gap", type=float, nargs=2, default=(15.0, 45.0), metavar=("MIN", "MAX"),
                        help="seconds between a recovery and the next fault (uniform)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--recovery-timeout", type=float, default=300.0, help="seconds a fault may take to recover")
    parser.add_argument("--faults", type=int, help="end the window after this many faults (default: none)")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: one fault of each kind, short gaps and judge downtimes, no final submission")
    parser.add_argument("--ray-task-history", type=int, default=ClusterConfig.model_fields["ray_task_history"].default,
                        help="task attempts the GCS keeps (as cluster.ray_task_history sets for local runs)")
    parser.add_argument("--out", type=Path, help="keep the run's files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.gap, args.faults = 8.0, (2.0, 5.0), len(FAULT_KINDS)

    import ray

    from actors.states import write_states
    from cluster.ray_cluster import shutdown_local
    from cluster.workfiles import read_json_lines
    from learner.checkpoint import latest_checkpoint, read_checkpoint
    from learner.queue import QueueSnapshot
    from reward.server import free_port

    work = args.out or Path(tempfile.mkdtemp(prefix="ampo-bench-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    print(f"chaos: seed {args.seed}, {args.minutes:g} min window, files in {work}", flush=True)
    model_dir, states, _, _, bc = cloned_policy(work)
    states_file = write_states(states, work / "states.parquet", SHORT_SYSTEM_PROMPT)
    print(f"policy: tiny Llama cloned in {bc['bc_steps']} steps ({bc['bc_seconds']:.0f} s)", flush=True)

    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False,
             _system_config={"task_events_max_num_task_in_gcs": args.ray_task_history},
             runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TOKENIZERS_PARALLELISM")}})
    judge = Judge(free_port(), work / "judge.log")  # a fixed port: the judge comes back where the pool looks
    command = [
        sys.executable, "-m", "cluster.cli", "train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        f"rollout.model={model_dir}", f"cluster.run_dir={run_dir}", f"data.train_states={states_file}",
        f"cluster.address={ray.get_runtime_context().gcs_address}",
        f"reward.judge.base_url={judge.base_url}", "reward.judge.model=fault-judge",
        f"eval.judge.base_url={judge.base_url}", "eval.judge.model=fault-judge", "eval.max_episodes=1", "eval.max_turns=2",
        "algorithm.max_staleness=1", "learner.num_ranks=2", "learner.lr=1e-6", "learner.checkpoint_every=1",
        "learner.keep_checkpoints=3", "learner.resume=auto", "learner.dist_timeout_s=30",
        "rollout.max_response_tokens=96", "rollout.max_model_len=2048", "logging.save_rollouts=true",
        "reward.num_actors=2", "rollout.max_restarts=-1", "reward.max_restarts=-1",
        "algorithm.total_steps=100000",  # the chaos window ends the run, not a step count
    ]
    driver = Driver(command, work / "driver.log")
    schedule = Schedule(args.seed, tuple(args.gap), downtime_s=(3.0, 8.0) if args.quick else (5.0, 30.0))
    faults: list[Fault] = []
    unexpected_exits: list[int] = []
    origin, origin_epoch = time.monotonic(), time.time()
    sampler = MemorySampler(driver, judge, args.sample_every, origin)
    try:
        judge.start()
        driver.submit()
        sampler.start()

        def stepped_since(moment: float) -> bool:
            return sum(r["time"] > moment for r in step_records(run_dir)) >= RECOVERY_STEPS

        def resubmit_if_ended(expected: bool) -> None:
            if not driver.running():
                # As an operator would: submit again once the judge answers (the command's preflight checks it).
                wait_until(lambda: judge.process is not None, 120)
                if not expected:
                    unexpected_exits.append(driver.process.returncode)
                    print(f"  driver ended by itself (status {driver.process.returncode}); submitted again", flush=True)
                driver.submit()

        def recovered(moment: float, driver_fails: bool = False) -> bool:
            """Whether ``RECOVERY_STEPS`` learner steps are logged after ``moment``; when the fault must end the driver
            (a learner rank lost), only steps of the next submission count (one finishing as the rank died does not)."""
            deadline = time.monotonic() + args.recovery_timeout
            if driver_fails:
                if not wait_until(lambda: not driver.running(), args.recovery_timeout):
                    return False
                resubmit_if_ended(expected=True)
                moment = time.time()
            while time.monotonic() < deadline:
                if stepped_since(moment):
                    return True
                resubmit_if_ended(expected=False)
                time.sleep(0.5)
            return False

        if not recovered(0.0):  # the first steps: the driver is up
            raise RuntimeError(f"no learner step within {args.recovery_timeout:.0f} s of the first submission")
        window_start = time.monotonic()
        window_end = window_start + 60 * args.minutes
        while time.monotonic() < window_end and len(faults) < (args.faults or sys.maxsize):
            gap_end = time.monotonic() + schedule.gap()
            while time.monotonic() < min(gap_end, window_end):
                resubmit_if_ended(expected=False)
                time.sleep(0.5)
            if time.monotonic() >= window_end:
                break
            kind = schedule.next_kind()
            moment = time.time()
            target, resume_at = inject(kind, driver, judge, schedule, run_dir)
            resume_submission = driver.submissions  # a driver kill submits the command again at once
            if not target:
                print(f"  no {kind} process to kill right now; skipped", flush=True)
                continue
            fault = Fault(kind, time.monotonic() - window_start, target)
            faults.append(fault)
            print(f"  {fault.at:6.0f} s  {kind:8s} killed ({target})", flush=True)
            if recovered(moment, driver_fails=kind == "learner"):
                fault.recovered_after = time.time() - moment
                print(f"           recovered: {RECOVERY_STEPS} learner steps {fault.recovered_after:.0f} s later", flush=True)
            else:
                print(f"           NOT recovered within {args.recovery_timeout:.0f} s; the driver is restarted", flush=True)
                driver.signal_group(signal.SIGKILL)
                driver.process.wait(timeout=60)
                driver.submit()
            if resume_at is not None:  # the checkpoint cut short must not be taken; the one before it must
                says = f"resumed at step {resume_at} (policy version {resume_at}) from {run_dir / 'checkpoints'}/step_{resume_at}"
                fault.resume_ok = says in driver.log.read_text().split(f"===== submission {resume_submission}", 1)[-1]
                print(f"           the resume took step_{resume_at}: {fault.resume_ok}", flush=True)
        window = (window_start - origin, time.monotonic() - origin)

        # Close: a graceful stop (the step finishes, a checkpoint is written); then, but for --quick, the same command
        # submitted once more finishes two steps past that checkpoint.
        if not judge.process:
            wait_until(lambda: judge.process is not None, 60)
        resubmit_if_ended(expected=False)
        driver.signal_group(signal.SIGTERM)
        try:
            driver.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            driver.signal_group(signal.SIGKILL)
            driver.process.wait(timeout=60)
        if not args.quick:
            last = latest_checkpoint(run_dir)
            driver.submit(f"algorithm.total_steps={(int(last.name[5:]) if last else 0) + FINAL_STEPS}")
            if driver.process.wait(timeout=2 * args.recovery_timeout) != 0:
                raise RuntimeError(f"the final submission failed:\n{driver.log.read_text()[-3000:]}")
        sampler.stop_event.set()
        actors_gone = wait_until(lambda: not any(role_processes(driver, judge).get(r) for r in ACTOR_ROLES.values()), 60)
    finally:
        sampler.stop_event.set()
        judge.kill()
        if driver.running():
            driver.signal_group(signal.SIGKILL)
        shutdown_local()

    # ------------------------------------------------------------------------------------------------ the checks
    # What the run keeps is its last checkpoint: the counts, the groups in flight (a resume issues them again) and
    # the groups waiting in the queue; consumed.jsonl holds the groups each kept step trained on.
    final = read_checkpoint(latest_checkpoint(run_dir))
    groups, in_flight = final.data_cursor["counts"], final.data_cursor["cursor"]["pending"]
    waiting = len(QueueSnapshot(**final.queue_snapshot).waiting_ids()) if final.queue_snapshot else 0
    ledger = read_json_lines(run_dir / "consumed.jsonl")
    consumed = [g for r in ledger for g in r["groups"]]
    twice = len(consumed) - len(set(consumed))
    lost = groups["issued"] - len(set(consumed)) - groups["refused"] - groups["dropped"] - groups["filtered"] - waiting
    steps_ok = [r["step"] for r in ledger] == list(range(1, final.step + 1))
    chain_ok = groups["issued"] == groups["generated"] == groups["scored"]
    resumes_ok = all(f.resume_ok is not False for f in faults)
    order_ok = carries_the_seeded_order(run_dir, states_file)
    unrecovered = sum(f.recovered_after is None for f in faults)

    print("\n| fault | injected | recovered | median recovery s | max recovery s |\n| --- | --- | --- | --- | --- |")
    for kind in (*FAULT_KINDS, "all"):
        hit = [f for f in faults if kind in (f.kind, "all")]
        times = [f.recovered_after for f in hit if f.recovered_after is not None]
        print(f"| {kind} | {len(hit)} | {len(times)} | {statistics.median(times) if times else 0:.0f} | "
              f"{max(times) if times else 0:.0f} |")
    print(f"\nwindow {(window[1] - window[0]) / 60:.1f} min; {final.step} learner steps kept; {driver.submissions} driver submissions; "
          f"{len(unexpected_exits)} driver exit(s) not caused by a fault {unexpected_exits or ''}")
    print(f"groups at the last checkpoint: {groups}; waiting in the queue {waiting}; in flight (issued again by a resume) "
          f"{len(in_flight)}")
    print(f"every resume after a kill in a checkpoint write took the checkpoint before: {resumes_ok}")
    print(f"every group generated (before and after resumes) carries the state of the seeded data order: {order_ok}")
    print(f"consumed.jsonl: steps 1..{final.step} once each: {steps_ok}; issued = generated = scored: {chain_ok}; "
          f"actors left after the last driver: {'none' if actors_gone else 'SOME'}")
    print(f"groups lost {lost}, groups trained twice {twice}")

    judged = window[1] - window[0] >= 60 * JUDGED_FROM_MINUTES
    print(f"\n| role | samples | RSS MiB first third | middle third | last third | max | growth (bound {MEMORY_BOUND}) "
          f"| still growing (bound {PLATEAU_BOUND}) |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    growths: list[float] = []
    within_memory = True
    for role in ROLES:
        samples = sampler.samples.get(role, [])
        first, middle, last_ = thirds(samples, *window)
        growth = last_ / first if first and last_ else None
        still = last_ / middle if middle and last_ else None
        if growth is not None:
            growths.append(growth)
        within_memory = within_memory and (growth or 0) <= MEMORY_BOUND and (still or 0) <= PLATEAU_BOUND
        print(f"| {role} | {len(samples)} | {first or 0:.0f} | {middle or 0:.0f} | {last_ or 0:.0f} | "
              f"{max((v for _, v in samples), default=0):.0f} | {f'{growth:.2f}' if growth else 'n/a'} | "
              f"{f'{still:.2f}' if still else 'n/a'} |")
    series = work / "memory.csv"  # the whole series, to see whether a growth levels off
    series.write_text("seconds,role,rss_mib\n" + "".join(
        f"{t:.1f},{role},{mib:.1f}\n" for role in ROLES for t, mib in sampler.samples.get(role, [])))
    print(f"memory series: {series}")
    records = step_records(run_dir)
    step_times = [(r["time"] - origin_epoch, r["step_seconds"]) for r in records if "step_seconds" in r]
    first_t, _, last_t = thirds(step_times, *window)
    step_growth = last_t / first_t if first_t and last_t else None
    print(f"learner step time: median {first_t or 0:.2f} s in the first third, {last_t or 0:.2f} s in the last "
          f"(ratio {f'{step_growth:.2f}' if step_growth else 'n/a'}, bound {STEP_TIME_BOUND}); {len(records)} step records")

    failed = bool(lost or twice or unrecovered or unexpected_exits or not steps_ok or not chain_ok or not actors_gone or not resumes_ok or not order_ok)
    if judged:
        within = within_memory and (step_growth or 0) <= STEP_TIME_BOUND
        print(f"soak bound {'holds' if within else 'BROKEN'} over {args.minutes:g} minutes")
        failed = failed or not within
    print(f"RESULT chaos_groups_lost={lost}")
    print(f"RESULT chaos_groups_trained_twice={twice}")
    print(f"RESULT chaos_unrecovered_faults={unrecovered}")
    if judged:
        print(f"RESULT chaos_memory_growth={max(growths, default=0):.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
