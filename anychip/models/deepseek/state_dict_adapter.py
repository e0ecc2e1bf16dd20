"""Parameter names: anychip <-> Hugging Face DeepSeek-V3 checkpoints.

The Hub layout keeps one tensor per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``)
and separate gate/up matrices; anychip stacks experts and fuses gate/up. MTP module k
lives at ``model.layers.{num_hidden_layers + k}`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` beside an ordinary decoder layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .args import ModelArgs

# Hub MTP layers repeat the shared embedding and head; they are not separate weights.
HF_MTP_DUPLICATES = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


@dataclass(frozen=True)
class Slot:
    """Where a Hugging Face tensor goes inside an anychip tensor.

    ``expert``: index along the stacked expert dim (None: not stacked).
    ``half``: 0 = gate rows, 1 = up rows of a fused gate_up matrix (None: all rows).
    """

    name: str
    expert: int | None = None
    half: int | None = None

    def view(self, target: torch.Tensor) -> torch.Tensor:
        t = target if self.expert is None else target[self.expert]
        if self.half is not None:
            t = t.chunk(2, dim=0)[self.half]
        return t


def _layer_prefix(args: ModelArgs, layer: int) -> str:
    """anychip prefix of HF decoder layer ``layer`` (MTP modules follow the trunk)."""
    if layer < args.num_hidden_layers:
        return f"layers.{layer}."
    return f"mtp.{layer - args.num_hidden_layers}."


_GATE_UP = re.compile(r"^(mlp\.(?:shared_experts\.)?)(gate|up)_proj\.weight$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_slot(args: ModelArgs, key: str) -> Slot | None:
    """The anychip slot of a Hugging Face tensor name; None for a known duplicate
    (MTP's copies of the embedding and head). Raises KeyError for an unknown name."""
    if key == "model.embed_tokens.weight":
        return Slot("embed_tokens.weight")
    if key == "model.norm.weight":
        return Slot("norm.weight")
    if key == "lm_head.weight":
        return Slot("lm_head.weight")
    m = _HF_LAYER.match(key)
    if m is None:
        raise KeyError(key)
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= args.num_hidden_layers + args.num_nextn_predict_layers:
        raise KeyError(key)
    prefix = _layer_prefix(args, layer)
    if layer >= args.num_hidden_layers:
        if rest in HF_MTP_DUPLICATES:
            return None
        if rest in _MTP_OWN:
            return Slot(prefix + rest)
        prefix += "block."
    if g := _EXPERT.match(rest):
        expert, proj = int(g.group(1)), g.group(2)
        if expert >= args.n_routed_experts:
            raise KeyError(key)
        if proj == "down":
            return Slot(prefix + "mlp.experts.down_proj", expert=expert)
        return Slot(prefix + "mlp.experts.gate_up_proj", expert=expert, half=0 if proj == "gate" else 1)
    if g := _GATE_UP.match(rest):
        return Slot(prefix + g.group(1) + "gate_up_proj.weight", half=0 if g.group(2) == "gate" else 1)
    return Slot(prefix + rest)  # same name on both sides; checked against the model's keys


def to_hf(args: ModelArgs, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) for every tensor of an anychip state dict.

    Split tensors are views; callers that write files must make them contiguous copies.
    """
    for name, t in state_dict.items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if name in ("embed_tokens.weight", "norm.weight"):
            yield "model." + name, t
            continue
        if name == "lm_head.weight":
            yield name, t
            continue
        kind, idx, rest = name.split(".", 2)
        layer = int(idx) + (args.num_hidden_layers if kind == "mtp" else 0)
        if kind == "mtp" and rest.startswith("block."):
            rest = rest[len("block.") :]
        prefix = f"model.layers.{layer}."
        if rest.endswith("mlp.experts.gate_up_proj"):
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                yield f"{prefix}mlp.experts.{e}.gate_proj.weight", gate
                yield f"{prefix}mlp.experts.{e}.up_proj.weight", up
        elif rest.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                yield f"{prefix}mlp.experts.{e}.down_proj.weight", t[e]
        elif rest.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2, dim=0)
            base = rest[: -len("gate_up_proj.weight")]
            yield f"{prefix}{base}gate_proj.weight", gate
            yield f"{prefix}{base}up_proj.weight", up
        else:
            yield prefix + rest, t
