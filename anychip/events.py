"""The run's append-only records (events.jsonl, metrics.jsonl), readable and appendable
from any process: ranks other than 0 and the hang watchdog write events here too.
Standard library only, so that the watchdog process starts fast."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def event_line(name: str, /, **fields) -> str:
    """One events.jsonl record: time, event name, fields."""
    return json.dumps({"time": time.time(), "event": name, **fields}) + "\n"


def append_event(run_dir: Path, name: str, /, **fields) -> None:
    """Append one event to ``run_dir/events.jsonl`` from any process (a rank other than 0,
    the hang watchdog): one O_APPEND write of one line, fsynced."""
    line = event_line(name, **fields).encode()
    fd = os.open(Path(run_dir) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it does not exist); a last line cut short
    by a crash is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
