"""What the in-flight weight update buys: the training driver with `rollout.weight_update: in_flight` against `drain`.

Same work, same seed, side by side in one run: the tiny Llama of `bench/pipeline.py`, cloned on a fixed level-1
response so that its samples reach the judge (the fault-injecting HTTP server, no faults, a fixed latency per call),
`max_staleness: 3`, the same states and sizes. The only difference between the two driver runs is what a rollout
engine does when a new policy version arrives:

* ``in_flight``: loads it at once; requests being generated pause for the load and continue with the new weights.
* ``drain``: stops admitting requests, lets those in flight finish under the old weights, then loads (what trainers
  without in-flight updates do); the engine idles meanwhile and new groups wait.

Printed per mode: steady-state samples/s (steps 2..N, as in `bench/pipeline.py`), the learner's idle share (time not
spent in a step: waiting for data or a push, from the driver's `idle/learner`) and the mean staleness of the consumed
groups (consumption lag in policy versions). The RESULT is the throughput ratio in_flight ÷ drain (goal ≥ 1.0: the
in-flight update must not cost throughput); the idle and staleness ratios are printed next to it. The tiny model's
responses are short (about 30 tokens), so a drain waits little here; responses of the paper's length (hundreds of
tokens, several pushes per response at high throughput) widen the gap.

Run from the repository root: ``.venv/bin/python bench/inflight_update.py [--quick]``; the last line is
``RESULT inflight_update_speedup=<v>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import Sizes, cloned_policy, driver_config, run_driver  # noqa: E402

JUDGE_LATENCY_S = 0.3
MODES = ("in_flight", "drain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer learner steps (noisier ratios)")
    parser.add_argument("--steps", type=int, default=None, help="learner steps per run (default 12, quick 6)")
    parser.add_argument("--groups-per-step", type=int, default=4, help="groups per learner step")
    parser.add_argument("--staleness", type=int, default=3, help="max_staleness of both runs")
    args = parser.parse_args()
    sizes = Sizes(steps=args.steps or (6 if args.quick else 12), groups_per_step=args.groups_per_step,
                  staleness=args.staleness, pin_learner=True)

    import ray

    from cluster.ray_cluster import connect
    from testing.fault_server import FaultConfig, FaultServer

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ampo-bench-inflight-"))
    model_dir, states, _, response, bc = cloned_policy(tmp)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cpus, load average at start {load[0]:.1f}")
    print(f"policy: tiny Llama cloned on a {len(response)}-token response in {bc['bc_steps']} steps; work per run: "
          f"{sizes.steps} steps x {sizes.groups_per_step} groups x 4 samples, max_staleness {sizes.staleness}, "
          f"judge latency {JUDGE_LATENCY_S} s")

    connect(driver_config(model_dir, tmp / "config-only", sizes.staleness, sizes))
    runs = {}
    with contextlib.ExitStack() as stack:
        stack.callback(ray.shutdown)
        server = stack.enter_context(FaultServer(FaultConfig(latency_s=JUDGE_LATENCY_S)))
        for mode in MODES:
            runs[mode] = run_driver(model_dir, states, sizes, sizes.staleness, server.base_url, tmp / f"run-{mode}",
                                    extra=[f"rollout.weight_update={mode}"])
            r = runs[mode]
            print(f"weight_update={mode:9s}: {r['rate_steady']:.2f} samples/s steady ({r['steady_seconds']:.1f} s for steps "
                  f"2-{sizes.steps}), learner idle {r['learner_idle']:.0%}, staleness {r['staleness']:.2f} versions, "
                  f"unscored {r['unscored_ratio']:.0%}")
    speedup = runs["in_flight"]["rate_steady"] / runs["drain"]["rate_steady"]
    idle = runs["drain"]["learner_idle"] / max(runs["in_flight"]["learner_idle"], 1e-9)
    staleness = runs["in_flight"]["staleness"] / max(runs["drain"]["staleness"], 1e-9)
    print(f"in_flight / drain: throughput {speedup:.3f}; learner idle drain / in_flight {idle:.3f}; "
          f"staleness in_flight / drain {staleness:.3f}; bench took {time.perf_counter() - started:.0f} s")
    print(f"RESULT inflight_update_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
