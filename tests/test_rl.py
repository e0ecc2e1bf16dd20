"""GRPO-family RL: advantages, k3 KL and loss normalisation against hand-computed values,
reward scorers on known answers, dynamic sampling, and real runs (1 and 2 processes,
kill and resume). TRL parity of the losses is in test_rl_trl_parity.py."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command
from safetensors.torch import load_file

from anychip.config import load_config
from anychip.data import ReasoningTasks
from anychip.errors import ConfigError
from anychip.parallel import unwrap
from anychip.report.page import render
from anychip.report.run import load_run
from anychip.report.summary import overview
from anychip.rl.losses import group_advantages, k3_kl, normalise, per_token_loss, policy_loss
from anychip.rl.rewards import Completion, Rewards, format_reward, load_function, overlong
from anychip.train.hooks import Hooks
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
SFT = [
    "model.preset=debug",
    "train.steps=6",
    "train.global_batch=4",
    "train.seq_len=64",
    "train.warmup_steps=1",
    "eval.n=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device.type=cpu",
    "checkpoint.interval=0",
    "guards.watchdog=false",
    "parallel.max_restarts=0",
]
GRPO = [
    "train.mode=grpo",
    "train.steps=6",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "eval.n=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device.type=cpu",
    "checkpoint.interval=2",
    "checkpoint.keep=5",
    "guards.watchdog=false",
    "guards.spike=false",
    "parallel.max_restarts=0",
    "grpo.prompts_per_step=4",
    "grpo.group_size=4",
    "grpo.max_new_tokens=12",
    "grpo.rewards={'rl_rewards:ascii_share' = 1.0, format = 0.1}",
]
PLUS_OR_MINUS = 'data.task_options={basic_arithmetic = {operators = ["+", "-"]}}'  # '+': all-equal groups


# -- advantages, KL, losses by hand -----------------------------------------------------


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    a = group_advantages(r, 4, "group")
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # an all-equal group carries no signal
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch_std = r.std().item()
    assert torch.allclose(
        group_advantages(r, 4, "batch")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (batch_std + 1e-4)
    )
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_k3_kl_hand_computed():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # d = ref - logp = log(0.5): exp(d) - d - 1 = 0.5 + log 2 - 1
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))
    x = torch.randn(100)
    assert (k3_kl(x, torch.randn(100)) >= 0).all()


def test_loss_types_normalise_as_documented():
    # per-token loss -A (ratio 1, no clipping): sequence 0 has 2 tokens, sequence 1 has 4
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -2.0])
    expected = {
        "grpo": ((-1 * 2 / 2) + (2 * 4 / 4)) / 2,  # per-sequence means, then the mean
        "bnpo": (-1 * 2 + 2 * 4) / 6,  # token mean of the batch
        "dapo": (-1 * 2 + 2 * 4) / 6,
        "dr_grpo": (-1 * 2 + 2 * 4) / (2 * 8),  # sequences x max completion length (8)
    }
    for loss_type, value in expected.items():
        loss, _ = policy_loss(logp, logp, adv, mask, loss_type=loss_type, max_completion_length=8)
        assert loss.item() == pytest.approx(value), loss_type


def test_clipping_and_kl_term_by_hand():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, loss_type="bnpo", eps_low=0.2, eps_high=0.28)
    # A > 0: min(r A, clip(r) A) = min(1.5, 1.28) and min(0.5, 0.8)
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2)
    assert stats["clip_high"] == 0.5 and stats["clip_low"] == 0.0
    ref = torch.zeros(1, 2)
    with_kl, stats = policy_loss(
        logp, old, torch.tensor([1.0]), mask, loss_type="bnpo", eps_low=0.2, eps_high=0.28, beta=0.1, ref_logp=ref
    )
    kl = k3_kl(logp, ref).mean().item()
    assert with_kl.item() == pytest.approx(loss.item() + 0.1 * kl)
    assert stats["kl"] == pytest.approx(kl)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, old, torch.tensor([1.0]), mask, beta=0.1)


def test_gspo_uses_one_ratio_per_sequence():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, 0.3, 5.0]])  # the masked token must not count
    loss, per_token = per_token_loss(logp, old, torch.tensor([-1.0]), mask, eps_low=0.5, eps_high=0.5, level="sequence")
    ratio = math.exp(0.2)  # exp of the masked mean log-ratio
    assert torch.allclose(loss[0, :2], torch.full((2,), ratio))  # -min(r A, clip(r) A) with A = -1
    assert per_token["clip_low"].sum() == 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_with_global_counts_add_up_to_the_big_batch(loss_type):
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(6, 5, generator=g) * 0.1 for _ in range(3))
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, ref_logp=ref)
    whole, _ = per_token_loss(logp, old, adv, mask, **kw)
    big = normalise(whole, mask, loss_type, max_completion_length=5)
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # e.g. two ranks of unequal share
        kw_rows = {**kw, "ref_logp": ref[rows]}
        tok, _ = per_token_loss(logp[rows], old[rows], adv[rows], mask[rows], **kw_rows)
        parts += normalise(tok, mask[rows], loss_type, sequences=6, tokens=mask.sum().item(), max_completion_length=5)
    assert parts.item() == pytest.approx(big.item(), rel=1e-6)


# -- rewards ----------------------------------------------------------------------------


def test_reasoning_gym_scorers_on_known_right_and_wrong_answers():
    for task in ("basic_arithmetic", "chain_sum", "countdown"):
        src = ReasoningTasks([task], seed=3)
        rewards = Rewards({"accuracy": 1.0}, src.score, 64, 16)
        ex = src.example(0)
        wrong_answer = "1 + 1" if task == "countdown" else str(int(ex.answer) + 1)
        texts = [ex.completion, f"<think></think>\n<answer>{wrong_answer}</answer>", ex.answer]  # last: no tags
        total, parts = rewards([ex] * 3, [Completion(t, 10, False) for t in texts])
        assert total == parts["accuracy"]
        assert total[0] == 1.0, (task, ex.completion)
        assert total[1] < 1.0 and total[2] == 0.0, task


def test_format_and_overlong_rewards():
    ok = ["<think>2 + 2 = 4</think>\n<answer>4</answer>", "  <think>\n</think><answer>x</answer>\n"]
    bad = ["<answer>4</answer>", "<think>4</think>", "<think>a</think><answer>4</answer> and more", ""]
    assert format_reward([Completion(t, 1, False) for t in ok + bad]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    lengths = [10, 48, 56, 64, 70]  # L_max 64, L_cache 16: punishment starts after 48
    assert overlong([Completion("", n, False) for n in lengths], 64, 16) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_user_reward_by_dotted_path_and_clear_errors():
    assert load_function("rl_rewards:ascii_share")(completions=["ab1"], lengths=[3]) == [2 / 3]
    assert load_function("rl_rewards.ascii_share") is load_function("rl_rewards:ascii_share")
    for path, msg in [
        ("no_such_module:f", "cannot import"),
        ("rl_rewards:nope", "no attribute"),
        ("rl_rewards:not_callable", "not callable"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_function(path)
    with pytest.raises(ConfigError, match="grpo.rewards"):
        load_config(None, [*GRPO, "model.init_from=.", "grpo.rewards={'rl_rewards:nope' = 1.0}"])


def test_grpo_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, GRPO)
    with pytest.raises(ConfigError, match="grpo.loss"):
        load_config(None, [*GRPO, "model.init_from=.", "grpo.loss=ppo"])
    with pytest.raises(ConfigError, match="checkpoint.interval"):
        load_config(None, [*GRPO, "model.init_from=.", "grpo.iterations=2", "checkpoint.interval=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, [*GRPO, f"model.init_from={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="holds no model"):
        load_config(None, [*GRPO, f"model.init_from={tmp_path}"])


# -- runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A few SFT steps of the debug model: something to start GRPO from."""
    run = tmp_path_factory.mktemp("sft")
    train(load_config(None, SFT), run)
    return run


