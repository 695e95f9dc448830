"""Plots of a training run, read from `<run_dir>/metrics.jsonl` (one JSON object per learner step, with
the keys documented in docs/metrics.md), written as PNG files with matplotlib."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
