"""Overhead of the RolloutActor over a bare vLLM engine.

The same 8 chat prompts × n=4 samples × 64 new tokens go, in one run, through a RolloutActor in Ray
(templating inside the actor, AsyncLLM, Ray call, Group building with per-token log-probs) and through a
bare `vllm.LLM` in this process, both built from the same engine arguments (`engine_kwargs`) and the same
sampling parameters (`sampling_params`: the bare engine also returns the sampled token's log-prob, and
produces no text at all, while the actor decodes each finished sample — so the bare side does strictly
less work). The two alternate over several repetitions after one warm-up each, so load from other work
on the machine hits both alike: each repetition runs the two back to back (order alternating), and the
ratio reported is the median over repetitions of the per-repetition ratio, which stays near the truth
when the machine is shared and the load swings from run to run. Best runs and medians are printed too.
The model is a random 6-layer, 512-wide Llama built into a temporary folder: big enough that generation
dominates, small enough for a CPU.

Prints tokens/s of each and ends with ``RESULT rollout_overhead_ratio=<actor tokens/s ÷ bare tokens/s>``
(goal ≥ 0.95). Run from the repository root: ``.venv/bin/python bench/rollout_overhead.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, the bench directory rather than the repository root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NUM_PROMPTS = 8
N = 4
MAX_TOKENS = 64
REPEATS = 16
TOPICS = [
    "the rent",
    "a borrowed car",
    "the project deadline",
    "a birthday party",
    "the noisy neighbours",
    "a job offer",
    "the shared kitchen",
    "a lost bet",
]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ampo-bench-rollout-") as tmp:
        measure(Path(tmp))


def measure(tmp: Path) -> None:
    # Same engine environment for the actor and the bare engine. OpenMP threads that spin while waiting
    # make wall times on a shared CPU swing several-fold with load from elsewhere (the bare engine was
    # measured between 200 and 2400 tokens/s within one run); sleeping waits on both sides keep the
    # comparison about the wrapper. Set OMP_WAIT_POLICY yourself to compare under another policy.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import psutil
    import ray
    from vllm import LLM

    from actors.config import RolloutConfig
    from actors.records import GroupRequest, SamplingSpec
    from actors.engine_io import engine_kwargs, sampling_params
    from actors.rollout import create_rollout_actors
    from testing.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4)
    config = RolloutConfig(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        max_restarts=0,
    )
    spec = SamplingSpec(n=N, temperature=1.0, max_tokens=MAX_TOKENS)
    messages = [
        (
            {"role": "system", "content": "You are a helpful social agent."},
            {"role": "user", "content": f"Let us talk about {topic}. What do you say?"},
        )
        for topic in TOPICS[:NUM_PROMPTS]
    ]

    env = {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TOKENIZERS_PARALLELISM", "OMP_WAIT_POLICY")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    # On CPU the actor's num_cpus is also its engine's thread count (Ray exports OMP_NUM_THREADS=num_cpus), so
    # give it the same two cores the bare engine uses.
    (actor,) = create_rollout_actors(config, model_dir, num=1, num_cpus=2)
    ray.get(actor.health.remote(), timeout=300)
    llm = LLM(**engine_kwargs(config, model_dir))
    tokenizer = llm.get_tokenizer()
    prompts = [
        {
            "prompt_token_ids": tokenizer.apply_chat_template(
                list(m), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        }
        for m in messages
    ]
    params = sampling_params(spec)
    # Ray runs its workers, the actor and its engine-core process included, at a lower CPU priority
    # (nice 15 by default). On a busy machine that alone costs the actor more than any wrapper overhead,
    # so the bare engine, which runs in this process, gets the same priority.
    actor_niceness = psutil.Process(ray.get(actor.health.remote())["pid"]).nice()
    if actor_niceness > os.nice(0):
        os.nice(actor_niceness - os.nice(0))
    print(f"both engines run at niceness {os.nice(0)}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    def run_actor(rep: int) -> tuple[int, float]:
        start = time.perf_counter()
        refs = [
            actor.generate.remote(GroupRequest(f"r{rep}-{i}", f"s{i}", messages=m, sampling=spec))
            for i, m in enumerate(messages)
        ]
        groups = ray.get(refs)
        return sum(len(s.response_token_ids) for g in groups for s in g.samples), time.perf_counter() - start

    def run_bare(rep: int) -> tuple[int, float]:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs), time.perf_counter() - start

    runs = {"actor": run_actor, "bare": run_bare}
    rates: dict[str, list[float]] = {"actor": [], "bare": []}
    for run in runs.values():
        run(-1)  # warm-up
    for rep in range(REPEATS):
        for name in ("actor", "bare") if rep % 2 == 0 else ("bare", "actor"):
            tokens, seconds = runs[name](rep)
            rates[name].append(tokens / seconds)
            print(f"rep {rep} {name:5s}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s")
    actor_rates, bare_rates = rates["actor"], rates["bare"]

    for label, values in (("RolloutActor via Ray", actor_rates), ("bare vllm.LLM", bare_rates)):
        print(f"{label:21s} {statistics.median(values):6.0f} tokens/s median, {max(values):6.0f} best of {REPEATS}")
    print(f"ratio of best runs: {max(actor_rates) / max(bare_rates):.3f}")
    ratio = statistics.median(a / b for a, b in zip(actor_rates, bare_rates, strict=True))
    print(f"median of per-repetition ratios: {ratio:.3f}")
    ray.get(actor.shutdown.remote())
    ray.shutdown()
    print(f"RESULT rollout_overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
