"""Weight-push latency into a live vLLM rollout actor ÷ an in-process load of the same tensors into the same engine.

Setup: the embedded default policy (SmolLM2-135M-Instruct, the model local mode trains), one learner rank (FSDP2,
fp32 master weights) and one rollout actor serving it in ``--dtype`` (default bfloat16, as ``configs/local.yaml``;
float32 as ``configs/tiny.yaml``). A push is ``LearnerGroup.publish(v)``: the rank streams its weights (cast to the
engine dtype) into a safetensors blob or the broadcast buckets, the actor receives them, pauses generation, reloads
its layers and resumes; the latency is publish → the actor's acknowledgement (``PushReport.seconds``).

Baseline (``RESULT``): the same tensors, already in the engine dtype and in this process's memory, loaded into a
vLLM engine of the same settings running in this process — the load every weight update into this engine must do,
with no learner, no transport and no other process. The ratio is therefore what the distributed, asynchronous push
costs on top of the engine's own load. On CPU that load is not a plain copy: vLLM repacks every linear weight for
oneDNN (``create_onednn_mm``), which alone takes several times a memory copy; on GPU it is a device copy.

Also printed, for reference: a plain ``load_state_dict`` of the fp32 master tensors into a transformers model of
the engine dtype (the least any weight copy can cost, with no engine kernels to prepare), the learner's share
(gather + serialise, ``PushReport.gather_seconds``) and the actor's own share, timed by sending it a blob that is
already in the object store. Pushes and the in-process loads alternate round by round and each ratio is the median
of the per-round ratios (robust to load from other jobs). Both transports are measured; ``RESULT`` reports
``--transport`` (default: the default config's object_store). Goal: ≤ 3×.

Run from the repository root: ``.venv/bin/python bench/weight_push.py [--dtype float32] [--transport broadcast]``
(converts the embedded model once if needed); the last line is
``RESULT weight_push_ratio=<push seconds ÷ in-process engine load seconds>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUNDS = 5
TRANSPORTS = ("object_store", "broadcast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="engine and push dtype")
    parser.add_argument("--transport", choices=TRANSPORTS, default="object_store", help="transport of the RESULT line")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import ray
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    from vllm import LLM

    from actors.config import RolloutConfig
    from actors.engine_io import engine_kwargs
    from actors.rollout import create_rollout_actors
    from cluster.models import prepare_embedded_model
    from learner.config import AlgorithmConfig, LearnerConfig
    from learner.group import LearnerGroup

    model_path = prepare_embedded_model()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}},
    )
    rollout = RolloutConfig(
        model=str(model_path),
        dtype=args.dtype,
        max_model_len=512,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=64 << 20,
        weight_update_timeout_s=120.0,
        max_restarts=0,
    )
    (actor,) = create_rollout_actors(rollout, model_path, num=1, num_cpus=1)
    learner = LearnerConfig(num_ranks=1, mixed_precision="fp32", gradient_checkpointing=False)
    group = LearnerGroup(learner, model_path, algorithm=AlgorithmConfig(kl_coef=0.0))
    ray.get(actor.health.remote(), timeout=300)

    # The baseline copies the learner's fp32 master tensors into a model of the engine dtype.
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
    master = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tensors = {k: v.detach().clone() for k, v in master.state_dict().items() if k != "lm_head.weight"}
    del master
    pushed = {k: v.to(getattr(torch, args.dtype)) for k, v in tensors.items()}
    megabytes = sum(t.numel() * t.element_size() for t in pushed.values()) / 1e6
    blob_ref = ray.put(np.frombuffer(safetensors.torch.save(pushed), dtype=np.uint8))  # as the learner sends it
    # The same engine settings as the actor's, in this process (one engine thread, as the actor's one Ray CPU).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = rollout.cpu_omp_threads_bind
    torch.set_num_threads(1)
    local_engine = LLM(**engine_kwargs(rollout, model_path))
    local_worker = local_engine.llm_engine.model_executor.driver_worker.worker

    def in_process_engine_load() -> float:
        start = time.perf_counter()
        local_worker._ampo_load(list(pushed.items()))  # the actor's load (actors/weights.py), minus the transport
        return time.perf_counter() - start

    def in_process_copy() -> float:
        start = time.perf_counter()
        reference.load_state_dict(tensors, strict=False)  # the tied lm_head follows the embedding
        return time.perf_counter() - start

    in_process_copy()  # warm-up: from_pretrained may memory-map the checkpoint; the first writes fault its pages in
    in_process_engine_load()
    version = 0
    results: dict[str, list[float]] = {
        "object_store": [], "broadcast": [], "engine": [], "copy": [], "gather": [], "actor_only": []
    }
    for transport in TRANSPORTS:
        group.connect_rollout([actor], rollout.model_copy(update={"weight_transport": transport}))
        version += 1
        group.publish(version).result(timeout=300)  # warm-up
        for _ in range(ROUNDS):
            version += 1
            report = group.publish(version).result(timeout=300)
            if not report.ok:
                raise RuntimeError(report.describe())
            results[transport].append(max(report.seconds.values()))
            if transport == "object_store":
                results["gather"].append(report.gather_seconds or 0.0)
                version += 1
                start = time.perf_counter()
                ray.get(actor.update_weights.remote(version, blob_ref), timeout=300)
                results["actor_only"].append(time.perf_counter() - start)
            results["engine"].append(in_process_engine_load())
            results["copy"].append(in_process_copy())
    group.shutdown()
    ray.get(actor.shutdown.remote(), timeout=60)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in results.items()}

    def ratio(transport: str, baseline: str) -> float:
        i = TRANSPORTS.index(transport)
        rounds = slice(i * ROUNDS, (i + 1) * ROUNDS)
        return statistics.median(p / b for p, b in zip(results[transport], results[baseline][rounds]))

    print(f"model: {model_path.name}, {megabytes:.0f} MB in {args.dtype}; {ROUNDS} rounds per transport (medians)")
    print(f"in-process load into a vLLM engine of the same settings: {med['engine'] * 1e3:.0f} ms")
    print(f"in-process load_state_dict into transformers (fp32 master -> {args.dtype}): {med['copy'] * 1e3:.0f} ms")
    print(
        f"object-store push: {med['object_store'] * 1e3:.0f} ms "
        f"(learner gather + serialise {med['gather'] * 1e3:.0f} ms; the actor alone on a ready blob {med['actor_only'] * 1e3:.0f} ms)"
    )
    print(f"broadcast push: {med['broadcast'] * 1e3:.0f} ms")
    for transport in TRANSPORTS:
        print(
            f"{transport}: {ratio(transport, 'engine'):.2f}x the in-process engine load, "
            f"{ratio(transport, 'copy'):.2f}x a plain load_state_dict"
        )
    print(f"RESULT weight_push_ratio={ratio(args.transport, 'engine'):.2f}")

if __name__ == "__main__":
    main()
