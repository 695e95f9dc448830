"""Where each stage of a run writes, and so where the next stage looks: one set of names shared by `ampo run`, the
single-stage commands and the README.

    <run_dir>/demos.json            make-demos   -> bc             (data.bc_data overrides it)
    <run_dir>/bc_model/             bc           -> build-states, train (bc.output overrides it)
    <run_dir>/train_rl.parquet      build-states -> train          (data.train_states overrides it)
    <run_dir>/final_model/          train        -> eval
    <run_dir>/eval/<policy>-<mode>-<subset>.jsonl   eval -> report  (<policy>-no_thinking-... for eval.thinking=false)
    <run_dir>/report/               report

A data field may name a Hugging Face dataset file (`hf://owner/dataset/path`, see `cluster.sources`): it is read
from the download, and a stage never writes into it.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import Config, ConfigError
from cluster.sources import is_hub_data, resolve_data

DEMOS = "demos.json"
BC_MODEL = "bc_model"
TRAIN_STATES = "train_rl.parquet"
FINAL_MODEL = "final_model"
EVAL_DIR = "eval"
REPORT_DIR = "report"


def run_dir(config: Config) -> Path:
    return Path(config.cluster.run_dir)


def scenarios_path(config: Config) -> Path | None:
    """The local folder of `data.scenarios` (downloaded when it names a Hub folder); None: the bundled set."""
    return resolve_data(config.data.scenarios) if config.data.scenarios is not None else None


def demos_path(config: Config, *, writing: bool = False) -> Path:
    """Where make-demos writes and bc reads the demonstrations."""
    return _data_file(config.data.bc_data, "data.bc_data", run_dir(config) / DEMOS, writing)


def bc_model_path(config: Config) -> Path:
    return Path(config.bc.output or run_dir(config) / BC_MODEL)


def states_path(config: Config, *, writing: bool = False) -> Path:
    """Where build-states writes and train reads the RL states."""
    return _data_file(config.data.train_states, "data.train_states", run_dir(config) / TRAIN_STATES, writing)


def _data_file(spec: str | None, field: str, default: Path, writing: bool) -> Path:
    if spec is None:
        return default
    if writing and is_hub_data(spec):
        raise ConfigError(f"{field} names a Hugging Face dataset file ({spec}), which a stage cannot write; unset it or give --out")
    return resolve_data(spec)


def eval_path(config: Config, policy: str | Path, mode: str, subset: str) -> Path:
    """`<run_dir>/eval/<policy>-<self_play|vs_partner>-<all|hard>.jsonl`, where `<policy>` is the checkpoint's folder
    name or the API model's name, with `-no_thinking` when `eval.thinking` is off."""
    name = (Path(policy).name or "policy") + ("" if config.eval.thinking else "-no_thinking")
    return run_dir(config) / EVAL_DIR / f"{name}-{mode}-{subset}.jsonl"


def existing(path: Path, what: str, made_by: str, field: str) -> Path:
    """``path`` when it exists, else a ConfigError saying which stage makes it and which field names another."""
    if not path.exists():
        raise ConfigError(f"{field}: no {what} at {path}; `ampo {made_by}` writes it there, or set {field} to another file")
    return path


class Interrupted(KeyboardInterrupt):
    """A stage that handled Ctrl-C or SIGTERM itself (the training driver finishes its step and writes a
    checkpoint) and stopped cleanly; ``signum`` is the signal, so the command exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
