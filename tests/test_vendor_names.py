"""Vendor names (CUDA, Ascend) live only in the device layer."""

import re
from pathlib import Path

PATTERN = re.compile(r"torch\.cuda\b|\.cuda\(\)|torch_npu|\"nccl\"|\"hccl\"|'nccl'|'hccl'")
ROOT = Path(__file__).resolve().parents[1] / "anychip"


def test_no_vendor_names_outside_device_layer():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "device" in path.relative_to(ROOT).parts[:1]:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if PATTERN.search(line):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
