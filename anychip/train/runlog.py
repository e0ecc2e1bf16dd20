"""What a run leaves behind: ``events.jsonl`` (append-only: start, end, and later every
checkpoint and fault), ``metrics.jsonl`` (one line per step), ``experts.jsonl`` (tokens
routed to each expert of each MoE layer, per log interval), TensorBoard scalars, and the
terminal view (a rich progress bar on a terminal, plain lines otherwise).
Only rank 0 writes; other ranks get a RunLog that does nothing."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..events import append_event, event_line, read_jsonl  # noqa: F401  (append_event, read_jsonl re-exported)


class RunLog:
    def __init__(self, run_dir: Path, active: bool, total_steps: int, tensorboard: bool = True, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.active = active
        self.console = Console(highlight=False)
        self._tb = None
        self._progress = None
        self._lock = threading.Lock()  # checkpoint commits log from a writer thread
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._events = open(self.run_dir / "events.jsonl", "a")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._experts = open(self.run_dir / "experts.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress and sys.stdout.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def event(self, kind: str, **fields) -> None:
        """Append one event; flushed and fsynced so it survives a crash right after."""
        if not self.active:
            return
        with self._lock:
            self._events.write(event_line(kind, **fields))
            self._events.flush()
            os.fsync(self._events.fileno())

    def metrics(self, step: int, values: dict) -> None:
        if not self.active:
            return
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def expert_load(self, step: int, tokens, layers: list[str]) -> None:
        """Tokens routed to each expert ([MoE layers, N_r]) over the steps since the last call, and the
        names of those layers."""
        if not self.active or tokens is None or tokens.numel() == 0:
            return
        rows = [[round(float(x)) for x in layer] for layer in tokens.cpu()]
        record = {"step": step, "time": time.time(), "layers": layers, "tokens": rows}
        self._experts.write(json.dumps(record) + "\n")
        self._experts.flush()

    def advance(self, step: int, status: str) -> None:
        if self.active and self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def print(self, text: str) -> None:
        if self.active:
            self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._events.close()
        self._metrics.close()
        self._experts.close()
