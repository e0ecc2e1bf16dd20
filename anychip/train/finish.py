"""The end of a run: the final model in Hugging Face format (``RUN_DIR/final``), its
held-out accuracy (``eval.json``) and the ``run_end`` event."""

from __future__ import annotations

import json

from rich.markup import escape

from ..config import EvalConfig
from ..eval import evaluate, reduce_result, shard
from ..models import DeepSeekV3, save_hf
from ..parallel import full_state_dict, unwrap
from .hooks import TrainState


def full_model(state: TrainState) -> DeepSeekV3:
    """A plain (unsharded) copy of the model on every rank, for evaluation."""
    model, world = state.model, state.world
    core = unwrap(model)
    if not world.distributed:
        return core
    plain = DeepSeekV3(core.args).to(state.device.torch_device(world.local_rank))
    plain.load_state_dict(full_state_dict(model, world))
    plain.materialize_counters()
    return plain


def finish(state: TrainState, e: EvalConfig, heldout, train_time: float) -> None:
    """Save the final model and score it on ``e.n`` problems of the ``heldout`` task source
    (none: no evaluation), each rank a share; then the run_end event."""
    world, log = state.world, state.log
    # streamed from the model as it is: sharded, every rank takes part in each tensor's gather
    # and the main rank writes; whole (one process, DDP), only the main rank has work to do
    save_hf(unwrap(state.model), state.run_dir / "final", overwrite=True, writer=world.is_main)
    result = None
    if heldout is not None and e.n:
        examples = shard([heldout.example(i) for i in range(min(e.n, len(heldout)))], world.rank, world.world_size)
        final = full_model(state)
        result = reduce_result(evaluate(final, state.tokenizer, examples, e.max_new_tokens, e.batch_size), world)
        state.eval = result
        log.print(
            f"held-out accuracy: {result.accuracy:.1%} ({result.correct:g}/{result.n}; exactly right: "
            f"{result.exact_accuracy:.1%}) on {escape(str(heldout.names))}"
        )
        for s in result.samples[:3]:
            line = f"  {s['prompt'].strip()!r} -> {s['output']!r} (answer {s['answer']}, score {s['score']:g})"
            log.print(escape(line))
        if world.is_main:
            report = {
                "accuracy": result.accuracy,
                "exact_accuracy": result.exact_accuracy,
                "correct": result.correct,
                "n": result.n,
                "tasks": heldout.names,
                "samples": result.samples,
            }
            (state.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    log.event(
        "run_end",
        status="ok",
        steps=state.step,
        train_time_s=train_time,
        final_loss=state.metrics.get("loss"),
        accuracy=result.accuracy if result else None,
    )
