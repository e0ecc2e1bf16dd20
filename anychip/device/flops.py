"""Dense peak FLOP/s of accelerators, by product name, for MFU.

One row per product, matched by a regular expression against the name the vendor's torch module
reports (torch.cuda.get_device_name, torch.npu.get_device_name); the first matching row wins, so
specific rows come before general ones. A name no row matches has no peak (None): MFU is then
reported as n/a, never computed against some other chip's figure.

Figures are per torch device, dense (no 2:4 sparsity; NVIDIA datasheets print the sparse figure,
halved here), in FLOP/s. bf16/fp16 are tensor-core (matrix-unit) peaks; fp32 is the plain,
non-tensor-core FP32 rate (TF32 is not listed), or None where the vendor publishes none.
Nothing here was measured in this repo; the source of each row is in the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

T = 1e12


@dataclass(frozen=True)
class ChipPeak:
    pattern: str  # regular expression, searched case-insensitively in the product name
    chip: str
    bf16: float | None
    fp16: float | None
    fp32: float | None
    source: str


# Ascend cube units: 16x16x16 fp16/bf16 MACs per cycle per AI core = 8192 FLOP per cycle per core.
ASCEND_CUBE_SOURCE = (
    "Cube-unit (matrix) BF16 peak per torch device, from the Ascend peak-FLOPS table of a Huawei torchtitan-npu "
    "MFU hook (2026; found by code search, not a Huawei datasheet); equals AI cores x 8192 FLOP/cycle x clock, "
    "e.g. 910B2: 24 x 8192 x 1.8 GHz. Huawei's 'total' marketing figures (910B2 376T, 910B3 313T, 910B4 280T) "
    "add the vector units. FP16 taken equal to BF16 on the cube; no dense FP32 figure is published"
)

# Not formatted (marker at the end): one table row per chip instead of eight lines per row.
PEAKS: tuple[ChipPeak, ...] = (
    # -- NVIDIA Hopper. Names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL".
    ChipPeak(r"\bH100 NVL\b", "H100 NVL", 835.5 * T, 835.5 * T, 60 * T,
             "NVIDIA H100 datasheet, H100 NVL column: BF16/FP16 1,671 TFLOPS sparse; FP32 60 TFLOPS"),
    ChipPeak(r"\bH100\b.*\b(PCIe|HBM2e)\b", "H100 PCIe", 756.5 * T, 756.5 * T, 51 * T,
             "NVIDIA H100 datasheet, H100 PCIe column: BF16/FP16 1,513 TFLOPS sparse; FP32 51 TFLOPS"),
    ChipPeak(r"\bH100\b.*\b(HBM3|SXM)", "H100 SXM", 989.5 * T, 989.5 * T, 67 * T,
             "NVIDIA H100 datasheet, H100 SXM column: BF16/FP16 1,979 TFLOPS sparse; FP32 67 TFLOPS"),
    ChipPeak(r"\bH200 NVL\b", "H200 NVL", 835.5 * T, 835.5 * T, 60 * T,
             "NVIDIA H200 datasheet, H200 NVL column: BF16/FP16 1,671 TFLOPS sparse; FP32 60 TFLOPS"),
    ChipPeak(r"\bH200\b", "H200 SXM", 989.5 * T, 989.5 * T, 67 * T,
             "NVIDIA H200 datasheet, H200 SXM column: BF16/FP16 1,979 TFLOPS sparse; FP32 67 TFLOPS"),
    ChipPeak(r"\bH800\b.*\bPCIe\b", "H800 PCIe", 756.5 * T, 756.5 * T, 51 * T,
             "NVIDIA H800 PCIe datasheet (same compute as H100 PCIe): BF16/FP16 1,513 TFLOPS sparse; FP32 51 "
             "TFLOPS. Well-known figures, not re-checked against the datasheet here"),
    ChipPeak(r"\bH800\b", "H800 SXM", 989.5 * T, 989.5 * T, 67 * T,
             "NVIDIA H800 SXM (H100 SXM compute, reduced FP64 and NVLink): BF16/FP16 1,979 TFLOPS sparse; FP32 "
             "67 TFLOPS. Well-known figures, not re-checked against the datasheet here"),
    ChipPeak(r"\bH20\b", "H20", 148 * T, 148 * T, 44 * T,
             "NVIDIA H20 product brief as widely reported (BF16/FP16 148 TFLOPS dense, FP32 44 TFLOPS); "
             "the brief itself was not available to check"),
    # -- NVIDIA Ampere, Ada. SXM and PCIe A100s have the same peaks.
    ChipPeak(r"\bA100\b", "A100", 312 * T, 312 * T, 19.5 * T,
             "NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS dense (624 sparse); FP32 19.5 TFLOPS"),
    ChipPeak(r"\bA800\b", "A800", 312 * T, 312 * T, 19.5 * T,
             "NVIDIA A800 datasheet (A100 compute, reduced NVLink): BF16/FP16 312 TFLOPS dense; FP32 19.5 TFLOPS"),
    ChipPeak(r"\bL40S\b", "L40S", 362.05 * T, 362.05 * T, 91.6 * T,
             "NVIDIA L40S datasheet: BF16/FP16 tensor 362.05 TFLOPS dense (733 sparse); FP32 91.6 TFLOPS"),
    # -- NVIDIA Blackwell. "GB200" must not match the B200 row (\b stops it).
    ChipPeak(r"\bGB200\b", "GB200 (per GPU)", 2500 * T, 2500 * T, 80 * T,
             "NVIDIA GB200 NVL72 spec, per-GPU column: FP16/BF16 5 PFLOPS sparse; FP32 80 TFLOPS"),
    ChipPeak(r"\bB200\b", "B200 (HGX)", 2250 * T, 2250 * T, 75 * T,
             "NVIDIA HGX B200 spec, per-GPU column: FP16/BF16 4.5 PFLOPS sparse; FP32 75 TFLOPS"),
    # -- AMD Instinct (ROCm torch reports them through torch.cuda, e.g. "AMD Instinct MI300X").
    ChipPeak(r"\bMI325X\b", "MI325X", 1307.4 * T, 1307.4 * T, 163.4 * T,
             "AMD Instinct MI325X spec: peak BF16/FP16 matrix 1307.4 TFLOPS dense; FP32 vector 163.4 TFLOPS. "
             "Well-known figures, not re-checked against AMD's page here"),
    ChipPeak(r"\bMI300X\b", "MI300X", 1307.4 * T, 1307.4 * T, 163.4 * T,
             "AMD Instinct MI300X datasheet: peak BF16/FP16 matrix 1307.4 TFLOPS dense; FP32 vector 163.4 TFLOPS. "
             "Well-known figures, not re-checked against AMD's page here"),
    # -- Huawei Ascend, names as torch_npu reports the SoC. (?![\w-]) keeps variants such as
    # "Ascend910B2C" and "Ascend910B4-1", whose figures are not known here, from matching.
    ChipPeak(r"\bAscend910B1(?![\w-])", "Ascend 910B1", 373.88 * T, 373.88 * T, None, ASCEND_CUBE_SOURCE),
    ChipPeak(r"\bAscend910B2(?![\w-])", "Ascend 910B2", 353.8944 * T, 353.8944 * T, None, ASCEND_CUBE_SOURCE),
    ChipPeak(r"\bAscend910B3(?![\w-])", "Ascend 910B3", 294.912 * T, 294.912 * T, None, ASCEND_CUBE_SOURCE),
    ChipPeak(r"\bAscend910B4(?![\w-])", "Ascend 910B4", 245.76 * T, 245.76 * T, None, ASCEND_CUBE_SOURCE),
    # Ascend 910C (Atlas A3) is two dies, and torch_npu shows each die as one device ("Ascend910_93xx").
    # Per-die cube peak from the same table; only the two bins it lists. Cross-check: Huawei's CloudMatrix
    # 384 (384 x 910C, 768 dies) is quoted at ~300 PFLOPS dense BF16, ~390 TFLOPS per die: same magnitude.
    ChipPeak(r"\bAscend910_9392\b", "Ascend 910C die (9392)", 353.8944 * T, 353.8944 * T, None, ASCEND_CUBE_SOURCE),
    ChipPeak(r"\bAscend910_9362\b", "Ascend 910C die (9362)", 353.8944 * T, 353.8944 * T, None, ASCEND_CUBE_SOURCE),
)  # fmt: skip
# Not listed: Intel Data Center GPU Max 1550 (published BF16 figures disagree: 832 TFLOPS marketing vs
# 340.8 TFLOPS from the DPAS clock), Intel Gaudi (an "hpu" device, not xpu), Apple GPUs (no published
# per-dtype peaks). They report MFU as n/a until someone adds a sourced row.


# Peak memory (HBM/GDDR) bandwidth per torch device in bytes/s, by the `chip` of the row above, for the
# "% of peak" of memory-bound operations. Chips whose row covers variants with different memories (A100
# 40 GB / 80 GB, A800) and chips without a published figure at hand (Ascend) are left out: n/a.
BANDWIDTH: dict[str, tuple[float, str]] = {
    "H100 NVL": (3.9e12, "NVIDIA H100 datasheet, H100 NVL column: 3.9 TB/s"),
    "H100 PCIe": (2.0e12, "NVIDIA H100 datasheet, H100 PCIe column: 2 TB/s"),
    "H100 SXM": (3.35e12, "NVIDIA H100 datasheet, H100 SXM column: 3.35 TB/s"),
    "H200 NVL": (4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s"),
    "H200 SXM": (4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s"),
    "H800 PCIe": (2.0e12, "as H100 PCIe (same memory); well-known figure, not re-checked here"),
    "H800 SXM": (3.35e12, "as H100 SXM (same memory); well-known figure, not re-checked here"),
    "H20": (4.0e12, "NVIDIA H20 as widely reported: 4.0 TB/s; the brief itself was not available to check"),
    "L40S": (864e9, "NVIDIA L40S datasheet: 864 GB/s"),
    "GB200 (per GPU)": (8e12, "NVIDIA GB200 NVL72 spec, per GPU: up to 8 TB/s"),
    "B200 (HGX)": (8e12, "NVIDIA HGX B200 spec: 64 TB/s for 8 GPUs"),
    "MI325X": (6.0e12, "AMD Instinct MI325X spec: 6 TB/s; well-known figure, not re-checked here"),
    "MI300X": (5.3e12, "AMD Instinct MI300X datasheet: 5.3 TB/s; well-known figure, not re-checked here"),
}


def table_peak_bandwidth(product_name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of the named product, or None if not listed."""
    row = lookup(product_name)
    return BANDWIDTH[row.chip][0] if row is not None and row.chip in BANDWIDTH else None


def lookup(product_name: str) -> ChipPeak | None:
    """The first row whose pattern occurs in `product_name`, or None."""
    for row in PEAKS:
        if re.search(row.pattern, product_name, flags=re.IGNORECASE):
            return row
    return None


def table_peak_flops(product_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the named product at `dtype`, or None if the product or the dtype is not listed."""
    row = lookup(product_name)
    if row is None:
        return None
    return {torch.bfloat16: row.bf16, torch.float16: row.fp16, torch.float32: row.fp32}.get(dtype)
