"""Subcommands of the data and evaluation pipeline; each registers a parser whose `handler(args) -> int` runs it.

    ampo data check [FILE ...] [--config C] [overrides]   counts, first errors, prompt mismatches; no FILE: the config's data
    ampo build-states [--config C] [overrides] [--policy DIR] [--out FILE] [--max-episodes N] [--rollouts N]
    ampo make-demos   [--config C] [overrides] [--states FILE] [--out FILE] [--modes 1,2,3,4] [--max-states N]
    ampo bc           [--config C] [overrides] [--data FILE] [--model DIR] [--out DIR]
    ampo eval         [--config C] [overrides] [--policy DIR] [--out FILE] [--subset all|hard] [--max-episodes N]
    ampo report       [RESULTS ...] [--config C] [overrides] [--run-dir DIR] [--out DIR]

The work itself lives in one module per stage (`cluster.data_check`, `states`, `demos`, `bc`, `evaluation`,
`report`); this module turns arguments and the config into their calls, prints
the summary and maps bad data to exit status 1 with a one-line message (cli.py maps config errors to 2). `data
check` and `report` take files and dotted overrides as one positional list: an item shaped `section.field=value`
is an override, anything else a path.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from cluster.config import ChatModelConfig, Config, ConfigError, load_config
from cluster import stages

log = logging.getLogger("ampo")

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def _add_config_args(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """`--config` and the dotted overrides, as the other `ampo` commands take them (cli.py imports this module,
    so its own helper cannot be imported here)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config file (default: built-in defaults)")
    if positional:
        parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")


