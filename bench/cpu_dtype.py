"""What `auto` precision buys on a CPU: SmolLM2 forward throughput in float32 and in bfloat16, with this CPU's own
kernels and with kernels held to AVX2 (what a CPU without AVX-512 runs), side by side in one run.

The AVX2 set runs in a subprocess with ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2``, which make
torch's and oneDNN's dispatch pick the kernels an AVX2-only CPU would get (no AVX-512, no native bfloat16). For each
set the bench prints tokens/s in both dtypes and the dtype `auto` chooses there (on this CPU: what
``actors.precision`` reads from /proc/cpuinfo; on an AVX2-only CPU: float32, as it has no bfloat16 flag), then

    RESULT cpu_dtype_auto_speedup_<set>=<tokens/s in auto's dtype / tokens/s in the other dtype>

(higher is better; at least 1 means `auto` chose the faster dtype). vLLM's CPU kernels choose their instruction set
from the CPU itself, so they cannot be held to AVX2 here; the learner's and the HF forward's can.

Run from the repository root: ``.venv/bin/python bench/cpu_dtype.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH, SEQ, REPEATS = 4, 256, 3
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def measure() -> dict[str, float]:
    """Forward tokens/s of the embedded model in float32 and bfloat16, in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.sources import resolve_model

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (BATCH, SEQ))
    rates = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(resolve_model("embedded"), dtype=getattr(torch, dtype)).eval()
        with torch.no_grad():
            model(ids)  # warm-up: first-call kernel selection
            start = time.perf_counter()
            for _ in range(REPEATS):
                model(ids)
        rates[dtype] = REPEATS * ids.numel() / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return

    from actors.precision import resolve_dtype
    from cluster.sources import resolve_model

    resolve_model("embedded")  # convert once, outside the timed children
    sets = {"native": ({}, resolve_dtype("auto", what="bench", device="cpu")), "avx2": (AVX2_ENV, "float32")}
    for name, (extra_env, auto_choice) in sets.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child"], env={**os.environ, **extra_env}, capture_output=True, text=True, check=True
        )
        rates = json.loads(out.stdout.strip().splitlines()[-1])
        other = "float32" if auto_choice == "bfloat16" else "bfloat16"
        print(f"{name:>6} kernels: float32 {rates['float32']:.0f} tokens/s, bfloat16 {rates['bfloat16']:.0f} tokens/s; auto -> {auto_choice}")
        print(f"RESULT cpu_dtype_auto_speedup_{name}={rates[auto_choice] / rates[other]:.3f}")


if __name__ == "__main__":
    main()
