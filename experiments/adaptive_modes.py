"""Adaptive-mode experiment: does AMPO do what the paper claims (arXiv 2505.02156, §3 and Fig. 2), and GRPO not?

The hypotheses, design and statistics are pre-registered in docs/experiments.md; this script runs them and writes the
results. A small random Llama (128 wide, 4 layers) is behaviour-cloned once on all four thinking modes, then trained
by the real pipeline (``TrainingDriver``: vLLM rollouts, reward pool, queue, FSDP2 learner, weight push) with a rule
reward over two kinds of contexts, told apart by the prompt ("Easy case…" / "Hard case…"):

* **easy**: every well-formed response earns 1, whatever its mode (a tie: GRPO's sample-level advantage is 0 in a
  group without format errors, so only AMPO's length term moves the mode mix);
* **hard**: a well-formed response of level m earns m / 4 (deeper modes earn more).

Format errors get −2 from the pool. Two designs, each run with both estimators on the same seeds:

* ``tie``: every context easy (hypothesis H1);
* ``mixed``: easy and hard contexts alternate (H2, H3).

Each run writes its per-version summary to ``<out>/runs/<design>-<estimator>-seed<k>.json`` and is skipped when that
file exists, so an interrupted experiment continues where it stopped. The analysis (``analyse``) reads those files
and writes the tables, the tests and one plot per hypothesis.

Run from the repository root (about 55 minutes on a 2-core CPU for the default 5 seeds)::

    .venv/bin/python -m experiments.adaptive_modes                 # runs + analysis: runs/adaptive_modes/report.md
    .venv/bin/python -m experiments.adaptive_modes --analyse-only  # the analysis of the runs already there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reward.custom import CustomRewardContext

SYSTEM = "Reply in a thinking mode."
KINDS = ("easy", "hard")
DESIGNS: dict[str, tuple[str, ...]] = {"tie": ("easy",), "mixed": KINDS}
ESTIMATORS = ("grpo", "ampo")
ANSWERS = ("Sure.", "Hello there.", "Let us meet.", "Fine.")
SPEC = "experiments.adaptive_modes:context_rule"
STATES_PER_KIND = 4
# Cloning recipe: 12 epochs of 32 steps at lr 5e-3 leave about 2 % of samples at temperature 1 breaking the format
# (6 epochs at 3e-3 left 13-20 %). AMPO's mode term needs a group without a single format error, and with n = 16 a
# 15 % error rate leaves almost no such group. One cloned model serves every run, so runs differ only in the RL phase.
BC_EPOCHS, BC_BATCH, BC_LR, BC_RECORDS, BC_SEED = 12, 16, 5e-3, 512, 1
MODES = (1, 2, 3, 4)


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


def states(kinds: Sequence[str], per_kind: int = STATES_PER_KIND) -> list[Any]:
    """Bundled-scenario states (valid reward contexts) whose prompt names the kind, the kinds alternating; the kind
    also prefixes agent1's goal, which the reward reads."""
    from actors.sotopia import SotopiaDataset
    from actors.states import make_state

    dataset = SotopiaDataset.load()
    out = []
    for i in range(len(kinds) * per_kind):
        kind = kinds[i % len(kinds)]
        state = make_state(dataset, i, [], (5.0, 5.0))
        out.append(state.model_copy(update={
            "instruction": instruction(kind), "system_prompt": SYSTEM, "agent1_goal": f"{kind}: {state.agent1_goal}",
        }))
    return out


def clone(out: Path) -> Path:
    """The behaviour-cloned policy (built once, then reused from ``out/bc``). Needs a running Ray."""
    from testing.tiny_model import build_tiny_model
    from learner.bc import run_bc
    from learner.config import BCConfig, LearnerConfig

    bc_dir = out / "bc"
    if not (bc_dir / "config.json").is_file():
        base = build_tiny_model(out / "base", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, seed=BC_SEED)
        config = BCConfig(lr=BC_LR, warmup_ratio=0.05, epochs=BC_EPOCHS, batch_size=BC_BATCH, cutoff_len=256)
        learner = LearnerConfig(num_ranks=1, micro_batch_size=BC_BATCH, backend="gloo", mixed_precision="fp32")
        run_bc(config, demo_records(BC_RECORDS), base, bc_dir, learner=learner, seed=BC_SEED)
    return bc_dir


