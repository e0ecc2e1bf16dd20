"""`anychip plan`: will this model fit on these chips, in which layout, and how fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import ConfigError
from ..models.deepseek.args import ModelArgs
from ..models.deepseek.presets import PRESETS, count_parameters, preset
from .chips import CHIPS, Chip, G
from .estimate import Assumptions, Estimate, fits_on, longest_sequence, plan, smallest_fleet


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (default v3)")
    src.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face model directory (its config.json)")
    src.add_argument("--run", type=Path, metavar="RUN_DIR", help="an anychip run (its config.toml)")
    p.add_argument("--device", required=True, choices=sorted(CHIPS), help="the chip, from the fleet table")
    p.add_argument("--count", type=int, required=True, help="devices in the fleet")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: one per device)")
    d = Assumptions()
    p.add_argument("--mfu", type=float, default=d.mfu, help=f"assumed MFU of the dense peak (default {d.mfu})")
    p.add_argument("--link-efficiency", type=float, default=d.link_efficiency,
                   help=f"fraction of the listed bandwidth a collective reaches (default {d.link_efficiency})")  # fmt: skip
    p.add_argument("--headroom", type=float, default=d.headroom, help=f"memory left free (default {d.headroom})")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="activations' dtype (default bf16)")
    p.add_argument("--max-micro-batch", type=int, default=d.max_micro_batch)
    p.add_argument("--expert-imbalance", type=float, default=d.expert_imbalance,
                   help="the busiest EP rank's all-to-all rows over the mean (default 1: balanced routing)")  # fmt: skip
    p.add_argument("--memory", type=float, metavar="GB", help="device memory, overriding the table")
    p.add_argument("--intra", type=float, metavar="GB/s", help="bandwidth inside a node, one direction")
    p.add_argument("--inter", type=float, metavar="GB/s", help="bandwidth across nodes, one direction")
    p.add_argument("--bandwidth", type=float, metavar="GB/s", help="both --intra and --inter")
    p.add_argument("--per-node", type=int, help="devices per node (the fast domain)")
    p.add_argument("--top", type=int, default=8, help="layouts to list (default 8)")
    p.add_argument("--json", action="store_true", help="every figure as JSON")


def run(a: argparse.Namespace) -> int:
    args, name = _model(a)
    chip = _chip(a)
    if a.count < 1 or a.seq < 1:
        raise ConfigError(f"--count {a.count} and --seq {a.seq} must be positive")
    batch = a.global_batch or a.count
    if batch % a.count:
        raise ConfigError(f"--global-batch {batch} must be a multiple of --count {a.count} (sequences per device)")
    if a.expert_imbalance < 1:
        raise ConfigError(f"--expert-imbalance {a.expert_imbalance} is below 1 (the busiest rank over the mean)")
    dtype_bytes = 2 if a.dtype == "bf16" else 4
    assume = Assumptions(a.mfu, a.link_efficiency, a.headroom, dtype_bytes, a.max_micro_batch, a.expert_imbalance)
    estimates = plan(args, chip, a.count, a.seq, batch, assume)
    best = estimates[0] if estimates and estimates[0].fits else None
    advice = {}
    if best is None:
        advice["smallest_fleet"] = smallest_fleet(args, chip, a.seq, assume)
        advice["fits_one_sequence_per_device"] = batch > a.count and fits_on(args, chip, a.count, a.seq, assume)
        advice["longest_sequence"] = longest_sequence(args, chip, a.count, a.seq, assume)
    total, active = count_parameters(args, include_mtp=True)
    out = {
        "model": name,
        "parameters": total,
        "activated": active,
        "device": dataclasses.asdict(chip),
        "peak_flops": chip.peak(),
        "count": a.count,
        "seq_len": a.seq,
        "global_batch": batch,
        "assumptions": dataclasses.asdict(assume),
        "fits": best is not None,
        "best": best.to_dict() if best else None,
        "layouts": [e.to_dict() for e in estimates],
        **advice,
    }
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        _print(out, estimates, best, a.top)
    return 0 if best else 1


def _model(a) -> tuple[ModelArgs, str]:
    if a.hf:
        from ..models.hf import read_hf_config

        return read_hf_config(a.hf), str(a.hf)
    if a.run:
        from ..config import load_config

        file = a.run / "config.toml"
        if not file.is_file():
            raise ConfigError(f"{file}: missing; --run takes an anychip run directory")
        return load_config(file).model_args(), str(a.run)
    return preset(a.preset or "v3"), a.preset or "v3"


def _chip(a) -> Chip:
    chip = CHIPS[a.device]
    changes = {}
    if a.memory is not None:
        changes["memory"] = a.memory * G
    for key in ("intra", "inter"):
        value = getattr(a, key) if getattr(a, key) is not None else a.bandwidth
        if value is not None:
            changes[key] = value * G
    if a.per_node is not None:
        changes["per_node"] = a.per_node
    if changes:
        chip = dataclasses.replace(chip, **changes, source=chip.source + "; overridden: " + ", ".join(changes))
    return chip


def _print(out: dict, estimates: list[Estimate], best: Estimate | None, top: int) -> None:
    chip, a = out["device"], out["assumptions"]
    print(
        f"anychip plan: {out['model']} ({out['parameters'] / 1e9:.1f}B parameters, {out['activated'] / 1e9:.1f}B "
        f"activated) on {out['count']} x {chip['name']} ({chip['memory'] / G:.0f} GB, "
        f"{out['peak_flops'] / 1e12:.0f} TFLOPS bf16 dense), {out['global_batch']} x {out['seq_len']} tokens a step"
    )
    print("assumptions (each can be overridden):")
    print(f"  MFU {a['mfu']} of the dense peak (--mfu); links at {a['link_efficiency']} of the listed bandwidth "
          f"(--link-efficiency): {chip['intra'] / G:.0f} GB/s inside a node of {chip['per_node']}, "
          f"{chip['inter'] / G:.0f} GB/s across, per device and direction (--intra, --inter, --per-node)")  # fmt: skip
    print(f"  {a['headroom']:.0%} of memory left free (--headroom); activations in "
          f"{'bf16' if a['compute_bytes'] == 2 else 'fp32'}, parameters, gradients and AdamW in fp32 (--dtype); "
          "compute and communication do not overlap; the busiest EP rank exchanges "
          f"{a['expert_imbalance']}x the mean all-to-all rows (--expert-imbalance; 1: balanced routing)")  # fmt: skip
    print(f"  the fleet table's source: {chip['source']}")
    rows = estimates[:top]
    print(f"\n{'layout':<38} {'params':>6} {'grads':>6} {'optim':>6} {'buffers':>7} {'activ.':>6} {'total':>6} "
          f"{'free':>6} {'compute':>8} {'comm':>7} {'step':>7} {'tokens/s':>10}")  # fmt: skip
    for e in rows:
        mark = "" if e.fits else "  does not fit"
        memory = (e.params, e.grads, e.optimizer, e.buffers, e.activations, e.total, e.headroom)
        print(f"{e.layout!s:<38} " + " ".join(f"{m / G:{7 if i == 3 else 6}.1f}" for i, m in enumerate(memory)) +
              f" {e.compute_s:7.2f}s {e.comm_s:6.2f}s {e.step_s:6.2f}s {e.tokens_per_s:10.0f}{mark}")  # fmt: skip
    print("(GB per device; free: below the capacity of", f"{rows[0].capacity / G:.1f} GB)" if rows else "")
    if best is not None:
        print(f"\nfastest that fits: {best.layout} — {best.total / G:.1f} of {best.capacity / G:.1f} GB, "
              f"{best.step_s:.2f} s a step, {best.tokens_per_s:,.0f} tokens/s")  # fmt: skip
        return
    lean = min(estimates, key=lambda e: e.total) if estimates else None
    need = (
        f"the leanest layout ({lean.layout}) needs {lean.total / G:.1f} GB of {lean.capacity / G:.1f}" if lean else ""
    )
    print(f"\ndoes not fit: {need}")
    fleet, seq = out.get("smallest_fleet"), out.get("longest_sequence")
    print(f"  would fit: {fleet} x {chip['name']} at this sequence length" if fleet else
          f"  no fleet of up to {1 << 17} x {chip['name']} fits at this sequence length")  # fmt: skip
    if out.get("fits_one_sequence_per_device"):
        print(f"  or a global batch of {out['count']} sequences on these devices (one per device and micro-batch)")
    if seq:
        print(f"  or sequences of {seq} tokens on these {out['count']} devices (micro-batch 1)")
