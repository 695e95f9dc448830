"""`ampo`: the one command-line entry point.

    ampo config show --config configs/local.yaml [section.field=value ...]
    ampo config template
    ampo model prepare
    ampo train --config configs/llama3.1-8b.yaml data.train_states=...
    ampo run --config configs/local.yaml

Run from the repo root without installing as `python -m cluster.cli ...` (what `ray job submit
--working-dir .` uses).
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from cluster.commands import register_pipeline_commands
from cluster.config import ConfigError, config_template, dump_config, load_config
from cluster.sources import SourceError

DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
"""Errors of a full or read-only disk: reported in one line (the error names the path), not as a traceback."""

log = logging.getLogger("ampo")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ampo",
        description="AMPO: adaptive thinking-mode RL for social language agents (Ray + vLLM + FSDP2).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="show or template the resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config (secrets are never part of it)")
    _add_config_args(show)
    template = config_sub.add_parser("template", help="print every field with its default and its meaning")
    _add_config_args(template)

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into a HF folder (cached)")
    prepare.add_argument("--force", action="store_true", help="convert again even if the cache is complete")

    register_pipeline_commands(sub)

    doctor = sub.add_parser("doctor", help="check every model endpoint the config names (key, model, one answer)")
    _add_config_args(doctor)
    train = sub.add_parser("train", help="AMPO reinforcement learning on RL states (the training driver)")
    _add_config_args(train)

    run = sub.add_parser(
        "run", help="local single-node mode: demonstrations → BC → RL states → AMPO → evaluation → report"
    )
    _add_config_args(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A plain SIGTERM would end the process without unwinding: the local judge server (its own process group)
    # and Ray would be left running. As an interruption they are stopped like on Ctrl-C; the training driver
    # installs its own handler while it runs, to finish the step and write a checkpoint first.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A command started in the background of a script inherits SIGINT ignored (POSIX job control); `kill -INT` from
    # a scheduler or a user must still stop it as Ctrl-C does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "config":
            config = load_config(args.config, args.overrides)
            print(dump_config(config) if args.config_command == "show" else config_template(config), end="")
        elif args.command == "model":
            from cluster.models import prepare_embedded_model

            print(prepare_embedded_model(force=args.force))
        elif args.command == "doctor":
            return _doctor(args)
        elif args.command == "train":
            return _train(args)
        elif args.command == "run":
            return _run(args)
        else:
            return args.handler(args)
    except ConfigError as exc:
        print(f"ampo: config error: {exc}", file=sys.stderr)
        return 2
    except SourceError as exc:
        print(f"ampo: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        print(f"ampo: {exc}", file=sys.stderr)  # a full or read-only disk: the path and what is kept, no traceback
        return 1
    except KeyboardInterrupt as exc:
        print("ampo: interrupted; what was finished is kept, and the same command continues from it", file=sys.stderr)
        return 128 + getattr(exc, "signum", _interrupted_by)  # a stage that caught the signal itself names it
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """`ampo doctor`: the preflight checks alone, one line each; status 2 when one fails."""
    from cluster.preflight import check_endpoints, check_run_dir

    config = load_config(args.config, args.overrides)
    checks = [check_run_dir(config), *check_endpoints(config)]
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 2


_interrupted_by = signal.SIGINT


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C: servers and engines are stopped, finished work is kept."""
    global _interrupted_by
    _interrupted_by = signum
    raise KeyboardInterrupt


def _train(args: argparse.Namespace) -> int:
    """`ampo train`: the asynchronous AMPO driver on `data.train_states`, from `rollout.model`."""
    import contextlib
    import json

    from actors.states import read_states
    from cluster.driver import TrainingDriver
    from cluster.sources import resolve_model
    from cluster.endpoints import Endpoint, judge_endpoint
    from cluster.evaluation import driver_evaluation
    from cluster.preflight import preflight
    from cluster.ray_cluster import connect
    from cluster.stages import Interrupted, existing, states_path

    config = load_config(args.config, args.overrides)
    states_file = existing(states_path(config), "RL states", "build-states", "data.train_states")
    preflight(config)
    states = read_states(states_file)
    policy = resolve_model(config.rollout.model)
    connect(config)
    with contextlib.ExitStack() as stack:
        base_url, model = stack.enter_context(judge_endpoint(config.reward.judge, config))
        if config.eval.judge.base_url == "local" and config.reward.judge.base_url == "local":
            eval_url, eval_model = base_url, model  # one local server serves both roles
        else:
            eval_url, eval_model = stack.enter_context(judge_endpoint(config.eval.judge, config, what="evaluator"))
        evaluation = driver_evaluation(
            config, judge=Endpoint(eval_url, eval_model), out_dir=config.cluster.run_dir / "eval", tokenizer_path=policy
        )
        driver = TrainingDriver(config, states, policy, judge_url=base_url, judge_model=model, evaluate=evaluation)
        summary = driver.run()
    print(json.dumps(summary, indent=2))
    if summary["interrupted"]:
        raise Interrupted(summary["stopped_by_signal"] or signal.SIGINT)
    return 0


def _run(args: argparse.Namespace) -> int:
    """`ampo run`: local single-node mode, the paper's whole flow at small sizes (see cluster/local.py)."""
    import json

    from cluster.local import progress, run_local
    from cluster.preflight import preflight

    config = load_config(args.config, args.overrides)
    preflight(config)
    try:
        summary = run_local(config)
    except KeyboardInterrupt:
        print("ampo: where the run stands:\n" + "\n".join(f"  {line}" for line in progress(config)), file=sys.stderr)
        raise
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
