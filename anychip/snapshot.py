"""Snapshots: each rank's training state in shared memory every few steps, so that a fault
costs a step or two of work instead of a checkpoint interval.

Where: ``/dev/shm/anychip-<user>-<run>/rank<r>/`` (the temp directory where there is no
/dev/shm). Shared memory outlives the worker process: a worker restarted on the same host
(a new interpreter after a kill or a hang, or the same process after an exception) maps
it again, with no disk I/O either way. The elastic agent's memory is not reachable by its
workers, and a copy on a replica would cost network bandwidth every step to cover only
the loss of a whole host, which the disk checkpoint covers. Snapshots live for one job:
the first start of a job clears its rank's directory, ``anychip train``'s launcher removes
the run's directory when the job ends, and a run that ends normally removes its own.

Two slots, used in turn: a snapshot goes into the slot that does not hold the newest one.
That slot's record (``slot<i>.json``) is deleted first, the tensors are copied into its
memory (``slot<i>.bin``, mapped with ``torch.from_file``), checked finite, and the record is
written last, atomically: a worker killed in the middle leaves the other slot whole. At
most two copies per rank exist, ever; their memory is reused from one snapshot to the next.

What: the rank's local shards of model state (parameters and buffers) and optimizer state,
GRPO's reference policy, the RNG states, the data position and the step: what a checkpoint
holds. A snapshot restores only on the layout that took it (world size, layout, device
type, config digest); anything else falls back to the disk checkpoint.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

ALIGN = 64


def run_root(run_dir: Path) -> Path:
    """The shared-memory directory of ``run_dir``'s snapshots (all ranks on this host)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return base / f"anychip-{getpass.getuser()}-{key}"


def remove_run_snapshots(run_dir: Path) -> None:
    shutil.rmtree(run_root(run_dir), ignore_errors=True)


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

    def __init__(self, state, run_dir: Path, interval: int, digest: str, background: bool = False, fresh: bool = False):
        self.state, self.interval, self.digest, self.background = state, interval, digest, background
        self.dir = run_root(run_dir) / f"rank{state.world.rank}"
        if fresh:  # the first start of a job: an earlier job's snapshots are not this one's
            shutil.rmtree(self.dir, ignore_errors=True)
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
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"slot{slot}.json").unlink(missing_ok=True)  # that slot is invalid from here on
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
        tmp = self.dir / f"slot{slot}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"slot{slot}.json")  # the commit

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
            with open(path, "wb") as f:
                if hasattr(os, "posix_fallocate"):
                    # reserve the pages now: a full tmpfs (Docker's /dev/shm is 64 MB by default) is then
                    # an OSError here, not a SIGBUS at the first write through the mapping
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                else:
                    f.truncate(nbytes)
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
        """The steps of the snapshots this rank holds that fit this run and layout (below ``before``)."""
        self.wait()
        me = self._identity()
        return sorted(
            r["step"]
            for r in self._records().values()
            if all(r.get(k) == v for k, v in me.items()) and (before is None or r["step"] < before)
        )

    def restore(self, step: int) -> None:
        """Copy the snapshot of ``step`` into the live state (every rank calls it with the same
        step). Snapshots newer than it belong to a trajectory given up: they are dropped."""
        records = self._records()
        slot = next(s for s, r in records.items() if r["step"] == step)
        record = records[slot]
        self.drop_after(step)
        memory = self._map(slot, (self.dir / f"slot{slot}.bin").stat().st_size)
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
        """Free this rank's snapshot memory (the run ended)."""
        self.wait()
        self._maps.clear()
        self._views.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


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
