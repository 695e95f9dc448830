"""Cost of the FSDP2 machinery: tokens/s of one learner rank's AMPO step ÷ a plain PyTorch loop doing the same.

Both run in this process on the same random Llama (4 layers, hidden 256, fp32) and the same batch of 8 sequences
of 512 tokens (256 prompt + 256 response; AMPO's are longer still): recompute old log-probs, reference log-probs,
then two micro-batches of the PPO-clip + KL + entropy loss (``learner/loss.py``), grad-norm clipping and an AdamW step. The FSDP side is :class:`learner.worker.LearnerWorker`
(1-rank gloo group, ``fully_shard`` per layer and root); the plain side is an unwrapped model, its frozen copy and
``torch.optim.AdamW(foreach=True)``. They alternate step by step (which one goes first alternates too) so
background load hits both alike, and the ratio is the median over rounds of the two step times of the same round,
which pairs measurements taken seconds apart on a machine shared with other work. Goal: ≥ 0.85. What remains is FSDP's own copying (flat-buffer copy-in/out around
every all-gather and reduce-scatter, even with one rank) and DTensor dispatch in the optimiser; it shrinks as the
tokens per micro-batch grow relative to the parameter count.

Run from the repository root: ``.venv/bin/python bench/learner_step.py``; the last line is
``RESULT learner_step_ratio=<fsdp tokens/s ÷ plain tokens/s>``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.tiny_model import build_tiny_model  # noqa: E402
from learner.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from learner.loss import policy_loss, token_logprobs_and_entropy  # noqa: E402
from learner.batches import TrainSample  # noqa: E402
from learner.worker import LearnerWorker, Schedule, WorkerSetup, free_port  # noqa: E402

SEQUENCES = 8
PROMPT_TOKENS = 256
RESPONSE_TOKENS = 256
MICRO_BATCH = 4
ROUNDS = 10
LR = 1e-5


def make_batch(vocab: int, seed: int = 0) -> list[TrainSample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(SEQUENCES):
        ids = torch.randint(3, vocab, (PROMPT_TOKENS + RESPONSE_TOKENS,), generator=generator).tolist()
        behaviour = (-torch.rand(RESPONSE_TOKENS, generator=generator) * 4).tolist()
        samples.append(
            TrainSample(
                prompt_ids=tuple(ids[:PROMPT_TOKENS]),
                response_ids=tuple(ids[PROMPT_TOKENS:]),
                behaviour_logprobs=tuple(behaviour),
                advantage=1.0 if i % 2 else -1.0,
                stale=i % 3 == 0,
            )
        )
    return samples


class PlainLoop:
    """The same update without FSDP: one module, its frozen copy, AdamW, the same loss code and micro-batches."""

    def __init__(self, model_path: Path, learner: LearnerConfig, algorithm: AlgorithmConfig, batches: list[dict]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.config.use_cache = False
        self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=learner.betas, weight_decay=learner.weight_decay, foreach=True
        )
        self.learner, self.algorithm, self.batches = learner, algorithm, batches

    def _logprobs(self, model: torch.nn.Module, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
        return token_logprobs_and_entropy(logits, mb["targets"])

    def step(self, global_tokens: int) -> None:
        algo = self.algorithm
        self.model.eval()
        with torch.no_grad():
            old = [self._logprobs(self.model, mb)[0] for mb in self.batches]
            ref = [self._logprobs(self.reference, mb)[0] for mb in self.batches]
        self.model.train()
        for i, mb in enumerate(self.batches):
            logprobs, entropy = self._logprobs(self.model, mb)
            behaviour = torch.where(mb["stale"].unsqueeze(-1), mb["behaviour"], old[i])
            out = policy_loss(
                logprobs,
                old[i],
                mb["advantages"],
                mb["mask"],
                ref_logprobs=ref[i],
                entropy=entropy,
                behaviour_logprobs=behaviour,
                clip_ratio=algo.clip_ratio,
                kl_coef=algo.kl_coef,
                entropy_coef=algo.entropy_coef,
                kl_clamp=algo.kl_clamp,
                tis_cap=algo.tis_cap,
            )
            (out.loss * (int(mb["mask"].sum()) / global_tokens)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.learner.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    # One intra-op thread: on a 2-core machine shared with other jobs, a multi-threaded op waits for its slowest
    # (descheduled) thread, which swamps the effect measured here; with one thread both sides just share the core.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(Path(tmp) / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4)
        learner = LearnerConfig(micro_batch_size=MICRO_BATCH, mixed_precision="fp32", gradient_checkpointing=False)
        algorithm = AlgorithmConfig(kl_coef=0.001)
        worker = LearnerWorker(0, 1, WorkerSetup(str(model_path), learner, Schedule(lr=LR), algorithm))
        info = worker.setup("127.0.0.1", free_port())
        samples = make_batch(vocab=512)
        tokens = sum(s.num_tokens for s in samples)
        global_tokens = sum(s.loss_tokens for s in samples)
        count = -(-len(samples) // MICRO_BATCH)
        # The plain loop gets exactly the tensors the worker builds for itself (sorted into the same micro-batches).
        order = sorted(range(len(samples)), key=lambda i: samples[i].num_tokens)
        batches = [worker._collate_rl([samples[i] for i in order[k : k + MICRO_BATCH]]) for k in range(0, len(order), MICRO_BATCH)]
        plain = PlainLoop(model_path, learner, algorithm, batches)

        fsdp_step = lambda: worker.step(samples, count, global_tokens)  # noqa: E731
        plain_step = lambda: plain.step(global_tokens)  # noqa: E731
        fsdp_step(), plain_step()  # warm-up
        fsdp_times, plain_times = [], []
        for round_index in range(ROUNDS):
            if round_index % 2:
                plain_times.append(timed(plain_step))
                fsdp_times.append(timed(fsdp_step))
            else:
                fsdp_times.append(timed(fsdp_step))
                plain_times.append(timed(plain_step))
        worker.shutdown()

    fsdp_rate = tokens / statistics.median(fsdp_times)
    plain_rate = tokens / statistics.median(plain_times)
    print(
        f"model: {info['parameters']:,} parameters; batch: {SEQUENCES} × {PROMPT_TOKENS + RESPONSE_TOKENS} tokens, "
        f"micro-batch {MICRO_BATCH}; {ROUNDS} alternating rounds, torch threads {torch.get_num_threads()}"
    )
    print(f"FSDP2 1-rank step: {fsdp_rate:,.0f} tokens/s (median {statistics.median(fsdp_times):.3f} s)")
    print(f"plain PyTorch step: {plain_rate:,.0f} tokens/s (median {statistics.median(plain_times):.3f} s)")
    ratio = statistics.median(p / f for p, f in zip(plain_times, fsdp_times))
    print(f"per-round ratios: {' '.join(f'{p / f:.2f}' for p, f in zip(plain_times, fsdp_times))}")
    print(f"RESULT learner_step_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
