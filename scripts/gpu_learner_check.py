"""The learner's AMPO step on one GPU, measured: tokens/s, peak memory and MFU next to docs/gpu.md's estimates.

Needs only torch and transformers (no vLLM, no Ray, no pydantic): the model is a randomly initialised
``transformers.LlamaForCausalLM`` of Llama-3.1-8B's shape (``--shape 8b``), of Llama-3.2-1B's shape (``--shape 1b``)
or a tiny one for the CPU test (``--shape tiny``). The step is the one :meth:`learner.worker.LearnerWorker.step`
takes, with the same pieces:

* a single-process torch.distributed group (nccl on cuda, gloo on cpu) and FSDP2 with world size 1:
  ``fully_shard`` on every decoder layer and then on the root, ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` over fp32 master weights, optionally ``CPUOffloadPolicy`` (``--cpu-offload``);
* activation checkpointing on every decoder layer through HF's ``gradient_checkpointing_enable`` (non-reentrant),
  as ``LearnerWorker._load_sharded`` does;
* per micro-batch: a forward pass, per-token log-probs and entropy by ``learner.loss.token_logprobs_and_entropy``,
  old log-probs = those of this very forward pass, detached (as ``LearnerWorker.step``: one optimiser step per
  batch), ``learner.loss.policy_loss`` (PPO-clip, entropy bonus; the defaults of ``algorithm``) scaled by its share
  of the batch's response tokens, backward;
* grad-norm clipping at 1.0, then AdamW (lr 1e-6 as in the paper, betas (0.9, 0.999), weight decay 0.01).

What the learner does and this does not: the frozen reference model's forward (the KL term; ``ref_logprobs`` is
None here, so kl = 0 and the step does 2·N·tokens less work than a learner step with ``kl_coef > 0``), padding and
the length-sorted micro-batch plan (every row here has exactly ``--seq-len`` tokens), stale samples' truncated
importance weights (every sample is of the current version, weight 1), and the metric transfers.

A batch is ``--micro-batches`` × ``--micro-batch`` rows of ``--seq-len`` random token ids; the last quarter of each
row is the response (AMPO's ~1.5k prompt + 0.5k response), masked as the worker's collate masks it, with random
N(0, 1) per-sample advantages. One warm-up step (it also allocates AdamW's state), then ``--steps`` timed steps, the
device synchronised before and after each.

Printed: tokens/s (every token of the batch, prompt and response, per second of step time), peak memory
(``torch.cuda.max_memory_allocated`` over the whole run on cuda; the process's peak RSS on cpu), MFU, the loss, the
gradient norm and the largest weight change of the last step, each next to the estimate of docs/gpu.md where it
has one. MFU = (8 · N · tokens / step time) / peak FLOP/s, where N is the number of parameters in Linear layers (every
matmul weight including lm_head; the embedding lookup and the norms do no matmul) and 8 = 2 (forward) + 4 (backward)
+ 2 (the forward recomputed by activation checkpointing), the accounting of docs/gpu.md §6. Attention-score FLOPs
are not counted (about 3 % at 2k tokens). The 6 · N ("model FLOPs", no recompute) figure is printed too. The
peak is ``--peak-tflops`` (default 989, dense bf16 of an H100 or H200 SXM); on cpu the MFU is n/a unless it is given.

Run from the repository root::

    python scripts/gpu_learner_check.py --shape 1b                 # one CUDA GPU
    python scripts/gpu_learner_check.py --shape 8b                 # one CUDA GPU with >= 140 GB (H200)
    python scripts/gpu_learner_check.py --shape tiny --device cpu  # the CPU test's shape

The last lines are ``RESULT gpu_check_tokens_per_s=<v>``, ``RESULT gpu_check_peak_mem_gib=<v>`` and
``RESULT gpu_check_mfu=<v or nan>``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# learner/__init__.py is empty and learner/loss.py imports torch only, so this pulls in neither Ray nor pydantic.
from learner.loss import policy_loss, token_logprobs_and_entropy  # noqa: E402

GIB = 2**30
GB = 1e9

# ------------------------------------------------------------------------------------------------ docs/gpu.md figures
# docs/gpu.md "5. Memory, from first principles", Llama-3.1-8B, per learner rank of the paper's layout
# (4 FSDP2 ranks, bf16 compute over fp32 master weights, fp32 reference, micro_batch_size 8 at ~16k tokens):
DOCS_8B_PARAMS = 8.03e9
DOCS_8B_SHARDED_STATE_GB = 40.2  # 20 B × P / 4: weights, grads, AdamW m and v, reference
DOCS_8B_GATHERED_GB = 1.9  # ≈ 2 bf16 layers + embedding or head
DOCS_8B_ACTIVATIONS_16K_GB = 4.2  # layers × tokens × hidden × 2 B, 8 sequences × 2k
DOCS_8B_RECOMPUTE_16K_GB = 2.7  # one layer recomputed in backward, 16k tokens
DOCS_8B_LOGITS_16K_GB = 16.8  # 2 × tokens × vocab × 4 B, 16k tokens
DOCS_8B_GPU_WITH_OFFLOAD_GB = 25.0  # "≈ 25 GB per GPU with offload"
DOCS_8B_GPU_WITHOUT_OFFLOAD_GB = 65.0  # "≈ 65 GB without"
# docs/gpu.md "6. Time per step, from first principles", the learner line: (6 + 2 + 4) × P × tokens at 40 % MFU
# of 989 TFLOP/s per GPU; 0.5 M tokens in ≈ 30 s of compute on 4 GPUs.
DOCS_MFU = 0.40
DOCS_PEAK_TFLOPS = 989.0
DOCS_LEARNER_FLOP_FACTOR = 12  # 6 forward + backward, 2 checkpointing recompute, 4 old-policy and reference forwards
DOCS_8B_TOKENS_PER_S_PER_GPU = 0.5e6 / 30.0 / 4  # ≈ 4.2k


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    seq_len: int  # default --seq-len
    micro_batch: int  # default --micro-batch
    optimizer: str  # default --optimizer


SHAPES = {
    # Llama-3.1-8B (untied embeddings). AdamW's foreach path allocates a temporary the size of all parameters
    # (sqrt of v, fp32: 32 GB at 8B), which does not fit next to the 128 GB of fp32 state on one 141 GB GPU, so this
    # shape defaults to the fused AdamW kernel (same update, no temporaries).
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, tied=False, seq_len=2048, micro_batch=2, optimizer="fused"),
    # Llama-3.2-1B (tied embeddings, head size 64)
    "1b": Shape(2048, 16, 32, 8, 8192, 128256, tied=True, seq_len=2048, micro_batch=8, optimizer="foreach"),
    # the CPU test's shape: the same structure, small
    "tiny": Shape(64, 2, 4, 2, 128, 512, tied=False, seq_len=64, micro_batch=2, optimizer="foreach"),
}

LR = 1e-6
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
RESPONSE_FRACTION = 0.25  # ~1.5k prompt + 0.5k response (docs/gpu.md §6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, help="tokens per row, prompt + response (default: per shape)")
    p.add_argument("--micro-batch", type=int, help="rows per micro-batch (default: per shape)")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy (cuda only)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype; auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--optimizer", choices=("foreach", "fused"), help="AdamW implementation (default: per shape; the learner uses foreach)")
    p.add_argument("--peak-tflops", type=float, help="peak dense FLOP/s of the device in TFLOP/s (default 989 on cuda, none on cpu)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.seq_len = args.seq_len or shape.seq_len
    args.micro_batch = args.micro_batch or shape.micro_batch
    args.optimizer = args.optimizer or shape.optimizer
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = DOCS_PEAK_TFLOPS
    if args.seq_len < 4 or args.micro_batch < 1 or args.micro_batches < 1 or args.steps < 1:
        p.error("--seq-len >= 4, --micro-batch >= 1, --micro-batches >= 1 and --steps >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.cpu_offload and args.device != "cuda":
        p.error("--cpu-offload needs --device cuda")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_model(shape: Shape, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """A random Llama of ``shape``, fp32 master weights created on ``device``, checkpointed and sharded as the
    learner shards it (``learner.worker.LearnerWorker._load_sharded``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(args.seq_len, 8192),
        tie_word_embeddings=shape.tied,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    # Built directly on the device (HF initialises the weights there; on an H200 the 8B's 32 GB of fp32 weights take
    # seconds instead of minutes on the host). fully_shard with one rank copies each parameter into its sharded
    # form one layer at a time, so the transient extra is one layer.
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.dtype == "bf16" else MixedPrecisionPolicy()
    offload = {}
    if args.cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = {"offload_policy": CPUOffloadPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, **offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, **offload)
    # (The learner also sets gradient_divide_factor 1 and forced sum reduction; with one rank both are no-ops.)
    return model


def make_batch(shape: Shape, args: argparse.Namespace, device: torch.device, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """``--micro-batches`` micro-batches of random rows laid out as ``LearnerWorker._collate_rl`` lays them out."""
    b, t = args.micro_batch, args.seq_len
    response = max(1, int(t * RESPONSE_FRACTION))
    prompt = t - response
    batches = []
    for _ in range(args.micro_batches):
        ids = torch.randint(1, shape.vocab, (b, t), generator=generator)
        mask = torch.zeros((b, t), dtype=torch.bool)
        mask[:, prompt - 1 : t - 1] = True  # position p predicts token p+1: response tokens p..t-1 at p-1..t-2
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones((b, t), dtype=torch.long, device=device),
                "targets": torch.roll(ids, -1, dims=1).to(device),
                "mask": mask.to(device),
                "advantages": torch.randn(b, generator=generator).to(device),
            }
        )
    return batches


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One AMPO update, as ``LearnerWorker.step`` takes it (without the reference forward)."""
    global_tokens = sum(int(mb["mask"].sum()) for mb in batches)
    loss_sum = 0.0
    for mb in batches:
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
        logprobs, entropy = token_logprobs_and_entropy(logits, mb["targets"], 1.0)
        old = logprobs.detach()  # one optimiser step per batch: the scoring forward is the "old" policy
        out = policy_loss(logprobs, old, mb["advantages"], mb["mask"], entropy=entropy, behaviour_logprobs=old)
        n_tokens = int(mb["mask"].sum())
        (out.loss * (n_tokens / global_tokens)).backward()
        loss_sum += out.metrics["loss"] * n_tokens
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / global_tokens, "grad_norm": float(norm)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def linear_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def estimate_memory_gb(shape: Shape, params: int, tokens: int, cpu_offload: bool, optimizer: str) -> dict[str, float]:
    """docs/gpu.md §5's formulas applied to this run: one rank (nothing sharded away), no reference model."""
    layer = shape.hidden * (2 * shape.hidden + 2 * shape.kv_heads * shape.hidden // shape.heads) + 3 * shape.hidden * shape.intermediate
    est = {
        "fp32 weights + grads + AdamW m, v (16 B × P)": 0.0 if cpu_offload else 16 * params / GB,
        "AdamW foreach temporary (4 B × P; not in docs/gpu.md)": 0.0 if cpu_offload or optimizer != "foreach" else 4 * params / GB,
        "gathered bf16: 2 layers + embedding or head": (2 * layer + shape.vocab * shape.hidden) * 2 / GB,
        "checkpointed activations (layers × tokens × hidden × 2 B)": shape.layers * tokens * shape.hidden * 2 / GB,
        "one layer recomputed (tokens × (10·hidden + 3·intermediate) × 2 B)": tokens * (10 * shape.hidden + 3 * shape.intermediate) * 2 / GB,
        "logits (2 × tokens × vocab × 4 B)": 2 * tokens * shape.vocab * 4 / GB,
    }
    est["total"] = sum(est.values())
    return est


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "torch.cuda.max_memory_allocated"
    # Linux reports ru_maxrss in KiB: the whole process (Python, torch, transformers, the model and its step).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "peak RSS of the process (ru_maxrss)"


def fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1, timeout=datetime.timedelta(minutes=10))
    try:
        return run(args, shape, device)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, shape: Shape, device: torch.device) -> int:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {where}; torch {torch.__version__}, transformers {transformers.__version__}")
    started = time.perf_counter()
    model = build_model(shape, args, device)
    params = sum(p.numel() for p in model.parameters())
    n_matmul = linear_params(model)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LR,
        betas=BETAS,
        weight_decay=WEIGHT_DECAY,
        **({"fused": True} if args.optimizer == "fused" else {"foreach": True}),
    )
    tokens = args.micro_batches * args.micro_batch * args.seq_len
    mb_tokens = args.micro_batch * args.seq_len
    print(
        f"shape {args.shape}: {params / 1e6:,.2f} M parameters ({n_matmul / 1e6:,.2f} M in Linear layers), "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}, {'tied' if shape.tied else 'untied'} embeddings; "
        f"built and sharded in {time.perf_counter() - started:.1f} s"
    )
    print(
        f"step: {args.micro_batches} micro-batch(es) of {args.micro_batch} × {args.seq_len} tokens = {tokens} tokens "
        f"({int(args.seq_len * RESPONSE_FRACTION)} response tokens per row); compute {args.dtype}, fp32 master weights, "
        f"FSDP2 world size 1 ({'nccl' if device.type == 'cuda' else 'gloo'}), activation checkpointing, "
        f"cpu offload {'on' if args.cpu_offload else 'off'}, AdamW {args.optimizer} lr {LR:g}, grad clip {GRAD_CLIP}"
    )

    generator = torch.Generator().manual_seed(args.seed)
    batches = make_batch(shape, args, device, generator)
    t0 = time.perf_counter()
    warm = train_step(model, optimizer, batches)
    synchronize(device)
    print(f"warm-up step: {time.perf_counter() - t0:.2f} s, loss {warm['loss']:.4f}, grad norm {warm['grad_norm']:.4g}")

    watched = local(model.model.layers[0].self_attn.q_proj.weight)  # fp32 master shard (on the host with offload)
    times = []
    for _ in range(args.steps):
        before = watched.detach().clone()
        synchronize(device)
        t0 = time.perf_counter()
        last = train_step(model, optimizer, batches)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    update = float((watched.detach() - before).abs().max())
    step_s = sum(times) / len(times)
    tokens_per_s = tokens / step_s
    peak_gib, peak_what = peak_memory_gib(device)

    flops_8n = 8 * n_matmul * tokens / step_s
    flops_6n = 6 * n_matmul * tokens / step_s
    mfu = flops_8n / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
    mfu_6n = flops_6n / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
    # docs/gpu.md §6's 40 % MFU turned into tokens/s for this shape (a GPU estimate: none without a peak).
    est_tokens_per_s = DOCS_MFU * args.peak_tflops * 1e12 / (8 * n_matmul) if args.peak_tflops else float("nan")
    est = estimate_memory_gb(shape, params, mb_tokens, args.cpu_offload, args.optimizer)

    print()
    print(f"loss {last['loss']:.6f}")
    print(f"grad norm {last['grad_norm']:.6g} (before clipping at {GRAD_CLIP})")
    print(f"weight update max {update:.3g} (layer 0 q_proj, last step)")
    print(f"step time {step_s:.3f} s (mean of {len(times)}: {', '.join(f'{t:.3f}' for t in times)})")
    print(
        f"tokens/s: measured {tokens_per_s:.1f}, estimated "
        + (
            f"{est_tokens_per_s:.1f} (docs/gpu.md §6: {DOCS_MFU:.0%} MFU of {args.peak_tflops:g} TFLOP/s at 8·N per token)"
            if args.peak_tflops
            else "n/a (docs/gpu.md §6 estimates GPUs only; give --peak-tflops)"
        )
    )
    print(
        "MFU (8·N·tokens: forward + backward + checkpointing recompute): measured "
        + (f"{fmt(mfu)} of {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "n/a (no --peak-tflops on cpu)")
        + f", estimated {DOCS_MFU:.2f} (docs/gpu.md §6); at 6·N·tokens (no recompute): "
        + (fmt(mfu_6n) if args.peak_tflops else "n/a")
    )
    print(f"peak memory: measured {peak_gib:.2f} GiB ({peak_what}), estimated {est['total'] * GB / GIB:.4g} GiB = {est['total']:.4g} GB "
          f"(docs/gpu.md §5 formulas for this run: one rank, no reference, {mb_tokens} tokens per micro-batch):")
    for name, value in est.items():
        if name != "total":
            print(f"    {value:10.4g} GB  {name}")
    if args.shape == "8b":
        print(
            f"docs/gpu.md §5 per rank of the paper's 4-rank layout (8B, micro-batch 8 at ~16k tokens, with the fp32 reference): "
            f"sharded state {DOCS_8B_SHARDED_STATE_GB} GB, gathered layers {DOCS_8B_GATHERED_GB} GB, activations "
            f"{DOCS_8B_ACTIVATIONS_16K_GB} GB, recompute {DOCS_8B_RECOMPUTE_16K_GB} GB, logits {DOCS_8B_LOGITS_16K_GB} GB; "
            f"≈ {DOCS_8B_GPU_WITHOUT_OFFLOAD_GB:g} GB per GPU without offload, ≈ {DOCS_8B_GPU_WITH_OFFLOAD_GB:g} GB with"
        )
        print(
            f"docs/gpu.md §6 learner: {DOCS_LEARNER_FLOP_FACTOR}·P per token (incl. old-policy and reference forwards) at "
            f"{DOCS_MFU:.0%} MFU ≈ {DOCS_8B_TOKENS_PER_S_PER_GPU:.0f} tokens/s per GPU; this step does 8·N per token "
            f"(no reference forward; old log-probs come from the training forward)"
        )
    if device.type == "cuda":
        print(f"peak reserved {torch.cuda.max_memory_reserved(device) / GIB:.2f} GiB of {torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB")
    print()
    print(f"RESULT gpu_check_loss={last['loss']:.6g}")
    print(f"RESULT gpu_check_grad_norm={last['grad_norm']:.6g}")
    print(f"RESULT gpu_check_weight_update_max={update:.6g}")
    print(f"RESULT gpu_check_tokens_per_s={tokens_per_s:.6g}")
    print(f"RESULT gpu_check_peak_mem_gib={peak_gib:.6g}")
    print(f"RESULT gpu_check_mfu={fmt(mfu, 6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
