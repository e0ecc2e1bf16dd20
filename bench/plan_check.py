"""`anychip plan` against what a step does, on every layout this machine runs (gloo, CPU):
the bytes each collective sends (counted as issued, ``anychip.plan.measure``) and the growth of
rank 0's peak resident set during the step, next to the planner's figures, as ratios. The
bytes are the mean over the ranks. The planner counts the all-to-all for balanced routing;
a router that is not balanced moves rows between ranks unevenly but, on average over the
ranks, sends the same share off-rank. "imbalance" is the busiest rank's all-to-all bytes
over the mean: what `anychip plan --expert-imbalance` takes.

`tiny`, 2 sequences of 128 tokens per process, one micro-batch each step unless said; the
first step initialises FSDP, the second is measured. Tensors above 64 KiB are allocated with
mmap, so the resident set follows the live tensors.

    python bench/plan_check.py [--nproc 2 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from anychip.models import preset
from anychip.plan.chips import CHIPS
from anychip.plan.estimate import Assumptions, Layout, estimate
from anychip.plan.measure import step_worker

LOCAL, SEQ = 2, 128
CASES = {  # processes: [(name, settings, (dp_replicate, ep), micro-batch)]
    2: [("fsdp 2", [], (1, 1), 2), ("fsdp 2, 2 micro-batches", [], (1, 1), 1), ("ep 2", ["parallel.ep=2"], (1, 2), 2)],
    4: [
        ("fsdp 4", [], (1, 1), 2),
        ("ep 4", ["parallel.ep=4"], (1, 4), 2),
        ("ep 2 of 4", ["parallel.ep=2"], (1, 2), 2),
        ("2x2 hsdp + ep 2", ["parallel.dp_replicate=2", "parallel.ep=2"], (2, 2), 2),
    ],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4], choices=sorted(CASES))
    a = p.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the workers' allocator reads it at start
    print(f"tiny, {LOCAL} x {SEQ} tokens per process; measured / planned")
    print(
        f"  {'layout':<26} {'all-gather':>10} {'reduce-sc.':>10} {'all-to-all':>10} {'all-reduce':>10} {'peak growth':>12}"
        f" {'imbalance':>11}"
    )
    for n in a.nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cases = CASES[n]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.pt"
            args = (n, port, [(sets, micro) for _, sets, _, micro in cases], LOCAL, str(out), "tiny", SEQ)
            mp.start_processes(step_worker, args=args, nprocs=n, start_method="spawn")
            results = torch.load(out)
        for (name, _, (r, ep), micro), got in zip(cases, results, strict=True):
            layout = Layout(r, n // r, ep, "none", micro)
            want = estimate(preset("tiny"), CHIPS["h100"], n, SEQ, LOCAL * n, layout, Assumptions(compute_bytes=4))
            cells = []
            for kind in ("all_gather", "reduce_scatter", "all_to_all", "all_reduce"):
                planned, sent = want.comm_bytes.get(kind), got["mean"].get(kind)
                cells.append(f"{sent / planned:10.3f}" if planned and sent else f"{'-':>10}")
            memory = got["growth"] / (want.buffers + want.activations)
            a2a = got["mean"].get("all_to_all")
            imbalance = f"{got['max']['all_to_all'] / a2a:11.3f}" if ep > 1 and a2a else f"{'-':>11}"
            print(f"  {name:<26} {' '.join(cells)} {memory:12.3f} {imbalance}", flush=True)


if __name__ == "__main__":
    main()
