"""The work files that make every stage resumable: append-only JSON lines, flushed and fsynced per record, keyed
by a digest of what was asked; and the progress bars of long stages."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


log = logging.getLogger(__name__)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def append_json_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (flushed and fsynced), so a crash loses at most the line being written."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an append-only JSONL file; a torn last line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring an unreadable line (a write cut short)", path)
    return rows


def rewind_json_lines(path: Path, last_step: int) -> int:
    """Keep in ``path`` the records whose ``step`` is at most ``last_step``; move the later ones and any unreadable
    line to ``<name>.discarded.jsonl`` beside it (appended, so nothing is lost) and return how many moved.

    A resume from the checkpoint of step N discards what the run did after step N (those updates died with the
    learner's weights, and the resumed run does those steps again), so their records must not stay mixed with the
    resumed ones. The kept lines are written to a temporary file that replaces ``path`` in one rename."""
    if not path.exists():
        return 0
    kept: list[str] = []
    moved: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None
        (kept if isinstance(step, int) and step <= last_step else moved).append(line)
    if not moved:
        return 0
    with path.with_name(f"{path.stem}.discarded.jsonl").open("a", encoding="utf-8") as aside:
        aside.write("".join(line + "\n" for line in moved))
        aside.flush()
        os.fsync(aside.fileno())
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(moved)
