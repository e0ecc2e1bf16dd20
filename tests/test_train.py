"""`anychip train` end to end: one process, two processes (FSDP2 and DDP on gloo),
gradient accumulation, the run directory, `anychip eval` and the CLI's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anychip.config import load_config
from anychip.train.build import build_source
from anychip.train.hooks import Hooks
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl

# a fast run: debug-sized model, byte tokenizer, arithmetic, pretraining on every token
FAST = [
    "model.preset=debug",
    "train.steps=6",
    "train.global_batch=4",
    "train.seq_len=48",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.mode=sft",
    "eval.n=4",
    "eval.max_new_tokens=12",
    "data.heldout_size=8",
    "log.tensorboard=false",
    "device.type=cpu",
    "eval.interval=3",
    "eval.loss_batches=2",
]


def metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def events(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "events.jsonl")


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anychip.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    state = train(load_config(None, FAST), run)
    return run, state


def test_run_directory_and_learning(tmp_path):
    seen = []
    hooks = Hooks()
    for point in ("on_start", "before_step", "after_backward", "after_step", "on_end"):
        hooks.add(point, lambda s, p=point: seen.append((p, s.step)))
    cfg = load_config(None, [*FAST, "train.steps=40", "train.mode=pretrain", "train.global_batch=8"])
    state = train(cfg, tmp_path / "run", hooks)
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(1, 41))
    assert sum(r["loss"] for r in m[-5:]) / 5 < 0.6 * m[0]["loss"]  # it learns
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "memory_peak_gb", "expert_imbalance", "mtp_loss"):
        assert m[-1][key] is not None and m[-1][key] >= 0, key
    kinds = [e["event"] for e in events(tmp_path / "run")]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert seen[0] == ("on_start", 0) and seen[-1] == ("on_end", 40)
    assert seen[1:5] == [("before_step", 1), ("after_backward", 1), ("after_step", 1), ("before_step", 2)]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert load_config(tmp_path / "run" / "config.toml").to_dict() == cfg.to_dict()
    assert 0 <= state.eval.accuracy <= 1 and state.eval.n == 4


def test_gradient_accumulation_equals_one_big_batch(one_process, tmp_path):
    _, state = one_process
    accumulated = train(load_config(None, [*FAST, "train.micro_batch=1"]), tmp_path / "acc")
    a = [r["loss"] for r in metrics(one_process[0])]
    b = [r["loss"] for r in metrics(tmp_path / "acc")]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for p, q in zip(state.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_equal_one(one_process, tmp_path, strategy):
    run = tmp_path / strategy
    sets = [f"--set={s}" for s in FAST]
    r = cli("train", "--nproc", "2", "--run-dir", str(run), *sets, f"--set=parallel.strategy={strategy}")
    assert r.returncode == 0, r.stdout + r.stderr
    single = metrics(one_process[0])
    double = metrics(run)
    assert [m["loss"] for m in double] == pytest.approx([m["loss"] for m in single], rel=1e-5, abs=1e-6)
    assert [m["grad_norm"] for m in double] == pytest.approx([m["grad_norm"] for m in single], rel=1e-4)
    held = [m["eval_loss"] for m in single if "eval_loss" in m]  # held-out rows split over the ranks
    assert [m["eval_loss"] for m in double if "eval_loss" in m] == pytest.approx(held, rel=1e-5)
    start = events(run)[0]
    assert start["world_size"] == 2 and start["strategy"] == strategy
    # the final weights agree too
    from anychip.models import load_hf

    a, b = load_hf(one_process[0] / "final"), load_hf(run / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_heldout_loss_is_the_models_loss_on_fixed_heldout_batches(one_process, tmp_path):
    from anychip.models import load_hf
    from anychip.parallel import World
    from anychip.train.build import heldout_batches

    run, state = one_process
    m = metrics(run)
    assert [r["step"] for r in m if "eval_loss" in r] == [3, 6]  # every eval.interval steps and the last
    batches = heldout_batches(load_config(run / "config.toml"), state.tokenizer, World())
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 48)
    model = load_hf(run / "final")  # the weights after step 6
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            out = model(b["input_ids"], labels=b["labels"], reduction="sum")
            total, count = total + out.lm_loss.item(), count + out.num_tokens.item()
    assert m[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert m[-1]["eval_loss"] != pytest.approx(m[-1]["lm_loss"], rel=1e-3)  # other data than the step's
    # measuring it changes nothing in training
    train(load_config(None, [*FAST, "eval.interval=0"]), tmp_path / "none")
    quiet = metrics(tmp_path / "none")
    assert [r["loss"] for r in quiet] == [r["loss"] for r in m] and all("eval_loss" not in r for r in quiet)


def test_eval_command_on_a_run(one_process):
    run, state = one_process
    r = cli("eval", str(run), "--n", "4", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n"] == 4 and report["tasks"] == ["basic_arithmetic"]
    assert report["accuracy"] == pytest.approx(state.eval.accuracy)
    assert report["decoding"] == "greedy"
    r = cli("eval", str(run), "--n", "4", "--max-new-tokens", "12", "--json", "--temperature", "1.0", "--samples", "3")
    sampled = json.loads(r.stdout)
    assert r.returncode == 0 and sampled["n"] == 4 and "3 samples" in sampled["decoding"]
    assert 0 <= sampled["exact_accuracy"] <= sampled["accuracy"] <= 1


def test_pass_at_1_averages_the_samples_of_each_problem(one_process):
    from anychip.data import load_tokenizer
    from anychip.eval import evaluate
    from anychip.models import load_hf

    run, _ = one_process
    model, tok = load_hf(run / "final"), load_tokenizer("byte")
    src = build_source(load_config(run / "config.toml"), "heldout")
    examples = [src.example(i) for i in range(3)]
    greedy = evaluate(model, tok, examples, 12)
    assert evaluate(model, tok, examples, 12, samples_per_problem=5).correct == greedy.correct  # greedy: 1 sample
    sampled = evaluate(model, tok, examples, 12, samples_per_problem=4, temperature=1.0, seed=1)
    assert sampled.n == 3 and len(sampled.samples) == 5  # 12 completions scored, 5 kept for reading
    assert sampled.correct == evaluate(model, tok, examples, 12, samples_per_problem=4, temperature=1.0, seed=1).correct


def test_cli_print_config_and_errors(tmp_path):
    r = cli("train", "--print-config", "--set", "train.steps=7")
    assert r.returncode == 0 and "steps = 7" in r.stdout and "[checkpoint]" in r.stdout
    r = cli("train", "--set", "train.stepz=7")
    assert r.returncode == 2 and "unknown key train.stepz" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr
    r = cli("train", "--set", "data.tasks=not_a_task", "--set", "train.steps=1", "--run-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "not_a_task" in r.stderr and "Traceback" not in r.stderr


def test_bfloat16_autocast_trains(tmp_path):
    cfg = load_config(None, [*FAST, "train.dtype=bfloat16", "train.steps=8", "train.mode=pretrain", "eval.n=0"])
    train(cfg, tmp_path / "bf16")
    m = metrics(tmp_path / "bf16")
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in m)  # finite
    assert m[-1]["loss"] < m[0]["loss"]


def test_train_deterministic_runs_every_step_with_deterministic_algorithms(one_process, tmp_path):
    """The run's own kernels (and the audit's recomputes) under torch's deterministic algorithms;
    on the CPU, deterministic already, the losses are the plain run's."""
    seen = []
    hooks = Hooks()
    hooks.add("after_backward", lambda s: seen.append(torch.are_deterministic_algorithms_enabled()))
    hooks.add("after_step", lambda s: seen.append(torch.are_deterministic_algorithms_enabled()))  # after the audit
    cfg = load_config(None, [*FAST, "train.deterministic=true", "guards.audit_interval=2"])
    try:
        train(cfg, tmp_path / "det", hooks)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [True] * 2 * cfg.train.steps
    assert [m["loss"] for m in metrics(tmp_path / "det")] == [m["loss"] for m in metrics(one_process[0])]
    assert not [e for e in events(tmp_path / "det") if e["event"] == "audit_mismatch"]


