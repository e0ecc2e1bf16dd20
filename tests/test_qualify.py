"""anychip qualify: error figures, the float64 truth, the op suite, step parity, fault injection, the
report card and the CLI (1 and 2 processes)."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import HtmlPage, run_command

from anychip.cli import main
from anychip.device import get_device
from anychip.device.flops import table_peak_bandwidth
from anychip.models.deepseek.model import RMSNorm
from anychip.models.deepseek.presets import preset
from anychip.qualify.faults import inject, parse
from anychip.qualify.numerics import FAIL, PASS, WARN, error_ratio, errors, float64_truth, judge
from anychip.qualify.ops import Shape
from anychip.qualify.parity import step_parity
from anychip.qualify.suite import run_ops

CPU = get_device("cpu")
DEBUG = preset("debug")
SMALL = Shape(tokens=128, seq=32)


# -- error figures and verdicts --------------------------------------------------------------------


def test_errors_on_known_values():
    truth = torch.tensor([1.0, -2.0, 4.0, 0.0], dtype=torch.float64)
    got = torch.tensor([1.0005, -2.0, 4.04, 0.0], dtype=torch.float64)
    e = errors(got, truth)
    assert e.max_abs == pytest.approx(0.04)
    assert e.rel_rms == pytest.approx(math.hypot(0.0005, 0.04) / math.sqrt(21))
    assert e.max_rel == pytest.approx(0.01)  # 0.04 / 4
    assert e.within_0_1pct == pytest.approx(3 / 4)  # 0.0005 / 1 is within 0.1%; 0.04 / 4 is not
    assert e.within_0_5pct == pytest.approx(3 / 4)
    assert e.cosine == pytest.approx(float(got @ truth / (got.norm() * truth.norm())))
    assert errors(torch.tensor([1.0, float("nan")]), torch.ones(2)).finite is False
    both = errors((got, truth * 2), (truth, truth))  # tuples: the worst part decides
    assert both.rel_rms == pytest.approx(1.0) and both.max_abs == pytest.approx(4.0) and both.cosine == e.cosine


def test_verdicts_follow_the_limits_and_the_ratio():
    f32 = torch.float32
    ok = errors(torch.ones(4) * (1 + 1e-7), torch.ones(4, dtype=torch.float64))
    assert judge(ok, 1.0, f32) == (PASS, "")
    bad = errors(torch.ones(4) * (1 + 1e-3), torch.ones(4, dtype=torch.float64))
    status, reason = judge(bad, 1.0, f32)
    assert status == FAIL and "relative error 1.00e-03" in reason
    assert judge(ok, 8.0, f32)[0] == WARN and "8.0x the reference" in judge(ok, 8.0, f32)[1]
    assert judge(ok, 100.0, f32)[0] == FAIL
    assert judge(ok, 1.0, f32, agreement=0.95)[0] == FAIL
    # two near-exact results do not make a large ratio: both are floored at a quarter unit roundoff
    assert error_ratio(0.0, 1e-12, f32) == 1.0
    assert error_ratio(6e-6, 0.0, f32) == pytest.approx(6e-6 / (2**-24 / 4))


def test_float64_truth_keeps_float64_through_casts():
    x = torch.randn(8, 16, dtype=torch.float64)
    with float64_truth():
        assert x.float().dtype == torch.float64
        assert x.to(torch.float32).dtype == torch.float64
        assert x.to("cpu", torch.bfloat16).dtype == torch.float64
        assert torch.arange(4, dtype=torch.float32).dtype == torch.float64
        assert torch.zeros(3).dtype == torch.float64
        norm = RMSNorm(16, 1e-6).double()
        y = norm(x.to(torch.float32))  # the bf16/fp32 branch casts to float32 internally
    assert torch.get_default_dtype() == torch.float32
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert y.dtype == torch.float64 and torch.allclose(y, exact, rtol=1e-13, atol=0)


def test_fault_injection_perturbs_only_while_active():
    x = torch.randn(64, 8)
    clean = torch.softmax(x, -1)
    with inject(parse("softmax:1e-2")):
        for faulty in (torch.softmax(x, -1), x.softmax(-1), torch.nn.functional.softmax(x, dim=-1)):
            rel = ((faulty - clean) / clean).abs()
            assert rel.max() == pytest.approx(1e-2, rel=1e-3) and rel.min() > 0.9e-2
        assert torch.equal(torch.sigmoid(x), torch.sigmoid(x))  # other ops untouched
    assert torch.equal(torch.softmax(x, -1), clean)
    for spec, words in (
        ("nope", "unknown operation 'nope'"),
        ("softmax:x", "not a relative error"),
        ("softmax:2", "must be in (0, 1)"),
    ):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse(spec)


# -- op suite --------------------------------------------------------------------------------------


def test_cpu_float32_bfloat16_float16_pass_against_float64():
    rows = run_ops(CPU, CPU, DEBUG, SMALL, (torch.float32, torch.bfloat16, torch.float16), time_budget_s=0)
    ops = {r["op"] for r in rows}
    assert ops == {
        "matmul",
        "softmax",
        "rms_norm",
        "rope",
        "sdpa",
        "swiglu",
        "moe_router",
        "moe_experts",
        "cross_entropy",
        "adamw_step",
    }
    assert [r for r in rows if r["status"] != PASS] == []
    by = {(r["op"], r["dtype"]): r for r in rows}
    assert ("matmul", "float16") in by and ("softmax", "float16") not in by
    # the truth really is float64: a float32 result carries a small but non-zero error, bf16 a larger one
    assert 0 < by["matmul", "float32"]["target"]["rel_rms"] < 1e-6
    assert 1e-4 < by["matmul", "bfloat16"]["target"]["rel_rms"] < 1e-2
    assert by["moe_router", "float32"]["expert_agreement"] == 1.0
    for r in rows:
        speed = r["target_speed"]
        assert speed["seconds"] > 0 and speed["rate"] > 0 and speed["peak_pct"] > 0  # CPU peaks are measured
        assert r["error_ratio"] == pytest.approx(1.0)  # same device, same kernels, no fault


def test_injected_softmax_fault_is_caught_and_named():
    rows = run_ops(
        CPU, CPU, DEBUG, SMALL, (torch.float32,), fault=("softmax", 1e-3), only=("softmax", "matmul"), time_budget_s=0
    )
    by = {r["op"]: r for r in rows}
    assert by["matmul"]["status"] == PASS
    soft = by["softmax"]
    assert soft["status"] == FAIL and "relative error" in soft["reason"]
    assert soft["target"]["rel_rms"] > 100 * soft["reference"]["rel_rms"]  # the reference is clean
    assert soft["error_ratio"] > 1000
    with pytest.raises(ValueError, match="unknown op"):
        run_ops(CPU, CPU, DEBUG, SMALL, (torch.float32,), only=("softmaxx",))


def test_router_fault_shows_in_expert_choice():
    shape, fault = Shape(1024, 32), ("sigmoid", 5e-2)
    rows = run_ops(CPU, CPU, DEBUG, shape, (torch.float32,), fault=fault, only=("moe_router",), time_budget_s=0)
    assert rows[0]["status"] == FAIL and rows[0]["expert_agreement"] < 1.0


# -- step parity -----------------------------------------------------------------------------------


def test_step_parity_passes_clean_and_finds_the_layer_of_a_faulty_op():
    clean = step_parity(CPU, CPU, DEBUG, torch.float32, steps=2, batch=2, seq=16)
    assert clean["status"] == PASS and clean["first_divergent"] is None
    step1 = clean["per_step"][0]
    assert 0 < step1["loss_rel_error"]["target"] < 1e-5  # against float64, not against itself
    assert {p["param"] for p in step1["params"]} >= {"layers.1.mlp.gate.weight", "embed_tokens.weight"}

    # the router's sigmoid is first used in the first MoE layer (layer 0 is dense in the debug preset)
    faulty = step_parity(CPU, CPU, DEBUG, torch.float32, steps=2, batch=2, seq=16, fault=("sigmoid", 1e-3))
    assert faulty["status"] == FAIL
    assert faulty["first_divergent"]["module"] == "layers.1.mlp.gate"
    assert faulty["first_divergent"]["layer"] == "layers.1"
    assert faulty["per_step"][0]["loss_rel_error"]["target"] > 5 * step1["loss_rel_error"]["target"]

    # a wrong matmul shows in the first linear layer of the first block
    faulty = step_parity(CPU, CPU, DEBUG, torch.bfloat16, steps=1, batch=2, seq=16, fault=("matmul", 5e-2))
    assert faulty["status"] == FAIL and faulty["first_divergent"]["module"] == "layers.0.self_attn.q_a_proj"


# -- CLI and report card ---------------------------------------------------------------------------

QUICK = ["qualify", "--device", "cpu", "--preset", "debug", "--tokens", "128", "--seq", "32", "--steps", "1"]
QUICK += ["--parity-batch", "2", "--parity-seq", "16"]


def _parse_html(path) -> HtmlPage:
    page = HtmlPage(path.read_text())
    assert page.open == []
    return page


def test_cli_writes_a_passing_report_card(tmp_path, capsys):
    assert main([*QUICK, "--out", str(tmp_path)]) == 0
    assert "qualify: PASS" in capsys.readouterr().out
    report = json.loads((tmp_path / "qualify.json").read_text())
    assert report["status"] == PASS and report["world_size"] == 1
    rows = report["ranks"][0]["ops"]
    assert len(rows) == 20 and {r["dtype"] for r in rows} == {"float32", "bfloat16", "float16"}
    assert [p["dtype"] for p in report["ranks"][0]["parity"]] == ["float32", "bfloat16"]
    md = (tmp_path / "qualify.md").read_text()
    assert "**Verdict: PASS**" in md and "Every check passed." in md
    assert "| sdpa | bfloat16 | pass |" in md and "## Step parity, bfloat16 (pass)" in md and "## Limits" in md
    page = _parse_html(tmp_path / "qualify.html")
    assert page.cells.count("pass") >= 20 and "fail" not in page.cells
    assert "Verdict: PASS" in "".join(page.text)


def test_cli_fails_on_an_injected_fault_and_names_it(tmp_path, capsys):
    flags = ["--dtypes", "float32", "--parity-dtypes", "float32", "--inject", "sigmoid:1e-3"]
    code = main([*QUICK, *flags, "--out", str(tmp_path)])
    assert code == 1
    assert "qualify: FAIL" in capsys.readouterr().out
    md = (tmp_path / "qualify.md").read_text()
    assert "**Injected fault:** `sigmoid`" in md
    findings = md.split("## Findings")[1].split("## ")[0]
    assert "| 0 | moe_router | float32 | fail |" in findings
    assert "first divergent module | float32 | fail | `layers.1.mlp.gate`" in findings
    assert "matmul" not in findings  # only what is wrong is listed
    assert "fail" in _parse_html(tmp_path / "qualify.html").cells


def test_cli_takes_shapes_and_weights_from_a_run(tmp_path):
    from anychip.config import load_config
    from anychip.export import load_init
    from anychip.train.loop import train

    sets = [
        "model.preset=debug",
        "model.n_routed_experts=4",
        "model.n_group=1",
        "model.topk_group=1",
        "train.steps=2",
        "train.global_batch=2",
        "train.seq_len=16",
        "eval.n=0",
        "log.tensorboard=false",
        "checkpoint.interval=0",
        "parallel.max_restarts=0",
    ]
    train(load_config(None, sets), tmp_path / "run")
    out = tmp_path / "card"
    argv = [*QUICK, "--init", str(tmp_path / "run"), "--dtypes", "float32", "--parity-dtypes", "float32"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "qualify.json").read_text())
    assert report["model"]["init"] == str(tmp_path / "run") and report["model"]["experts"] == 4  # the run's shape
    router = next(r for r in report["ranks"][0]["ops"] if r["op"] == "moe_router")
    assert "top-2 of 4 experts" in router["what"]
    loss = report["ranks"][0]["parity"][0]["per_step"][0]["loss"]["float64"]
    # the run's weights, not a fresh initialisation of its shape
    args = load_init(str(tmp_path / "run")).args
    fresh = step_parity(CPU, CPU, args, torch.float32, steps=1, batch=2, seq=16)
    assert loss != fresh["per_step"][0]["loss"]["float64"]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--dtypes", "float8"], "--dtypes 'float8': unknown dtype(s) float8"),
        (["--inject", "tanh"], "unknown operation 'tanh'"),
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--tokens", "100", "--seq", "32"], "--tokens 100 must be a multiple of --seq 32"),
        (["--init", "/nonexistent/run"], "--init /nonexistent/run: no such file"),
    ],
)
def test_cli_rejects_bad_flags_by_name(tmp_path, capsys, flags, words):
    assert main([*QUICK, *flags, "--out", str(tmp_path / "out")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_processes_check_collectives_on_every_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--ops", "matmul", "--steps", "0", "--nproc", "2", "--collective-numel", "4096"]
    args = [sys.executable, "-m", "anychip.cli", *QUICK, *flags, "--out", str(tmp_path)]
    result = run_command(args, env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "qualify.json").read_text())
    assert report["world_size"] == 2 and [k["rank"] for k in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        names = [(c["op"], c["dtype"]) for c in rank["collectives"]]
        assert len(names) == 8 and {n for n, _ in names} == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
        assert all(c["status"] == PASS for c in rank["collectives"])
        exact = [c for c in rank["collectives"] if c["op"] in ("all_gather", "all_to_all")]
        assert all(c["target"]["max_abs"] == 0 for c in exact)  # moving data must not change it
        assert all(c["target_speed"]["rate"] > 0 for c in rank["collectives"])
    assert "## Ranks" in (tmp_path / "qualify.md").read_text()


# -- device peaks ----------------------------------------------------------------------------------


def test_peak_bandwidth_from_the_table_and_measured_on_cpu():
    assert table_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert table_peak_bandwidth("NVIDIA H200") == 4.8e12
    assert table_peak_bandwidth("NVIDIA A100-SXM4-80GB") is None  # the row covers two memories
    assert table_peak_bandwidth("Some Future Chip") is None
    measured = CPU.peak_bandwidth()
    assert 1e8 < measured < 1e13 and CPU.peak_bandwidth() == measured  # measured once, cached


def test_report_json_is_standard_json_even_for_non_finite_errors():
    from anychip.qualify.report import _finite

    report = {"target": {"rel_rms": math.inf, "cosine": math.nan, "finite": False}, "rows": [(1.0, -math.inf)]}
    text = json.dumps(_finite(report), allow_nan=False)  # raises on a bare inf / nan
    assert json.loads(text) == {"target": {"rel_rms": "inf", "cosine": "nan", "finite": False}, "rows": [[1.0, "-inf"]]}
