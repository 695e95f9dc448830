"""Throughput of the advantage estimators on one large batch.

100k samples in 6250 groups of 16, shuffled so groups interleave, uuid-string group ids (what the trainer uses),
random modes with about 2% invalid samples and some tied groups. Prints samples/s for both estimators and ends with
``RESULT ampo_advantages_seconds_per_100k=<best seconds>`` (lower is better).

Run from the repository root: ``.venv/bin/python bench/advantages.py``.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Run as a script, the bench directory rather than the repository root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learner.ampo import ampo_advantages, grpo_advantages  # noqa: E402

N_GROUPS = 6250
GROUP_SIZE = 16
REPEATS = 7
INVALID_FRACTION = 0.02
TIED_GROUP_FRACTION = 0.1


def make_batch(seed: int = 0) -> dict[str, np.ndarray | list[str]]:
    rng = np.random.default_rng(seed)
    n = N_GROUPS * GROUP_SIZE
    group = np.repeat(np.arange(N_GROUPS), GROUP_SIZE)
    rewards = rng.random(n)
    # Tied groups share one reward, so their mode means tie and the length branch runs.
    tied = rng.random(N_GROUPS) < TIED_GROUP_FRACTION
    rewards[tied[group]] = 0.5
    modes = rng.integers(1, 5, n).astype(float)
    invalid = rng.random(n) < INVALID_FRACTION
    modes[invalid] = -1.0
    rewards[invalid] = -2.0
    lengths = np.where(invalid, -1.0, rng.integers(20, 2048, n).astype(float))
    names = [str(uuid.UUID(int=int(rng.integers(2**63)))) for _ in range(N_GROUPS)]
    perm = rng.permutation(n)
    return {
        "rewards": rewards[perm],
        "lengths": lengths[perm],
        "modes": modes[perm],
        "group_ids": [names[g] for g in group[perm]],
    }


def best_seconds(fn: Callable[[], np.ndarray], repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    batch = make_batch()
    n = len(batch["rewards"])
    ampo = best_seconds(lambda: ampo_advantages(**batch))
    grpo = best_seconds(lambda: grpo_advantages(batch["rewards"], batch["group_ids"]))
    print(f"samples={n} groups={N_GROUPS} group_size={GROUP_SIZE} repeats={REPEATS} (best of)")
    print(f"grpo_advantages: {grpo * 1e3:.2f} ms  {n / grpo:,.0f} samples/s")
    print(f"ampo_advantages: {ampo * 1e3:.2f} ms  {n / ampo:,.0f} samples/s")
    print(f"RESULT ampo_advantages_seconds_per_100k={ampo * 100_000 / n:.6f}")


if __name__ == "__main__":
    main()
