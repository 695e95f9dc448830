"""The science guard: AMPO's mode-level term must do what the paper says it does, through the whole pipeline.

The test makes a total tie: every response earns 1, a broken format included (``reward.format_error_reward=1``,
where the paper has −2). GRPO's sample-level advantages are then exactly 0 in every group, so GRPO cannot move the
mode mix at all: it is the negative control. AMPO can move it only through its mode term, whose length branch
gives shorter modes ``tanh(−(l̄_k − μ_l)/σ_l) > 0`` in groups without a format error. (With the paper's −2, GRPO
moves too, because format errors fall mostly on the long modes: docs/experiments.md, and a guard built that way
failed in one seed out of four.) The test clones the adaptive-mode experiment's small policy on all four modes
(``experiments/adaptive_modes.py``), then trains it on tie contexts twice through the real pipeline (vLLM rollouts,
reward pool, queue, FSDP2 learner, weight push): once with AMPO, once with GRPO, 12 steps each, same seed.

It fails unless, counting the level-1 share among the well-formed samples (a format error has no mode; in this tie
nothing penalises it) of steps 1–4 ("first") and 9–12 ("last"), pooled per window:
- AMPO's last share is above GRPO's last share (one-sided Fisher exact test, p < 0.001): the comparison only the
  mode term can win;
- AMPO's last share is above its first (one-sided Fisher, p < 0.001);
- GRPO's last share is not different from its first (two-sided Fisher, p > 0.001): with no policy gradient, its
  policy stays the cloned one (but for the drift of weight decay, a KL to the clone under 1e-5 after 12 steps), so only
  sampling noise separates the windows.

Under the null hypothesis (no mode term) both runs sample the same fixed policy, so the samples of a window are
independent draws and Fisher's test is exact.

Why 12 steps: the mode term switches itself off as the policy concentrates (a group needs every mode twice and no
format error). From then on AMPO's policy gradient is exactly 0, but AdamW's momentum keeps pushing the weights the
way the last steps did for about ten steps, and since the length term also unlearns the long modes' section headers
and this tie does not penalise format errors, the format breaks: on a 2-core Intel Xeon with AMX the share of format
errors rose from 2-9 % to 78-100 % between steps 10 and 18 in each of 3 seeds, and did so with ``algorithm.kl_coef=0``
and with synchronous rollouts too, but not with AdamW's β₁ = 0 (docs/experiments.md, §3 point 5). A 24-step guard
measured that collapse, not the mode term, and failed on that machine. This design was written down before it ran on
three new seeds, and passed on each: AMPO 0.26-0.29 -> 0.47-0.55 (p <= 7e-7), against GRPO p <= 4e-8, GRPO's
windows p = 0.13-0.69. On this test's seed: AMPO 0.257 -> 0.571 (p = 2e-11), against GRPO p = 1e-11, GRPO 0.250 -> 0.253.

Deleting the mode term leaves AMPO without any gradient, like GRPO (AMPO 0.228 -> 0.276, p = 0.13), and flipping its
sign pushes AMPO towards the long modes (0.226 -> 0.129): both fail.
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
from learner.ampo import MODES

pytestmark = pytest.mark.slow

STEPS = 12
FIRST, LAST = slice(0, 4), slice(8, 12)
"""Steps 1-4 and 9-12: the mode term acts for about the first ten steps of this setup (see above)."""
LR = 1e-4


def level1_counts(estimator: str, bc_dir: Path, run_dir: Path, tiny_config_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per step: level-1 samples and well-formed samples."""
    records: list[dict[str, Any]] = []
    config = load_config(
        tiny_config_path, [*overrides(run_dir, bc_dir, estimator, seed=1, steps=STEPS, lr=LR), "reward.format_error_reward=1.0"]
    )
    summary = TrainingDriver(config, states(("easy",)), bc_dir, on_step=records.append).run()
    assert summary["steps"] == STEPS
    level1 = np.array([r["mode_count/1"] for r in records])
    formed = np.array([sum(r[f"mode_count/{m}"] for m in MODES) for r in records])
    return level1, formed


def fisher(a: tuple[int, int], b: tuple[int, int], alternative: str) -> float:
    """Fisher's exact test of two shares given as (hits, total)."""
    return stats.fisher_exact([[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]], alternative=alternative).pvalue


def window(counts: tuple[np.ndarray, np.ndarray], steps: slice) -> tuple[int, int]:
    return int(counts[0][steps].sum()), int(counts[1][steps].sum())


def test_ampo_mode_term_shortens_modes_where_grpo_has_no_signal(ray_local, tiny_config_path: Path, tmp_path: Path) -> None:
    bc_dir = clone(tmp_path)
    ampo = level1_counts("ampo", bc_dir, tmp_path / "ampo", tiny_config_path)
    grpo = level1_counts("grpo", bc_dir, tmp_path / "grpo", tiny_config_path)
    windows = {name: (window(c, FIRST), window(c, LAST)) for name, c in (("ampo", ampo), ("grpo", grpo))}
    share = {name: [hits / max(total, 1) for hits, total in pair] for name, pair in windows.items()}
    versus = fisher(windows["ampo"][1], windows["grpo"][1], "greater")
    rise = fisher(windows["ampo"][1], windows["ampo"][0], "greater")
    still = fisher(windows["grpo"][1], windows["grpo"][0], "two-sided")
    print(
        f"\nmode-term guard: level-1 share of well-formed samples AMPO {share['ampo'][0]:.3f} -> {share['ampo'][1]:.3f} "
        f"(p = {rise:.2g}); GRPO {share['grpo'][0]:.3f} -> {share['grpo'][1]:.3f} (p = {still:.2g}); "
        f"steps 9-12 AMPO vs GRPO p = {versus:.2g}"
    )
    per_step = {name: (c[0] / np.maximum(c[1], 1)).round(2).tolist() for name, c in (("ampo", ampo), ("grpo", grpo))}
    assert versus < 1e-3, per_step
    assert rise < 1e-3, per_step
    assert still > 1e-3, per_step