def grpo(run_dir: Path, init: Path, *sets: str, hooks=None):
    return train(load_config(None, [*GRPO, f"model.init_from={init}", *sets]), run_dir, hooks)


def test_grpo_run_logs_what_train_logs_and_raises_the_reward(sft_run, tmp_path):
    state = grpo(tmp_path / "g", sft_run, "train.steps=24", "train.lr=3e-3", "grpo.beta=0.01")
    metrics = read_jsonl(tmp_path / "g" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 25))
    for key in (
        "loss",
        "reward",
        "reward/rl_rewards:ascii_share",
        "reward/format",
        "accuracy",
        "kl",
        "clip_fraction",
        "response_length",
        "entropy",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
    ):
        assert all(key in m for m in metrics), key
    first = sum(m["reward/rl_rewards:ascii_share"] for m in metrics[:6]) / 6
    last = sum(m["reward/rl_rewards:ascii_share"] for m in metrics[-6:]) / 6
    assert last > first + 0.05, (first, last)  # the policy learns what the reward asks for
    assert metrics[-1]["kl"] > 0  # and moves away from the reference
    events = [e["event"] for e in read_jsonl(tmp_path / "g" / "events.jsonl")]
    assert events.count("checkpoint_commit") == 1 + 12 and events[-1] == "run_end"  # step 0, then every 2
    assert (tmp_path / "g" / "final" / "model.safetensors").is_file()
    assert state.step == 24
    run = load_run(tmp_path / "g")  # the report of a GRPO run shows its rewards
    assert run.is_grpo and dict(overview(run))["reward"].startswith(f"{metrics[0]['reward']:.4g} -> ")
    page = render(run)
    assert "<h2>Reinforcement learning</h2>" in page and "rl_rewards:ascii_share" in page