def _split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(paths, overrides) of a mixed positional list."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    return [item for item in items if not _OVERRIDE.match(item)], overrides


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _handler(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input data ends the command with a one-line message and status 1; config errors go on to cli.py."""

    def handle(args: argparse.Namespace) -> int:
        from actors.sotopia import ScenarioDataError
        from actors.states import StateDataError
        from learner.bc import BCDataError
        from reward.server import JudgeServerError

        try:
            return run(args)
        except ConfigError:
            raise
        except (StateDataError, BCDataError, ScenarioDataError, JudgeServerError, FileNotFoundError,
                ValueError) as exc:
            print(f"ampo {args.command}: error: {exc}", file=sys.stderr)
            return 1

    return handle


def register_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Add the pipeline subcommands to the `ampo` parser."""
    data = sub.add_parser("data", help="inspect data files")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser(
        "check",
        help="check RL states (JSON/JSONL/Parquet), alpaca BC records or a Sotopia scenario folder",
        description="Prints what each file holds, its counts and its first errors, and compares its prompts with the "
        "config's templates (a scenario folder: every episode renders; RL states and BC records: each row's system "
        "prompt is prompts.system and its turn prompt follows prompts.turn); exits 1 on any error or difference. "
        "Without a FILE it checks the config's scenarios, data.train_states and data.bc_data. hf://owner/dataset/path "
        "downloads a file of a Hugging Face dataset first.",
    )
    _add_config_args(check, positional=False)
    check.add_argument("items", nargs="*", metavar="FILE|section.field=value")
    check.add_argument("--max-errors", type=int, default=10, help="errors to print per file")
    check.set_defaults(handler=_handler(_data_check))

    states = sub.add_parser("build-states", help="play self-play episodes and write judged RL states (Parquet)")
    _add_config_args(states)
    states.add_argument("--policy", help="policy model: folder or Hub id (default: rollout.model)")
    states.add_argument("--out", type=Path, help="output Parquet (default: data.train_states, else <run_dir>/train_rl.parquet)")
    states.add_argument("--episodes", type=_int_list, help="episode ids, comma-separated (default: all)")
    states.add_argument("--max-episodes", type=int, help="play only the first N episodes")
    states.add_argument("--rollouts", type=int, default=1, help="episodes played per scenario episode")
    states.add_argument("--seed", type=int, help="engine seed (default: rollout.seed)")
    states.set_defaults(handler=_handler(_build_states))

    demos = sub.add_parser(
        "make-demos",
        help="ask an expert model for thinking-mode demonstrations (alpaca JSON for BC)",
        description="The expert is reward.judge's endpoint unless --expert-url/--expert-model name another; it "
        "uses reward.judge's client settings with one greedy parse round (a deterministic repeat would only "
        "repeat a failure). Without RL states (--states or data.train_states) the opening turns of the "
        "scenarios are used.",
    )
    _add_config_args(demos)
    demos.add_argument("--states", help="RL states file or hf:// file (default: data.train_states)")
    demos.add_argument("--out", type=Path, help="output JSON (default: data.bc_data, else <run_dir>/demos.json)")
    demos.add_argument("--modes", type=_int_list, default=[1, 2, 3, 4], help="thinking modes, comma-separated")
    demos.add_argument("--max-states", type=int, help="use only the first N states")
    demos.add_argument("--expert-url", help="OpenAI-compatible base URL of the expert, or `local`")
    demos.add_argument("--expert-model", help="model name at that URL")
    demos.add_argument("--expert-model-path", help="model (folder or Hub id) a `local` expert serves (default: rollout.model)")
    demos.add_argument("--section-chars", type=int, default=400, help="longest text of one thinking section")
    demos.add_argument("--answer-chars", type=int, default=300, help="longest answer")
    demos.set_defaults(handler=_handler(_make_demos))

    bc = sub.add_parser("bc", help="behaviour cloning of the thinking modes; writes a HF model folder")
    _add_config_args(bc)
    bc.add_argument("--data", help="alpaca records, a file or hf:// file (default: data.bc_data, else <run_dir>/demos.json)")
    bc.add_argument("--model", help="initial model: folder or Hub id (default: rollout.model)")
    bc.add_argument("--out", type=Path, help="output folder (default: bc.output, else <run_dir>/bc_model)")
    bc.set_defaults(handler=_handler(_bc))

    evaluation = sub.add_parser(
        "eval",
        help="Sotopia evaluation judged on 7 dimensions (self-play, or against eval.partner)",
        description="Resumable: re-running on the same --out continues where it stopped.",
    )
    _add_config_args(evaluation)
    evaluation.add_argument("--policy", help="policy model: folder or Hub id (default: rollout.model)")
    evaluation.add_argument("--out", type=Path, help="results JSONL (default: <run_dir>/eval/<policy>-<mode>-<subset>.jsonl)")
    evaluation.add_argument("--subset", choices=["all", "hard"], default="all", help="all episodes or the hard subset")
    evaluation.add_argument("--max-episodes", type=int, help="evaluate only the first N (default: eval.max_episodes)")
    evaluation.add_argument("--episodes", type=_int_list, help="episode ids, comma-separated")
    evaluation.set_defaults(handler=_handler(_eval))

    rep = sub.add_parser(
        "report",
        help="tables of evaluation results (Markdown and text) and plots of a training run",
        description="RESULTS are evaluation results files (our JSONL or the authors' JSON list); default: "
        "<run_dir>/eval/*.jsonl. Plots come from <run_dir>/metrics.jsonl when it exists.",
    )
    _add_config_args(rep, positional=False)
    rep.add_argument("items", nargs="*", metavar="RESULTS|section.field=value")
    rep.add_argument("--run-dir", type=Path, help="run directory (default: cluster.run_dir)")
    rep.add_argument("--out", type=Path, help="output folder (default: <run_dir>/report)")
    rep.set_defaults(handler=_handler(_report))


def _config(args: argparse.Namespace, overrides: Sequence[str] | None = None) -> Config:
    return load_config(args.config, list(args.overrides if overrides is None else overrides))


# ---- data check --------------------------------------------------------------------------------------------------


def _configured_data(config: Config) -> Iterator[str | Path]:
    from actors.sotopia import BUNDLED_SCENARIOS

    yield config.data.scenarios or BUNDLED_SCENARIOS
    for spec in (config.data.train_states, config.data.bc_data):
        if spec is not None:
            yield spec


def _data_check(args: argparse.Namespace) -> int:
    from cluster.data_check import check_data
    from cluster.sources import resolve_data

    paths, overrides = _split_items(args.items)
    config = _config(args, overrides)
    targets = [resolve_data(spec) for spec in (paths or _configured_data(config))]
    prompts = config.prompts.load()
    checks = [
        check_data(path, max_errors=args.max_errors, prompts=prompts, hide_private_info=config.data.hide_private_info)
        for path in targets
    ]
    for check in checks:
        print(check.describe())
    failed = [c for c in checks if not c.ok]
    print(f"checked {len(checks)}: {len(checks) - len(failed)} OK, {len(failed)} with errors")
    return 1 if failed else 0


# ---- build-states / make-demos -----------------------------------------------------------------------------------


def _build_states(args: argparse.Namespace) -> int:
    from cluster.endpoints import open_endpoint
    from cluster.states import build_states

    config = _config(args)
    out = args.out or stages.states_path(config, writing=True)
    if out.suffix != ".parquet":
        raise ConfigError(f"build-states writes Parquet; {out} does not end in .parquet (give --out)")
    with open_endpoint(config.reward.judge, config.rollout, what="goal judge") as judge:
        result = build_states(
            config, judge=judge, out_path=out, policy_path=args.policy, episodes=args.episodes,
            max_episodes=args.max_episodes, rollouts_per_episode=args.rollouts, seed=args.seed,
        )
    print(result.describe())
    return 0


def _make_demos(args: argparse.Namespace) -> int:
    from actors.sotopia import SotopiaDataset
    from actors.states import read_states
    from cluster.demos import make_demos, opening_states
    from cluster.endpoints import open_endpoint
    from cluster.sources import resolve_data

    config = _config(args)
    source = args.states or config.data.train_states
    if source is not None:
        states = read_states(resolve_data(source))
    else:
        log.warning("no RL states given (--states or data.train_states): using the opening turn of every scenario "
                    "episode; states from `ampo build-states` cover later turns too")
        dataset = SotopiaDataset.load(stages.scenarios_path(config))
        states = opening_states(dataset, dataset.episodes(), prompts=config.prompts.load(),
                                hide_private_info=config.data.hide_private_info)
    states = states[: args.max_states] if args.max_states is not None else states
    expert_section = config.reward.judge
    if args.expert_url is not None:
        expert_section = expert_section.model_copy(update={"base_url": args.expert_url})
    if args.expert_model is not None:
        expert_section = expert_section.model_copy(update={"model": args.expert_model})
    out = args.out or stages.demos_path(config, writing=True)
    with open_endpoint(expert_section, config.rollout, model_path=args.expert_model_path, what="expert") as expert:
        result = make_demos(
            states, expert=expert, expert_config=expert_section, out_path=out, modes=args.modes,
            section_max_chars=args.section_chars, answer_max_chars=args.answer_chars, prompts=config.prompts.load(),
        )
    print(result.describe())
    return 0


# ---- bc / eval / report ------------------------------------------------------------------------------------------


def _bc(args: argparse.Namespace) -> int:
    from cluster.bc import run_bc_command

    out = run_bc_command(_config(args), data=args.data, model_path=args.model, out_dir=args.out)
    print(f"behaviour-cloned model written to {out} (per-step losses in {out / 'bc_metrics.jsonl'})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cluster.endpoints import Endpoint, open_endpoint
    from cluster.evaluation import evaluate
    from cluster.preflight import preflight

    config = _config(args)
    preflight(config, training=False)
    partner_section, policy_section = config.eval.partner, config.eval.policy
    if policy_section is not None and args.policy is not None:
        raise ConfigError("eval.policy names an API model as the evaluated policy; drop --policy, or set eval.policy=null")
    mode = "self_play" if partner_section is None else "vs_partner"
    policy_name = policy_section.model if policy_section is not None else args.policy or config.rollout.model
    out = args.out or stages.eval_path(config, policy_name, mode, args.subset)
    with ExitStack() as stack:
        judge = stack.enter_context(open_endpoint(config.eval.judge, config.rollout, what="episode evaluator"))

        def endpoint(section: ChatModelConfig, what: str) -> Endpoint:
            same_local = (section.base_url, section.model) == (config.eval.judge.base_url, config.eval.judge.model) == ("local", "local")
            return judge if same_local else stack.enter_context(open_endpoint(section, config.rollout, what=what))

        partner = endpoint(partner_section, "partner") if partner_section is not None else None
        policy = endpoint(policy_section, "evaluated policy") if policy_section is not None else None
        result = evaluate(
            config, judge=judge, out_path=out, policy_path=args.policy, policy=policy, partner=partner,
            hard_only=args.subset == "hard",
            max_episodes=args.max_episodes if args.max_episodes is not None else config.eval.max_episodes,
            episodes=args.episodes,
        )
    print(f"results: {result.path} (summary: {result.path.with_name(result.path.stem + '.summary.md')})")
    print(result.text, end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cluster.report import report

    paths, overrides = _split_items(args.items)
    config = _config(args, overrides)
    run_dir = args.run_dir or Path(config.cluster.run_dir)
    results = [Path(p) for p in paths] or sorted((run_dir / stages.EVAL_DIR).glob("*.jsonl"))
    result = report(results, run_dir=run_dir, out_dir=args.out or run_dir / stages.REPORT_DIR)
    print(result.text.read_text(), end="")
    print(f"\nreport written to {result.markdown} and {result.text}" + (f" with {len(result.plots)} plot(s)" if result.plots else ""))
    return 0
