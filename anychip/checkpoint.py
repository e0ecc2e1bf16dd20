"""Checkpoints that survive crashes, with torch.distributed.checkpoint (DCP).

A checkpoint is a directory ``RUN_DIR/checkpoints/step_00000120`` holding:

    DCP files       model and optimizer (sharded or not: DCP reshards N -> M on load)
    rank<r>.json    per rank: data-loader state, step
    rank<r>.safetensors  per rank: RNG states (CPU and device generators)
    meta.json       step, config digest, the model's shape fields, world size, device type
    config.toml     the run's resolved config at that step
    manifest.json   size and SHA-256 of every file above: written last

Save: the loop stalls only for the ``async_save`` call; staging to host memory and
writing into ``step_X.tmp`` run in the background, and the loop waits for staging only
before the next optimizer step changes the weights. When the write is complete,
rank 0 checksums every file into the manifest, fsyncs, and renames ``step_X.tmp`` to
``step_X``: the commit. Only committed directories are loaded; leftovers of a crashed
save are removed at start. A second save waits for the first. A failing write is an
event and a warning; earlier checkpoints are untouched and training goes on.

Load: newest committed checkpoint first; every file is checked against the manifest;
a missing, truncated or altered file is an event naming it, and the previous
checkpoint is tried. A checkpoint whose model shape differs from the config is refused
with an error naming the fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from rich.markup import escape
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .dcp_reader import safe_load
from .errors import CheckpointError
from .models.deepseek.args import SHAPE_FREE
from .parallel import unwrap
from .runfiles import RUN_OWNED, make_dir, refuse_links, remove_dir

# one process without a process group is a supported case, not a mistake to warn about
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

PREFIX = "step_"
TMP = ".tmp"
UNCOMMITTED = re.compile(rf"{PREFIX}\d+{re.escape(TMP)}")  # the only names cleanup deletes: saves cut short


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    dirs = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def saved_config(root: Path) -> Path | None:
    """The ``config.toml`` of the newest committed checkpoint under ``root`` that records one: the
    config the checkpoint was saved with; None when there is none. CheckpointError when that file
    is not it (its digest differs from the one ``meta.json`` records)."""
    for d in committed(root):
        try:
            meta = json.loads((d / "meta.json").read_text())
            text = (d / "config.toml").read_text()
        except (OSError, ValueError):
            continue  # unreadable: loading sets it aside and tries the one before
        recorded = meta.get("config_digest") if isinstance(meta, dict) else None
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]  # Config.digest: the SHA-256 of its TOML
        if digest != recorded:
            raise CheckpointError(
                f"{d / 'config.toml'} is not the config this checkpoint was saved with (its digest is {digest}, "
                f"{d / 'meta.json'} records {recorded!r}): edited after the save"
            )
        return d / "config.toml"
    return None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": _digest(p)}
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    (directory / "manifest.json").write_text(json.dumps({"files": files}, indent=1))
    with open(directory / "manifest.json", "rb") as f:
        os.fsync(f.fileno())


def verify(directory: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong (naming the file)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{manifest} is unreadable ({e!r})"
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != want["size"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {want['size']} (truncated?)"
        if _digest(p) != want["sha256"]:
            return f"{p} does not match its checksum (corrupted)"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RunIdentity:
    """What a checkpoint records of the run besides the training state."""

    config_toml: str  # the run's resolved config, written beside every checkpoint
    digest: str
    seed: int  # train.seed: reseeds the RNGs when a checkpoint is loaded on another layout


class Checkpointer:
    """Saves and restores the whole training state of one rank; every rank calls it.

    ``state`` holds what is saved (model, optimizer, data, optional ``ref_model``) and the
    run's device, world and log; ``cfg`` is the ``[checkpoint]`` section; ``last_step`` the
    run's final step (always saved when ``cfg.interval`` is set)."""

    def __init__(self, state, root: Path, cfg=None, last_step: int = 0, run: RunIdentity | None = None):
        self.state = state
        self.root = root
        self.cfg = cfg
        self.last_step = last_step
        self.run = run
        self.world = state.world
        self.log = state.log
        self._pending: tuple[object, threading.Event, int] | None = None  # (future, committed, step)
        # the background writer's collectives get their own group: sharing the training
        # group between two threads would interleave their messages
        self._group = dist.new_group(backend="gloo") if self.world.distributed else None
        # on accelerators, staging (the copy to pinned host memory) also runs in the
        # background; the loop calls wait_staged() before the optimizer next changes the
        # weights. On CPU, DCP's own staging (a copy in the save call): DefaultStager's
        # cached host buffers made every later CPU step ~15% slower (page-fault churn, seen
        # as system time), far more than the copy it hides
        accelerator = state.device.type != "cpu"
        self._stager = DefaultStager(StagingOptions(True, False, True, True)) if accelerator else None
        self._staging = None
        self.fail_next_write: Exception | None = None  # fault injection (anychip.chaos): the next write raises it
        self.snapshots = None  # anychip.snapshot.Snapshots: the state in shared memory, every few steps

    def step_dir(self, step: int) -> Path:
        return step_dir(self.root, step)

    def due(self, step: int) -> bool:
        """Whether the run saves a checkpoint after ``step``: every ``interval`` steps and at
        the last step (never with interval 0)."""
        interval = self.cfg.interval
        return bool(interval) and (step % interval == 0 or step == self.last_step)

    # -- state -----------------------------------------------------------------------

    def _app_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.state.model, self.state.optimizer)
        app = {"model": model_sd, "optim": optim_sd}
        ref = getattr(self.state, "ref_model", None)
        if ref is not None:  # GRPO's reference policy: reset to the policy during the run
            app["ref"] = ref.state_dict()
        return app

    def _meta(self, step: int) -> dict:
        args = self._model_args()
        return {
            "step": step,
            "config_digest": self.run.digest,
            "model_shape": {k: v for k, v in asdict(args).items() if k not in SHAPE_FREE},
            "world_size": self.world.world_size,
            "layout": asdict(self.world.layout),  # informative: any layout loads it
            "device": self.state.device.type,
            "optimizer_empty": not self.state.optimizer.state,
            "time": time.time(),
        }

    def _model_args(self):
        return unwrap(self.state.model).args

    # -- save ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove leftovers of saves that never committed (rank 0, at start): directories named
        ``step_<digits>.tmp``, nothing else. First, UnsafePath (naming it) when the checkpoint
        directory, or another path the run keeps (runfiles.RUN_OWNED: final/, heartbeat/, ...),
        is a symbolic link: what it points to is not the run's to delete, load or replace."""
        if self.world.is_main:
            refuse_links(self.root.parent, (*RUN_OWNED, self.root.name))
        if self.world.is_main and self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if UNCOMMITTED.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                    remove_dir(self.root.parent, Path(self.root.name, p.name))
                    self.log.event("checkpoint_cleanup", path=str(p))
        if self.world.distributed:
            dist.barrier()

    def save(self, step: int, force: bool = False) -> None:
        """Save the state after optimizer step ``step`` when it is ``due`` (or ``force``).
        Async (default): returns once the save is started; the write and commit finish in
        the background. Sync (``checkpoint.async_save = false``): returns after the commit."""
        if not (force or self.due(step)):
            return
        self.wait()
        t0 = time.perf_counter()
        tmp = self.root / f"{PREFIX}{step:08d}{TMP}"

        def prepare_directory():
            if self.world.is_main:  # in the run directory, following no link (runfiles)
                remove_dir(self.root.parent, Path(self.root.name, tmp.name))
                make_dir(self.root.parent, Path(self.root.name, tmp.name))

        def check_finite():
            bad = _nonfinite(self.state.model, self.state.optimizer)
            if bad:
                raise FloatingPointError(f"{bad} holds a non-finite value; a checkpoint never stores one")

        def write_rank_files():
            if self.fail_next_write is not None:
                error, self.fail_next_write = self.fail_next_write, None
                raise error
            r = self.world.rank
            (tmp / f"rank{r}.json").write_text(json.dumps({"step": step, "data": self.state.data.state_dict()}))
            save_file(self.state.device.rng_state(), tmp / f"rank{r}.safetensors")
            if self.world.is_main:
                (tmp / "meta.json").write_text(json.dumps(self._meta(step), indent=1))
                (tmp / "config.toml").write_text(self.run.config_toml)

        # every rank must agree a stage worked before the next (a failing disk on one rank
        # would otherwise leave the others waiting in a collective)
        for stage in (check_finite, prepare_directory, write_rank_files):
            error = None
            try:
                stage()
            except Exception as e:
                error = e
            if not self._all_ok(error is None):
                self._failed(step, error or RuntimeError("a checkpoint write failed on another rank"))
                return
        # before the first update the optimizer has no state; DCP creates it with a zero-lr
        # step (step counters at 1). That must not change the run: it is cleared again once
        # copied, and on load (meta "optimizer_empty")
        fresh = not self.state.optimizer.state
        try:
            if self.cfg.async_save:
                response = dcp.async_save(
                    self._app_state(),
                    checkpoint_id=str(tmp),
                    process_group=self._group,
                    no_dist=not self.world.distributed,
                    async_stager=self._stager,
                )
                self._staging = getattr(response, "staging_completion", None)
                future = getattr(response, "upload_completion", response)
            else:  # synchronous: the loop waits for the write and the commit
                future = Future()
                dcp.save(self._app_state(), checkpoint_id=str(tmp), no_dist=not self.world.distributed)
                future.set_result(None)
        except Exception as e:  # a failing write must not end the run
            self._failed(step, e)
            return
        finally:
            if fresh:
                self.wait_staged()
                self.state.optimizer.state.clear()
        done = threading.Event()
        self._pending = (future, done, step)
        if self.cfg.async_save:
            self.log.event("checkpoint_save", step=step, stall_s=time.perf_counter() - t0)
        # the commit runs as soon as the write is complete, in the writer's thread: on
        # rank 0 the future completes only after every rank's files and DCP's metadata
        future.add_done_callback(lambda f: self._commit(f, tmp, step, t0, done))
        if not self.cfg.async_save:
            self.wait()
            self.log.event("checkpoint_save", step=step, stall_s=time.perf_counter() - t0)

    def _all_ok(self, ok: bool) -> bool:
        if not self.world.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    def snapshot(self, step: int) -> None:
        """Snapshot the state after ``step`` in shared memory when one is due. A failed
        snapshot is an event and a warning; the snapshot kept before stays."""
        s = self.snapshots
        if s is None or not s.due(step):
            return
        try:
            s.take(step)
        except OSError as e:  # no room in shared memory: no more snapshots; disk checkpoints go on
            self.log.event("snapshot_failed", step=step, error=f"{type(e).__name__}: {e}", snapshots="off")
            self.log.print(
                f"[yellow]warning: snapshot of step {step} failed ({escape(str(e))}); snapshots are off for this "
                "run (checkpoint.snapshot_interval = 0 says so up front)[/yellow]"
            )
            s.remove()
            self.snapshots = None
        except Exception as e:
            self.log.event("snapshot_failed", step=step, error=f"{type(e).__name__}: {e}")
            self.log.print(f"[yellow]warning: snapshot of step {step} failed ({escape(str(e))})[/yellow]")

    def snapshot_stalls(self) -> dict[str, float]:
        """The loop's stalls for snapshots since the last call, for a step's metrics:
        ``snapshot_s`` the calls that took them (between steps), ``snapshot_wait_s`` waits
        within the step for a background copy to finish."""
        s = self.snapshots
        if s is None:
            return {}
        out = {"snapshot_s": s.taken_s} if s.taken_s else {}
        if s.waited_s:
            out["snapshot_wait_s"] = s.waited_s
        s.taken_s = s.waited_s = 0.0
        return out

    def wait_staged(self) -> None:
        """Block until the pending save (and a background snapshot) has copied the state
        (before weights change)."""
        if self.snapshots is not None:
            try:
                self.snapshots.wait()
            except Exception as e:
                self.log.event("snapshot_failed", step=self.state.step - 1, error=f"{type(e).__name__}: {e}")
        if self._staging is None:
            return
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # a failed save is reported by the commit callback
            self._staging.result()
        self._staging = None
        self.log.event("checkpoint_staged", stall_s=time.perf_counter() - t0)

    def _commit(self, future, tmp: Path, step: int, t0: float, done: threading.Event) -> None:
        try:
            future.result()
            if self.world.is_main:
                write_manifest(tmp)
                final = step_dir(self.root, step)
                remove_dir(self.root.parent, Path(self.root.name, final.name))  # the same step saved before
                tmp.rename(final)
                _fsync_dir(self.root)
                size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
                write_s = time.perf_counter() - t0
                self.log.event("checkpoint_commit", step=step, write_s=write_s, path=str(final), bytes=size)
                self._retire()
                self._scrub(final)
        except Exception as e:
            self._failed(step, e)
        finally:
            done.set()

    def wait(self, barrier: bool = True) -> None:
        """Block until the pending save is written and committed (or has failed).
        ``barrier=False`` on an error path, where other ranks may be gone."""
        self.wait_staged()
        if self._pending is None:
            return
        _, done, _ = self._pending
        self._pending = None
        done.wait(timeout=None if barrier else 60)
        if barrier and self.world.distributed:
            dist.barrier()

    def _failed(self, step: int, error: Exception) -> None:
        self.log.event("checkpoint_failed", step=step, error=f"{type(error).__name__}: {error}")
        self.log.print(
            f"[yellow]warning: checkpoint of step {step} failed ({escape(str(error))}); training goes on[/yellow]"
        )
        if self.world.is_main:
            with contextlib.suppress(OSError, ValueError):  # ValueError: UnsafePath, a link is left alone
                remove_dir(self.root.parent, Path(self.root.name, f"{PREFIX}{step:08d}{TMP}"))

    def _retire(self) -> None:
        """Keep the newest ``checkpoint.keep`` and every ``keep_every``-th step."""
        cfg = self.cfg
        for old in committed(self.root)[cfg.keep :]:
            step = int(old.name[len(PREFIX) :])
            if cfg.keep_every and step % cfg.keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)
            self.log.event("checkpoint_retire", step=step)

    def _scrub(self, newest: Path) -> None:
        """Check the checkpoints kept besides ``newest`` against their manifests (in the
        writer's thread, after a commit): one altered at rest is found now, and set aside,
        rather than when it is needed (a restart from a snapshot reads no checkpoint)."""
        for d in committed(self.root):
            if d != newest:
                self._set_aside_if_corrupt(d)

    def _set_aside_if_corrupt(self, d: Path) -> bool:
        """True when ``d`` matches its manifest; else a ``checkpoint_corrupt`` event, and the
        directory renamed ``corrupt_<name>``: kept for inspection, never loaded again, never
        counted by ``checkpoint.keep`` (committed() reads only step_<digits>)."""
        problem = verify(d)
        if problem is None:
            return True
        self.log.event("checkpoint_corrupt", path=str(d), problem=problem)
        self.log.print(f"[yellow]checkpoint {escape(d.name)} is unusable: {escape(problem)}[/yellow]")
        aside, n = d.with_name(f"corrupt_{d.name}"), 1  # numbered when the step was set aside before
        while aside.exists():
            aside, n = d.with_name(f"corrupt_{d.name}_{n}"), n + 1
        d.rename(aside)
        return False

    # -- load ------------------------------------------------------------------------

    def load_latest(self, before: int | None = None, disk_only: bool = False) -> int | None:
        """Restore the newest state (with a step below ``before``, if given): the newest
        snapshot every rank holds in shared memory, or a newer verified checkpoint on disk
        (only a checkpoint with ``disk_only``); returns its step, None when there is none.

        Rank 0 verifies and every rank loads the same one. Raises CheckpointError when a
        checkpoint's model shape differs from the config."""
        from .snapshot import restorable_step

        snap = None if disk_only else restorable_step(self.snapshots, self.world, before)
        choice = None
        if self.world.is_main:
            for d in committed(self.root):
                if before is not None and int(d.name[len(PREFIX) :]) >= before:
                    continue
                if snap is not None and int(d.name[len(PREFIX) :]) <= snap:
                    break  # the snapshot is as new: no disk read, no checksums
                if self._set_aside_if_corrupt(d):  # else: the previous one is tried
                    choice = str(d)
                    break
        if self.world.distributed:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        if choice is None and snap is not None:
            t0 = time.perf_counter()
            self.snapshots.restore(snap)
            self.log.event("snapshot_load", step=snap, load_s=time.perf_counter() - t0)
            return snap
        if choice is None:
            return None
        step = self._load(Path(choice))
        if self.snapshots is not None:
            self.snapshots.drop_after(step)  # a rollback past them: their trajectory is given up
        return step

    def _load(self, directory: Path) -> int:
        t0 = time.perf_counter()
        meta = json.loads((directory / "meta.json").read_text())
        want = {k: v for k, v in asdict(self._model_args()).items() if k not in SHAPE_FREE}
        saved = meta["model_shape"]
        diff = {k: (saved.get(k), v) for k, v in want.items() if _norm(saved.get(k)) != _norm(v)}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{directory}: the model in this checkpoint has another shape ({detail})")
        app = self._app_state()
        safe_load(app, directory, no_dist=not self.world.distributed)  # runs no code the checkpoint holds
        model, optimizer = self.state.model, self.state.optimizer
        set_state_dict(model, optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"])
        if "ref" in app:
            self.state.ref_model.load_state_dict(app["ref"])
        if meta.get("optimizer_empty"):
            self.state.optimizer.state.clear()
        r = self.world.rank
        per_rank = directory / f"rank{r}.json"
        if not per_rank.is_file():  # resharded to more ranks: rank 0's data state is the global one
            per_rank = directory / "rank0.json"
        extra = json.loads(per_rank.read_text())
        self.state.data.load_state_dict(extra["data"])
        rng_file = directory / f"rank{r}.safetensors"
        same_layout = meta["world_size"] == self.world.world_size and meta["device"] == self.state.device.type
        if rng_file.is_file() and same_layout:
            self.state.device.set_rng_state(load_file(rng_file))
        else:
            self.state.device.manual_seed(self.run.seed + meta["step"] + r)
            self.log.event("rng_reseeded", step=meta["step"], reason="world size or device type changed")
        self.log.event(
            "checkpoint_load",
            step=meta["step"],
            path=str(directory),
            load_s=time.perf_counter() - t0,
            saved_world_size=meta["world_size"],
            saved_device=meta["device"],
        )
        return int(meta["step"])


@torch.no_grad()
def _nonfinite(model, optimizer) -> str | None:
    """The name of the first parameter or optimizer state (local shard) with a NaN/Inf."""
    tensors = [(f"parameter {n}", p) for n, p in model.named_parameters()]
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                tensors.append((f"optimizer state {k} of a {tuple(p.shape)} parameter", v))
    for name, t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        # a cheap sum first; the element-wise test only when the sum is not finite
        if local.numel() and not torch.isfinite(local.sum(dtype=torch.float32)) and not torch.isfinite(local).all():
            return name
    return None


def _norm(v):
    return json.loads(json.dumps(v))  # tuples vs lists, dataclasses vs dicts