def test_dynamic_sampling_drops_all_equal_groups(sft_run, tmp_path):
    def groups_with_signal(run, *sets):
        seen = []

        def look(state):  # whole groups of 4 on this one rank; all-zero advantages = all-equal rewards
            seen.extend((state.batch["advantages"].view(-1, 4) != 0).any(dim=1).tolist())

        hooks = Hooks()
        hooks.add("after_backward", look)
        grpo(
            run,
            sft_run,
            "train.steps=4",
            "checkpoint.interval=0",
            "grpo.rewards={'rl_rewards:constant_on_plus' = 1.0}",
            *sets,
            hooks=hooks,
        )
        return seen, read_jsonl(run / "metrics.jsonl")

    plain, _ = groups_with_signal(tmp_path / "plain", PLUS_OR_MINUS)
    assert not all(plain)  # without dynamic sampling, '+' prompts give all-equal groups
    dynamic, metrics = groups_with_signal(
        tmp_path / "dyn", PLUS_OR_MINUS, "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=20"
    )
    assert len(dynamic) == len(plain) and all(dynamic)  # dropped and refilled to full size
    assert sum(m["groups_dropped"] for m in metrics) > 0
    assert all(m["groups_short"] == 0 for m in metrics)


def cli(run_dir: Path, init: Path, *sets: str, timeout: float = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "anychip.cli", "grpo", "--init", str(init), "--run-dir", str(run_dir)]
    for s in (*GRPO, *sets):
        args += ["--set", s]
    return run_command(args, ENV, timeout)


