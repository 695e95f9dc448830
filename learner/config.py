"""Configuration owned by the learning role: the FSDP learner, the AMPO algorithm and behaviour cloning."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from actors.config import ConfigSection


class LearnerConfig(ConfigSection):
    """FSDP2 learner ranks, optimiser and checkpoints."""

    num_ranks: int = Field(1, ge=1)
    """Learner processes forming one torch.distributed group (one per GPU on a cluster)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto picks nccl with GPUs, gloo without."""
    dist_timeout_s: float = Field(600.0, gt=0)
    """Collective timeout: a rank mismatch fails with an error instead of hanging."""
    lr: float = Field(2e-7, gt=0)
    """AdamW learning rate (paper: 2e-7 Llama-3.1-8B, 3e-7 Qwen2.5-7B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps before the constant learning rate (paper: 0)."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clipping."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one rank (paper: 8 per GPU)."""
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter dtype in forward/backward; master weights and optimiser state stay fp32. `auto`: bf16 where the
    rank's device computes bfloat16 natively (a recent GPU, or a CPU with AVX512_BF16/AMX), fp32 elsewhere; each
    rank logs its choice."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    cpu_offload: bool = False
    """FSDP2 parameter/optimizer CPU offload (paper: on, for 8 GPUs)."""
    checkpoint_every: int = Field(50, ge=0)
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept on disk."""
    resume: Literal["auto", "never"] | Path = "auto"
    """`auto` resumes from the latest checkpoint in the run directory, `never` starts fresh, or a path. A
    checkpoint written with other experiment settings (estimator, learning rate, seeds, data, model, sampling,
    reward; see `cluster.config.EXPERIMENT_FIELDS`) is refused, naming the fields that differ."""
    resume_changed_config: bool = False
    """Resume even when the experiment settings differ from the checkpoint's (a deliberate change; the differences
    are logged)."""


class AlgorithmConfig(ConfigSection):
    """AMPO / GRPO update (docs/protocol.md, AMPO advantage and Policy loss)."""

    estimator: Literal["ampo", "grpo"] = "ampo"
    """Advantage estimator: AMPO (sample + mode term) or GRPO (sample term only)."""
    groups_per_step: int = Field(16, ge=1)
    """Prompts (groups of rollout.n responses) per learner step (paper: 16 → 256 responses)."""
    total_steps: int = Field(800, ge=1)
    """Learner steps to run (paper: 800)."""
    max_staleness: int = Field(0, ge=0)
    """Largest staleness a group may have when the learner consumes it, staleness being the consumption lag: the
    learner's policy version at consumption minus the oldest version that produced any of the group's tokens (the
    version its requests started under). The replay queue refuses or drops older groups; the driver issues no group
    that could exceed it (`ampo_queue_staleness` shows the distribution). 0 is synchronous on-policy RL."""
    clip_ratio: float = Field(0.2, gt=0)
    """PPO clip range ε."""
    kl_coef: float = Field(0.001, ge=0)
    """Weight of the k3 KL to the frozen reference."""
    kl_clamp: float = Field(10.0, gt=0)
    """Clamp of the per-token k3 KL."""
    entropy_coef: float = Field(0.001, ge=0)
    """Weight of the entropy bonus."""
    tis_cap: float | None = Field(2.0, gt=0)
    """Cap C of the truncated importance weight min(exp(old − behaviour), C) for off-policy samples (null: off)."""
    adv_eps: float = Field(1e-6, gt=0)
    """ε added to standard deviations in the advantages."""
    filter_uninformative: bool = False
    """Drop a scored group whose samples would all get the same advantage (no gradient: equal rewards and, for
    AMPO, no mode term) and generate a replacement, so each step trains on `groups_per_step` informative groups
    (DAPO's dynamic sampling). Dropped groups are counted as `filtered`; at most `max_filtered_per_step` per step,
    after which groups are trained on as they come (a policy whose groups all fail the format would otherwise
    refill forever)."""
    max_filtered_per_step: int = Field(64, ge=0)
    """Cap on groups filtered while one step's batch is gathered (with `filter_uninformative`)."""
    tie_tolerance: float = Field(1e-8, ge=0)
    """Mode-mean rewards within this of their mean count as tied, selecting the length branch (the authors' code:
    0, an exact test)."""


class BCConfig(ConfigSection):
    """Behaviour cloning of the four thinking modes (docs/protocol.md, BC data)."""

    lr: float = Field(2e-6, gt=0)
    """Peak learning rate (paper: 2e-6, cosine schedule)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of steps of linear warm-up."""
    epochs: int = Field(3, ge=1)
    """Passes over the demonstrations."""
    batch_size: int = Field(32, ge=1)
    """Sequences per optimiser step, across ranks (paper: 32)."""
    cutoff_len: int = Field(8192, ge=16)
    """Records longer than this many tokens are truncated (paper: 8192)."""
    output: Path | None = None
    """Where the BC model folder goes; null: `<run_dir>/bc_model`."""
