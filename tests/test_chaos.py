"""The chaos script at CI size: one fault of every kind (rollout actor, reward actor, learner rank, judge server,
training driver) under a seeded schedule, every one recovered, and over the run that finishes no group lost and none
trained twice; the driver killed in the middle of a checkpoint write resumes from the checkpoint before (`bench/chaos.py
--quick`; the 30-minute soak is in docs/reliability.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
KINDS = ("rollout", "reward", "learner", "judge", "driver")


@pytest.mark.timeout(1200)
def test_one_fault_of_every_kind_loses_no_group_and_trains_none_twice(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "bench/chaos.py", "--quick", "--seed", "0", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=1100,
    )
    output = result.stdout
    print("\n".join(line for line in output.splitlines() if "cloning:" not in line))
    assert result.returncode == 0, output[-4000:] + result.stderr[-3000:]
    faults = output[output.index("| fault |"):output.index("\n\n", output.index("| fault |"))]
    table = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\| (\w+) \| (\d+) \| (\d+) \|", faults, re.M)}
    for kind in KINDS:
        injected, recovered = table[kind]
        assert injected == 1 and recovered == 1, (kind, injected, recovered)
    assert "RESULT chaos_groups_lost=0" in output and "RESULT chaos_groups_trained_twice=0" in output
    assert "RESULT chaos_unrecovered_faults=0" in output
    assert "0 driver exit(s) not caused by a fault" in output and "actors left after the last driver: none" in output
    assert "every resume after a kill in a checkpoint write took the checkpoint before: True" in output
    assert re.search(r"driver\s+killed \(driver pid \d+, writing step_\d+\)", output), "the driver kill missed a checkpoint write"