def overrides(run_dir: Path, bc_dir: Path, estimator: str, seed: int, steps: int, lr: float) -> list[str]:
    """The RL settings of one run on configs/tiny.yaml (shared with the guard test in tests/)."""
    return [
        f"rollout.model={bc_dir}", f"cluster.run_dir={run_dir}", f"cluster.seed={seed}", f"rollout.seed={seed}",
        f"data.seed={seed}", f"reward.custom_reward={SPEC}", f"algorithm.estimator={estimator}", "rollout.n=16",
        "rollout.max_response_tokens=160", "algorithm.groups_per_step=4", f"algorithm.total_steps={steps}",
        "algorithm.max_staleness=1", "algorithm.entropy_coef=0.0", f"learner.lr={lr}", "learner.checkpoint_every=0",
        "learner.resume=never",
    ]


def summarise(run_dir: Path, kind_of_state: dict[str, str], estimator: str) -> dict[str, list[dict[str, float]]]:
    """Per kind and policy version: samples, share of each mode and of format errors, mean response tokens, the rule
    reward among well-formed samples, the share of groups with a mode term, and the mean advantage per mode under
    the run's estimator (recomputed from the rewards, lengths and modes exactly as the learner computes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learner.ampo import ampo_advantages, grpo_advantages, mode_term_groups

    table = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "rollouts").glob("*.parquet"))])
    rows = table.select(["group_id", "state_id", "policy_version", "mode", "reward", "response_token_ids"]).to_pylist()
    modes = [r["mode"] or -1 for r in rows]
    lengths = [len(r["response_token_ids"]) for r in rows]
    groups = [r["group_id"] for r in rows]
    rewards = [r["reward"] for r in rows]
    advantages = (
        ampo_advantages(rewards, lengths, modes, groups) if estimator == "ampo" else grpo_advantages(rewards, groups)
    )
    buckets: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        buckets[(kind_of_state[row["state_id"]], row["policy_version"])].append(i)
    result: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (kind, version), idx in sorted(buckets.items()):
        n = len(idx)
        entry: dict[str, float] = {"version": version, "samples": n}
        well_formed = [i for i in idx if modes[i] > 0]
        for mode in MODES:
            chosen = [i for i in idx if modes[i] == mode]
            entry[f"mode{mode}"] = len(chosen) / n
            entry[f"adv{mode}"] = float(np.mean(advantages[chosen])) if chosen else 0.0
        entry["format_error"] = 1 - len(well_formed) / n
        entry["tokens"] = sum(lengths[i] for i in idx) / n
        entry["reward"] = float(np.mean([rewards[i] for i in well_formed])) if well_formed else 0.0
        # Groups are all n samples, so this group share weighs like the sample shares above.
        entry["mode_term"] = float(mode_term_groups([modes[i] for i in idx], [groups[i] for i in idx]).mean())
        result[kind].append(entry)
    return dict(result)


WINDOW_KEYS = ("mode1", "mode2", "mode3", "mode4", "format_error", "mode_term", "tokens", "reward")


def window(entries: list[dict[str, float]], first: bool, size: int) -> dict[str, float]:
    """Sample-weighted averages over the first or last ``size`` policy versions, plus the mean level of the
    well-formed samples (Σ_m m · share_m / Σ_m share_m)."""
    chosen = entries[:size] if first else entries[-size:]
    total = sum(e["samples"] for e in chosen)
    w = {k: sum(e[k] * e["samples"] for e in chosen) / total for k in WINDOW_KEYS}
    valid = sum(w[f"mode{m}"] for m in MODES)
    w["level"] = sum(m * w[f"mode{m}"] for m in MODES) / valid if valid else 0.0
    return w | {"samples": total}


# ---- statistics ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One pre-registered test: what is compared, the two samples (one per seed), and the result."""

    hypothesis: str
    claim: str
    a_label: str
    a: tuple[float, ...]
    b_label: str
    b: tuple[float, ...] | None
    """None for a one-sample test of ``a`` against 0."""
    alternative: str
    """"greater", "less" or "two-sided", for a − b (or a − 0)."""

    @property
    def difference(self) -> float:
        return float(np.mean(self.a) - (np.mean(self.b) if self.b is not None else 0.0))

    @property
    def effect_size(self) -> float:
        """Cohen's d: the difference over the pooled standard deviation (one sample: over its own)."""
        a = np.asarray(self.a)
        if self.b is None:
            sd = a.std(ddof=1)
        else:
            b = np.asarray(self.b)
            sd = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        return float(self.difference / sd) if sd > 0 else float("inf") * np.sign(self.difference)

    @property
    def p_value(self) -> float:
        """Welch's t-test (two samples) or a one-sample t-test against 0."""
        from scipy import stats

        if self.b is None:
            return float(stats.ttest_1samp(self.a, 0.0, alternative=self.alternative).pvalue)
        return float(stats.ttest_ind(self.a, self.b, equal_var=False, alternative=self.alternative).pvalue)


