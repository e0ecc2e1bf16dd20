"""The end of a run: the final model in Hugging Face format (``RUN_DIR/final``), its
held-out accuracy (``eval.json``) and the ``run_end`` event."""

from __future__ import annotations

import json

from rich.markup import escape

from ..config import EvalConfig
from ..eval import evaluate, reduce_result, shard
from ..generate import sharded
from ..models import save_hf
from ..parallel import unwrap
from ..runfiles import write_file
from .hooks import TrainState


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
        # the model itself: sharded (FSDP2), the ranks decode in lockstep; a DDP replica is whole
        model = unwrap(state.model)
        lockstep = world if sharded(model) else None
        result = evaluate(model, state.tokenizer, examples, e.max_new_tokens, e.batch_size, lockstep=lockstep)
        result = reduce_result(result, world)
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
            write_file(state.run_dir, "eval.json", json.dumps(report, indent=2))  # following no link
    log.event(
        "run_end",
        status="ok",
        steps=state.step,
        train_time_s=train_time,
        final_loss=state.metrics.get("loss"),
        accuracy=result.accuracy if result else None,
    )
