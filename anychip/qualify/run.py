"""`anychip qualify`: the op suite, collectives and step parity of one device against a reference, as
a JSON file and a report card (Markdown and HTML). Under torchrun every rank checks its own device."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
import torch.distributed as dist

from ..device import Device, get_device
from ..models.deepseek.presets import preset
from ..parallel import close_world, init_world
from .collectives import run_collectives
from .faults import parse
from .numerics import AGREEMENT_LIMITS, FAIL, LIMITS, RATIO_LIMITS, worst
from .ops import Shape
from .options import add_arguments, check_arguments, default_out, dtypes
from .parity import step_parity
from .report import rank_status, write_report
from .suite import DTYPE_NAMES, run_ops


def qualify(a: argparse.Namespace) -> dict:
    """Run every check on this process's device (all ranks under torchrun); rank 0 writes the report
    to a.out and every rank returns it (with its overall status)."""
    check_arguments(a)
    target, reference = get_device(a.device), get_device(a.reference)
    world = init_world(target)
    try:
        report = _qualify(a, target, reference, world.rank, world.world_size)
    finally:
        close_world(world)
    return report


def _qualify(a, target: Device, reference: Device, rank: int, world_size: int) -> dict:
    fault = parse(a.inject)
    args, weights = _model(a)
    shape = Shape(a.tokens, a.seq)
    only = tuple(s.strip() for s in a.ops.split(",") if s.strip())

    def progress(row: dict) -> None:
        if rank == 0:
            print(f"  {row['op']:<15} {row['dtype']:<9} {row['status']}", file=sys.stderr, flush=True)

    rows = run_ops(target, reference, args, shape, dtypes(a.dtypes), fault, a.seed, only, on_row=progress)
    collectives = []
    if world_size > 1:
        ref = reference if reference.type in target.dist_backend else get_device("cpu")
        collectives = run_collectives(target, ref, a.collective_numel, (torch.float32, torch.bfloat16), a.seed)
    parity = []
    for dtype in dtypes(a.parity_dtypes) if a.steps else ():
        if target.supports_dtype(dtype) and reference.supports_dtype(dtype):
            checked = step_parity(
                target, reference, args, dtype, a.steps, a.parity_batch, a.parity_seq, fault, a.seed, weights
            )
            parity.append(checked)
            if rank == 0:
                print(f"  step parity     {DTYPE_NAMES[dtype]:<9} {parity[-1]['status']}", file=sys.stderr)
    mine = {"rank": rank, "device": _describe(target), "ops": rows, "collectives": collectives, "parity": parity}
    ranks = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": ("anychip " if sys.argv[0].endswith("anychip") else "anychip qualify ") + " ".join(sys.argv[1:]),
        "target": mine["device"],
        "reference": _describe(reference),
        "model": {
            "preset": None if a.init else a.preset,
            "init": str(a.init) if a.init else None,
            "hidden_size": args.hidden_size,
            "layers": args.num_hidden_layers,
            "experts": args.n_routed_experts,
            "vocab_size": args.vocab_size,
        },
        "shape": {"tokens": shape.tokens, "seq": shape.seq},
        "world_size": world_size,
        "seed": a.seed,
        "injected_fault": {"op": fault[0], "relative_error": fault[1]} if fault else None,
        "limits": {
            "relative_error": {DTYPE_NAMES.get(k, "float64"): v for k, v in LIMITS.items()},
            "error_ratio": RATIO_LIMITS,
            "expert_agreement": AGREEMENT_LIMITS,
        },
        "software": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "ranks": ranks,
    }
    report["status"] = worst(rank_status(r) for r in ranks)
    if rank == 0:
        write_report(report, a.out)
    return report


def _model(a):
    if a.init is None:
        return preset(a.preset), None
    from ..export import load_init

    model = load_init(str(a.init))
    return model.args, model.state_dict()


def _describe(device: Device) -> dict:
    peaks = {DTYPE_NAMES[d]: device.peak_flops(d) for d in DTYPE_NAMES if device.supports_dtype(d)}
    return {
        "type": device.type,
        "name": device.name(),
        "peak_flops": peaks,
        "peak_bandwidth": device.peak_bandwidth(),
        "peak_source": "measured (matmul, copy)" if device.type == "cpu" else "device table",
    }


def main(argv: list[str] | None = None) -> int:
    """Worker entry (``python -m anychip.qualify.run``): exit 1 when any check failed."""
    p = argparse.ArgumentParser(prog="anychip qualify")
    add_arguments(p)
    a = p.parse_args(argv)
    a.out = a.out or default_out(a.device)
    report = qualify(a)
    return 1 if report["status"] == FAIL else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
