"""Shared fixtures: a tiny random causal LM (built offline in about a second) and engine-friendly env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# In-process vLLM engines start in ~2 s instead of ~15 s and three processes (ARCHITECTURE.md).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with tied embeddings, a byte-level BPE tokenizer and a ChatML
    chat template, saved as a HF folder (fp32 safetensors)."""
    from cluster.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return REPO_ROOT / "configs" / "tiny.yaml"
