"""The flags of `anychip qualify`, kept free of torch imports so that the CLI starts fast."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="the device to qualify (the target): cuda, npu, xpu, mps, cpu or auto"
    )
    p.add_argument(
        "--reference",
        default="cpu",
        help="the device the target is judged against (default cpu); every result is also compared "
        "with float64 on the CPU",
    )
    p.add_argument("--preset", default="tiny", help="the model preset whose shapes to use (default tiny)")
    p.add_argument(
        "--init",
        type=Path,
        metavar="PATH",
        help="shapes and weights from an anychip run, checkpoint or Hugging Face directory",
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/qualify-<device>-<date-time>)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="op-suite dtypes, comma-separated")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per op-suite call (default 2048)")
    p.add_argument("--seq", type=int, default=512, help="sequence length of attention ops (default 512)")
    p.add_argument("--ops", default="", help="run only these ops of the suite, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="training steps of step parity (0 = none; default 3)")
    p.add_argument(
        "--parity-dtypes",
        default="float32,bfloat16",
        help="autocast dtypes of step parity, comma-separated (default float32,bfloat16)",
    )
    p.add_argument("--parity-batch", type=int, default=4, help="sequences in the step-parity batch (default 4)")
    p.add_argument("--parity-seq", type=int, default=64, help="their length (default 64)")
    p.add_argument("--collective-numel", type=int, default=1 << 22, help="elements per rank of collectives")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inject",
        metavar="OP[:REL]",
        help="make OP wrong on the target by a relative error REL (default 1e-2), to see the checks "
        "catch it: matmul, softmax, sigmoid, silu, rms_norm, sdpa, cross_entropy",
    )
    p.add_argument("--nproc", type=int, default=1, help="local processes (one per device); > 1 adds collectives")


def dtypes(spec: str, flag: str = "--dtypes"):
    """ "float32,bfloat16" -> (torch.float32, torch.bfloat16); ValueError naming `flag` for unknown names."""
    import torch

    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown:
        raise ValueError(
            f"{flag} {spec!r}: unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPE_NAMES)}"
        )
    return tuple(getattr(torch, n) for n in names)


def check_arguments(a: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for bad values, before any work or process starts."""
    from ..models.deepseek.presets import PRESETS
    from .faults import parse

    dtypes(a.dtypes, "--dtypes")
    dtypes(a.parity_dtypes, "--parity-dtypes")
    parse(a.inject)
    if a.init is None and a.preset not in PRESETS:
        raise ValueError(f"--preset {a.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if a.init is not None and not a.init.exists():
        raise ValueError(f"--init {a.init}: no such file or directory")
    for flag in ("tokens", "seq", "parity_batch", "parity_seq", "collective_numel", "nproc"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.steps < 0:
        raise ValueError(f"--steps must be 0 or more, got {a.steps}")
    if a.tokens % a.seq:
        raise ValueError(f"--tokens {a.tokens} must be a multiple of --seq {a.seq}")


def worker_argv(a: argparse.Namespace) -> list[str]:
    """The flags that reproduce `a` for ``python -m anychip.qualify.run`` (without --nproc)."""
    argv = []
    for key, value in vars(a).items():
        if key in FLAGS and value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


FLAGS = (
    "device",
    "reference",
    "preset",
    "init",
    "out",
    "dtypes",
    "tokens",
    "seq",
    "ops",
    "steps",
    "parity_dtypes",
    "parity_batch",
    "parity_seq",
    "collective_numel",
    "seed",
    "inject",
)


def default_out(device: str) -> Path:
    return Path("runs") / f"qualify-{device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
