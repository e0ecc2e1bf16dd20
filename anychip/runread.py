"""Opening what a run directory holds as untrusted input: a copied, shared or half-written run may hold
anything under a familiar name. A reader opens only a regular file inside the run (not a FIFO, which
would block it, not a device such as /dev/zero, which never ends, not a symlink that leads out of the
run), reads at most a cap of bytes, and gets `NotReadable` naming the file and why otherwise. Text taken
from such a file goes to a terminal through `printable`. Standard library only (the watchdog imports
events.py, which reads through here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

SMALL_FILE_BYTES = 1 << 20  # fatal.json, eval.json, a heartbeat, config.toml: far less in any run


class NotReadable(OSError):
    """A path in a run that is not a regular file inside the run, or is larger than a reader's cap."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, root: str | Path | None = None) -> BinaryIO:
    """``path`` opened for reading in binary, when it is a regular file that resolves to a place inside
    ``root`` (default: its own directory; symlinks within the run are followed). FileNotFoundError when
    it does not exist; NotReadable naming it otherwise. Never blocks and never opens a device: the type is
    checked before the open and again on the open file."""
    path = Path(path)
    root = Path(root if root is not None else path.parent)
    name = path.relative_to(root) if path.is_relative_to(root) else path  # how messages name it
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise NotReadable(f"{name}: leads out of the run (to {real}); not read")
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise NotReadable(f"{name}: {_kind(mode)}, not a regular file; not read")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the check and the open
            raise NotReadable(f"{name}: {_kind(mode)}, not a regular file; not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | Path, root: str | Path | None = None, cap: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of a small file of a run (`open_regular`); NotReadable when it holds more than ``cap``."""
    with open_regular(path, root) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise NotReadable(f"{Path(path).name}: larger than {cap:,} bytes; not read")
    return data


def printable(text: object) -> str:
    """``text`` safe to write to a terminal: every control character (escape sequences, carriage returns,
    bells, C1 codes) shown as a Python escape such as ``\\x1b`` instead of being sent; newlines and tabs too,
    so that one value stays on one line."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
