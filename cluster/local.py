"""Local single-node mode: the paper's whole flow at small sizes on one machine (`ampo run`).

    demonstrations → behaviour cloning → RL states → AMPO steps → evaluation → report

One local vLLM OpenAI server serves the embedded base model as the expert, the reward judge and the
episode evaluator (on a cluster these are strong hosted models); the policy goes from the embedded model
through BC to AMPO. Every stage writes into the run directory and is skipped when its output is already
there, so an interrupted run picks up where it stopped (the AMPO stage resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from actors.sotopia import SotopiaDataset
from actors.states import read_states
from cluster import stages
from cluster.config import Config, dump_config
from cluster.sources import resolve_model
from cluster.bc import run_bc_command
from cluster.demos import make_demos, opening_states
from cluster.endpoints import open_endpoint
from cluster.episodes import select_episodes
from cluster.evaluation import evaluate
from cluster.report import compare_first_last, report
from cluster.states import build_states
from cluster.workfiles import read_json_lines
from learner.checkpoint import latest_checkpoint, read_checkpoint

log = logging.getLogger(__name__)


def run_local(config: Config) -> dict[str, Any]:
    """Run every stage; returns a summary (also written to `<run_dir>/local_summary.json`)."""
    run_dir = Path(config.cluster.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    base = resolve_model(config.rollout.model)
    dataset = SotopiaDataset.load(stages.scenarios_path(config))
    prompts = config.prompts.load()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"run_dir": str(run_dir), "timings_s": timings}
    started = time.monotonic()

    def stage(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    with open_endpoint(config.reward.judge, config.rollout, model_path=base, what="judge, expert and evaluator") as judge:
        stage("judge server")
        log.info("[1/6] demonstrations: the expert writes each opening state in all four thinking modes")
        demos = stages.demos_path(config)
        if not demos.is_file():
            states = opening_states(dataset, select_episodes(dataset, max_episodes=config.data.demo_states),
                                    prompts=prompts, hide_private_info=config.data.hide_private_info)
            demo_report = make_demos(states, expert=judge, expert_config=config.reward.judge, out_path=demos,
                                     prompts=prompts)
            summary["demos"] = demo_report.describe()
            log.info(demo_report.describe())
        stage("demonstrations")

        log.info("[2/6] behaviour cloning of the four modes")
        bc_model = stages.bc_model_path(config)
        if not (bc_model / "config.json").is_file():
            run_bc_command(config, data=demos, model_path=base, out_dir=bc_model)
        stage("behaviour cloning")

        log.info("[3/6] RL states: self-play with the BC policy, every dialogue prefix judged")
        states_file = stages.states_path(config)
        if not states_file.is_file():
            states_report = build_states(
                config, judge=judge, out_path=states_file, policy_path=bc_model, max_episodes=config.data.build_episodes
            )
            summary["states"] = states_report.describe()
            log.info(states_report.describe())
        states = read_states(states_file)
        stage("RL states")

        log.info("[4/6] AMPO: %d learner steps on %d states", config.algorithm.total_steps, len(states))
        training = _train(config, states, bc_model, judge.base_url, judge.model)
        if training["interrupted"]:  # the driver stopped at a checkpoint; the flow stops with it
            raise stages.Interrupted(training["stopped_by_signal"] or signal.SIGINT)
        summary["training"] = training
        learning = compare_first_last(run_dir / "rollouts")
        if learning is not None:
            summary["learning"] = learning.as_dict()
            log.info("what the training changed:\n%s", learning.markdown())
        stage("AMPO training")

        log.info("[5/6] evaluation: Sotopia episodes of the trained policy judged on 7 dimensions")
        eval_file = _eval_file(config, training["final_model"])
        eval_report = evaluate(
            config, judge=judge, out_path=eval_file, policy_path=training["final_model"],
            hard_only=config.eval.hard_only, max_episodes=config.eval.max_episodes,
        )
        stage("evaluation")

    log.info("[6/6] report")
    result = report([eval_file], run_dir=run_dir, out_dir=run_dir / stages.REPORT_DIR)
    stage("report")
    summary["evaluation"] = eval_report.metrics()
    summary["report"] = str(result.markdown)
    summary["plots"] = [str(p) for p in result.plots]
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (run_dir / "local_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def progress(config: Config) -> list[str]:
    """One line per stage of `run_local`: what its output in the run directory holds now (printed when the flow is
    interrupted, so the user knows what the same command will skip)."""
    bc_model, final = stages.bc_model_path(config), Path(config.cluster.run_dir) / stages.FINAL_MODEL
    checkpoint = latest_checkpoint(Path(config.cluster.run_dir))
    step = read_checkpoint(checkpoint).step if checkpoint is not None else None
    trained = step is not None and step >= config.algorithm.total_steps  # an interrupted run exports its model too
    if trained:
        training = f"complete ({final})"
    elif step is not None:
        training = f"checkpoint of step {step} of {config.algorithm.total_steps} kept; resumes from it"
    else:
        training = "not started"
    evaluation = "not started"
    if trained:
        path = _eval_file(config, final)
        if path.is_file():
            evaluation = f"{len(read_json_lines(path))} episode(s) judged and kept ({path})"

    def made(path: Path, marker: Path) -> str:
        return f"complete ({path})" if marker.is_file() else "not complete"

    demos, states = stages.demos_path(config), stages.states_path(config)
    return [
        f"demonstrations: {made(demos, demos)}",
        f"behaviour cloning: {made(bc_model, bc_model / 'config.json')}",
        f"RL states: {made(states, states)}",
        f"AMPO training: {training}",
        f"evaluation: {evaluation}",
    ]


def _eval_file(config: Config, policy: str | Path) -> Path:
    """The results file of the flow's evaluation of `policy` (self-play or against the partner, all or hard)."""
    mode = "self_play" if config.eval.partner is None else "vs_partner"
    return stages.eval_path(config, policy, mode, "hard" if config.eval.hard_only else "all")


def _train(config: Config, states: list, policy: Path, judge_url: str, judge_model: str) -> dict[str, Any]:
    import ray

    from cluster.driver import TrainingDriver
    from cluster.ray_cluster import connect, shutdown_local

    config = config.model_copy(deep=True)
    config.rollout.model = str(policy)
    started_here = not ray.is_initialized()
    connect(config)
    try:
        return TrainingDriver(config, states, policy, judge_url=judge_url, judge_model=judge_model).run()
    finally:
        if started_here:
            shutdown_local()
