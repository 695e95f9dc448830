"""Files of JSON records, in the two layouts every data file of the project uses: one JSON list, or JSON lines
(a `.jsonl` file, one record per line, blank lines skipped).

RL states (actors), behaviour-cloning records (learner) and `ampo data check` (cluster) all read these files, so
the reader lives here, in the lowest role. It judges the file, not the records: rows come back as parsed, whatever
their type, so that a caller checking a file can count a non-object row as one invalid row among the others and
name it by its index. Errors are raised as the caller's own error type, so that each role's callers catch only
what they already know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json_rows"]


def read_json_rows(path: str | Path, *, error: type[Exception] = ValueError, what: str = "records") -> list[Any]:
    """The rows of a JSON list file, or of a `.jsonl` file (one JSON value per non-blank line).

    Raises `error` naming the file and what is wrong with it: missing, not UTF-8, not JSON (with the line of a
    JSON-lines file, counted from 1 including blank lines, so that an editor finds it), or not a list; `what`
    names the expected records in that last message.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text: {exc}") from None
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise error(f"{path}: line {line_no}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data
