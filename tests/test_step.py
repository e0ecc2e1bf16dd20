"""The micro-batch driver (anychip.train.step) with its objectives: micro-batches add up to
one big batch, a new objective needs only the Objective interface, and the recompute audit
runs the step's own objective."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_args, make_model

from anychip.config import GuardsConfig
from anychip.device import get_device
from anychip.guards.base import Action, StepView
from anychip.guards.sdc import RecomputeAudit
from anychip.parallel import World
from anychip.train.lm import NextTokenLoss
from anychip.train.step import Objective, Part, Work, forward_backward

CPU = get_device("cpu")


def batch(args, rows=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (rows, length), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, :3] = -100  # a prompt
    labels[1, 5:] = -100  # rows with fewer label tokens than others
    return {"input_ids": ids, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class SequenceMeanLoss(Objective):
    """A third objective, written as a newcomer would: each sequence's mean token loss,
    averaged over the sequences of the global batch (not over its tokens)."""

    def counts(self, batch):
        return {"sequences": float(batch["input_ids"].shape[0])}

    def __call__(self, forward, micro, counts):
        logits = forward(micro["input_ids"])
        labels = micro["labels"]
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        per_sequence = per_token.view(labels.shape).sum(1) / (labels != -100).sum(1).clamp(min=1)
        loss = per_sequence.sum() / counts["sequences"]
        return Part(loss, {"loss": per_sequence.sum().item()})

    def figures(self, sums, counts, batch):
        return {"loss": sums["loss"] / counts["sequences"]}

    def work(self, batch, counts):
        return Work(batch["input_ids"].numel(), 0.0)


def test_micro_batches_add_up_to_one_big_batch_for_the_next_token_loss():
    args = make_args(num_nextn_predict_layers=1, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    data = batch(args)
    results = []
    for micro in (4, 1):
        model = make_model(args)
        objective = NextTokenLoss(args, len(model.mtp), seq_len=12, global_batch=4)
        result = forward_backward(model, data, objective, micro, None, CPU, World())
        results.append((result, grads(model)))
    (whole, g_whole), (split, g_split) = results
    assert whole.figures.keys() == split.figures.keys() >= {"loss", "lm_loss", "mtp_loss", "balance_loss", "tokens"}
    for key, value in whole.figures.items():
        assert split.figures[key] == pytest.approx(value, rel=1e-5), key
    assert whole.figures["tokens"] == int((data["labels"] != -100).sum())
    assert whole.work.tokens == 4 * 12 and whole.work.flops > 0
    for name, g in g_whole.items():
        torch.testing.assert_close(g_split[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_new_objective_plugs_into_the_driver_and_equals_its_loss_on_the_whole_batch():
    args = make_args()
    data = batch(args)
    model = make_model(args)
    result = forward_backward(model, data, SequenceMeanLoss(), 1, None, CPU, World())  # one row per pass
    reference = make_model(args)
    logits = reference(data["input_ids"])
    per_token = F.cross_entropy(logits.flatten(0, 1), data["labels"].flatten(), ignore_index=-100, reduction="none")
    per_token = per_token.view(data["labels"].shape)
    expected = (per_token.sum(1) / (data["labels"] != -100).sum(1)).mean()
    expected.backward()
    assert result.figures["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result.work.tokens == data["input_ids"].numel()
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_recompute_audit_runs_the_steps_objective_and_catches_flaky_compute():
    args = make_args()
    data = batch(args)
    model = make_model(args)
    calls = []

    class Counted(SequenceMeanLoss):
        def __call__(self, forward, micro, counts):
            calls.append(micro["input_ids"].shape[0])
            return super().__call__(forward, micro, counts)

    audit = RecomputeAudit(GuardsConfig(audit_interval=2, audit_rows=2), model, CPU, None, Counted(), rank=0)
    view = StepView(2, {"loss": 1.0}, 1.0, data)
    passed = audit.judge(view)  # deterministic: bit-equal twice
    assert passed.action == Action.GO and passed.metrics == {"audit_max_rel_diff": 0.0}
    assert calls == [2, 2]  # the step's objective, on audit_rows rows, twice
    assert audit.judge(StepView(3, {"loss": 1.0}, 1.0, data)) is None and calls == [2, 2]  # not an audit step
    noise = torch.Generator().manual_seed(0)
    hook = model.layers[1].register_forward_hook(lambda m, a, out: out + 1e-3 * torch.randn(out.shape, generator=noise))
    verdict = audit.judge(view)
    hook.remove()
    assert verdict is not None and verdict.event == "audit_mismatch" and verdict.guard == "audit"
