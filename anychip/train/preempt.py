"""Preemption: a polite stop asked for by a signal, honoured at the next step boundary.

Kubernetes, Slurm and Ctrl-C ask a job to stop with SIGTERM or SIGINT, and follow with
SIGKILL after a grace period. ``anychip train``'s launcher turns that into SIGUSR2 to its
workers (a SIGTERM from torch's elastic agent means "die now", e.g. before a restart, and
keeps that meaning); under plain torchrun, or when training runs in the launcher's own
process, the worker takes SIGTERM and SIGINT itself. Either way the signal only sets a
flag; at the next step boundary the ranks agree on it (within the guards' per-step
agreement, or one all-reduce of one number when no guard runs),
save a checkpoint of that step, record a ``preempted`` event and exit 0, so that
``anychip train --resume`` continues as if nothing had happened.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from ..launcher_env import LAUNCHER_PID

PREEMPT_SIGNAL = signal.SIGUSR2  # what anychip's launcher sends its workers


def launched_by_anychip() -> bool:
    """Whether this worker was started by ``anychip train``'s launcher (which owns SIGTERM)."""
    return bool(os.environ.get(LAUNCHER_PID))


class Preemption:
    """Installs the handlers (main thread only; elsewhere it never fires) and answers,
    at a step boundary, whether any rank was asked to stop."""

    def __init__(self, own_terminate: bool | None = None):
        self.signal: str | None = None
        self.since: float | None = None
        if own_terminate is None:
            own_terminate = not launched_by_anychip()
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        wanted = [PREEMPT_SIGNAL] + ([signal.SIGTERM, signal.SIGINT] if own_terminate else [])
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.signal is None:
            self.signal, self.since = signal.Signals(signum).name, time.monotonic()

    @property
    def asked(self) -> bool:
        """This rank was asked to stop (the guards' per-step agreement carries it to the others)."""
        return self.signal is not None

    def requested(self, world) -> bool:
        """True on every rank when any rank has been asked to stop: a collective, every rank
        calls it at the same step (unguarded runs; guarded ones learn it from their agreement)."""
        flag = self.asked
        if world.distributed:
            import torch.distributed as dist

            t = torch.tensor([1 if flag else 0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
