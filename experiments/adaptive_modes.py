"""Adaptive-mode experiment (issue 8, point 2; spec §7.2): does AMPO pick short thinking modes where they suffice
and deep ones where they pay, while GRPO drifts to one mode?

Setup (CPU, minutes): a small random Llama (128 wide, 4 layers — the 64-wide 2-layer test model cannot learn to make
the thinking block depend on the level it just wrote) is behaviour-cloned on all four modes, then trained by the
real pipeline (``TrainingDriver``: vLLM rollouts, reward pool, queue, FSDP2 learner, weight push) with a rule reward
over two kinds of contexts, told apart by the prompt:

* **easy**: every well-formed response earns 1, whatever its mode;
* **hard**: a well-formed response of level m earns m / 4 (deeper modes earn more).

Format errors get −2 from the pool. GRPO and AMPO (``algorithm.estimator``) run with the same seeds, data and
budget. Per context kind and policy version the script records the mode mix, the mean response length and the share
of groups that get AMPO's mode-level term, and writes a JSON file, a Markdown table and a PNG plot. The learning rate
is 1e-4: at 3e-4 and above the format collapses within 40 steps (docs/experiments.md).

Run from the repository root: ``.venv/bin/python -m experiments.adaptive_modes`` (results in ``runs/adaptive_modes/``, plot in
``docs/adaptive_modes.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from reward.custom import CustomRewardContext

SYSTEM = "Reply in a thinking mode."
KINDS = ("easy", "hard")
ANSWERS = ("Sure.", "Hello there.", "Let us meet.", "Fine.")
SPEC = "experiments.adaptive_modes:context_rule"
# Cloning long enough that about 2 % of samples at temperature 1 break the format (6 epochs left 13-20 %): AMPO's mode
# term needs a group without a single format error, and with n = 16 a 15 % error rate leaves almost no such group.
BC_EPOCHS = 16
# One cloned model for every RL seed (it is reused from --out when present), so seeds differ only in the RL phase.
BC_SEED = 1


def instruction(kind: str) -> str:
    return f"{kind.capitalize()} case. Turn 0: speak."


def context_rule(context: CustomRewardContext) -> float:
    """The rule reward (runs in the reward actors): easy contexts pay every mode alike, hard ones pay depth."""
    kind = context.state["agent1_goal"].split(":", 1)[0]
    mode = context.parsed.mode or 0
    return 1.0 if kind == "easy" else mode / 4


def demo_records(count: int) -> list[dict[str, str]]:
    """The four modes equally often in both kinds of context, with one-word thinking sections."""
    from reward.modes import MODE_SECTIONS, format_response

    records = []
    for i in range(count):
        mode = 1 + (i // len(ANSWERS)) % 4
        sections = {name: "ok" for name in MODE_SECTIONS[mode]} or None
        output = format_response(mode, sections, ANSWERS[i % len(ANSWERS)])
        records.append({"system": SYSTEM, "instruction": instruction(KINDS[(i // 16) % 2]), "input": "", "output": output})
    return records


def states(per_kind: int) -> list[Any]:
    """Bundled-scenario states (valid reward contexts) whose prompt names the kind; the kind also prefixes
    agent1's goal, which the reward reads."""
    from actors.sotopia import SotopiaDataset
    from actors.states import make_state

    dataset = SotopiaDataset.load()
    out = []
    for i in range(2 * per_kind):
        kind = KINDS[i % 2]
        state = make_state(dataset, i, [], (5.0, 5.0))
        out.append(state.model_copy(update={
            "instruction": instruction(kind), "system_prompt": SYSTEM, "agent1_goal": f"{kind}: {state.agent1_goal}",
        }))
    return out


