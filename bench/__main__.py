"""The benchmark suite: ``python -m bench`` runs every ``bench/*.py`` script and prints one table of its ratios.

Each script runs as its own subprocess (``<this python> bench/<name>.py``), so one crashing or hanging bench (a vLLM
engine, a Ray cluster) cannot take the others down, and each starts from a clean process; a per-script timeout kills
its whole process group. Every ``RESULT name=value`` line a script prints becomes one row (a script may print
several), judged against the goal set by the issue that introduced it. A script in ``bench/`` without a known goal
still runs and is listed, passing when it printed a RESULT.

The table is printed as Markdown together with the machine it ran on (CPU model, cores, RAM, load average at start
and end, date), because every ratio here is measured side by side inside one script and only means something next
to the load it ran under. ``--write docs/performance.md`` puts the same block into that file, between the markers
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` when the file has them (so the hand-written reading around the
table survives a re-run), or as the whole file otherwise. The last line is ``RESULT bench_suite_passed=<k>/<n>``
(rows passed / rows expected: a script that fails or times out counts each RESULT it owed as failed).

Run from the repository root: ``.venv/bin/python -m bench [--only pipeline,judge_pool] [--quick] [--write PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from actors.precision import cpu_vector_units

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULT_LINE = re.compile(r"^RESULT (\w+)=(\S+)\s*$")
BEGIN_MARK, END_MARK = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Goal:
    """A target for one RESULT: ``value >= target`` (``at_least``) or ``value <= target``."""

    target: float
    at_least: bool

    def met(self, value: float) -> bool:
        return value >= self.target if self.at_least else value <= self.target

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.target:g}"


@dataclass(frozen=True)
class Bench:
    """One script: its goals per RESULT name, its time limit, and the extra arguments of ``--quick``."""

    goals: dict[str, Goal]
    timeout_s: float = 900.0
    quick_args: tuple[str, ...] = ()


# Goals as the issues set them (advantages: "well under a second" per 100k samples).
BENCHES: dict[str, Bench] = {
    "advantages": Bench({"ampo_advantages_seconds_per_100k": Goal(1.0, at_least=False)}, timeout_s=300),
    "rollout_overhead": Bench({"rollout_overhead_ratio": Goal(0.95, at_least=True)}),
    "judge_pool": Bench({"judge_pool_efficiency": Goal(0.90, at_least=True)}, timeout_s=300),
    "learner_step": Bench({"learner_step_ratio": Goal(0.85, at_least=True)}, timeout_s=600),
    "weight_push": Bench({"weight_push_ratio": Goal(3.0, at_least=False)}),
    "cpu_dtype": Bench(
        {"cpu_dtype_auto_speedup_native": Goal(1.0, at_least=True), "cpu_dtype_auto_speedup_avx2": Goal(1.0, at_least=True)},
        timeout_s=300,
    ),
    "pipeline": Bench(
        {"pipeline_efficiency": Goal(0.90, at_least=True), "async_speedup": Goal(1.8, at_least=True)},
        timeout_s=1200,
        quick_args=("--quick",),
    ),
    "inflight_update": Bench(
        {"inflight_update_speedup": Goal(1.0, at_least=True)}, timeout_s=1200, quick_args=("--quick",)
    ),
    # Reliability, not speed: nothing lost or trained twice under random faults. Its memory bound is judged by the
    # script itself (exit status 1), on windows of 10 minutes or more only, so a --quick run prints no growth row.
    "chaos": Bench(
        {
            "chaos_groups_lost": Goal(0, at_least=False),
            "chaos_groups_trained_twice": Goal(0, at_least=False),
            "chaos_unrecovered_faults": Goal(0, at_least=False),
        },
        timeout_s=2400,
        quick_args=("--quick",),
    ),
    # Ray's control plane levels off once the task history it keeps is full (cluster.ray_task_history).
    "ray_task_history": Bench({"gcs_growth_capped": Goal(1.1, at_least=False)}, timeout_s=300),
}


@dataclass
class Row:
    bench: str
    name: str
    value: float | None
    goal: Goal | None
    seconds: float
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.goal.met(self.value) if self.goal else True


def discover() -> list[str]:
    """Every bench script: the known ones in suite order, then any other ``bench/*.py``."""
    found = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    return [name for name in BENCHES if name in found] + [name for name in found if name not in BENCHES]


def run_script(name: str, quick: bool, log_dir: Path) -> list[Row]:
    """Run one bench script; its RESULT lines become rows (or failed rows for the RESULTs it owed). Its whole output
    goes to ``log_dir/<name>.log``: the figures behind a ratio are what explains a miss."""
    bench = BENCHES.get(name, Bench({}))
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(bench.quick_args if quick else ())]
    print(f"[bench] {name}: {' '.join(command[1:])} (limit {bench.timeout_s:.0f} s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    # Own session: a timeout kills the script and everything it started (engines, Ray workers) in one go.
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=bench.timeout_s)
        note = "" if process.returncode == 0 else f"exit {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        note = f"timed out after {bench.timeout_s:.0f} s"
    seconds = time.monotonic() - started
    (log_dir / f"{name}.log").write_text(output)
    results = {m.group(1): m.group(2) for m in map(RESULT_LINE.match, output.splitlines()) if m}
    if note or not results:
        tail = "\n".join(output.splitlines()[-25:])
        print(f"[bench] {name} failed ({note or 'no RESULT line'}); last lines:\n{tail}", file=sys.stderr, flush=True)
    rows = []
    for result_name in dict.fromkeys([*bench.goals, *results]):
        raw = results.get(result_name)
        try:
            value = None if raw is None else float(raw)
        except ValueError:
            value, note = None, f"unreadable value {raw!r}"
        rows.append(Row(name, result_name, value, bench.goals.get(result_name), seconds, note if value is None else ""))
    if not rows:
        rows.append(Row(name, "(no RESULT)", None, None, seconds, note or "printed no RESULT line"))
    for row in rows:
        shown = "—" if row.value is None else f"{row.value:g}"
        print(f"[bench] {name}: {row.name}={shown} {'pass' if row.passed else 'FAIL'} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return rows


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    ram = "?"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), cpu)
        cpu = f"{cpu} ({cpu_vector_units(cpuinfo)})"
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        ram = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": ram, "os": platform.platform(), "python": platform.python_version()}


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def markdown(rows: list[Row], info: dict[str, str], load_start: str, load_end: str, date: str, command: str) -> str:
    lines = [
        f"Measured {date} with `{command}`.",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM; {info['os']}, Python {info['python']}",
        f"- load average (1 / 5 / 15 min): {load_start} at start, {load_end} at end",
        "",
        "| bench | ratio | value | goal | pass/fail | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        value = "—" if row.value is None else f"{row.value:.3f}"
        verdict = ("pass" if row.passed else "**fail**") + (f" ({row.note})" if row.note else "")
        lines.append(f"| {row.bench} | `{row.name}` | {value} | {row.goal or '—'} | {verdict} | {row.seconds:.0f} |")
    passed = sum(row.passed for row in rows)
    lines += ["", f"{passed}/{len(rows)} passed."]
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` (or write the whole file when it has no markers)."""
    marked = f"{BEGIN_MARK}\n{block}\n{END_MARK}"
    text = path.read_text() if path.exists() else ""
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        text = head + marked + rest.split(END_MARK, 1)[1]
    else:
        text = f"# Performance\n\n{marked}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="comma-separated bench names (e.g. pipeline,judge_pool)")
    parser.add_argument("--quick", action="store_true", help="pass each script its quick arguments, where it has any")
    parser.add_argument("--write", type=Path, metavar="PATH", help="also write the table into this Markdown file")
    args = parser.parse_args(argv)

    names = discover()
    if args.only:
        wanted = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"unknown bench(es) {unknown}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load()
    log_dir = Path(tempfile.mkdtemp(prefix="ampo-bench-logs-"))
    print(f"[bench] full output of each script goes to {log_dir}", file=sys.stderr, flush=True)
    rows = [row for name in names for row in run_script(name, args.quick, log_dir)]
    command = "python -m bench" + (f" --only {','.join(names)}" if args.only else "") + (" --quick" if args.quick else "")
    block = markdown(rows, machine(), load_start, load(), date, command)
    print(block)
    if args.write:
        write_block(args.write, block)
    print(f"RESULT bench_suite_passed={sum(r.passed for r in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
