"""The science guard: AMPO's mode-level term must do what the paper says it does, through the whole pipeline.

The test makes a total tie: every response earns 1, a broken format included (``reward.format_error_reward=1``,
where the paper has −2). GRPO's sample-level advantages are then exactly 0 in every group, so GRPO cannot move the
mode mix at all: it is the negative control. AMPO can move it only through its mode term, whose length branch
gives shorter modes ``tanh(−(l̄_k − μ_l)/σ_l) > 0`` in groups without a format error. (With the paper's −2, GRPO
moves too, because format errors fall mostly on the long modes: docs/experiments.md, and a guard built that way
failed in one seed out of four.) The test clones the adaptive-mode experiment's small policy on all four modes
(``experiments/adaptive_modes.py``), then trains it on tie contexts twice through the real pipeline (vLLM rollouts,
reward pool, queue, FSDP2 learner, weight push): once with AMPO for 24 steps, once with GRPO for 16, same seed (GRPO's
policy cannot leave its start, so two windows of 8 steps show all it does).

It fails unless
- AMPO's level-1 share over the last 8 steps is above GRPO's over the same steps (Welch t-test on the per-step
  shares, p < 0.01): the comparison only the mode term can win;
- AMPO's level-1 share over the last 8 steps is above its first 8 steps' (Welch, p < 0.05);
- GRPO's share stays where it was (the means of its first and last 8 steps within 0.1): with no gradient, only
  sampling noise moves it.

In the run that introduced the test: AMPO 0.303 -> 0.449 (rise p = 0.003), GRPO 0.256 -> 0.266, AMPO against GRPO
p = 5.6e-6.

Deleting the mode term leaves AMPO without any gradient, like GRPO, and flipping its sign pushes AMPO towards the
long modes: both fail (see the closing note of the session that added this test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from cluster.config import load_config
from cluster.driver import TrainingDriver
from experiments.adaptive_modes import clone, overrides, states

pytestmark = pytest.mark.slow

STEPS = 24
WINDOW = 8
LR = 1e-4
CONTROL_STEPS = 2 * WINDOW
"""GRPO's run is shorter: with every advantage exactly 0 (and no entropy bonus) its policy never leaves the reference,
so its level-1 share is the same sampling noise at every step, and its first and last windows need not be further
apart than AMPO's to compare."""


def level1_shares(estimator: str, bc_dir: Path, run_dir: Path, tiny_config_path: Path, steps: int) -> np.ndarray:
    records: list[dict[str, Any]] = []
    config = load_config(
        tiny_config_path, [*overrides(run_dir, bc_dir, estimator, seed=1, steps=steps, lr=LR), "reward.format_error_reward=1.0"]
    )
    summary = TrainingDriver(config, states(("easy",)), bc_dir, on_step=records.append).run()
    assert summary["steps"] == steps
    return np.array([r["mode_fraction/1"] for r in records])


def test_ampo_mode_term_shortens_modes_where_grpo_has_no_signal(ray_local, tiny_config_path: Path, tmp_path: Path) -> None:
    bc_dir = clone(tmp_path)
    ampo = level1_shares("ampo", bc_dir, tmp_path / "ampo", tiny_config_path, STEPS)
    grpo = level1_shares("grpo", bc_dir, tmp_path / "grpo", tiny_config_path, CONTROL_STEPS)
    rise = stats.ttest_ind(ampo[-WINDOW:], ampo[:WINDOW], equal_var=False, alternative="greater")
    versus = stats.ttest_ind(ampo[-WINDOW:], grpo[-WINDOW:], equal_var=False, alternative="greater")
    print(
        f"\nmode-term guard: level-1 share AMPO {ampo[:WINDOW].mean():.3f} -> {ampo[-WINDOW:].mean():.3f} "
        f"(p = {rise.pvalue:.2g}); GRPO {grpo[:WINDOW].mean():.3f} -> {grpo[-WINDOW:].mean():.3f}; "
        f"last {WINDOW} steps AMPO vs GRPO p = {versus.pvalue:.2g}"
    )
    assert versus.pvalue < 0.01, (ampo.round(2).tolist(), grpo.round(2).tolist())
    assert rise.pvalue < 0.05, ampo.round(2).tolist()
    assert abs(grpo[-WINDOW:].mean() - grpo[:WINDOW].mean()) < 0.1, grpo.round(2).tolist()