def test_grpo_killed_and_resumed_ends_bit_identical(sft_run, tmp_path):
    ref = tmp_path / "ref"
    grpo(ref, sft_run, "train.steps=8", "grpo.iterations=2", "checkpoint.interval=4")
    r = cli(
        tmp_path / "kill",
        sft_run,
        "train.steps=8",
        "grpo.iterations=2",
        "checkpoint.interval=4",
        "parallel.max_restarts=2",
        "chaos.at=kill@6",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_jsonl(tmp_path / "kill" / "events.jsonl")
    # the snapshot of step 4 (snapshots fall between rollout batches, as checkpoints do)
    assert [e["step"] for e in events if e["event"] in ("checkpoint_load", "snapshot_load")] == [4]
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(tmp_path / "kill" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_process_grpo(sft_run, tmp_path, strategy):
    """Two rollouts of two updates each in bfloat16, the reference reset to the policy after
    each rollout. Under FSDP the policy samples sharded, in lockstep, with dynamic sampling
    (each rank samples as many rounds as it needs, the other joining every forward), and the
    reference is reset shard by shard. (Evaluation on the sharded model: test_generate.py.)"""
    run = tmp_path / strategy
    sets = ["parallel.nproc=2", f"parallel.strategy={strategy}", "train.steps=4", "grpo.ref_reset_interval=2"]
    sets += ["grpo.iterations=2", "train.dtype=bfloat16"]
    if strategy == "fsdp":
        sets += ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=20"]
        sets += ["grpo.rewards={'rl_rewards:constant_on_plus' = 1.0}", PLUS_OR_MINUS]
    r = cli(run, sft_run, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_jsonl(run / "events.jsonl")
    start = next(e for e in events if e["event"] == "run_start")
    assert start["world_size"] == 2 and start["strategy"] == strategy
    assert [e["step"] for e in events if e["event"] == "reference_reset"] == [2, 4]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # 4 prompts x 4 completions, two prompts per rank: every completion counted once (DDP: one round)
    assert all(m["groups_short"] == 0 for m in metrics)
    assert strategy == "fsdp" or all(m["generated_tokens"] <= 16 * 12 for m in metrics)
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 for m in metrics)
    # each rollout's first update: the policy is the one that sampled (ratio 1) and the reference
    # (the start, then the policy reset after step 2, balancing biases included) equals it (KL 0)
    for m in metrics[0], metrics[2]:
        assert m["kl"] == 0.0 and m["ratio_dev"] == 0.0 and m["ratio_mean"] == 1.0, m
    assert metrics[1]["ratio_dev"] > 0 and metrics[1]["kl"] > 0  # the second update: the policy moved
    assert metrics[0]["policy_fingerprint"] != metrics[2]["policy_fingerprint"]
    assert all(-1e-6 < m["sampler_kl"] < 1e-2 for m in metrics)  # k3 >= 0, but for rounding
    if strategy == "fsdp":
        assert sum(m["groups_dropped"] for m in metrics) > 0


def test_grpo_in_bfloat16_starts_at_zero_kl_and_a_ratio_of_one(sft_run, tmp_path):
    """Old-policy and reference log-probs come from the update's own forward (autocast, the same
    micro-batches of the same minibatches, eval mode): at the first update the policy is both
    the sampler and the reference, so the KL is 0 and every ratio exactly 1, in bfloat16 too.
    Sampling and those passes count no expert loads; each rollout logs the fingerprint of the
    weights it sampled with and how far the sampler's log-probs are from the trainer's."""
    seen = {}

    def before_step(state):
        if state.step == 1:  # sampled and scored, no update yet: nothing counted
            seen["loads"] = unwrap(state.model).expert_loads().abs().sum().item()

    def after_backward(state):  # before the update: the weights are still those of the last one
        seen[state.step] = (state.figures["policy_fingerprint"], state.data.fingerprint())

    hooks = Hooks()
    hooks.add("before_step", before_step)
    hooks.add("after_backward", after_backward)
    sets = ["train.steps=4", "checkpoint.interval=0", "train.dtype=bfloat16", "grpo.beta=0.04"]
    sets += ["grpo.iterations=2", "grpo.minibatches=2", "train.micro_batch=2"]  # 16 rows: 2 x 8, in fours of 2
    grpo(tmp_path / "g", sft_run, *sets, hooks=hooks)
    metrics = read_jsonl(tmp_path / "g" / "metrics.jsonl")
    first = metrics[0]
    assert first["kl"] == 0.0 and first["ratio_mean"] == 1.0 and first["ratio_dev"] == 0.0
    assert all(m["ratio_dev"] > 0 and m["kl"] > 0 for m in metrics[1:])  # minibatch 1 comes after an update
    assert all(-1e-6 < m["sampler_kl"] < 1e-2 for m in metrics)  # k3 >= 0, but for rounding
    assert seen["loads"] == 0
    assert seen[1][0] == seen[1][1]  # the rollout sampled with the weights that step 1 starts from
    assert all(seen[s][0] == seen[1][0] != seen[s][1] for s in (2, 3, 4))  # one rollout, weights moving on


def test_grpo_preempted_mid_rollout_stops_at_the_rollout_boundary_and_resumes_bit_identical(sft_run, tmp_path):
    sets = ["train.steps=8", "grpo.iterations=2", "checkpoint.interval=4"]
    grpo(tmp_path / "ref", sft_run, *sets)
    hooks = Hooks()  # the signal arrives after step 5, inside the rollout batch of steps 5-6
    hooks.add("after_step", lambda state: state.step == 5 and os.kill(os.getpid(), signal.SIGUSR2))
    run = tmp_path / "preempted"
    state = grpo(run, sft_run, *sets, hooks=hooks)
    assert state.preempted and state.step == 6
    stop = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "preempted"]
    assert [e["step"] for e in stop] == [6] and stop[0]["signal"] == "SIGUSR2"
    assert not (run / "final").exists()  # no final export: the run is not over
    train(load_config(run / "config.toml"), run)  # what `anychip grpo --resume` does
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
