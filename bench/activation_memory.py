"""Peak memory of one training step of `tiny` (16 x 128 tokens, float32, CPU) under each
activation-checkpointing mode, eager and compiled, each in a fresh process.

The figure is the growth of the process's peak resident set over its size before the step
(the CPU device's ``peak_allocated``, reset per step through /proc/self/clear_refs, Linux),
after --warmup steps (compilation happens in the first), the median over --steps steps. glibc
allocates every tensor above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so the resident set
follows the live tensors. Next to it, eager only, what `anychip plan` predicts for the step
(``anychip.plan.estimate.step_growth``).

    python bench/activation_memory.py [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys

MODES = ("none", "block", "selective")


def measure(mode: str, compiled: bool, steps: int, warmup: int) -> float:
    """One process: MB of peak growth per step, median over the steps after warm-up."""
    import torch

    from anychip.device import get_device
    from anychip.models import DeepSeekV3, preset
    from anychip.models.deepseek.parallelize import apply_activation_checkpointing, apply_compile

    torch.set_num_threads(1)
    args = preset("tiny")
    model = DeepSeekV3(args)
    model.init_weights(seed=0)
    apply_activation_checkpointing(model, mode)
    apply_compile(model, compiled)
    x = torch.randint(0, args.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    cpu, libc = get_device("cpu"), ctypes.CDLL("libc.so.6")
    growth = []
    for step in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        libc.malloc_trim(0)  # give freed memory back, so the step's own allocations show
        cpu.reset_peak_memory()
        before = cpu.memory_stats()["allocated"]
        model(x, labels=x.roll(-1, 1), reduction="sum").lm_loss.backward()
        if step >= warmup:
            growth.append((cpu.memory_stats()["peak_allocated"] - before) / 2**20)
    return statistics.median(growth)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--one", nargs=2, metavar=("MODE", "COMPILED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(measure(a.one[0], a.one[1] == "1", a.steps, a.warmup))
        return
    from anychip.models import preset
    from anychip.plan.estimate import step_growth

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print("tiny, 16 x 128 tokens, float32, one thread; peak growth of one training step (MB):")
    for compiled in (False, True):
        for mode in MODES:
            argv = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup), "--one", mode]
            out = subprocess.run([*argv, "1" if compiled else "0"], capture_output=True, text=True, check=True, env=env)
            mb = float(out.stdout.split()[-1])
            line = f"  {'compiled' if compiled else 'eager':<9} {mode:<10} {mb:6.0f} MB"
            if not compiled:
                predicted = step_growth(preset("tiny"), 16, 128, mode) / 2**20
                line += f"   planned {predicted:4.0f} MB ({predicted / mb - 1:+.0%})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
