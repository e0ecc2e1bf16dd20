"""Chaos mode: inject faults into a run to prove that the guards and the recovery work.

    [chaos]
    at = ["nan@12", "kill@30:1"]   # kind@step, optionally :rank (default rank 0)
    every = 30                     # and/or a random fault about every 30 steps (seeded)

    anychip train --chaos nan@12,kill@30:1      # shorthand for chaos.at
    anychip train --chaos every=30              # shorthand for chaos.every

Kinds (and where they strike):
    kill               SIGKILL of the worker, at the start of the step
    exception          an exception raised at the start of the step
    hang               the worker stops making progress (a native call that holds the GIL,
                       or SIGSTOP with chaos.hang = "stop")
    nan                a NaN in one gradient, after the backward pass
    bitflip            one bit of one parameter flipped on one rank, after the update
    slow               the rank sleeps chaos.slow_s per step for chaos.slow_steps steps
    corrupt_checkpoint one file of the newest committed checkpoint altered on disk
    checkpoint_write   the next checkpoint write fails
    bad_batch          the batch with this number in the data stream gets garbage targets,
                       every time it is drawn (a data-caused loss spike)
    sdc                flaky compute: noise on one layer's output for this step's forward
                       passes on the rank (caught by the recompute audit on audit steps)
    pool_loss          pool_loss@step:pool: every process of that pool dies at the start of the
                       step (its launcher with SIGKILL, its workers with it); a run of pools

Every injection is appended to events.jsonl as ``chaos_inject`` by the rank that injects
it, before it strikes; an injection fires once per run, also across restarts (the
events are read back at start), so a resumed run meets the same faults only once.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
from dataclasses import dataclass

import torch

from .checkpoint import committed
from .config import FAULT_KINDS, split_fault
from .events import append_event, read_jsonl
from .launcher_env import LAUNCHER_PID, POOL
from .parallel import unwrap

KINDS = FAULT_KINDS  # declared on the config field chaos.kinds


class ChaosError(RuntimeError):
    """The exception that chaos mode raises: a transient fault, retried by a restart."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0

    @property
    def key(self) -> tuple:
        return (self.kind, self.step, self.rank)


def parse_fault(spec: str) -> Fault:
    """``kind@step`` or ``kind@step:rank``; raises ValueError naming what is wrong."""
    return Fault(*split_fault(spec))


def schedule(cfg, world_size: int, steps: int, replicas: bool) -> list[Fault]:
    """Every fault of the run: the listed ones, plus random ones (seeded: the same on every
    rank and across restarts). Random bit flips are drawn only where replicas exist to
    compare (DDP with >= 2 ranks); without them a flip is undetectable by design."""
    faults = [parse_fault(s) for s in cfg.at]
    if cfg.every:
        kinds = [k for k in cfg.kinds if k not in ("bad_batch", "sdc", "pool_loss") and (k != "bitflip" or replicas)]
        for step in range(2, steps):
            rng = random.Random(f"{cfg.seed}:{step}")
            if kinds and rng.random() < 1.0 / cfg.every:
                faults.append(Fault(rng.choice(kinds), step, rng.randrange(world_size)))
    return faults


def install(cfg, state, hooks, steps: int, replicas: bool) -> None:
    """Register the faults of the ``[chaos]`` section ``cfg`` on the loop's hooks (nothing
    when empty); ``steps`` is the run's last step, ``replicas`` whether DDP replicas exist."""
    faults = schedule(cfg, state.world.world_size, steps, replicas)
    if faults:
        Chaos(cfg, state, faults).attach(hooks)


