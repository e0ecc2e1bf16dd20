"""Step parity: K training steps of one model from one set of weights on one batch, on the target, on
the reference, and in float64 on the CPU (the truth), compared step by step.

Per step: the loss, and every parameter's gradient (cosine, relative norm difference, relative error),
target and reference each against the truth. On the first forward pass every module's output is kept
(forward hooks), so the report can name the first module, in execution order, whose output is much
further from the truth on the target than on the reference: where an engineer should look.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from ..config import TrainConfig
from ..device import Device
from ..models.deepseek.args import ModelArgs
from ..models.deepseek.model import DeepSeekV3
from ..train.optim import build_optimizer
from .faults import inject
from .numerics import FAIL, RATIO_LIMITS, error_ratio, errors, float64_truth, grade_ratio, judge, worst


def step_parity(
    target: Device,
    reference: Device,
    args: ModelArgs,
    dtype: torch.dtype,
    steps: int = 3,
    batch: int = 4,
    seq: int = 64,
    fault: tuple[str, float] | None = None,
    seed: int = 0,
    weights: dict | None = None,
) -> dict:
    """Run and compare (see the module docstring); `dtype` is the autocast dtype (float32: none).
    `weights` (a state dict) replaces the seeded initialisation. `fault` is injected on the target only.
    Returns a JSON-ready dict with per-step figures, the first divergent module and a status."""
    if weights is None:
        model = DeepSeekV3(args)
        model.init_weights(seed)
        weights = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen)
    truth = _train(torch.device("cpu"), None, args, weights, tokens, steps, truth=True)
    ref = _train(reference.torch_device(), reference, args, weights, tokens, steps, dtype=dtype)
    with inject(fault):
        tgt = _train(target.torch_device(), target, args, weights, tokens, steps, dtype=dtype)
    return _compare(tgt, ref, truth, dtype) | {
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "seed": seed,
    }


def _train(where, device: Device | None, args, weights, tokens, steps, dtype=torch.float32, truth=False) -> dict:
    model = DeepSeekV3(args).to(where)
    model.load_state_dict(weights)
    cfg = TrainConfig()
    if truth:
        model.double()
    activations: dict[str, torch.Tensor | tuple] = {}
    hooks = [m.register_forward_hook(_keep(name, activations)) for name, m in model.named_modules() if name]
    optimizer = build_optimizer(model, cfg, device or _CpuStandIn())
    ids, labels = tokens[:, :-1].to(where), tokens[:, 1:].to(where)
    losses, grads = [], []
    amp = torch.autocast(where.type, dtype=dtype) if dtype != torch.float32 and not truth else nullcontext()
    for step in range(steps):
        with float64_truth() if truth else nullcontext():
            with amp:
                loss = model.loss(ids, labels).loss
            loss.backward()
            if step == 0:
                for h in hooks:
                    h.remove()
            with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            grads.append({n: p.grad.detach().to("cpu", torch.float64, copy=True) for n, p in with_grad})
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_balancing_bias()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grads": grads, "activations": activations}


def _keep(name: str, store: dict):
    def hook(module: nn.Module, inputs, output) -> None:
        if name in store:
            return  # MTP reuses the rotary module: keep the first call
        parts = output if isinstance(output, tuple) else (output,)
        tensors = [t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()]
        floats = tuple(t.detach().to("cpu", torch.float64, copy=True) for t in tensors)
        if floats:
            store[name] = floats

    return hook


class _CpuStandIn:
    """What build_optimizer asks of a device, for the float64 run (plain AdamW there)."""

    def fused_adamw(self) -> bool:
        return False


def _compare(tgt: dict, ref: dict, truth: dict, dtype: torch.dtype) -> dict:
    per_step, statuses = [], []
    for k, (lt, lr, l64) in enumerate(zip(tgt["losses"], ref["losses"], truth["losses"])):
        loss_t = abs(lt - l64) / abs(l64) if math.isfinite(lt) else math.inf
        loss_r = abs(lr - l64) / abs(l64)
        params = []
        for name, g64 in truth["grads"][k].items():
            g_t, g_r = tgt["grads"][k][name], ref["grads"][k][name]
            e_t, e_r = errors(g_t, g64), errors(g_r, g64)
            ratio = error_ratio(e_t.rel_rms, e_r.rel_rms, dtype)
            param = {"param": name, "target": asdict(e_t), "reference": asdict(e_r), "error_ratio": ratio}
            param |= {"target_norm_diff": _norm_diff(g_t, g64), "reference_norm_diff": _norm_diff(g_r, g64)}
            params.append(param)
        worst_param = max(params, key=lambda p: (p["error_ratio"], p["target"]["rel_rms"]))
        status = grade_ratio(worst_param["error_ratio"]) if math.isfinite(lt) else FAIL
        status = worst([status, grade_ratio(error_ratio(loss_t, loss_r, dtype))])
        statuses.append(status)
        cosine_min = {
            "target": min(p["target"]["cosine"] for p in params),
            "reference": min(p["reference"]["cosine"] for p in params),
        }
        per_step.append(
            {
                "step": k + 1,
                "loss": {"target": lt, "reference": lr, "float64": l64},
                "loss_rel_error": {"target": loss_t, "reference": loss_r},
                "grad_cosine_min": cosine_min,
                "worst_param": worst_param["param"],
                "worst_param_error_ratio": worst_param["error_ratio"],
                "params": params,
                "status": status,
            }
        )
    divergent = first_divergent(tgt["activations"], ref["activations"], truth["activations"], dtype)
    status = worst(statuses + ([FAIL] if divergent and divergent["status"] == FAIL else []))
    return {
        "status": status,
        "per_step": per_step,
        "first_divergent": divergent,
        "modules_compared": len(truth["activations"]),
    }


def first_divergent(tgt: dict, ref: dict, truth: dict, dtype: torch.dtype) -> dict | None:
    """The first module in execution order whose output error on the target exceeds the reference's
    by more than the pass ratio (None when there is none), with its figures."""
    for name, t64 in truth.items():
        e_t, e_r = errors(tgt[name], t64), errors(ref[name], t64)
        ratio = error_ratio(e_t.rel_rms, e_r.rel_rms, dtype)
        if ratio > RATIO_LIMITS[0] or not e_t.finite:
            status, _ = judge(e_t, ratio, dtype)
            layer = next((f"layers.{p}" for p in name.split(".")[1:2] if name.startswith("layers.")), None)
            return {
                "module": name,
                "layer": layer,
                "target_rel_error": e_t.rel_rms,
                "reference_rel_error": e_r.rel_rms,
                "error_ratio": ratio,
                "status": status,
            }
    return None


def _norm_diff(g: torch.Tensor, g64: torch.Tensor) -> float:
    n64 = float(g64.norm())
    return abs(float(g.norm()) - n64) / n64 if n64 > 0 else float(g.norm())
