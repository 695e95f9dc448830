"""Shared fixtures: a tiny random causal LM (built offline in about a second) and engine-friendly env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# In-process vLLM engines start in ~2 s instead of ~15 s and three processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with tied embeddings, a byte-level BPE tokenizer and a ChatML
    chat template, saved as a HF folder (fp32 safetensors)."""
    from testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def ray_local():
    """One private single-node Ray instance shared by the tests that need actors. Resources are logical,
    so more actors than cores fit (each test keeps its own actors small)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            object_store_memory=1 << 30,
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "TOKENIZERS_PARALLELISM")}},
        )
    yield ray
    ray.shutdown()
