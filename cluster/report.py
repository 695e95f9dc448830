"""The report stage (`ampo report`): the evaluation tables of results files (7 dimensions, modes, the Table 1
layout, the benchmark coverage) and what a training run shows: plots read from `<run_dir>/metrics.jsonl` (one JSON
object per learner step, with the keys documented in docs/metrics.md), written as PNG files with matplotlib, and a
first-against-last comparison of the run's samples (`<run_dir>/rollouts/*.parquet`) with its significance tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.evaluation import headline, summarise_results
from reward.evaluator import ResultsSummary, RunMode, load_results, render_summary, run_mode_of, table1_markdown


MODES = (1, 2, 3, 4)


def read_step_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a run; a truncated last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        if record.get(key) is not None:
            steps.append(record["step"])
            values.append(float(record[key]))
    return steps, values


def plot_training(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one PNG per panel (reward, format errors, mode mix, tokens per mode, KL, entropy, eval GOAL)
    and return their paths; panels with no data are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("reward.png", "Mean reward", [("reward_mean", "reward")]),
        ("format_error_ratio.png", "Format-error ratio", [("format_error_ratio", "format errors")]),
        ("mode_mix.png", "Mode mix (fraction of samples)", [(f"mode_fraction/{m}", f"mode {m}") for m in MODES]),
        ("tokens_per_mode.png", "Mean response tokens per mode", [(f"mode_tokens/{m}", f"mode {m}") for m in MODES]),
        ("kl.png", "KL to reference", [("kl", "k3 KL")]),
        ("entropy.png", "Entropy", [("entropy", "entropy")]),
        ("eval_goal.png", "Evaluation GOAL", [("eval/goal_actor", "actor"), ("eval/goal_avg", "average")]),
    ]
    written = []
    for filename, title, lines in panels:
        data = [(label, *_series(records, key)) for key, label in lines]
        if not any(steps for _, steps, _ in data):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, steps, values in data:
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


@dataclass(frozen=True)
class WindowComparison:
    """One outcome in the first and the last window of policy versions, with a one-sided test of improvement."""

    name: str
    first: tuple[float, float, int]
    """(mean, standard deviation, samples) in the first window."""
    last: tuple[float, float, int]
    test: str
    p_value: float

    @property
    def change(self) -> float:
        return self.last[0] - self.first[0]

    def line(self) -> str:
        (m0, s0, n0), (m1, s1, n1) = self.first, self.last
        return (f"| {self.name} | {m0:.3f} ± {s0:.3f} (n={n0}) | {m1:.3f} ± {s1:.3f} (n={n1}) | {self.change:+.3f} "
                f"| {self.test} | {self.p_value:.2g} |")


@dataclass(frozen=True)
class LearningComparison:
    """Did the policy get better? Samples of the first ``window`` policy versions against the last ``window``."""

    versions: tuple[int, ...]
    window: int
    outcomes: tuple[WindowComparison, ...]

    def markdown(self) -> str:
        head = (f"First {self.window} against last {self.window} of {len(self.versions)} policy versions (each sample counted "
                "under the version that generated it; one-sided tests of improvement):")
        rows = ["| outcome | first window | last window | change | test | p |", "| --- | --- | --- | --- | --- | --- |"]
        return "\n".join([head, "", *rows, *(o.line() for o in self.outcomes)])

    def as_dict(self) -> dict[str, Any]:
        return {"versions": len(self.versions), "window": self.window, **{
            o.name: {"first": o.first[0], "last": o.last[0], "change": o.change, "p": o.p_value, "test": o.test}
            for o in self.outcomes}}


def compare_first_last(rollouts_dir: Path, window: int | None = None) -> LearningComparison | None:
    """First against last policy versions of a run's rollout files (``<run_dir>/rollouts/*.parquet``).

    ``window`` defaults to a third of the versions (at least 1). Outcomes and tests:

    - format-error share (lower is better): Fisher's exact test on the 2×2 table (window × well-formed or not);
    - mean reward of the scored samples, format errors included as −2 (higher is better): Welch's t-test;
    - mean reward of the well-formed samples, the judge's part alone (higher is better): Welch's t-test.

    None when there are fewer than two policy versions, so nothing to compare.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy import stats

    files = sorted(Path(rollouts_dir).glob("*.parquet"))
    if not files:
        return None
    table = pa.concat_tables([pq.read_table(p, columns=["policy_version", "format_valid", "reward"]) for p in files])
    rows = table.to_pylist()
    versions = tuple(sorted({r["policy_version"] for r in rows}))
    if len(versions) < 2:
        return None
    k = window or max(1, len(versions) // 3)
    k = min(k, len(versions) // 2)  # the two windows never share a version
    first_v, last_v = set(versions[:k]), set(versions[-k:])
    first = [r for r in rows if r["policy_version"] in first_v]
    last = [r for r in rows if r["policy_version"] in last_v]

    def summary(values: list[float]) -> tuple[float, float, int]:
        return (float(np.mean(values)) if values else float("nan"), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                len(values))

    def welch(name: str, a: list[float], b: list[float]) -> WindowComparison:
        p = float(stats.ttest_ind(b, a, equal_var=False, alternative="greater").pvalue) if len(a) > 1 and len(b) > 1 else float("nan")
        return WindowComparison(name, summary(a), summary(b), "Welch t", p)

    errors = [[sum(not r["format_valid"] for r in w), sum(bool(r["format_valid"]) for r in w)] for w in (first, last)]
    fisher = float(stats.fisher_exact([errors[1], errors[0]], alternative="less").pvalue)
    error_share = WindowComparison(
        "format-error share", summary([float(not r["format_valid"]) for r in first]),
        summary([float(not r["format_valid"]) for r in last]), "Fisher exact", fisher,
    )
    scored = [[r["reward"] for r in w if r["reward"] is not None] for w in (first, last)]
    judged = [[r["reward"] for r in w if r["reward"] is not None and r["format_valid"]] for w in (first, last)]
    return LearningComparison(versions, k, (
        error_share, welch("reward (format errors as −2)", *scored), welch("reward of well-formed samples", *judged),
    ))


# ---- the report command --------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    """Files `report` wrote and the summary of each results file."""

    out_dir: Path
    markdown: Path
    text: Path
    plots: list[Path]
    summaries: dict[str, ResultsSummary]


SOTOPIA_EPISODES, SOTOPIA_HARD = 450, 70


def benchmark_coverage(records: Sequence[Mapping[str, Any]]) -> str:
    """Which share of the Sotopia benchmark a results file covers, so that a partial one is never read as Table 1."""
    episodes = {r.get("env_id") for r in records}
    hard = {r.get("env_id") for r in records if r.get("hard")}
    if len(episodes) == SOTOPIA_EPISODES and len(hard) == SOTOPIA_HARD:
        return f"Episodes: the full Sotopia benchmark ({SOTOPIA_EPISODES} episodes, {SOTOPIA_HARD} hard)."
    return (f"Episodes: {len(episodes)} ({len(hard)} hard), not the full Sotopia benchmark of {SOTOPIA_EPISODES} "
            f"({SOTOPIA_HARD} hard): these figures are not comparable with the paper's Table 1.")


def report(
    results: Sequence[str | Path] = (),
    *,
    run_dir: str | Path | None = None,
    out_dir: str | Path,
) -> ReportResult:
    """Write `report.md` and `report.txt` to `out_dir`: for each results file (our JSONL or the authors' JSON list)
    the result tables (actor / opponent / average per dimension and overall, all and hard, plus mode usage);
    and, when `run_dir` holds a `metrics.jsonl`, PNG plots of the run (reward, format errors, mode mix, tokens per
    mode, KL, entropy, evaluation GOAL over steps) listed in the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, ResultsSummary] = {}
    markdown: list[str] = ["# AMPO report", ""]
    text: list[str] = ["AMPO report", ""]
    runs: list[tuple[RunMode, ResultsSummary]] = []
    for path in map(Path, results):
        records = load_results(path)
        summary = summarise_results(records)
        summaries[str(path)] = summary
        runs.append((run_mode_of(records), summary))
        coverage = benchmark_coverage(records)
        markdown += [f"## {path.name}", "", f"`{path}`", "", headline(summary), "", coverage, "", render_summary(summary, "markdown")]
        text += [f"== {path} ==", headline(summary), coverage, "", render_summary(summary, "text")]
    if runs:
        layout = table1_markdown(runs)
        note = ("The paper's Table 1 layout over these results files (several files of one protocol: mean ± std "
                "between them; self-play reads the two agents' average, vs partner the model's side).")
        markdown += ["## Table 1 layout", "", note, "", layout, ""]
        text += ["== Table 1 layout ==", note, layout, ""]
    plots: list[Path] = []
    metrics_file = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if metrics_file is not None and metrics_file.is_file():
        plots = plot_training(read_step_metrics(metrics_file), out)
        markdown += ["## Training run", "", f"`{metrics_file}`", ""]
        text += [f"== training run {metrics_file} =="]
        learning = compare_first_last(Path(run_dir) / "rollouts")
        if learning is not None:
            markdown += ["### Did the policy improve?", "", learning.markdown(), ""]
            text += [learning.markdown(), ""]
        markdown += [f"![{p.stem}]({p.name})" for p in plots] + [""]
        text += [*(f"plot: {p}" for p in plots), ""]
    if not summaries and not plots:
        raise ValueError("nothing to report: give results files, or a run directory with metrics.jsonl")
    md_path, text_path = out / "report.md", out / "report.txt"
    md_path.write_text("\n".join(markdown))
    text_path.write_text("\n".join(text))
    return ReportResult(out, md_path, text_path, plots, summaries)