class Chaos:
    def __init__(self, cfg, state, faults: list[Fault]):
        self.state = state
        self.cfg = cfg
        self.rank = state.world.rank
        self.pool = int(os.environ.get(POOL, "-1"))  # pool_loss@step:pool strikes through its rank 0
        fired = {
            (e["kind"], e["step"], e["rank"])
            for e in read_jsonl(state.run_dir / "events.jsonl")
            if e["event"] == "chaos_inject"
        }
        self.faults = [f for f in faults if f.key not in fired]
        self.poisoned = {f.step for f in faults if f.kind == "bad_batch"}  # data faults stay with their batch
        self.slow_until = -1
        self._noise = None
        state.log.event("chaos", faults=[f"{f.kind}@{f.step}:{f.rank}" for f in faults], pending=len(self.faults))

    def attach(self, hooks) -> None:
        hooks.add("before_step", self.before_step)
        hooks.add("after_backward", self.after_backward)
        hooks.add("after_step", self.after_step)

    def _due(self, kinds: tuple[str, ...], everywhere: bool = False) -> list[Fault]:
        """Faults of these kinds at this step for this rank; each recorded as it fires."""
        step = self.state.step
        due = [f for f in self.faults if f.kind in kinds and f.step == step and (everywhere or self._mine(f))]
        for f in due:
            self.faults.remove(f)
            if self._mine(f):  # the injecting rank records it, before it strikes
                append_event(self.state.run_dir, "chaos_inject", kind=f.kind, step=f.step, rank=f.rank)
        return [f for f in due if self._mine(f) or everywhere]

    def _mine(self, f: Fault) -> bool:
        if f.kind == "pool_loss":  # its number is a pool
            return f.rank == self.pool and self.rank == 0
        return f.rank == self.rank

    # -- hooks -----------------------------------------------------------------------

    def before_step(self, state) -> None:
        self._heal()  # flaky compute lasts one step (also when that step was rolled back)
        for f in self._due(("kill", "exception", "hang", "slow", "sdc", "checkpoint_write", "pool_loss")):
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "pool_loss":  # the pool's launcher first: it must not start the workers again
                if os.environ.get(LAUNCHER_PID):
                    os.kill(int(os.environ[LAUNCHER_PID]), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)  # and the pool's other workers die with their launcher
            elif f.kind == "exception":
                raise ChaosError(f"chaos: exception injected at step {f.step} on rank {f.rank}")
            elif f.kind == "hang":
                self._hang()
            elif f.kind == "slow":
                self.slow_until = f.step + self.cfg.slow_steps - 1
            elif f.kind == "sdc":
                self._flaky_compute()
            elif f.kind == "checkpoint_write":
                state.checkpointer.fail_next_write = OSError(
                    f"chaos: checkpoint write failure injected at step {f.step}"
                )
        if state.data.stats["batches"] in self.poisoned:  # the batch just drawn for this step
            self._poison(state.batch, state.data.stats["batches"])

    def after_backward(self, state) -> None:
        for _ in self._due(("nan",)):
            p = next(p for p in state.model.parameters() if p.grad is not None)
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g.view(-1)[0] = float("nan")
        if state.step <= self.slow_until:
            time.sleep(self.cfg.slow_s)

    def _heal(self) -> None:
        if self._noise is not None:
            self._noise.remove()
            self._noise = None

    def after_step(self, state) -> None:
        self._heal()
        for _ in self._due(("bitflip",)):
            self._flip(state)
        if self._due(("corrupt_checkpoint",), everywhere=True):
            self._corrupt(state)

    # -- the faults ------------------------------------------------------------------

    def _hang(self) -> None:
        if self.cfg.hang == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL, so no Python thread runs either
        while True:
            libc.sleep(3600)

    @torch.no_grad()
    def _flip(self, state) -> None:
        state.checkpointer.wait_staged()  # a memory fault after the checkpoint copied the weights
        rng = random.Random(f"{self.cfg.seed}:flip:{state.step}")
        params = [p for p in state.model.parameters() if p.dtype == torch.float32]
        p = params[rng.randrange(len(params))]
        local = p.to_local() if hasattr(p, "to_local") else p
        flat = local.view(-1).view(torch.int32)
        i, bit = rng.randrange(flat.numel()), rng.randrange(8, 23)  # a mantissa bit: silent, not a NaN
        flat[i] ^= 1 << bit

    def _corrupt(self, state) -> None:
        state.checkpointer.wait()  # the newest checkpoint is committed
        if not state.world.is_main:
            return
        newest = next(iter(committed(state.checkpointer.root)), None)
        if newest is None:
            return
        files = (p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json")
        target = max(files, key=lambda p: p.stat().st_size)
        with open(target, "r+b") as f:
            f.seek(target.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    def _poison(self, batch: dict, number: int) -> None:
        # every target becomes the padding token, which the model never learns to predict
        labels = batch["labels"]
        batch["labels"] = torch.where(labels == -100, labels, torch.full_like(labels, self.state.tokenizer.pad_id))
        if self.rank == 0:
            append_event(
                self.state.run_dir, "chaos_inject", kind="bad_batch", step=self.state.step, rank=0, batch=number
            )

    def _flaky_compute(self) -> None:
        layers = unwrap(self.state.model).layers
        layer = layers[len(layers) // 2]
        gen = torch.Generator().manual_seed(self.state.step)

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            noise = 1e-3 * torch.randn(out.shape, generator=gen).to(out)
            out = out + noise
            return (out, *output[1:]) if isinstance(output, tuple) else out

        self._noise = layer.register_forward_hook(hook)