def final_values(runs: dict[tuple[str, str, int], Any], design: str, estimator: str, kind: str, key: str, size: int,
                 change: bool = False) -> tuple[float, ...]:
    """One value per seed: ``key`` over the last ``size`` versions (``change``: last window minus first window)."""
    out = []
    for (d, e, _seed), run in sorted(runs.items()):
        if d == design and e == estimator:
            entries = run["by_kind"][kind]
            value = window(entries, first=False, size=size)[key]
            out.append(value - window(entries, first=True, size=size)[key] if change else value)
    return tuple(out)


def hypothesis_tests(runs: dict[tuple[str, str, int], Any], size: int) -> list[Comparison]:
    """The pre-registered tests (docs/experiments.md), over whichever designs have runs."""
    designs = {d for d, _, _ in runs}
    out: list[Comparison] = []

    def v(design: str, estimator: str, kind: str, key: str, change: bool = False) -> tuple[float, ...]:
        return final_values(runs, design, estimator, kind, key, size, change)

    if "tie" in designs:
        out += [
            Comparison("H1", "level-1 share, last window: AMPO > GRPO", "ampo", v("tie", "ampo", "easy", "mode1"),
                 "grpo", v("tie", "grpo", "easy", "mode1"), "greater"),
            Comparison("H1", "response tokens, last window: AMPO < GRPO", "ampo", v("tie", "ampo", "easy", "tokens"),
                 "grpo", v("tie", "grpo", "easy", "tokens"), "less"),
            Comparison("H1", "AMPO's level-1 share rises (last − first window)", "ampo",
                 v("tie", "ampo", "easy", "mode1", change=True), "0", None, "greater"),
            Comparison("H1", "GRPO's level-1 share moves (last − first window; the claim is that it does not)", "grpo",
                 v("tie", "grpo", "easy", "mode1", change=True), "0", None, "two-sided"),
        ]
    if "mixed" in designs:
        gap = {e: tuple(h - e_ for h, e_ in zip(v("mixed", e, "hard", "level"), v("mixed", e, "easy", "level"), strict=True))
               for e in ESTIMATORS}
        out += [
            Comparison("H2", "AMPO's mean level, last window: hard − easy > 0", "ampo", gap["ampo"], "0", None, "greater"),
            Comparison("H2", "context gap (hard − easy mean level): AMPO > GRPO", "ampo", gap["ampo"], "grpo", gap["grpo"], "greater"),
            Comparison("H2", "GRPO's mean level rises on easy contexts (last − first)", "grpo",
                 v("mixed", "grpo", "easy", "level", change=True), "0", None, "greater"),
            Comparison("H2", "GRPO's mean level rises on hard contexts (last − first)", "grpo",
                 v("mixed", "grpo", "hard", "level", change=True), "0", None, "greater"),
            Comparison("H3", "response tokens over both contexts, last window: AMPO < GRPO", "ampo", _both(runs, "ampo", "tokens", size),
                 "grpo", _both(runs, "grpo", "tokens", size), "less"),
            Comparison("H3", "rule reward of well-formed samples, last window: AMPO − GRPO (equal?)", "ampo",
                 _both(runs, "ampo", "reward", size), "grpo", _both(runs, "grpo", "reward", size), "two-sided"),
        ]
    return out


def _both(runs: dict[tuple[str, str, int], Any], estimator: str, key: str, size: int) -> tuple[float, ...]:
    """Per seed, the mean of ``key`` over the easy and hard contexts of a mixed run (they have equal samples)."""
    easy, hard = (final_values(runs, "mixed", estimator, kind, key, size) for kind in KINDS)
    return tuple((x + y) / 2 for x, y in zip(easy, hard, strict=True))


