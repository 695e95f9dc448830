"""Ray's control-plane memory against the number of task attempts, with Ray's default task history and with ours.

The 30-minute soak (docs/reliability.md, Chaos and soak) saw the GCS server grow steadily while every role of ours
stayed flat. The hypothesis: the GCS keeps a record of every task attempt (each actor method call is one) for the
dashboard's task table, up to `task_events_max_num_task_in_gcs` (Ray's default: 100,000), so it grows with the calls
a run makes until that cap and then levels off; `cluster.ray_task_history` lowers the cap for local runs.

This script starts a private local Ray twice, once with Ray's default cap and once with ours, makes `--calls` trivial
actor calls in each, and samples the GCS server's resident memory every 10,000 calls. It prints the memory each
record costs and, per cap, the growth over the second half of the calls (after ours is reached): ~1 when the history
is capped, well above 1 while it is not.

    RESULT gcs_kib_per_task=<KiB of GCS memory per task attempt kept, default cap, first 10,000 calls>
    RESULT gcs_growth_default=<GCS RSS at the end / at half-way, Ray's default cap>
    RESULT gcs_growth_capped=<the same with cluster.ray_task_history>

Run: ``.venv/bin/python bench/ray_task_history.py [--calls 40000]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.config import ClusterConfig  # noqa: E402

SAMPLE_EVERY = 10_000


def gcs_rss_mib() -> float:
    import psutil

    total = 0
    for process in psutil.process_iter(["cmdline"]):
        if any("gcs_server" in part for part in process.info["cmdline"] or ()):
            total += process.memory_info().rss
    return total / 2**20


def measure(cap: int | None, calls: int) -> list[tuple[int, float]]:
    """(calls made, GCS RSS MiB) every SAMPLE_EVERY calls, in a Ray started with this task-history cap (None:
    Ray's default)."""
    import ray

    system = {} if cap is None else {"task_events_max_num_task_in_gcs": cap}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=system)
    try:
        @ray.remote(num_cpus=0)
        class Echo:
            def call(self, x: int) -> int:
                return x

        echo = Echo.remote()
        ray.get(echo.call.remote(0))
        time.sleep(3)
        samples = [(0, gcs_rss_mib())]
        for made in range(1000, calls + 1, 1000):
            ray.get([echo.call.remote(i) for i in range(1000)])
            if made % SAMPLE_EVERY == 0:
                time.sleep(2)  # workers report task events to the GCS every second
                samples.append((made, gcs_rss_mib()))
        return samples
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=40_000, help="actor calls per Ray instance (a multiple of 20,000)")
    parser.add_argument("--cap", type=int, help="only measure this cap (0: Ray's default) and print its samples (a child run)")
    args = parser.parse_args()
    if args.calls < 2 * SAMPLE_EVERY or args.calls % (2 * SAMPLE_EVERY):
        parser.error(f"--calls must be a positive multiple of {2 * SAMPLE_EVERY:,} (samples at the half-way point and the end)")
    if args.cap is not None:
        for made, mib in measure(args.cap or None, args.calls):
            print(f"SAMPLE {made} {mib:.1f}", flush=True)
        return 0

    ours = ClusterConfig.model_fields["ray_task_history"].default
    curves = {}
    for name, cap in (("default", 0), ("capped", ours)):
        # One process per Ray instance: a second ray.init in one process inherits the first one's leftovers.
        out = subprocess.run([sys.executable, __file__, "--cap", str(cap), "--calls", str(args.calls)],
                             capture_output=True, text=True, check=True).stdout
        curves[name] = [(int(a), float(b)) for _, a, b in (line.split() for line in out.splitlines() if line.startswith("SAMPLE"))]
    print(f"| calls | GCS MiB, Ray's default cap (100,000) | GCS MiB, cap {ours:,} |")
    print("| --- | --- | --- |")
    for (made, default), (_, capped) in zip(curves["default"], curves["capped"], strict=True):
        print(f"| {made:,} | {default:.0f} | {capped:.0f} |")
    default = dict(curves["default"])
    capped = dict(curves["capped"])
    half = args.calls // 2
    per_task = (default[SAMPLE_EVERY] - default[0]) * 1024 / SAMPLE_EVERY
    print(f"RESULT gcs_kib_per_task={per_task:.2f}")
    print(f"RESULT gcs_growth_default={default[args.calls] / default[half]:.2f}")
    print(f"RESULT gcs_growth_capped={capped[args.calls] / capped[half]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
