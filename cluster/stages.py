"""Where each stage of a run writes, and so where the next stage looks: one set of names shared by `ampo run`, the
single-stage commands and the README.

    <run_dir>/demos.json            make-demos   -> bc             (data.bc_data overrides it)
    <run_dir>/bc_model/             bc           -> build-states, train (bc.output overrides it)
    <run_dir>/train_rl.parquet      build-states -> train          (data.train_states overrides it)
    <run_dir>/final_model/          train        -> eval
    <run_dir>/eval/<policy>-<mode>-<subset>.jsonl   eval -> report  (<policy>-no_thinking-... for eval.thinking=false)
    <run_dir>/report/               report
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import Config, ConfigError

DEMOS = "demos.json"
BC_MODEL = "bc_model"
TRAIN_STATES = "train_rl.parquet"
FINAL_MODEL = "final_model"
EVAL_DIR = "eval"
REPORT_DIR = "report"


def run_dir(config: Config) -> Path:
    return Path(config.cluster.run_dir)


def demos_path(config: Config) -> Path:
    """Where make-demos writes and bc reads the demonstrations."""
    return Path(config.data.bc_data or run_dir(config) / DEMOS)


def bc_model_path(config: Config) -> Path:
    return Path(config.bc.output or run_dir(config) / BC_MODEL)


def states_path(config: Config) -> Path:
    """Where build-states writes and train reads the RL states."""
    return Path(config.data.train_states or run_dir(config) / TRAIN_STATES)


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