def tests_table(results: list[Comparison]) -> str:
    lines = ["| hypothesis | test | a: mean ± sd | b: mean ± sd | difference | Cohen's d | p | n per arm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in results:
        b = "0" if t.b is None else f"{t.b_label} {np.mean(t.b):.3f} ± {np.std(t.b, ddof=1):.3f}"
        lines.append(f"| {t.hypothesis} | {t.claim} ({t.alternative}) | {t.a_label} {np.mean(t.a):.3f} ± {np.std(t.a, ddof=1):.3f} "
                     f"| {b} | {t.difference:+.3f} | {t.effect_size:+.2f} | {t.p_value:.2g} | {len(t.a)} |")
    return "\n".join(lines)


def advantage_table(runs: dict[tuple[str, str, int], Any]) -> str:
    """Markdown: the mean advantage each mode received, per design, estimator and context, over the whole run (the
    sample-weighted mean of the per-version means, then the mean over seeds). It shows which way the updates pushed
    each mode in each kind of context, and how hard."""
    lines = ["| design | estimator | context | level 1 | level 2 | level 3 | level 4 | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for design, kinds in DESIGNS.items():
        for estimator in ESTIMATORS:
            chosen = [run for (d, e, _), run in sorted(runs.items()) if d == design and e == estimator]
            for kind in kinds if chosen else ():
                cells = []
                for mode in MODES:
                    per_seed = []
                    for run in chosen:
                        entries = run["by_kind"][kind]
                        weight = [e[f"mode{mode}"] * e["samples"] for e in entries]
                        per_seed.append(sum(w * e[f"adv{mode}"] for w, e in zip(weight, entries, strict=True)) / max(sum(weight), 1e-12))
                    cells.append(f"{np.mean(per_seed):+.3f}")
                lines.append(f"| {design} | {estimator} | {kind} | " + " | ".join(cells) + f" | {len(chosen)} |")
    return "\n".join(lines)


def transfer_test(runs: dict[tuple[str, str, int], Any], size: int) -> list[Comparison]:
    """Exploratory, not pre-registered (the diagnosis): do hard contexts pull the easy ones along? AMPO's easy-context
    level-1 share and mean level in the last window, tie design (no hard contexts) against mixed design."""
    designs = {d for d, _, _ in runs}
    if not {"tie", "mixed"} <= designs:
        return []
    return [
        Comparison("transfer", "AMPO easy contexts, level-1 share, last window: tie design > mixed design", "tie",
                   final_values(runs, "tie", "ampo", "easy", "mode1", size), "mixed",
                   final_values(runs, "mixed", "ampo", "easy", "mode1", size), "greater"),
        Comparison("transfer", "AMPO easy contexts, mean level, last window: tie design < mixed design", "tie",
                   final_values(runs, "tie", "ampo", "easy", "level", size), "mixed",
                   final_values(runs, "mixed", "ampo", "easy", "level", size), "less"),
    ]


def windows_table(runs: dict[tuple[str, str, int], Any], size: int) -> str:
    """Markdown: per design, estimator and kind, the seed-mean of the first and last window."""
    lines = ["| design | estimator | context | window | level 1 | level 2 | level 3 | level 4 | mean level | format errors | groups with a mode term | response tokens | reward (well-formed) | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = ("mode1", "mode2", "mode3", "mode4", "level", "format_error", "mode_term", "tokens", "reward")
    for design, kinds in DESIGNS.items():
        for estimator in ESTIMATORS:
            chosen = [run for (d, e, _), run in sorted(runs.items()) if d == design and e == estimator]
            if not chosen:
                continue
            for kind in kinds:
                for first in (True, False):
                    ws = [window(run["by_kind"][kind], first, size) for run in chosen]
                    cells = [f"{np.mean([w[k] for w in ws]):.{0 if k == 'tokens' else 2}f}" for k in keys]
                    lines.append(f"| {design} | {estimator} | {kind} | {'first' if first else 'last'} {size} | " + " | ".join(cells) + f" | {len(ws)} |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------------


def _curves(runs: dict[tuple[str, str, int], Any], design: str, estimator: str, kind: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Versions, seed-mean and seed-sd of ``key`` (versions all seeds have)."""
    series = [run["by_kind"][kind] for (d, e, _), run in sorted(runs.items()) if d == design and e == estimator]
    length = min(len(s) for s in series)
    values = np.array([[entry["level"] if key == "level" else entry[key] for entry in s[:length]] for s in series])
    versions = np.array([e["version"] for e in series[0][:length]])
    return versions, values.mean(axis=0), values.std(axis=0)


def _with_level(runs: dict[tuple[str, str, int], Any]) -> dict[tuple[str, str, int], Any]:
    """Every per-version entry gets its mean level (as :func:`window` computes it for one version)."""
    for run in runs.values():
        for entries in run["by_kind"].values():
            for entry in entries:
                entry["level"] = window([entry], first=True, size=1)["level"]
    return runs


def plots(runs: dict[tuple[str, str, int], Any], docs: Path) -> list[Path]:
    """One figure per hypothesis with the runs it needs: seed-mean curves with a ±1 sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = {d for d, _, _ in runs}
    panels = {
        "h1": ("tie", [("easy", "mode1", "level-1 share"), ("easy", "tokens", "response tokens")]),
        "h2": ("mixed", [("easy", "level", "mean level, easy contexts"), ("hard", "level", "mean level, hard contexts")]),
        "h3": ("mixed", [("easy", "tokens", "response tokens, easy"), ("hard", "tokens", "response tokens, hard"),
                         ("easy", "reward", "reward (well-formed), easy"), ("hard", "reward", "reward (well-formed), hard")]),
    }
    written = []
    for name, (design, chosen) in panels.items():
        if design not in designs:
            continue
        fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 3.6), squeeze=False)
        for ax, (kind, key, label) in zip(axes[0], chosen, strict=True):
            for estimator, colour in zip(ESTIMATORS, ("C1", "C0"), strict=True):
                versions, mean, sd = _curves(runs, design, estimator, kind, key)
                ax.plot(versions, mean, colour, label=estimator.upper())
                ax.fill_between(versions, mean - sd, mean + sd, color=colour, alpha=0.2)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("policy version")
            ax.legend(fontsize=8)
        fig.suptitle(f"{name.upper()} ({design} design; mean ± sd over seeds)", fontsize=11)
        fig.tight_layout()
        path = docs / f"adaptive_modes_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ---- driver ---------------------------------------------------------------------------------------------------------


def run_key(path: Path) -> tuple[str, str, int]:
    design, estimator, seed = path.stem.split("-")
    return design, estimator, int(seed.removeprefix("seed"))


def load_runs(out: Path) -> dict[tuple[str, str, int], Any]:
    return _with_level({run_key(p): json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))})


def analyse(out: Path, docs: Path, size: int) -> str:
    """The report of every finished run: windows, tests and plots; written to ``out/report.md`` and returned."""
    runs = load_runs(out)
    results = hypothesis_tests(runs, size)
    figures = plots(runs, docs)
    exploratory = transfer_test(runs, size)
    report = "\n\n".join([
        f"Runs: {len(runs)} ({', '.join(sorted({f'{d}/{e}' for d, e, _ in runs}))}); windows of {size} policy versions.",
        windows_table(runs, size),
        "Pre-registered tests:",
        tests_table(results),
        "Mean advantage per mode over the whole run:",
        advantage_table(runs),
        *(["Exploratory (the diagnosis, not pre-registered):", tests_table(exploratory)] if exploratory else []),
        "Plots: " + ", ".join(str(p) for p in figures),
    ])
    (out / "report.md").write_text(report + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive_modes"), help="cloned model, run folders, results")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the plots go")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--window", type=int, default=10, help="policy versions in the first and last windows")
    parser.add_argument("--analyse-only", action="store_true", help="skip the runs; analyse what is in --out")
    args = parser.parse_args()
    out: Path = args.out
    if not args.analyse_only:
        train(out, args.designs, args.seeds, args.steps, args.lr)
    print(analyse(out, args.docs, args.window))


def train(out: Path, designs: Sequence[str], seeds: Sequence[int], steps: int, lr: float) -> None:
    """Clone once, then every (design, seed, estimator) run that has no result file yet."""
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "auto", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    import ray

    from cluster.config import load_config
    from cluster.driver import TrainingDriver

    (out / "runs").mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "TOKENIZERS_PARALLELISM")}})
    try:
        started = time.monotonic()
        bc_dir = clone(out)
        print(f"cloned policy ready in {time.monotonic() - started:.0f} s: {bc_dir}", flush=True)
        for design in designs:
            train_states = states(DESIGNS[design])
            kind_of_state = {s.state_id: s.agent1_goal.split(":", 1)[0] for s in train_states}
            for seed in seeds:
                for estimator in ESTIMATORS:
                    result_path = out / "runs" / f"{design}-{estimator}-seed{seed}.json"
                    if result_path.is_file():
                        continue
                    run_dir = out / "work" / result_path.stem
                    shutil.rmtree(run_dir, ignore_errors=True)  # the summary reads every rollout file in it
                    config = load_config("configs/tiny.yaml", overrides(run_dir, bc_dir, estimator, seed, steps, lr))
                    t0 = time.monotonic()
                    summary = TrainingDriver(config, train_states, bc_dir).run()
                    result = {"design": design, "estimator": estimator, "seed": seed, "steps": summary["steps"], "lr": lr,
                              "seconds": round(time.monotonic() - t0, 1), "by_kind": summarise(run_dir, kind_of_state, estimator)}
                    result_path.write_text(json.dumps(result, indent=1))
                    print(f"{result_path.stem}: {summary['steps']} steps in {result['seconds']} s", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
