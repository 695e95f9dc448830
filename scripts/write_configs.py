"""Regenerate configs/*.yaml from the config models so every field, default and docstring shows.

    .venv/bin/python scripts/write_configs.py

Each file is the full template with a few overrides; edit the overrides here, not the YAML.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import config_template, load_config

ROOT = Path(__file__).resolve().parent.parent

PROFILES: dict[str, tuple[str, list[str]]] = {
    "local.yaml": (
        "Local single-node mode on one CPU machine with the embedded SmolLM2-135M-Instruct model. Sized for about 25\n"
        "# minutes on 2 cores while still learning visibly: 16 learner steps of one group of 8 responses at lr 1e-4, no KL\n"
        "# term (so no reference model to run; the paper uses 0.001), RL states and evaluation episodes of 2 turns.",
        [
            "cluster.address=local",
            "cluster.run_dir=runs/local",
            "cluster.learner_cpus_per_rank=2",
            "rollout.model=embedded",
            "rollout.max_model_len=2048",
            "rollout.max_prompt_tokens=1536",
            "rollout.max_response_tokens=384",
            "rollout.kv_cache_memory_bytes=536870912",
            "rollout.n=8",
            "reward.num_actors=1",
            "reward.judge.max_concurrency=8",
            "reward.judge.max_tokens=256",
            "learner.lr=1e-4",
            "learner.micro_batch_size=4",
            "learner.checkpoint_every=5",
            "algorithm.groups_per_step=1",
            "algorithm.total_steps=16",
            "algorithm.kl_coef=0",
            "algorithm.max_staleness=1",
            "bc.lr=2e-4",
            "bc.epochs=1",
            "bc.batch_size=2",
            "bc.cutoff_len=2048",
            "eval.every_steps=0",
            "eval.max_turns=2",
            "eval.max_episodes=3",
            "eval.judge.max_tokens=1024",
            "data.demo_states=12",
            "data.build_episodes=12",
        ],
    ),
    "tiny.yaml": (
        "Tests: a tiny random model built by the test fixtures (rollout.model is set by the test).",
        [
            "cluster.address=local",
            
            "cluster.run_dir=runs/tiny",
            "rollout.dtype=float32",
            "rollout.max_model_len=4096",
            "rollout.max_prompt_tokens=3072",
            "rollout.max_response_tokens=32",
            "rollout.kv_cache_memory_bytes=67108864",
            "rollout.n=4",
            "reward.num_actors=1",
            "reward.judge.max_concurrency=4",
            "reward.judge.timeout_s=10",
            "reward.judge.max_retries=2",
            "reward.judge.backoff_base_s=0.05",
            "reward.judge.backoff_max_s=0.5",
            "learner.lr=1e-3",
            "learner.micro_batch_size=4",
            "learner.mixed_precision=fp32",
            "learner.gradient_checkpointing=false",
            "learner.dist_timeout_s=120",
            "learner.checkpoint_every=2",
            "algorithm.groups_per_step=2",
            "algorithm.total_steps=3",
            "bc.lr=1e-3",
            "bc.epochs=1",
            "bc.batch_size=4",
            "bc.cutoff_len=4096",
            "eval.every_steps=0",
            "eval.max_turns=4",
            "eval.max_episodes=2",
            "logging.metrics_port=0",
        ],
    ),
    "llama3.1-8b.yaml": (
        "Paper setting (docs/protocol.md, Hyperparameters): Llama-3.1-8B-Instruct after BC, 1 node × 8 GPUs, judge Qwen2.5-72B-Instruct.",
        [
            "cluster.address=auto",
            "cluster.run_dir=runs/llama3.1-8b-{algorithm.estimator}-seed{cluster.seed}",
            "cluster.rollout_gpus_per_actor=4",
            "cluster.learner_gpus_per_rank=1",
            "rollout.model=checkpoints/llama3.1-8b-bc",
            "rollout.num_actors=1",
            "rollout.tensor_parallel_size=4",
            "rollout.dtype=bfloat16",
            "reward.num_actors=4",
            "reward.judge.base_url=http://127.0.0.1:8000/v1",
            "reward.judge.model=qwen2.5-72b-instruct",
            "learner.num_ranks=4",
            "learner.lr=2e-7",
            "learner.cpu_offload=true",
            "eval.judge.base_url=https://api.openai.com/v1",
            "eval.judge.model=gpt-4o-2024-08-06",
            "eval.judge.api_key_env=OPENAI_API_KEY",
            "eval.judge.structured_output_field=response_format",
            "data.benchmark=sotopia",
        ],
    ),
    "qwen2.5-7b.yaml": (
        "Paper setting (docs/protocol.md, Hyperparameters): Qwen2.5-7B-Instruct after BC, 1 node × 8 GPUs, judge Qwen2.5-72B-Instruct.",
        [
            "cluster.address=auto",
            "cluster.run_dir=runs/qwen2.5-7b-{algorithm.estimator}-seed{cluster.seed}",
            "cluster.rollout_gpus_per_actor=4",
            "cluster.learner_gpus_per_rank=1",
            "rollout.model=checkpoints/qwen2.5-7b-bc",
            "rollout.num_actors=1",
            "rollout.tensor_parallel_size=4",
            "rollout.dtype=bfloat16",
            "reward.num_actors=4",
            "reward.judge.base_url=http://127.0.0.1:8000/v1",
            "reward.judge.model=qwen2.5-72b-instruct",
            "learner.num_ranks=4",
            "learner.lr=3e-7",
            "learner.cpu_offload=true",
            "eval.judge.base_url=https://api.openai.com/v1",
            "eval.judge.model=gpt-4o-2024-08-06",
            "eval.judge.api_key_env=OPENAI_API_KEY",
            "eval.judge.structured_output_field=response_format",
            "data.benchmark=sotopia",
        ],
    ),
}


# A paper config names the benchmark but not its folder, which only the user knows; written with a placeholder
# folder, then shown as null, so that loading the file unchanged stops and asks for `data.scenarios`.
PLACEHOLDER = "data.scenarios=SOTOPIA_DIR"


def main() -> None:
    for name, (title, overrides) in PROFILES.items():
        paper = "data.benchmark=sotopia" in overrides
        config = load_config(None, overrides + [PLACEHOLDER] if paper else overrides)
        header = f"# {title}\n# Generated by scripts/write_configs.py: every field is listed with its meaning.\n\n"
        text = config_template(config)
        if paper:
            text = text.replace("scenarios: SOTOPIA_DIR", "scenarios: null", 1)
        # The run folder is shown as written, placeholders and all, not as this load filled them in.
        run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("cluster.run_dir="))
        text = text.replace(f"run_dir: {config.cluster.run_dir}", f"run_dir: {run_dir}", 1)
        (ROOT / "configs" / name).write_text(header + text)
        print("wrote", name)


if __name__ == "__main__":
    main()
