"""Snapshots: each rank's training state in shared memory every few steps, so that a fault
costs a step or two of work instead of a checkpoint interval.

Where: ``/dev/shm/anychip-<user>-<job>/rank<r>/`` (the temp directory where there is no
/dev/shm). Shared memory outlives the worker process: a worker restarted on the same host
(a new interpreter after a kill or a hang, or the same process after an exception) maps
it again, with no disk I/O either way. The elastic agent's memory is not reachable by its
workers, and a copy on a replica would cost network bandwidth every step to cover only
the loss of a whole host, which the disk checkpoint covers. Snapshots live for one job:
the first start of a job clears its rank's directory, ``anychip train``'s launcher removes
the job's directory when the job ends, and a run that ends normally removes its own.

Whose: ``<job>`` is a random id drawn for each job (``secrets.token_hex``): by ``anychip
train``'s launcher (``SnapshotJob``), which passes it to its workers in
``$ANYCHIP_SNAPSHOT_JOB``; under plain torchrun by rank 0 at the job's first start, which
sends it to every rank. Either records it in ``RUN_DIR/snapshots.id`` (0600), where rank 0 of
a restart under plain torchrun reads it again. So a restart of the same job finds its
snapshots, and nothing else does: not a new job in the same run directory, not a job of
another container that shares this /dev/shm. The directories are created 0700 and the files
0600; a directory that is a symlink, not this user's, or open to group or others is refused
(a ``snapshot_refused`` event naming it and why; the run goes on without snapshots). Each
slot's record names its job and a checksum of the bytes written (``sum64``), both checked
before a restore. Every process of a live job holds a shared flock on the directory's
``lock``; the start of any job on the host removes every ``anychip-<user>-*`` directory of
this user whose lock nobody holds (the leftovers of a job killed with SIGKILL).

Two slots, used in turn: a snapshot goes into the slot that does not hold the newest one.
That slot's record (``slot<i>.json``) is deleted first, the tensors are copied into its
memory (``slot<i>.bin``, mapped with ``torch.from_file``), checked finite, and the record is
written last, atomically: a worker killed in the middle leaves the other slot whole. At
most two copies per rank exist, ever; their memory is reused from one snapshot to the next.

What: the rank's local shards of model state (parameters and buffers) and optimizer state,
GRPO's reference policy, the RNG states, the data position and the step: what a checkpoint
holds. A snapshot restores only on the layout that took it (world size, layout, device
type, config digest) and in the job that took it; anything else falls back to the disk
checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import torch

from .events import append_event
from .launcher_env import SNAPSHOT_JOB

ALIGN = 64
JOB_FILE = "snapshots.id"  # in the run directory: the id of the job whose snapshots are in shared memory
LOCK = "lock"  # in a job's directory: a shared flock held by every live process of the job
LEGACY_AGE_S = 600.0  # a directory without a lock (an earlier anychip's) is a leftover once this old
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class Refused(Exception):
    """A shared-memory path that is not this user's alone: never read, never written."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def shm_base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _prefix() -> str:
    return f"anychip-{getpass.getuser()}-"


def job_root(job: str) -> Path:
    """The shared-memory directory of job ``job``'s snapshots (every rank of it on this host)."""
    return shm_base() / f"{_prefix()}{job}"


