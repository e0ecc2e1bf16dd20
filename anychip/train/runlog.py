"""What a run leaves behind: ``events.jsonl`` (append-only: start, end, and later every
checkpoint and fault), ``metrics.jsonl`` (one line per step), ``experts.jsonl`` (tokens
routed to each expert of each MoE layer, over a span of steps), TensorBoard scalars, and the
terminal view (a rich progress bar on a terminal, plain lines otherwise).
Only rank 0 writes; other ranks get a RunLog that does nothing."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.errors import MarkupError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..events import append_event, open_append, read_jsonl  # noqa: F401  (read_jsonl re-exported)

# experts.jsonl of a whole run stays within about this size (in 10^6 bytes). DeepSeek-V3 (58 MoE layers and
# the MTP module's, x 256 experts) writes 130-190 KB a record (counts of more steps have more digits): a
# 1M-step run at log interval 10 gets a record every ~3700 steps, ~270 of them, more than the heatmap's
# 200 columns.
EXPERTS_MAX_MB = 50.0


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        active: bool,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        log_interval: int = 1,
        experts_max_mb: float = EXPERTS_MAX_MB,
    ):
        self.run_dir = Path(run_dir)
        self.active = active
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.experts_max_bytes = experts_max_mb * 1e6
        self.experts_interval: int | None = None  # steps per expert record; chosen at the first one
        self._expert_tokens: torch.Tensor | None = None  # float64, on the CPU: since the last record
        self._expert_layers: list[str] = []
        self._expert_step = 0  # the last step added to _expert_tokens
        self.console = Console(highlight=False)
        self._tb = None
        self._progress = None
        self._lock = threading.Lock()  # checkpoint commits log from a writer thread
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open_append(self.run_dir / "metrics.jsonl")  # only this process appends to these two
        self._experts = open_append(self.run_dir / "experts.jsonl")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress and sys.stdout.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}", markup=False),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def event(self, kind: str, **fields) -> None:
        """Append one event to events.jsonl (which other processes append to as well); fsynced so it survives
        a crash right after."""
        if not self.active:
            return
        with self._lock:
            append_event(self.run_dir, kind, **fields)

    def metrics(self, step: int, values: dict) -> None:
        if not self.active:
            return
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def expert_load(self, step: int, tokens: torch.Tensor | None, layers: list[str]) -> None:
        """Count the tokens routed to each expert ([MoE layers, N_r], any device) in ``step``, a step that
        updated the weights, under the names of those layers. Call it once per such step: the counts add up
        until a record of them is due, at step 1, at the last step and every ``experts_interval`` steps: a
        multiple of the log interval (the log interval itself for small models), chosen at the first call
        so that the run's records fit in ``experts_max_mb``."""
        if not self.active or tokens is None or tokens.numel() == 0:
            return
        tokens = tokens.detach().cpu().double()
        self._expert_tokens = tokens if self._expert_tokens is None else self._expert_tokens + tokens
        self._expert_layers, self._expert_step = list(layers), step
        if self.experts_interval is None:
            self.experts_interval = self._experts_interval(tokens, layers)
        if step == 1 or step == self.total_steps or step % self.experts_interval == 0:
            self._write_experts()

    def _experts_interval(self, step_tokens: torch.Tensor, layers: list[str]) -> int:
        """The smallest multiple of the log interval at which all records of the run, each as long as a
        record of that many steps of ``step_tokens`` (counts of more steps have more digits), fit in the
        budget; the whole run when not even that fits."""
        k = 1
        while True:
            span = k * self.log_interval
            size = len(expert_line(0, step_tokens * span, layers))
            need = (self.total_steps // span + 2) * size  # and the records of step 1 and the last step
            if need <= self.experts_max_bytes or span >= self.total_steps:
                return span
            k = max(k + 1, math.ceil(k * need / self.experts_max_bytes))

    def _write_experts(self) -> None:
        if self._expert_tokens is None:
            return
        self._experts.write(expert_line(self._expert_step, self._expert_tokens, self._expert_layers))
        self._experts.flush()
        self._expert_tokens = None

    def advance(self, step: int, status: str) -> None:
        """Move the progress bar to ``step``; ``status`` is shown as plain text."""
        if self.active and self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def print(self, text: str) -> None:
        """Print one line of rich markup ("[yellow]...[/yellow]"); the caller escapes untrusted parts (paths,
        errors, model output) with ``rich.markup.escape``. A line that is not valid markup is printed as it is,
        never raised: a missed escape must not stop a run."""
        if not self.active:
            return
        try:
            line = Text.from_markup(text)
        except MarkupError:
            line = Text(text)
        self.console.print(line, soft_wrap=True)

    def close(self) -> None:
        """Write the expert counts not yet recorded (a run that stops between records), close every file."""
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._write_experts()
        self._metrics.close()
        self._experts.close()


def expert_line(step: int, tokens: torch.Tensor, layers: list[str]) -> str:
    """One experts.jsonl record: step, time, layer names, tokens per expert per layer (whole numbers)."""
    rows = tokens.round().long().tolist()
    return json.dumps({"step": step, "time": time.time(), "layers": layers, "tokens": rows}) + "\n"
