"""Shared fixtures (a tiny random causal LM, built offline in about a second; a local Ray) and the test layers.

Three layers, each a marker:

* **unit** (no marker): pure functions and single objects, seconds in all; no Ray, no server, no process group.
  `make test-unit` runs them. A guard holds the layer to that: a unit test that starts Ray, listens on a socket or
  opens a process group fails, saying to mark it.
* **integration**: real components on a small scale (a local Ray, the fault-injecting judge server, gloo process
  groups, an in-process vLLM engine), a few seconds each. Tests using the fixtures in `INTEGRATION_FIXTURES` get the
  marker by themselves.
* **slow**: whole flows (the training driver, clusters, the embedded model), minutes.

`make test` (CI) runs all three.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# In-process vLLM engines start in ~2 s instead of ~15 s and three processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_FIXTURES = {"ray_local", "fault_server", "judge", "actors", "hub"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is None and INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_layer_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests start no Ray, no server and no process group (see the module docstring)."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("integration"):
        return

    def refuse(what: str):
        def raise_(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"a unit test may not {what}: mark the test `integration` (tests/conftest.py)")

        return raise_

    import ray
    import torch.distributed

    monkeypatch.setattr(ray, "init", refuse("start Ray"))
    monkeypatch.setattr(socket.socket, "listen", refuse("listen on a socket (start a server)"))
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse("open a process group"))


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