def test_plain_torchrun_runs_the_same_worker(one_process, tmp_path):
    """What a cluster runs: torchrun (not anychip's launcher) starting python -m anychip.launch."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "anychip.launch"]
    args += ["--run-dir", str(tmp_path / "tr")]
    for s in FAST:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    single = [m["loss"] for m in metrics(one_process[0])]
    assert [m["loss"] for m in metrics(tmp_path / "tr")] == pytest.approx(single, rel=1e-5, abs=1e-6)
    assert events(tmp_path / "tr")[0]["world_size"] == 2


def test_nonfinite_gradient_stops_before_the_update_when_unguarded(tmp_path):
    """With guards.nonfinite off the loop still never applies a non-finite update (the
    guarded behaviour, retry/skip/rollback, is in test_guards.py)."""
    hooks = Hooks()
    snapshot = {}

    def poison(state):
        if state.step == 3:
            snapshot.update({k: v.clone() for k, v in state.model.state_dict().items()})
            next(state.model.parameters()).grad[0, 0] = float("nan")

    hooks.add("after_backward", poison)
    cfg = load_config(None, [*FAST, "checkpoint.interval=1", "eval.n=0", "guards.nonfinite=false"])
    with pytest.raises(FloatingPointError, match="step 3"):
        train(cfg, tmp_path / "nan", hooks)
    from anychip.checkpoint import committed

    assert [d.name for d in committed(tmp_path / "nan" / "checkpoints")][0] == "step_00000002"
    kinds = [e["event"] for e in events(tmp_path / "nan")]
    assert "nonfinite" in kinds and kinds[-1] == "run_end"
