"""The fleet side of a plan: memory and links of each chip, by the name `anychip plan --device` takes.

Peak FLOP/s come from the device layer's table (``anychip.device.flops``) through ``product``, a
name its rows match. Bandwidths are bytes/s per device in one direction, as a collective sees
them: ``intra`` within the chip's fast domain (NVLink, HCCS, UB), ``inter`` across it (the
InfiniBand/RoCE NICs per device). Every figure can be overridden on the command line
(``--memory``, ``--intra``, ``--inter``, ``--per-node``); where a datasheet was not at hand the
row says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device.flops import table_peak_flops

G = 1e9


@dataclass(frozen=True)
class Chip:
    name: str
    product: str  # matched by anychip.device.flops for the peak
    memory: float  # bytes per torch device
    intra: float  # bytes/s per device, one direction, inside the fast domain
    inter: float  # bytes/s per device, one direction, across domains
    per_node: int  # devices in one fast domain (a node; a supernode for CloudMatrix)
    source: str

    def peak(self, dtype: torch.dtype = torch.bfloat16) -> float:
        flops = table_peak_flops(self.product, dtype)
        if flops is None:
            raise ValueError(f"no {dtype} peak for {self.product} in anychip.device.flops")
        return flops


CHIPS = {
    c.name: c
    for c in (
        Chip("h800", "H800 SXM", 80 * G, 200 * G, 50 * G, 8,
             "80 GB HBM3; NVLink 400 GB/s both directions; the DeepSeek-V3 report (arXiv 2412.19437, "
             "sec. 3.2.2) gives 50 GB/s InfiniBand per GPU and ~160 GB/s achievable NVLink"),
        Chip("h100", "H100 SXM", 80 * G, 450 * G, 50 * G, 8,
             "NVIDIA H100 SXM datasheet: 80 GB, NVLink 900 GB/s both directions; one 400 Gb/s NIC per GPU"),
        Chip("h200", "H200 SXM", 141 * G, 450 * G, 50 * G, 8,
             "NVIDIA H200 SXM datasheet: 141 GB, NVLink 900 GB/s both directions; one 400 Gb/s NIC per GPU"),
        Chip("h20", "H20", 96 * G, 450 * G, 50 * G, 8,
             "NVIDIA H20 as widely reported: 96 GB HBM3, NVLink 900 GB/s both directions; a 400 Gb/s NIC "
             "per GPU assumed; the brief itself was not available to check"),
        Chip("a100", "A100", 80 * G, 300 * G, 25 * G, 8,
             "NVIDIA A100 80 GB SXM datasheet: NVLink 600 GB/s both directions; one 200 Gb/s NIC per GPU"),
        Chip("910b", "Ascend910B2", 64 * G, 196 * G, 25 * G, 8,
             "Ascend 910B2 as reported: 64 GB HBM, HCCS 392 GB/s per chip (7 x 56 GB/s) both directions, "
             "200 Gb/s RoCE per NPU; not re-checked here"),
        Chip("910c", "Ascend910_9392", 64 * G, 196 * G, 25 * G, 768,
             "one die of an Ascend 910C (the NPU runtime shows each die as a device): 64 GB of the 128 GB, "
             "half of the ~392 GB/s one-direction UB bandwidth per chip, 768 dies in a CloudMatrix384 "
             "supernode, 200 Gb/s RDMA per die between supernodes, as reported (arXiv 2506.12708); "
             "not re-checked here"),
    )
}  # fmt: skip
