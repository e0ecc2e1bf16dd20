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

from .runread import NotReadable, open_regular


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


# A longer line is no record of ours (an experts record of DeepSeek-V3's 58 MoE layers is about 100 KB).
MAX_RECORD_BYTES = 4 << 20
# The most of a JSON-lines file a reader takes: of a longer file, the last this many bytes (a metrics.jsonl
# of 200k steps is 85 MB).
MAX_READ_BYTES = 256 << 20
TAIL_START_BYTES = 64 << 10  # what a tail read takes first (read_jsonl_tail), doubled until enough

# The types a JSON value of a key may have (exactly: a JSON true is no number here).
NUMBER, INT, TEXT = (int, float), (int,), (str,)
# What a record of each file must hold (key: type), and what its other keys hold when present (or null).
EVENT = ({"time": NUMBER, "event": TEXT}, {
    "step": INT, "last_step": INT, "from_step": INT, "to_step": INT, "rank": INT, "world_size": INT,
    "parameters": INT, "activated": INT, "stall_s": NUMBER, "duration_s": NUMBER, "last_record": NUMBER,
    "kind": TEXT, "error": TEXT, "status": TEXT, "strategy": TEXT, "device": TEXT, "device_name": TEXT,
})  # fmt: skip
METRIC = ({"step": INT, "time": NUMBER, "step_time": NUMBER}, {"snapshot_s": NUMBER, "snapshot_wait_s": NUMBER})


class Records(list):
    """Records (JSON objects) read from a JSON-lines file, in order, with what was left out: ``skipped``
    malformed lines (not JSON, not an object, not of the file's schema, too long or too deep), ``refused``
    why the file was not read at all ('' when it was), ``unread`` bytes at its start not read (a tail), of
    its ``size``."""

    skipped: int = 0
    refused: str = ""
    unread: int = 0
    size: int = 0

    def notes(self, name: str) -> list[str]:
        """What a reader should be told about ``name`` ([] when everything was read)."""
        out = [self.refused] if self.refused else []
        if self.unread:
            out.append(f"{name}: only its last {_mb(self.size - self.unread)} read, the first {_mb(self.unread)} not")
        if self.skipped:
            out.append(f"{name}: {self.skipped} malformed record{'s' * (self.skipped != 1)} skipped")
        return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fits(record: object, schema: tuple[dict, dict] | None) -> bool:
    """Whether ``record`` is a JSON object holding what ``schema`` (EVENT, METRIC) asks: each required key
    with a value of its type, each optional key absent, null or of its type (any object: schema None)."""
    if type(record) is not dict:
        return False
    if schema is None:
        return True
    required, optional = schema
    for key, kinds in required.items():
        if type(record.get(key)) not in kinds:
            return False
    for key, kinds in optional.items():
        value = record.get(key)
        if value is not None and type(value) not in kinds:
            return False
    return True


def keep_fitting(records: Records, schema: tuple[dict, dict]) -> Records:
    """``records`` less those not of ``schema``, counted in ``skipped``."""
    out = Records(r for r in records if fits(r, schema))
    out.skipped, out.refused, out.unread, out.size = records.skipped + len(records) - len(out), records.refused, records.unread, records.size  # fmt: skip
    return out


def read_jsonl(path: Path, root: Path | None = None) -> Records:
    """The records (JSON objects) of a JSON-lines file, in order; none if it does not exist. A line that is
    not one, such as a line cut short by a crash (or an empty one), is skipped alone and counted. Streams the
    file; of one larger than MAX_READ_BYTES only the end is read. A path that is not a regular file inside
    ``root`` (default: its directory) is not read: no records, ``refused`` says why (runread.open_regular)."""
    return read_jsonl_tail(path, MAX_READ_BYTES, root=root)


def read_jsonl_tail(
    path: Path,
    start_bytes: int = TAIL_START_BYTES,
    schema: tuple[dict, dict] | None = None,
    *,
    keys: tuple[str, ...] | None = None,
    enough=None,
    root: Path | None = None,
) -> Records:
    """The records at the end of a JSON-lines file (all of it when shorter): those in its last
    ``start_bytes``, and while ``enough(records)`` is false, in twice as many, up to the whole file or
    MAX_READ_BYTES. Records not of ``schema`` are skipped and counted; ``keys`` keeps only those keys of
    each record (a small copy of a long file). Otherwise as `read_jsonl`."""
    out = Records()
    try:
        f = open_regular(path, root)
    except FileNotFoundError:
        return out
    except OSError as e:  # NotReadable (a FIFO, a device, a link out of the run), or no permission
        out.refused = str(e) if isinstance(e, NotReadable) else f"{Path(path).name}: {e.strerror}; not read"
        return out
    with f:
        size = out.size = os.fstat(f.fileno()).st_size
        want = min(max(start_bytes, 1), MAX_READ_BYTES)
        while True:
            begin = max(size - want, 0)
            out[:], out.skipped = [], 0
            for record in _records(f, begin, size, out):
                if fits(record, schema):
                    out.append(record if keys is None else {k: record[k] for k in keys if k in record})
                else:
                    out.skipped += 1
            out.unread = begin
            if begin == 0 or want >= MAX_READ_BYTES or enough is None or enough(out):
                return out
            want = min(2 * want, MAX_READ_BYTES)


def _records(f, begin: int, end: int, out: Records):
    """The parsed lines of ``f`` between ``begin`` (the line it falls in dropped, unless at 0) and ``end``;
    lines that are no JSON are counted in ``out.skipped``."""
    f.seek(begin)
    if begin > 0:
        f.readline(MAX_RECORD_BYTES)  # the line cut by the start of the tail
    pos = f.tell()
    while pos < end:
        line = f.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        pos += len(line)
        if len(line) > MAX_RECORD_BYTES:  # too long: skip to its end unparsed
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_RECORD_BYTES)
                pos += len(line)
            out.skipped += 1
            continue
        if not line.strip():
            continue  # an empty line: not a record, not a fault
        try:
            yield json.loads(line)
        except (ValueError, RecursionError):  # not JSON (a cut line, bytes not UTF-8), or nested too deep
            out.skipped += line.endswith(b"\n")  # the last line, not ended yet, is being written