def new_job_id(run_dir: Path) -> str:
    """A new random job id, recorded in ``run_dir/snapshots.id`` (0600, replaced atomically;
    a symlink there is replaced, not followed)."""
    job = secrets.token_hex(16)
    path = Path(run_dir) / JOB_FILE
    tmp = path.with_name(f"{JOB_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(job + "\n")
    os.replace(tmp, path)
    return job


def recorded_job_id(run_dir: Path) -> str | None:
    """The job id recorded in ``run_dir`` (None when there is none, or the file is not a
    regular file of this user's holding one id)."""
    try:
        fd = os.open(Path(run_dir) / JOB_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        text = f.read(64).strip()
    return text if _JOB_ID.fullmatch(text) else None


def run_root(run_dir: Path) -> Path | None:
    """The shared-memory directory of the job last recorded in ``run_dir`` (None: none recorded)."""
    job = recorded_job_id(run_dir)
    return job_root(job) if job else None


def job_id(run_dir: Path, world, fresh: bool) -> str:
    """The id of this job's snapshots, the same on every rank: the launcher's
    (``$ANYCHIP_SNAPSHOT_JOB``); else (plain torchrun, or ``train`` called directly) rank 0's,
    new at the job's first start (``fresh``) and the one recorded in ``run_dir`` at a restart,
    sent to every rank."""
    job = os.environ.get(SNAPSHOT_JOB, "")
    if _JOB_ID.fullmatch(job):
        return job
    if world.is_main:
        job = (None if fresh else recorded_job_id(run_dir)) or new_job_id(run_dir)
    if world.distributed:
        import torch.distributed as dist

        box = [job]
        dist.broadcast_object_list(box, src=0)
        job = box[0]
    return job


def unsafe(st: os.stat_result) -> str | None:
    """Why a directory with this lstat() is not this user's alone (None: it is)."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o}: group or others have access (0700 expected)"
    return None


def private_dir(path: Path) -> Path:
    """``path`` created 0700, or already there and this user's alone; raises Refused naming it
    and why otherwise (a symlink, not a directory, another owner, group or other access)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    reason = unsafe(os.lstat(path))
    if reason:
        raise Refused(path, reason)
    return path


_held: dict[Path, int] = {}  # job directory -> the fd of its lock, held shared by this process


def hold(root: Path) -> None:
    """Create (or accept, see ``private_dir``) the job directory ``root`` and hold its lock
    shared for the life of this process or until ``release``: ``remove_leftovers`` then
    leaves it alone. Raises Refused."""
    if root in _held:
        return
    for _ in range(10):  # a leftover with this name being removed right now: create it again
        private_dir(root)
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a cleaner removes the directory
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(root / LOCK).st_ino == os.fstat(fd).st_ino:
                _held[root] = fd
                return
        os.close(fd)
    raise Refused(root, "removed again and again while being created")


def release(root: Path) -> None:
    fd = _held.pop(root, None)
    if fd is not None:
        os.close(fd)


def _try_remove(root: Path) -> bool:
    """Remove job directory ``root`` when no live process holds its lock; True when removed."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        shutil.rmtree(root, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _newest_change(path: Path) -> float:
    times = [os.lstat(path).st_mtime]
    with contextlib.suppress(OSError):
        times += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)]
    return max(times)


def remove_leftovers() -> list[Path]:
    """Remove this user's snapshot directories on this host that no live job holds (the
    leftovers of a job killed with SIGKILL, whose workers died with it); those of live jobs
    stay. A directory with no lock (an earlier anychip's) goes once unchanged for
    ``LEGACY_AGE_S``. Returns the directories removed; never raises for one it cannot remove."""
    base, prefix, removed = shm_base(), _prefix(), []
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        root = base / name
        try:
            st = os.lstat(root)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # not this user's: not ours to remove
            if os.path.lexists(root / LOCK):
                gone = _try_remove(root)
            elif time.time() - _newest_change(root) > LEGACY_AGE_S:
                shutil.rmtree(root, ignore_errors=True)
                gone = True
            else:
                gone = False
        except OSError:
            continue
        if gone:
            removed.append(root)
    return removed


class SnapshotJob:
    """The launcher's side of one job's snapshots (``anychip train``): ``start`` removes the
    leftovers of dead jobs on this host, draws the job's id, records it in the run directory
    and in the environment its workers inherit, creates the job's directory and holds it
    while the job lives (across restarts of its workers); ``end`` removes it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.root: Path | None = None

    def start(self) -> SnapshotJob:
        remove_leftovers()
        job = new_job_id(self.run_dir)
        os.environ[SNAPSHOT_JOB] = job
        self.root = job_root(job)
        with contextlib.suppress(Refused):  # the workers refuse it too, each with an event
            hold(self.root)
        return self

    def end(self) -> None:
        """Remove the job's snapshots: they serve restarts within this job only."""
        os.environ.pop(SNAPSHOT_JOB, None)
        if self.root is not None and self.root in _held:  # never one that was refused
            release(self.root)
            shutil.rmtree(self.root, ignore_errors=True)


def report_refused(run_dir: Path, state, e: Refused) -> None:
    """A ``snapshot_refused`` event (this rank's, naming the path and why) and a warning."""
    from rich.markup import escape

    append_event(run_dir, "snapshot_refused", rank=state.world.rank, dir=str(e.path), reason=e.reason)
    state.log.print(f"[yellow]warning: snapshots: {escape(str(e))}; not used[/yellow]")


def open_snapshots(state, run_dir: Path, interval: int, digest: str, background: bool = False, fresh: bool = False):
    """This rank's Snapshots (see the class); None where its directory cannot be trusted (a
    ``snapshot_refused`` event and a warning: the run goes on without snapshots, restarts
    resume from the disk checkpoint). Under no launcher, local rank 0 of a job's first start
    removes the leftovers of dead jobs on this host first."""
    if fresh and not os.environ.get(SNAPSHOT_JOB) and state.world.local_rank == 0:
        remove_leftovers()
    job = job_id(run_dir, state.world, fresh)  # every rank, before anything may fail on one
    try:
        return Snapshots(state, run_dir, interval, digest, background, fresh, job)
    except Refused as e:
        report_refused(run_dir, state, e)
        return None


def _private_file(path: Path, flags: int = 0) -> int:
    """``path`` opened read-write, created 0600 (a symlink there is an OSError, never followed)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)


def sum64(memory: torch.Tensor) -> int:
    """A cheap checksum of a slot's bytes (a multiple of 8): their sum as 64-bit words, modulo
    2**64 (exact in any order: the same on every read). Any change of one word shows; it
    guards against torn or corrupt memory, the directory's mode against other users."""
    return int(memory.view(torch.int64).sum())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_tensors(state, names: dict | None = None) -> dict[str, torch.Tensor]:
    """Every live tensor of a rank's training state, by name: the local shards of the model
    state (parameters and buffers) and of the optimizer state (by parameter name), GRPO's
    reference policy, the RNG states. What a snapshot copies, and what a pool that returns
    takes from a live one (anychip.pools). ``names``: parameter -> name, when already known."""
    s = state
    out = {f"model/{k}": _local(v) for k, v in s.model.state_dict().items()}
    names = names if names is not None else {p: n for n, p in s.model.named_parameters()}
    for p, st in s.optimizer.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[p]}/{key}"] = _local(v)
    if s.ref_model is not None:
        out.update({f"ref/{k}": _local(v) for k, v in s.ref_model.state_dict().items()})
    out.update({f"rng/{k}": v for k, v in s.device.rng_state().items()})
    return out


@torch.no_grad()
def load_state_tensors(state, saved: dict[str, torch.Tensor], source: str, devices: dict | None = None) -> None:
    """Copy ``saved`` (``state_tensors`` of the same layout) into the live state, in place; the
    optimizer state is created where this process has none yet (a scalar such as Adam's step on
    the device ``devices`` names for it, else on the device it comes on). Raises KeyError naming
    the first tensor of the live model that ``source`` lacks."""
    s = state
    live = {f"model/{k}": _local(v) for k, v in s.model.state_dict().items()}
    if s.ref_model is not None:
        live.update({f"ref/{k}": _local(v) for k, v in s.ref_model.state_dict().items()})
    missing = [k for k in live if k not in saved]
    if missing:
        raise KeyError(f"{source} has no {missing[0]}")
    for name, t in live.items():
        t.copy_(saved[name])
    for name, p in s.model.named_parameters():
        prefix = f"optim/{name}/"
        keys = [k for k in saved if k.startswith(prefix)]
        if not keys:
            continue
        st = s.optimizer.state[p]
        for k in keys:
            value = saved[k]
            key = k[len(prefix) :]
            current = st.get(key)
            if current is None:  # a fresh process: create the state as the optimizer would
                like = value.shape == _local(p).shape and value.dim() > 0
                current = torch.zeros_like(p) if like else torch.empty(value.shape, dtype=value.dtype)
                current = current if like else current.to(torch.device((devices or {}).get(k, value.device)))
                st[key] = current
            _local(current).copy_(value)
    rng = {k.removeprefix("rng/"): v.clone() for k, v in saved.items() if k.startswith("rng/")}
    s.device.set_rng_state(rng)


class Snapshots:
    """The snapshots of one rank: ``take(step)`` after an applied step when due,
    ``steps(before)`` what it holds, ``restore(step)`` in place of the live state.

    ``state`` is the run's TrainState (model, optimizer, data, ref_model, device, world);
    ``interval`` steps between snapshots (0: none); ``background``: copy in a thread that
    overlaps the next step's forward and backward (``wait`` before the weights change)."""

    def __init__(
        self,
        state,
        run_dir: Path,
        interval: int,
        digest: str,
        background: bool = False,
        fresh: bool = False,
        job: str | None = None,
    ):
        """``job``: the job's id (``job_id``, a collective where there is no launcher). Raises
        Refused for a directory that is not this user's alone."""
        self.state, self.interval, self.digest, self.background = state, interval, digest, background
        self.run_dir = Path(run_dir)
        self.job = job if job is not None else job_id(run_dir, state.world, fresh)
        self.root = job_root(self.job)
        self.dir = self.root / f"rank{state.world.rank}"
        hold(self.root)
        if fresh:  # the first start of a job: nothing there is this one's
            shutil.rmtree(self.dir, ignore_errors=True)
        private_dir(self.dir)
        self._checked: dict[int, dict] = {}  # slot -> its record, its bytes known to match it
        self._thread: threading.Thread | None = None
        self._maps: dict[int, tuple[int, torch.Tensor]] = {}
        self._views: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._layout_cache: tuple | None = None
        self._names: dict | None = None  # parameter -> name
        self._newest: int | None = None  # the slot of the newest snapshot this process wrote
        self._error: Exception | None = None
        self.taken_s = 0.0  # time in take() since the caller last reset it
        self.waited_s = 0.0  # waits for background copies since the caller last reset it

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    # -- what is copied ----------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every live tensor of the snapshot, by name (local shards; optimizer state by parameter name)."""
        if self._names is None:
            self._names = {p: n for n, p in self.state.model.named_parameters()}
        return state_tensors(self.state, self._names)

    def _identity(self) -> dict:
        w = self.state.world
        return {
            "digest": self.digest,
            "world_size": w.world_size,
            "rank": w.rank,
            "layout": [w.layout.dp_replicate, w.layout.dp_shard, w.layout.ep],
            "device": self.state.device.type,
            "job": self.job,
        }

    # -- take --------------------------------------------------------------------------

    def _records(self) -> dict[int, dict]:
        """slot -> its committed record, for the slots that have one."""
        out = {}
        for slot in (0, 1):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out[slot] = json.loads((self.dir / f"slot{slot}.json").read_text())
        return out

    def take(self, step: int) -> None:
        """Snapshot the state after optimizer step ``step`` when due."""
        if not self.due(step):
            return
        self.wait()
        t0 = time.perf_counter()
        if self._newest is None:
            records = self._records()
            self._newest = max(records, key=lambda s: records[s]["step"], default=1)
        slot = self._newest = 1 - self._newest
        (self.dir / f"slot{slot}.json").unlink(missing_ok=True)  # that slot is invalid from here on
        self._checked.pop(slot, None)
        tensors = self._tensors()
        data = json.loads(json.dumps(self.state.data.state_dict()))  # a copy: the next step moves the data on
        try:
            memory = self._map(slot, self._layout(tensors)[1])  # here: no room is an OSError for the caller
            if self.background:
                args = (slot, step, tensors, data, memory)
                self._thread = threading.Thread(target=self._write_safely, args=args, daemon=True)
                self._thread.start()
            else:
                self._write(slot, step, tensors, data, memory)
        except Exception:
            self._newest = 1 - slot  # the other slot still holds the newest snapshot
            raise
        self.taken_s += time.perf_counter() - t0

    def _write_safely(self, slot: int, *args) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: a thread has a nice value of its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # the step's threads come first
        try:
            self._write(slot, *args)
        except Exception as e:  # reported by wait()
            self._newest = 1 - slot
            self._error = e

    def _write(self, slot: int, step: int, tensors: dict[str, torch.Tensor], data: dict, memory: torch.Tensor) -> None:
        entries, _, groups = self._layout(tensors)
        if self._views.get(slot, (None,))[0] is not memory:  # views into this very mapping, this layout
            self._views[slot] = (memory, [self._view(memory, entries[name]) for name in tensors])
        torch._foreach_copy_(self._views[slot][1], list(tensors.values()))  # one call for every tensor
        for dtype, (start, size) in groups.items():  # one sum per dtype: a NaN or Inf anywhere shows
            if not torch.isfinite(memory.narrow(0, start, size).view(getattr(torch, dtype)).sum()):
                raise FloatingPointError(
                    f"snapshot of step {step}: a {dtype} tensor holds a non-finite value; not kept"
                )
        record = {"step": step, **self._identity(), "data": data, "entries": entries, "time": time.time()}
        record.update(bytes=memory.numel(), sum64=sum64(memory))  # checked before a restore
        tmp = self.dir / f"slot{slot}.json.tmp"
        with os.fdopen(_private_file(tmp, os.O_TRUNC), "w") as f:
            f.write(json.dumps(record))
        os.replace(tmp, self.dir / f"slot{slot}.json")  # the commit
        self._checked[slot] = json.loads(json.dumps(record))  # as _records() will read it

    def _layout(self, tensors: dict[str, torch.Tensor]) -> tuple[dict, int, dict]:
        """Where each tensor goes: {name: [offset, dtype, shape, device]}, the bytes in all, and
        {floating dtype: (offset, bytes)} of the contiguous run of each floating dtype."""
        signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in tensors.items())
        if self._layout_cache is not None and self._layout_cache[0] == signature:
            return self._layout_cache[1]
        entries, groups, offset = {}, {}, 0
        for name, t in sorted(tensors.items(), key=lambda kv: str(kv[1].dtype)):  # each dtype in one run
            dtype = str(t.dtype).removeprefix("torch.")
            if t.is_floating_point() and dtype not in groups:
                groups[dtype] = (offset, 0)
            entries[name] = [offset, dtype, list(t.shape), str(t.device)]
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
            if t.is_floating_point():
                groups[dtype] = (groups[dtype][0], offset - groups[dtype][0])
        entries = {name: entries[name] for name in tensors}  # the live order, for the copy
        layout = (entries, max(offset, ALIGN), groups)
        self._layout_cache = (signature, layout)
        self._views.clear()
        return layout

    def _map(self, slot: int, nbytes: int) -> torch.Tensor:
        """The slot's memory, mapped once and kept mapped (a new mapping pays a page fault per
        page on the first copy)."""
        path = self.dir / f"slot{slot}.bin"
        kept = self._maps.get(slot)
        if kept is not None and kept[0] == nbytes and path.is_file():
            return kept[1]
        if not path.is_file() or path.stat().st_size != nbytes:
            fd = _private_file(path, os.O_TRUNC)
            try:
                if hasattr(os, "posix_fallocate"):
                    # reserve the pages now: a full tmpfs (Docker's /dev/shm is 64 MB by default) is then
                    # an OSError here, not a SIGBUS at the first write through the mapping
                    os.posix_fallocate(fd, 0, nbytes)
                else:
                    os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
        memory = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        self._maps[slot] = (nbytes, memory)
        return memory

    @staticmethod
    def _view(memory: torch.Tensor, entry: list) -> torch.Tensor:
        offset, dtype, shape, _ = entry
        dtype = getattr(torch, dtype)
        n = 1
        for d in shape:
            n *= d
        size = n * torch.empty((), dtype=dtype).element_size()
        return memory.narrow(0, offset, size).view(dtype).view(shape)

    def wait(self) -> None:
        """Block until a background copy is complete (before the weights change); a
        failed copy is raised here."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self._thread = None
            self.waited_s += time.perf_counter() - t0
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- restore -----------------------------------------------------------------------

    def steps(self, before: int | None = None) -> list[int]:
        """The steps of the snapshots this rank holds that fit this job, run and layout and
        match their checksums (below ``before``)."""
        self.wait()
        return sorted(r["step"] for r in self._usable().values() if before is None or r["step"] < before)

    def _usable(self) -> dict[int, dict]:
        """slot -> record, for the slots whose record fits this job, run and layout and whose
        bytes match its checksum; a slot that does not match is reported and never restored."""
        me, out = self._identity(), {}
        for slot, r in self._records().items():
            if not all(r.get(k) == v for k, v in me.items()):
                continue
            if self._checked.get(slot) != r:
                problem = self._check(slot, r)
                if problem:
                    report_refused(self.run_dir, self.state, Refused(self.dir / f"slot{slot}.bin", problem))
                    continue
                self._checked[slot] = r
            out[slot] = r
        return out

    def _check(self, slot: int, record: dict) -> str | None:
        """Why the bytes of ``slot`` do not match ``record`` (None: they do)."""
        try:
            st = os.lstat(self.dir / f"slot{slot}.bin")
        except FileNotFoundError:
            return f"step {record['step']}: its memory is gone"
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return f"not a regular file of this user's alone (mode {st.st_mode:o}, uid {st.st_uid})"
        if not isinstance(record.get("sum64"), int):
            return f"step {record['step']}: the record has no checksum"
        if st.st_size != record.get("bytes"):
            return f"step {record['step']}: {st.st_size} bytes, the record says {record.get('bytes')}"
        found = sum64(self._map(slot, st.st_size))
        if found != record["sum64"]:
            return f"step {record['step']}: checksum {found} of the bytes read, {record['sum64']} of those written"
        return None

    def restore(self, step: int) -> None:
        """Copy the snapshot of ``step`` into the live state (every rank calls it with the same
        step; ``steps`` checked it). Snapshots newer than it belong to a trajectory given up:
        they are dropped."""
        records = self._usable()
        slot = next((s for s, r in records.items() if r["step"] == step), None)
        if slot is None:
            raise RuntimeError(f"{self.dir}: no usable snapshot of step {step}")
        record = records[slot]
        self.drop_after(step)
        memory = self._map(slot, record["bytes"])
        entries = record["entries"]
        saved = {k: self._view(memory, e) for k, e in entries.items()}
        load_state_tensors(self.state, saved, f"snapshot of step {step}", {k: e[3] for k, e in entries.items()})
        self.state.data.load_state_dict(record["data"])

    def drop_after(self, step: int) -> None:
        """Forget the snapshots of steps after ``step`` (the run went back before them)."""
        for slot, r in self._records().items():
            if r["step"] > step:
                (self.dir / f"slot{slot}.json").unlink(missing_ok=True)
        self._newest = None

    def remove(self) -> None:
        """Free this rank's snapshot memory (the run ended); with no launcher to do it, the
        last process of the job to leave removes the job's directory."""
        self.wait()
        self._maps.clear()
        self._views.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        if not os.environ.get(SNAPSHOT_JOB):  # else the launcher holds the directory until the job ends
            release(self.root)
            _try_remove(self.root)


def restorable_step(snapshots: Snapshots | None, world, before: int | None = None) -> int | None:
    """The newest snapshot step every rank holds (below ``before``), None when there is none."""
    import torch.distributed as dist

    mine = snapshots.steps(before) if snapshots is not None else []
    if world.distributed:
        every = [None] * world.world_size
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    common = set(every[0]).intersection(*every[1:])
    return max(common) if common else None
