"""The training core's math is fixed: three reference runs (SFT, GRPO, 2-process DDP with
the recompute audit) give bit-identical per-step losses and final weights to the ones
recorded in tests/trajectory.json for this CPU (see tests/trajectory.py)."""

import json

import pytest
from trajectory import RECORDS, cpu_key, record_all


@pytest.fixture(scope="module")
def now(tmp_path_factory):
    return record_all(tmp_path_factory.mktemp("trajectory"))


@pytest.mark.parametrize("name", ["sft", "grpo", "ddp"])
def test_reference_runs_keep_their_recorded_trajectory(now, name):
    records = json.loads(RECORDS.read_text())
    recorded = records.get(cpu_key())
    if recorded is None:
        # another CPU computes other low bits: the first step (same weights, same batch) agrees closely
        recorded = next(iter(records.values()))[name]["steps"][0]
        first = now[name]["steps"][0]
        assert first.keys() == recorded.keys()
        for key in ("loss", "lm_loss"):
            assert float(first[key]) == pytest.approx(float(recorded[key]), rel=1e-4), key
        return
    recorded = recorded[name]
    assert len(now[name]["steps"]) == len(recorded["steps"])
    for step, (got, want) in enumerate(zip(now[name]["steps"], recorded["steps"]), start=1):
        assert got == want, f"{name} step {step}"
    assert now[name]["weights"] == recorded["weights"]
