"""Pipeline efficiency and asynchronous ÷ synchronous speed-up of the real training driver.

Two ratios, measured in one run on the same tiny Llama (hidden 128, 2 layers, 4 heads of 32, fp32) and the same RL
states, with the fault-injecting HTTP server as the judge (no faults, a fixed latency per call):

1. **Pipeline efficiency**: steady-state scored samples/s of :class:`cluster.driver.TrainingDriver` with
   ``max_staleness: 3`` (``--staleness``) ÷ the rate of its slowest stage measured alone on the same work: generation alone through a
   RolloutActor, judge scoring alone through a RewardPool, learner steps alone through a LearnerGroup on batches of
   the same size. The stages alone run with the driver's own bound on groups in flight,
   ``(max_staleness + 1) × groups_per_step``, and each stage gets the resources the driver's placement gives it
   (the rollout actor and each learner rank one Ray CPU, i.e. one engine / torch thread; with
   ``cluster.pin_learner_cpus`` the learner rank has the machine's last core to itself and everything else
   shares the others, alone as in the pipeline, the way separate GPUs would keep the roles apart). The learner alone is
   timed twice, before and after the driver runs, and the faster time counts, so that load from elsewhere during one
   timing cannot inflate the ratio. Steady state: the driver's rate counts the samples of steps 2..N over the time
   between the end of step 1 and the end of step N, so the pipeline's fill is left out; the whole-run rate is printed
   too. Goal ≥ 0.90.
2. **Asynchronous speed-up**: wall time of the same number of learner steps (so the same
   ``total_steps × groups_per_step × n`` samples) with ``max_staleness: 0`` (generate, judge, learn, push, in
   turn) ÷ with ``max_staleness: 3``, the judge's injected latency set to the measured generation time of one
   group. The RESULT compares steps 2..N (end of step 1 to end of step N): the first step of a fresh driver pays
   one-off warm-ups (first generation and first learner step of new actors) that are the same in both modes. The
   whole-run ratio (first group issued to last step finished, via the driver's evaluation hook; role start-up, final
   checkpoint and export excluded) is printed too. Goal ≥ 1.8×.

Why 4 groups per step and ``max_staleness: 3``: the driver issues the groups of step ``j`` only once the rollout
actors serve a policy at most ``max_staleness`` versions older than the one step ``j`` will train (cluster/driver.py),
so a group's issue → generation → judge → queue chain (plus the weight push that unlocks it) must fit into
``max_staleness`` learner steps for the learner never to wait: ``max_staleness × step ≥ push + generation + judge``.
On this machine that chain takes 0.7-1.0 s: in the pipeline a group's generation runs 2-4× slower than alone, because a
push lands on the engine every step and the other roles share its core. With 2 groups × 4 samples per step the
learner's step is 0.22 s, and it waits for data on about one step in five even at ``max_staleness: 4`` (efficiency
0.79-0.80 measured at 3 and at 4); with 4 groups per step (0.40 s) efficiency was 0.90 at ``max_staleness: 2`` and
0.94 at 3. The paper's steps are far larger still (16 prompts × 16 responses), which only widens the
margin. AReaL runs with bounds of 4-8 for the same reason. Both rates are printed per run, with the learner's own
step time inside the pipeline next to its time alone, so a shortfall shows whether the driver or the shared cores
cost it (``--groups-per-step`` and ``--staleness`` reproduce the other settings).

Why a behaviour-cloned model: the judge is only asked about well-formed responses; a random model never
produces one, so its groups would skip the judge and the judge latency would not be measured at all. The script
therefore first clones a fixed level-1 response (about 70 tokens, then end of turn) into the random model with
about a hundred plain AdamW steps on the bench's prompts, and the RL learning rate is kept tiny so the policy keeps that format during the run. The share
of well-formed, judged samples is printed; the run fails if it is under 90 %. Prompts are kept short so that the
cloning and the learner fit a shared 2-core CPU: a one-line system prompt instead of the four-mode prompt, and the
user turn cut to the tail of the real Sotopia turn prompt (goal, dialogue, open slot). The reward context (names,
goals, dialogue, prior scores) is the real state's, so the judge gets the real goal-progress prompt.

Without pinning, all roles share this machine's cores: the learner's step then takes about a third longer inside
the pipeline than alone, because generation, the reward actor, the driver and Ray preempt it (measured with
``--no-pin``), and that, not the driver, is what keeps the pipeline from its slowest stage's rate; on a cluster
each role has its own GPUs.

Run from the repository root: ``.venv/bin/python bench/pipeline.py [--quick]``; the last lines are
``RESULT pipeline_efficiency=<v>`` and ``RESULT async_speedup=<v>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, the bench directory rather than the repository root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHORT_SYSTEM_PROMPT = "You are a social agent. Answer in the thinking-mode format."
CLONED_ANSWER = "Sure, I can help you with that. Let us talk it over tomorrow after lunch."
NUM_STATES = 4
INSTRUCTION_CHARS = 200
GROUP_SIZE = 4
BC_MAX_STEPS = 400
BC_TARGET_LOSS = 3e-4
MIN_VALID_FRACTION = 0.9


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    steps: int
    """Learner steps per driver run (and learner steps timed alone)."""
    groups_per_step: int
    """Groups each learner step consumes."""
    staleness: int
    """`max_staleness` of the asynchronous run."""
    pin_learner: bool
    """`cluster.pin_learner_cpus` of every run and of the learner alone."""

    @property
    def groups(self) -> int:
        return self.steps * self.groups_per_step

    @property
    def samples(self) -> int:
        return self.groups * GROUP_SIZE


def build_policy(out: Path, prompts: Sequence[list[int]], response: list[int]) -> dict[str, float]:
    """Write the tiny random Llama to ``out`` and clone ``response`` into it after every prompt.

    Plain AdamW on the response tokens only, all prompts in one batch, until the mean token NLL is
    below ``BC_TARGET_LOSS`` so that sampling at temperature 1 reproduces the response almost always."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # One thread: on a shared, overloaded CPU a multi-threaded op waits for its slowest descheduled thread.
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    loss_value = float("inf")
    step = 0
    # One right-padded batch: prompt and padding positions carry no loss.
    width = max(len(p) for p in prompts) + len(response)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full((len(prompts), width), -100)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequence = torch.tensor(prompt + response)
        ids[row, : len(sequence)] = sequence
        labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        mask[row, : len(sequence)] = 1
    for step in range(1, BC_MAX_STEPS + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 10 == 0:
            print(f"  cloning: step {step}, loss {loss_value:.4f}", file=sys.stderr, flush=True)
        if loss_value < BC_TARGET_LOSS:
            break
    model.save_pretrained(out)
    return {"bc_steps": step, "bc_loss": loss_value, "bc_seconds": time.perf_counter() - started}


def cloned_policy(tmp: Path) -> tuple[Path, list[Any], list[list[int]], list[int], dict[str, float]]:
    """The benches' policy and work: the tiny Llama written under ``tmp``, the short-prompt states, their prompt ids,
    and the level-1 response cloned into the model after each prompt (with the cloning's figures)."""
    from transformers import AutoTokenizer

    from actors.sotopia import SotopiaDataset
    from actors.states import make_state
    from reward.modes import format_response
    from testing.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp / "model", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    dataset = SotopiaDataset.load()
    states = [
        state.model_copy(update={"system_prompt": SHORT_SYSTEM_PROMPT, "instruction": state.instruction[-INSTRUCTION_CHARS:]})
        for state in (make_state(dataset, i, [], (5.0, 5.0)) for i in range(NUM_STATES))
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer(tokenizer.apply_chat_template(s.messages(s.system_prompt), add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        for s in states
    ]
    response = tokenizer(format_response(1, None, CLONED_ANSWER), add_special_tokens=False)["input_ids"]
    response.append(tokenizer.eos_token_id)
    return model_dir, states, prompts, response, build_policy(model_dir, prompts, response)


def driver_config(model_dir: Path, run_dir: Path, staleness: int, sizes: Sizes, extra: Sequence[str] = ()) -> Any:
    """The tiny test config with this bench's sizes; only ``max_staleness`` differs between the two driver runs
    (``extra`` overrides are for the benches that reuse this one's setup)."""
    from cluster.config import load_config

    return load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        [
            f"rollout.model={model_dir}",
            f"cluster.run_dir={run_dir}",
            "cluster.num_cpus=8",
            f"cluster.pin_learner_cpus={str(sizes.pin_learner).lower()}",
            "learner.resume=never",
            "learner.checkpoint_every=0",
            "learner.lr=1e-7",
            "logging.save_rollouts=false",
            f"rollout.n={GROUP_SIZE}",
            "rollout.max_response_tokens=96",
            "rollout.max_model_len=2048",
            "reward.judge.max_concurrency=16",
            f"algorithm.groups_per_step={sizes.groups_per_step}",
            f"algorithm.total_steps={sizes.steps}",
            f"algorithm.max_staleness={staleness}",
            *extra,
        ],
    )


def group_request(state: Any, index: int, config: Any) -> Any:
    """The request the driver issues for ``state`` (TrainingDriver._issue), so the stages alone do the same work."""
    from actors.records import GroupRequest, SamplingSpec

    rollout = config.rollout
    return GroupRequest(
        group_id=f"alone{index}",
        state_id=state.state_id,
        messages=tuple(state.messages(state.system_prompt)),
        sampling=SamplingSpec(
            n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
            max_tokens=rollout.max_response_tokens,
        ),
        context=state.reward_context(),
    )


async def windowed(calls: Sequence[Callable[[], Any]], window: int) -> tuple[list[Any], float]:
    """Run ``calls`` (each returning an awaitable Ray ref) with at most ``window`` in flight; results in order and
    the seconds it took."""
    semaphore = asyncio.Semaphore(window)

    async def one(call: Callable[[], Any]) -> Any:
        async with semaphore:
            return await call()

    started = time.perf_counter()
    results = await asyncio.gather(*(one(c) for c in calls))
    return list(results), time.perf_counter() - started


def valid_fraction(scored_groups: Sequence[Any]) -> float:
    samples = [s for g in scored_groups for s in g.samples]
    return sum(s.format_valid and s.reward is not None for s in samples) / max(len(samples), 1)


def measure_stages(
    model_dir: Path, states: Sequence[Any], sizes: Sizes, run_dir: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    """Each stage alone on the driver's work; returns samples/s per stage, one group's generation time and the
    judge server (started here with that latency, stopped by ``stack``) that the driver runs use too."""
    import ray

    from actors.records import store
    from actors.rollout import create_rollout_actors
    from testing.fault_server import FaultConfig, FaultServer
    from reward.pool import RewardPool

    config = driver_config(model_dir, run_dir, sizes.staleness, sizes)
    window = (sizes.staleness + 1) * sizes.groups_per_step
    requests = [group_request(states[i % len(states)], i, config) for i in range(sizes.groups)]
    (actor,) = create_rollout_actors(config.rollout, model_dir, num=1, num_cpus=1)
    ray.get(actor.health.remote(), timeout=600)
    # Warm-up, then one group on its own: the judge latency is set to this.
    ray.get(actor.generate.remote(requests[0]), timeout=600)
    single = []
    for request in requests[:3]:
        started = time.perf_counter()
        ray.get(actor.generate.remote(request), timeout=600)
        single.append(time.perf_counter() - started)
    group_seconds = statistics.median(single)
    groups, generate_seconds = asyncio.run(windowed([lambda r=r: actor.generate.remote(r) for r in requests], window))
    tokens = sum(len(s.response_token_ids) for g in groups for s in g.samples)

    latency = round(group_seconds, 2)
    server = stack.enter_context(FaultServer(FaultConfig(latency_s=latency)))
    pool = RewardPool(config.reward, model_dir, base_url=server.base_url, model="judge", num_cpus=0.5)
    pool.wait_ready()
    ray.get(pool.score(groups[0]).group)  # warm-up: connections, code paths
    scored, judge_seconds = asyncio.run(windowed([lambda g=g: pool.score(g).group for g in groups], window))
    pool.shutdown()
    valid = valid_fraction(scored)

    # As the driver hands them to the learner: in the object store, with their summaries.
    batches = [[store(g) for g in scored[k : k + sizes.groups_per_step]] for k in range(0, len(scored), sizes.groups_per_step)]
    learn_seconds, pushes = time_learner(model_dir, config, batches, push_to=actor)
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)
    return {
        "server": server,
        "judge_latency_s": latency,
        "push_seconds": statistics.median(pushes),
        "group_seconds": group_seconds,
        "response_tokens_mean": tokens / sizes.samples,
        "valid_fraction": valid,
        "rates": {
            "generation": sizes.samples / generate_seconds,
            "judge": sizes.samples / judge_seconds,
            "learner": sizes.samples / learn_seconds,
        },
        "seconds": {"generation": generate_seconds, "judge": judge_seconds, "learner": learn_seconds},
        "batches": batches,
    }


def time_learner(model_dir: Path, config: Any, batches: Sequence[Sequence[Any]], push_to: Any = None) -> tuple[float, list[float]]:
    """Seconds a fresh LearnerGroup takes for ``batches`` (one step each, after a warm-up step), and, when ``push_to``
    (a rollout actor) is given, the seconds of three weight pushes to it afterwards."""
    from cluster.ray_cluster import learner_core_sets
    from learner.group import LearnerGroup

    learner = LearnerGroup(
        config.learner, model_dir, algorithm=config.algorithm, temperature=config.rollout.temperature,
        cpu_cores=learner_core_sets(config),
    )
    learner.step(batches[0], 0)  # warm-up
    started = time.perf_counter()
    for version, batch in enumerate(batches, start=1):
        learner.step(batch, version)
    seconds = time.perf_counter() - started
    pushes = []
    if push_to is not None:
        # Not a stage of its own, but work the driver's learner does every step: the weight push it starts after a
        # step (the ranks' gather runs before their next step). Timed alone to explain where pipeline time goes.
        learner.connect_rollout([push_to], config.rollout)
        for version in range(len(batches) + 1, len(batches) + 4):
            report = learner.publish(version).result(timeout=600)
            if not report.ok:
                raise RuntimeError(report.describe())
            pushes.append(max(report.seconds.values()))
    learner.shutdown()
    return seconds, pushes


def run_driver(
    model_dir: Path, states: Sequence[Any], sizes: Sizes, staleness: int, judge_url: str, run_dir: Path,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One driver run; returns its wall time (first to last evaluation hook), step end times, valid fraction, and the
    steady steps' mean learner idle share and staleness."""
    from cluster.driver import TrainingDriver

    marks: list[float] = []
    steps: list[dict[str, float]] = []

    async def mark(_driver: TrainingDriver, _step: int) -> dict[str, float]:
        marks.append(time.perf_counter())
        return {}

    def on_step(record: dict[str, float]) -> None:
        steps.append({"t": time.perf_counter(), "samples": record["samples"], "unscored": record["unscored_ratio"],
                      "format_errors": record["format_error_ratio"], "step_seconds": record.get("step_seconds", 0.0),
                      "learner_idle": record["idle/learner"], "staleness": record["staleness"]})

    config = driver_config(model_dir, run_dir, staleness, sizes, extra)
    summary = TrainingDriver(config, states, model_dir, judge_url=judge_url, judge_model="judge", evaluate=mark, on_step=on_step).run()
    if summary["steps"] != sizes.steps:
        raise SystemExit(f"driver ran {summary['steps']} of {sizes.steps} steps")
    wall = marks[-1] - marks[0]
    steady_samples = sum(s["samples"] for s in steps[1:])
    steady_seconds = steps[-1]["t"] - steps[0]["t"]
    bad = statistics.mean(s["unscored"] for s in steps)
    return {
        "wall": wall,
        "steady_seconds": steady_seconds,
        "first_step_seconds": steps[0]["t"] - marks[0],
        "samples": sum(s["samples"] for s in steps),
        "rate_whole": sum(s["samples"] for s in steps) / wall,
        "rate_steady": steady_samples / steady_seconds,
        "unscored_ratio": bad,
        "groups": summary["groups"],
        # Where a steady-state step's time goes: the learner's own call (its weight gather included) and the rest.
        "learner_step_s": statistics.median(s["step_seconds"] for s in steps[1:]),
        "period_s": steady_seconds / max(len(steps) - 1, 1),
        "learner_idle": statistics.mean(s["learner_idle"] for s in steps[1:]),
        "staleness": statistics.mean(s["staleness"] for s in steps[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer learner steps (noisier ratios)")
    parser.add_argument("--steps", type=int, default=None, help="learner steps per run (default 12, quick 6)")
    parser.add_argument("--groups-per-step", type=int, default=4, help="groups per learner step")
    parser.add_argument("--staleness", type=int, default=3, help="max_staleness of the asynchronous run")
    parser.add_argument("--no-pin", action="store_true", help="let the roles share every core (no learner pinning)")
    args = parser.parse_args()
    sizes = Sizes(
        steps=args.steps or (6 if args.quick else 12), groups_per_step=args.groups_per_step, staleness=args.staleness,
        pin_learner=not args.no_pin,
    )

    import ray

    from cluster.ray_cluster import connect

    load_start = os.getloadavg()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ampo-bench-pipeline-"))
    model_dir, states, prompts, response, bc = cloned_policy(tmp)
    print(f"machine: {os.cpu_count()} cpus, load average at start {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}")
    print(f"policy: tiny Llama hidden 128 x 2 layers, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
          f"cloned a {len(response)}-token level-1 response in {bc['bc_steps']} AdamW steps "
          f"(loss {bc['bc_loss']:.4f}, {bc['bc_seconds']:.0f} s)")
    print(f"work per run: {sizes.steps} steps x {sizes.groups_per_step} groups x {GROUP_SIZE} samples = {sizes.samples} samples; "
          f"asynchronous run at max_staleness {sizes.staleness}; learner pinned to its own core: {sizes.pin_learner}")

    config = driver_config(model_dir, tmp / "config-only", sizes.staleness, sizes)
    connect(config)
    with contextlib.ExitStack() as stack:
        stack.callback(ray.shutdown)
        stages = measure_stages(model_dir, states, sizes, tmp / "stages", stack)
        server = stages["server"]
        if stages["valid_fraction"] < MIN_VALID_FRACTION:
            raise SystemExit(f"only {stages['valid_fraction']:.0%} of the samples were well-formed and judged; "
                             "the cloned policy did not hold its format")
        print(f"one group alone: {stages['group_seconds']:.2f} s -> judge latency {stages['judge_latency_s']} s per call; "
              f"mean response {stages['response_tokens_mean']:.0f} tokens, {stages['valid_fraction']:.0%} well-formed and judged")
        for name, rate in stages["rates"].items():
            print(f"stage alone  {name:10s} {rate:6.2f} samples/s  ({stages['seconds'][name]:.1f} s for {sizes.samples})")
        print(f"weight push alone ({config.rollout.weight_transport}): {stages['push_seconds']:.2f} s per version "
              f"(the driver's learner does one per step; the learner alone takes "
              f"{stages['seconds']['learner'] / sizes.steps:.2f} s per step)")
        runs = {}
        for staleness in (sizes.staleness, 0):
            runs[staleness] = run_driver(model_dir, states, sizes, staleness, server.base_url, tmp / f"run-s{staleness}")
            r = runs[staleness]
            print(f"driver max_staleness={staleness}: {r['samples']:.0f} samples in {r['wall']:.1f} s "
                  f"(first step {r['first_step_seconds']:.1f} s, steps 2-{sizes.steps} {r['steady_seconds']:.1f} s); "
                  f"{r['rate_whole']:.2f} samples/s whole run, {r['rate_steady']:.2f} steady; "
                  f"unscored {r['unscored_ratio']:.0%}; groups {r['groups']}")
        # The slowest stage is timed again after the driver runs and its faster time counts: a window of load from
        # elsewhere during one timing would otherwise lower the denominator and inflate the efficiency (1.05 seen).
        learner_again, _ = time_learner(model_dir, config, stages["batches"])
        print(f"stage alone  learner again after the driver runs: {learner_again:.1f} s for {sizes.samples} "
              f"(before: {stages['seconds']['learner']:.1f} s; the faster counts)")
        stages["seconds"]["learner"] = min(stages["seconds"]["learner"], learner_again)
        stages["rates"]["learner"] = sizes.samples / stages["seconds"]["learner"]

    learner_alone = stages["seconds"]["learner"] / sizes.steps
    for staleness, r in runs.items():
        print(f"driver max_staleness={staleness}: a steady step every {r['period_s']:.3f} s, of which the learner call "
              f"{r['learner_step_s']:.3f} s (alone: {learner_alone:.3f} s; the rest is the driver between steps)")
    slowest = min(stages["rates"], key=stages["rates"].get)
    efficiency = runs[sizes.staleness]["rate_steady"] / stages["rates"][slowest]
    speedup = runs[0]["steady_seconds"] / runs[sizes.staleness]["steady_seconds"]
    load_end = os.getloadavg()
    print(f"synchronous / asynchronous wall time: steps 2-{sizes.steps} {speedup:.3f}, whole runs "
          f"{runs[0]['wall'] / runs[sizes.staleness]['wall']:.3f}")
    print(f"slowest stage alone: {slowest} ({stages['rates'][slowest]:.2f} samples/s); whole-run efficiency "
          f"{runs[sizes.staleness]['rate_whole'] / stages['rates'][slowest]:.3f}")
    print(f"load average at end {load_end[0]:.1f} {load_end[1]:.1f} {load_end[2]:.1f}; bench took {time.perf_counter() - started:.0f} s")
    print(f"RESULT pipeline_efficiency={efficiency:.3f}")
    print(f"RESULT async_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
