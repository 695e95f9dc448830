"""Which floating-point type the hardware under this process computes fast.

bfloat16 halves memory traffic, but only hardware with native bfloat16 arithmetic turns that into speed: CUDA GPUs
from Ampere on, and x86 CPUs with AVX512_BF16 or AMX-BF16 (or Arm CPUs with the BF16 extension). On an x86 CPU with
AVX2 only (most laptops and many cloud machines), oneDNN and vLLM's CPU kernels emulate bfloat16, and a SmolLM2
forward pass in bfloat16 runs about 3× slower than in float32 (`bench/cpu_dtype.py` measures both). So `auto`, the
default of `rollout.dtype` and `learner.mixed_precision`, resolves to bfloat16 only where it is native and to float32
elsewhere, on the node where the engine or learner rank runs, and logs which it chose and why.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

__all__ = ["AUTO", "cpu_bf16_flags", "cpu_vector_units", "native_bf16", "resolve_dtype"]

AUTO = "auto"
# CPU feature flags (as /proc/cpuinfo spells them) that mean bfloat16 matrix products run in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

FastDtype = Literal["bfloat16", "float32"]


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The native-bfloat16 flags that a /proc/cpuinfo text lists (its ``flags``, or ``Features`` on Arm)."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(flag for flag in value.split() if flag in BF16_CPU_FLAGS)
    return sorted(found)


def cpu_vector_units(cpuinfo: str) -> str:
    """The widest vector instruction set a /proc/cpuinfo text lists, and whether bfloat16 is native, in words (for
    the header of every timing: the same run is several times slower on an AVX2-only CPU)."""
    flags = {flag for line in cpuinfo.splitlines() if line.split(":", 1)[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}
    bf16 = cpu_bf16_flags(cpuinfo)
    native = f"native bfloat16 ({', '.join(bf16)})" if bf16 else "no native bfloat16"
    if "avx512f" in flags:
        return f"AVX-512, {native}"
    if "avx2" in flags:
        return f"AVX2 without AVX-512, {native}"
    return native


@functools.cache
def _this_cpu_bf16_flags() -> tuple[str, ...]:
    try:
        return tuple(cpu_bf16_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:  # not Linux: no flags to read, so float32 (vLLM's CPU build is Linux-only anyway)
        return ()


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` ("cpu" or "cuda") computes bfloat16 natively, and the reason in words."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name()} supports bfloat16"
        return False, "this GPU has no native bfloat16"
    flags = _this_cpu_bf16_flags()
    if flags:
        return True, f"this CPU has {', '.join(flags)}"
    return False, "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag): bfloat16 would be emulated, about 3x slower"


def resolve_dtype(requested: str, *, what: str, device: str | None = None) -> str:
    """``requested`` unless it is ``auto``; then bfloat16 where ``device`` computes it natively, else float32.

    ``device`` is "cpu" or "cuda"; None means this process's (cuda when torch sees a GPU). ``what`` names the
    consumer in the log line (for example "rollout engine" or "learner").
    """
    if requested != AUTO:
        return requested
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    native, why = native_bf16(device)
    chosen: FastDtype = "bfloat16" if native else "float32"
    log.info("%s dtype auto -> %s (%s)", what, chosen, why)
    return chosen
