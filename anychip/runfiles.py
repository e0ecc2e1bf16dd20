"""Writing and deleting in a run directory without following symbolic links. Standard library only.

A run directory may come from elsewhere (copied, unpacked, shared), so what it holds is not trusted:
a symbolic link where anychip keeps its own files (``checkpoints/``, ``final/``, ``heartbeat/``,
``config.toml``, ...) would make a write or a delete land outside the directory. Every writer goes
through these helpers:

- a directory between the run directory and the file is opened with ``O_NOFOLLOW`` relative to the one
  above it (``dir_fd``), so a link there is refused, naming it, and cannot be swapped in half-way;
- a file is written to a new temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``) beside it and renamed over
  it: the rename replaces a name, never a link's target, and a reader never sees half a file;
- a delete removes only a regular file (or a real directory) of a name anychip writes, never a link.

The run directory itself may be a link: that is the user's choice of where the run lives.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from .errors import ConfigError

# what anychip itself keeps at the top of a run directory: none of them may be a symbolic link
RUN_OWNED = (
    ".lock",
    "config.toml",
    "launch.toml",
    "events.jsonl",
    "metrics.jsonl",
    "experts.jsonl",
    "fatal.json",
    "eval.json",
    "report.html",
    "checkpoints",
    "final",
    "heartbeat",
    "stacks",
    "tensorboard",
)


class UnsafePath(ConfigError):
    """A path anychip writes or deletes in a run directory is a symbolic link (or not what anychip keeps there)."""


def _refused(path: Path, what: str = "a symbolic link") -> UnsafePath:
    return UnsafePath(
        f"{path} is {what}; anychip writes and deletes its run's files only inside the run directory and follows "
        "no link there (replace it with a real directory or file, or link the whole run directory instead)"
    )


def refuse_links(run_dir: str | Path, names=RUN_OWNED) -> None:
    """Raise UnsafePath naming the first of ``run_dir/<name>`` (``names``: paths relative to the run
    directory, by default RUN_OWNED) that is a symbolic link, or lies below one."""
    run_dir = Path(run_dir)
    for name in names:
        path = run_dir
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise _refused(path)


def _open_dir(run_dir: Path, parts: tuple[str, ...], create: bool) -> int:
    """A descriptor of ``run_dir/<parts>``, each part opened with O_NOFOLLOW relative to the one above it
    (made when ``create``)."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = run_dir
    try:
        for part in parts:
            path = path / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise _refused(path) from None
                raise
            os.close(fd)
            fd = below
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_name(dir_fd: int, name: str, path: Path, kind: int = stat.S_IFREG) -> bool:
    """Whether ``name`` exists in ``dir_fd``; UnsafePath when it is a link or not of ``kind``."""
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise _refused(path)
    if stat.S_IFMT(mode) != kind:
        raise _refused(path, "not a regular file" if kind == stat.S_IFREG else "not a directory")
    return True


def write_file(run_dir: str | Path, relative: str | Path, data: str | bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``run_dir/relative`` (directories between made as needed) and return its path: into
    a new temporary ``.<name>.<random>.tmp`` beside it, created exclusively, then renamed over it (fsynced
    first when ``durable``). UnsafePath, writing nothing, when the file or a directory between is a link."""
    run_dir, relative = Path(run_dir), Path(relative)
    path = run_dir / relative
    name = relative.name
    dfd = _open_dir(run_dir, relative.parts[:-1], create=True)
    try:
        _check_name(dfd, name, path)
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return path


def open_file(run_dir: str | Path, relative: str | Path, mode: str = "w"):
    """``run_dir/relative`` opened for writing text (``mode`` "w" or "a"; directories between made as
    needed) without following a link to it or to a directory between (UnsafePath)."""
    run_dir, relative = Path(run_dir), Path(relative)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    dfd = _open_dir(run_dir, relative.parts[:-1], create=True)
    try:
        _check_name(dfd, relative.name, run_dir / relative)
        fd = os.open(relative.name, flags, 0o644, dir_fd=dfd)
    finally:
        os.close(dfd)
    return os.fdopen(fd, mode, encoding="utf-8")


def make_dir(run_dir: str | Path, relative: str | Path) -> Path:
    """Create the directory ``run_dir/relative`` (those between it and the run directory as needed) and
    return its path; FileExistsError when it exists, UnsafePath when a directory between is a link."""
    run_dir, relative = Path(run_dir), Path(relative)
    dfd = _open_dir(run_dir, relative.parts[:-1], create=True)
    try:
        os.mkdir(relative.name, 0o755, dir_fd=dfd)
    finally:
        os.close(dfd)
    return run_dir / relative


def _remove(run_dir: Path, relative: Path, kind: int, delete) -> bool:
    """Delete ``run_dir/relative`` with ``delete(name, dir_fd=...)`` if it exists and is of ``kind``."""
    try:
        dfd = _open_dir(run_dir, relative.parts[:-1], create=False)
    except FileNotFoundError:
        return False
    try:
        if not _check_name(dfd, relative.name, run_dir / relative, kind):
            return False
        delete(relative.name, dir_fd=dfd)
        return True
    finally:
        os.close(dfd)


def remove_file(run_dir: str | Path, relative: str | Path) -> bool:
    """Delete the regular file ``run_dir/relative`` if it exists (True when it did); UnsafePath for a link
    (neither it nor its target is deleted)."""
    return _remove(Path(run_dir), Path(relative), stat.S_IFREG, os.unlink)


def remove_dir(run_dir: str | Path, relative: str | Path) -> bool:
    """Delete the directory ``run_dir/relative`` and what it holds, if it exists (True when it did);
    UnsafePath for a link. Links inside are removed, never followed (``shutil.rmtree``'s fd-based walk)."""
    return _remove(Path(run_dir), Path(relative), stat.S_IFDIR, shutil.rmtree)
