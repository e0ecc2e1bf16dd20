"""The run's append-only records (events.jsonl, metrics.jsonl, experts.jsonl), readable and appendable
from any process: ranks other than 0 and the hang watchdog write events here too.
Standard library only, so that the watchdog process starts fast.

A crash can leave the last line of a file cut short. Every writer first ends such a line (it looks at
the last byte only), so that the next record starts on a line of its own; readers skip the cut line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TextIO


def event_line(name: str, /, **fields) -> str:
    """One events.jsonl record: time, event name, fields."""
    return json.dumps({"time": time.time(), "event": name, **fields}) + "\n"


def append_event(run_dir: Path, name: str, /, **fields) -> None:
    """Append one event to ``run_dir/events.jsonl`` from any process (rank 0's RunLog, a rank other than 0,
    the hang watchdog): one O_APPEND write of one line, fsynced; a cut last line is ended first."""
    append_line(Path(run_dir) / "events.jsonl", event_line(name, **fields))


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (ending in a newline) to ``path``, created if missing, in one O_APPEND write, fsynced.
    When the file ends in a line cut short by a crash, a newline ends it in the same write, so the cut line
    stays one unreadable line and ``line`` stays readable."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode()
        os.write(fd, b"\n" + data if _ends_cut(fd) else data)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path) -> TextIO:
    """``path`` opened for appending text, created if missing; a line cut short by a crash at its end is
    ended first. For a file that only this process appends to (a cut can only come from an earlier one).
    A symbolic link at ``path`` is not followed (OSError ELOOP): its target is not the run's to write."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if _ends_cut(fd):
            os.write(fd, b"\n")
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _ends_cut(fd: int) -> bool:
    """Whether the file open at ``fd`` is not empty and its last byte is not a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_jsonl(path: Path) -> list[dict]:
    """The records (JSON objects) of a JSON-lines file, in order; none if it does not exist. A line that is
    not one, such as a line cut short by a crash (or an empty one), is skipped alone."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
