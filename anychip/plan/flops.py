"""The FLOPs a training step executes, as a profiler counts them (torch's FlopCounterMode).

This is what the step time is estimated from, not the model FLOPs behind MFU
(``training_flops_per_token``): attention is counted as the fused kernels run it, over the
whole [L, L] square (as FlopCounterMode counts it), with the value head padded to the query-key
head size (MLA pads v for the fused kernels), and its backward pass as 2.5 forward passes (the
fused backward recomputes the scores); each MTP depth k runs its module and the shared output
head on L - k positions.
"""

from __future__ import annotations

import functools

from ..models.deepseek.args import ModelArgs
from ..models.deepseek.presets import count_parameters


@functools.lru_cache(maxsize=64)
def step_flops_per_sequence(args: ModelArgs, seq_len: int) -> float:
    """Forward + backward FLOPs of one sequence of ``seq_len`` tokens (labels on every position)."""
    _, main = count_parameters(args.replace(num_nextn_predict_layers=0))
    _, with_mtp = count_parameters(args, include_mtp=True)
    depth = args.num_nextn_predict_layers
    mtp = (with_mtp - main) / depth if depth else 0.0  # one MTP module's activated weights
    head = args.vocab_size * args.hidden_size  # the output head, shared by the MTP depths
    dense = 6.0 * main * seq_len
    lengths = [seq_len] * args.num_hidden_layers
    for k in range(1, depth + 1):
        if seq_len > k:
            dense += 6.0 * (mtp + head) * (seq_len - k)
            lengths.append(seq_len - k)
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    attention = sum(3.5 * 4.0 * n * n * args.num_attention_heads * qk for n in lengths)
    return dense + attention
