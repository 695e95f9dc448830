"""scripts/gpu_learner_check.py, the one-GPU learner check, run on CPU at its tiny shape.

The script's GPU shapes (1b, 8b) cannot run here; this runs the same code path (FSDP2 world size 1 over gloo,
activation checkpointing, policy_loss, AdamW) at the tiny shape and checks what it reports, plus the docs/gpu.md
estimates the script prints next to its measurements.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_learner_check.py"
RESULT = re.compile(r"^RESULT (\w+)=(\S+)\s*$", re.MULTILINE)


@pytest.fixture(scope="module")
def cpu_run() -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MASTER_PORT", None)  # the script picks a free one
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--steps", "1", "--seq-len", "64", "--micro-batch", "2"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    return proc, {name: float(value) for name, value in RESULT.findall(proc.stdout)}


def test_tiny_step_on_cpu_reports_throughput_memory_and_mfu(cpu_run) -> None:
    proc, results = cpu_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("gpu_check_tokens_per_s", "gpu_check_peak_mem_gib", "gpu_check_mfu"):
        assert name in results, f"no RESULT {name} line"
    assert results["gpu_check_tokens_per_s"] > 0
    assert results["gpu_check_peak_mem_gib"] > 0
    assert math.isnan(results["gpu_check_mfu"])  # cpu without --peak-tflops: n/a
    loss = results["gpu_check_loss"]
    print(f"loss {loss}, tokens/s {results['gpu_check_tokens_per_s']}, peak {results['gpu_check_peak_mem_gib']} GiB")
    assert math.isfinite(loss)
    # The three headline lines close the output, in this order.
    last = proc.stdout.strip().splitlines()[-3:]
    assert [line.split("=")[0] for line in last] == [
        "RESULT gpu_check_tokens_per_s",
        "RESULT gpu_check_peak_mem_gib",
        "RESULT gpu_check_mfu",
    ]
    assert "measured" in proc.stdout and "estimated" in proc.stdout


def test_the_loss_reaches_the_weights(cpu_run) -> None:
    """A step whose loss is cut off from the parameters (detached, or not backpropagated) has gradient norm 0 and
    leaves the weights where they were; the check must not report throughput for such a step unnoticed."""
    proc, results = cpu_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    grad_norm = results["gpu_check_grad_norm"]
    assert math.isfinite(grad_norm) and grad_norm > 0
    # AdamW's first steps move every weight by about lr = 1e-6 (fp32 master weights)
    assert 1e-7 < results["gpu_check_weight_update_max"] < 1e-4


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_learner_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_memory_formulas_reproduce_docs_gpu_md() -> None:
    """The script's per-run memory estimate uses docs/gpu.md §5's formulas; at the docs' 8B setting (16k tokens per
    micro-batch, 4 ranks, with the fp32 reference) they give the docs' figures (to the docs' rounding)."""
    check = _load_script()
    shape, params = check.SHAPES["8b"], check.DOCS_8B_PARAMS
    est = check.estimate_memory_gb(shape, params, 8 * 2048, cpu_offload=False, optimizer="fused")
    state = est["fp32 weights + grads + AdamW m, v (16 B × P)"]
    assert state * 20 / 16 / 4 == pytest.approx(check.DOCS_8B_SHARDED_STATE_GB, rel=0.03)
    assert est["gathered bf16: 2 layers + embedding or head"] == pytest.approx(check.DOCS_8B_GATHERED_GB, rel=0.03)
    assert est["checkpointed activations (layers × tokens × hidden × 2 B)"] == pytest.approx(check.DOCS_8B_ACTIVATIONS_16K_GB, rel=0.03)
    assert est["one layer recomputed (tokens × (10·hidden + 3·intermediate) × 2 B)"] == pytest.approx(check.DOCS_8B_RECOMPUTE_16K_GB, rel=0.03)
    assert est["logits (2 × tokens × vocab × 4 B)"] == pytest.approx(check.DOCS_8B_LOGITS_16K_GB, rel=0.03)
    # The foreach AdamW temporary is what keeps the 8B shape from fitting one 141 GB GPU: it defaults to fused.
    foreach = check.estimate_memory_gb(shape, params, 2 * 2048, cpu_offload=False, optimizer="foreach")
    fused = check.estimate_memory_gb(shape, params, 2 * 2048, cpu_offload=False, optimizer="fused")
    assert foreach["total"] > 141 > fused["total"]
    assert check.SHAPES["8b"].optimizer == "fused"