def summarise(run_dir: Path, kind_of_state: dict[str, str]) -> dict[str, list[dict[str, float]]]:
    """Per kind and policy version: samples, share of each mode and of format errors, mean response tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learner.ampo import mode_term_groups

    table = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "rollouts").glob("*.parquet"))])
    buckets: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in table.select(["group_id", "state_id", "policy_version", "mode", "response_token_ids"]).to_pylist():
        buckets[(kind_of_state[row["state_id"]], row["policy_version"])].append(row)
    result: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    for (kind, version), rows in sorted(buckets.items()):
        entry: dict[str, float] = {"version": version, "samples": len(rows)}
        for mode in (1, 2, 3, 4):
            entry[f"mode{mode}"] = sum(r["mode"] == mode for r in rows) / len(rows)
        entry["format_error"] = sum(r["mode"] is None for r in rows) / len(rows)
        entry["tokens"] = sum(len(r["response_token_ids"]) for r in rows) / len(rows)
        # Groups are all n samples, so this group share weighs like the sample shares above.
        entry["mode_term"] = float(mode_term_groups([r["mode"] or -1 for r in rows], [r["group_id"] for r in rows]).mean())
        result[kind].append(entry)
    return result


def window(entries: list[dict[str, float]], first: bool, size: int) -> dict[str, float]:
    """Sample-weighted averages over the first or last ``size`` policy versions."""
    chosen = entries[:size] if first else entries[-size:]
    total = sum(e["samples"] for e in chosen)
    keys = ["mode1", "mode2", "mode3", "mode4", "format_error", "mode_term", "tokens"]
    return {k: sum(e[k] * e["samples"] for e in chosen) / total for k in keys} | {"samples": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive_modes"), help="models, run folders, JSON")
    parser.add_argument("--plot", type=Path, default=Path("docs/adaptive_modes.png"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1, help="RL seed: sampling, data order (the cloned model is shared)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="learner lr (3e-4 and 1e-3 collapse the format within 40 steps, see docs/experiments.md)")
    args = parser.parse_args()
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "auto", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    import ray

    from cluster.config import load_config
    from cluster.driver import TrainingDriver
    from cluster.models import build_tiny_model
    from learner.bc import run_bc
    from learner.config import BCConfig, LearnerConfig

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "TOKENIZERS_PARALLELISM")}})
    bc_dir = out / "bc"
    if not (bc_dir / "config.json").is_file():
        base = build_tiny_model(out / "base", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, seed=BC_SEED)
        run_bc(BCConfig(lr=3e-3, warmup_ratio=0.05, epochs=BC_EPOCHS, batch_size=8, cutoff_len=256), demo_records(512), base,
               bc_dir, learner=LearnerConfig(num_ranks=1, micro_batch_size=8, backend="gloo"), seed=BC_SEED)
    bc_seconds = time.monotonic() - started
    train_states = states(4)
    kind_of_state = {s.state_id: s.agent1_goal.split(":", 1)[0] for s in train_states}
    results: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "lr": args.lr, "bc_seconds": round(bc_seconds, 1), "runs": {}}
    for estimator in ("grpo", "ampo"):
        run_dir = out / f"{estimator}-lr{args.lr:g}-seed{args.seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # the summary reads every rollout file in it
        config = load_config("configs/tiny.yaml", [
            f"rollout.model={bc_dir}", f"cluster.run_dir={run_dir}", f"cluster.seed={args.seed}",
            f"rollout.seed={args.seed}", f"data.seed={args.seed}", f"reward.custom_reward={SPEC}",
            f"algorithm.estimator={estimator}", "rollout.n=16", "rollout.max_response_tokens=160",
            "algorithm.groups_per_step=4", f"algorithm.total_steps={args.steps}", "algorithm.max_staleness=1",
            "algorithm.entropy_coef=0.0", f"learner.lr={args.lr}", "learner.checkpoint_every=0", "learner.resume=never",
        ])
        t0 = time.monotonic()
        summary = TrainingDriver(config, train_states, bc_dir).run()
        results["runs"][estimator] = {
            "seconds": round(time.monotonic() - t0, 1), "steps": summary["steps"], "by_kind": summarise(run_dir, kind_of_state),
        }
    ray.shutdown()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    (out / f"adaptive_modes-lr{args.lr:g}-seed{args.seed}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    plot(results, args.plot)


def table(results: dict[str, Any], size: int = 4) -> str:
    """Markdown: per estimator and kind, mode mix and tokens over the first and the last ``size`` policy versions."""
    lines = ["| estimator | context | versions | level 1 | level 2 | level 3 | level 4 | format errors | groups with a mode term | response tokens | samples |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for estimator, run in results["runs"].items():
        for kind in KINDS:
            entries = run["by_kind"][kind]
            for first in (True, False):
                w = window(entries, first, size)
                span = entries[:size] if first else entries[-size:]
                label = f"{int(span[0]['version'])}–{int(span[-1]['version'])}"
                lines.append(f"| {estimator} | {kind} | {label} | " + " | ".join(f"{w[k]:.2f}" for k in ("mode1", "mode2", "mode3", "mode4", "format_error", "mode_term"))
                             + f" | {w['tokens']:.0f} | {w['samples']} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"])
    fig, axes = plt.subplots(2, 2 * len(runs), figsize=(5 * len(runs) * 2, 7), squeeze=False)
    for col, (estimator, kind) in enumerate((e, k) for e in runs for k in KINDS):
        entries = results["runs"][estimator]["by_kind"][kind]
        versions = [e["version"] for e in entries]
        ax = axes[0][col]
        for mode in (1, 2, 3, 4):
            ax.plot(versions, [e[f"mode{mode}"] for e in entries], label=f"level {mode}")
        ax.plot(versions, [e["format_error"] for e in entries], "k:", label="format error")
        ax.set_title(f"{estimator.upper()} — {kind} contexts")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of samples")
        ax.legend(fontsize=7)
        axes[1][col].plot(versions, [e["tokens"] for e in entries], "C4")
        axes[1][col].set_xlabel("policy version")
        axes[1][col].set_ylabel("mean response tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
